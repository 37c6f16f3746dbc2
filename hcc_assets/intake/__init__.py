"""Intake: how studies arrive. The drop zone (complete folders, labels manifests), pseudonyms, the
DICOM C-STORE receiver, and the importers that turn a source's download layout into drop folders
(CHAOS, TCGA-LIHC / NBIA).

Rule: may use imaging and core, never dagster, the feature store or the lake. The receiver runs on
a gateway machine with only pydicom and pynetdicom: `hcc_assets.intake.receiver` imports nothing
else of hcc_assets but `core.files`, and this `__init__` imports nothing (import-linter checks both).
"""
