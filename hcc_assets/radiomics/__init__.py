"""Handcrafted radiomics: pyradiomics on an image and its liver mask, with a shipped parameter file.

from hcc_assets import radiomics
features = radiomics.extract(nib.load("nifti_volume.nii.gz"), nib.load("liver_mask.nii.gz"))
radiomics.feature_set_version()   # 'pyradiomics-3.1.0-<params sha256[:12]>'

Rule: a volume and its mask in, features out; never imports dagster, the feature store or the lake.
"""

from .conversion import standard_axial_order, to_sitk
from .extraction import (
    FEATURE_COUNTS,
    MIN_ROI_VOXELS,
    PARAMS_PATH,
    STUDY_FEATURE_CLASSES,
    RadiomicsError,
    extract,
    feature_set_version,
    study_features,
)

__all__ = [
    "FEATURE_COUNTS",
    "MIN_ROI_VOXELS",
    "PARAMS_PATH",
    "STUDY_FEATURE_CLASSES",
    "RadiomicsError",
    "extract",
    "feature_set_version",
    "standard_axial_order",
    "study_features",
    "to_sitk",
]
