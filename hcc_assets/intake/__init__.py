"""Intake: how studies arrive. The drop zone (complete folders, labels manifests), pseudonyms, the
DICOM C-STORE receiver, and one adapter per public source (`sources/chaos.py`,
`sources/tcga_lihc.py`) that turns its download layout into drop folders.

Rule: may use imaging and core, never dagster, the feature store or the lake. The receiver runs on
a gateway machine with only pydicom and pynetdicom: `hcc_assets.intake.receiver` imports nothing
else of hcc_assets but `core.files`, and this `__init__` imports nothing (import-linter checks both).
"""
