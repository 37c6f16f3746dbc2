"""Imaging: DICOM series inventory and the T2 choice, DICOM -> NIfTI, preprocessing, reference masks,
previews; also the synthetic cohort, the drop zone, pseudonyms and the CHAOS / TCGA-LIHC importers.

Rule: arrays, DICOM and NIfTI in, results out. Never imports dagster, the feature store or the lake
(import-linter's layers contract in pyproject.toml).
"""
