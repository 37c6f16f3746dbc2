"""The synthetic cohort with known truth: a liver/spleen/lesion phantom, its MR acquisition, the DICOM
it writes (drop-zone, CHAOS or TCIA layout) and the reference masks and labels.

Rule: may use intake (to merge labels into a drop zone), imaging and core; never dagster, the
feature store or the lake. The embedded default data of the project and of its tests.
"""
