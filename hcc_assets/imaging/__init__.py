"""Imaging: DICOM series inventory and the T2 choice, DICOM -> NIfTI, geometry, preprocessing,
reference masks, previews.

Rule: arrays, DICOM and NIfTI in, results out. Never imports dagster, the feature store, the lake,
intake or synthetic (import-linter's layers contract in pyproject.toml).
"""
