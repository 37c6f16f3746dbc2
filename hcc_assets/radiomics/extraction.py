"""Handcrafted radiomic features of one ROI with pyradiomics and the shipped parameter file."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from .conversion import in_standard_axial_order, to_sitk, voxels

PARAMS_PATH = Path(__file__).with_name("params.yaml")
# Features per class with PARAMS_PATH (pyradiomics 3.1.0 default-enabled features).
FEATURE_COUNTS = {"shape": 14, "firstorder": 18, "glcm": 24, "glrlm": 16, "glszm": 16, "gldm": 14, "ngtdm": 5}
# The study's 14 shape + 18 first-order + 40 second-order (glcm 24 + glrlm 16) = 72.
STUDY_FEATURE_CLASSES = ("shape", "firstorder", "glcm", "glrlm")
MIN_ROI_VOXELS = 64  # below this (a 4x4x4 cube) texture matrices are mostly empty: no meaningful features
_AFFINE_TOLERANCE_MM = 1e-3


class RadiomicsError(Exception):
    """Features cannot be extracted for this image/mask; `reason` goes to the exclusions table."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def feature_set_version(params_path: Path | str | None = None) -> str:
    """`pyradiomics-<version>-<first 12 hex of sha256(params file)>`: changes with either."""
    import radiomics

    return f"pyradiomics-{radiomics.__version__.lstrip('v')}-{_params_sha256(_params(params_path))[:12]}"


def extract(
    image: nib.spatialimages.SpatialImage | sitk.Image,
    mask: nib.spatialimages.SpatialImage | sitk.Image,
    label: int = 1,
    params_path: Path | str | None = None,
    min_voxels: int = MIN_ROI_VOXELS,
) -> dict[str, float]:
    """`original_<class>_<feature>` -> value for the ROI `mask == label` of `image`.

    Takes nibabel or SimpleITK images (the mask on the image's grid); nibabel images are read in
    the voxel order of a standard axial series (conversion.standard_axial_order). Raises
    RadiomicsError with a reason for an unusable input: grid mismatch, missing label, too few
    voxels, non-finite intensities, a pyradiomics failure, or non-finite features.
    """
    params = _params(params_path)
    if isinstance(image, sitk.Image) and isinstance(mask, sitk.Image):  # pyradiomics checks their geometry
        sitk_image, sitk_mask = image, mask
        image_array, mask_array = sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(mask)
    elif not isinstance(image, sitk.Image) and not isinstance(mask, sitk.Image):
        image_array, mask_array = voxels(image, np.float32), voxels(mask, np.uint8)
        _check_same_grid(image, mask, image_array.shape, mask_array.shape)
        # the same anatomy gives the same features however its acquisition stored the voxels
        grid, (image_array, mask_array) = in_standard_axial_order(image, image_array, mask_array)
        sitk_image, sitk_mask = to_sitk(grid, image_array), to_sitk(grid, mask_array)
        sitk_mask.CopyInformation(sitk_image)  # one grid (checked above): no float noise for pyradiomics
    else:
        raise TypeError("image and mask must both be nibabel or both be SimpleITK images")
    _check_inputs(image_array, mask_array, label, min_voxels)

    try:
        with itk_single_threaded():
            result = _extractor(str(params), _params_sha256(params)).execute(sitk_image, sitk_mask, label=label)
    except Exception as error:  # pyradiomics raises ValueError, RuntimeError, and ITK's errors
        raise RadiomicsError(f"pyradiomics failed: {type(error).__name__}: {error}") from error
    features = {name: float(value) for name, value in result.items() if not name.startswith("diagnostics_")}
    bad = sorted(name for name, value in features.items() if not math.isfinite(value))
    if bad:
        raise RadiomicsError(f"{len(bad)} non-finite features: {', '.join(bad[:5])}")
    return features


@contextlib.contextmanager
def itk_single_threaded() -> Iterator[None]:
    """ITK filters created meanwhile use one thread. Its multi-threaded filters add up partial
    results in the order their threads finish: pyradiomics' normalisation (a mean and SD over the
    whole image) then differed in its last bits between runs on a busy machine, and so did the
    features built on it (one demo patient: two results among 15 extractions in each of 3
    processes sharing 2 cores; with one thread, one). The platform's workers have a core each anyway."""
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def study_features(features: dict[str, float]) -> dict[str, float]:
    """The study's 72 (shape, first-order, GLCM, GLRLM) out of everything `extract` returns."""
    prefixes = tuple(f"original_{name}_" for name in STUDY_FEATURE_CLASSES)
    return {name: value for name, value in features.items() if name.startswith(prefixes)}


def _params(params_path: Path | str | None) -> Path:
    return Path(params_path) if params_path is not None else PARAMS_PATH


def _params_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.lru_cache(maxsize=8)
def _extractor(path: str, sha256: str):
    """One extractor per parameter file content; `execute` copies its settings, so reuse is safe."""
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    return RadiomicsFeatureExtractor(path)


def _check_same_grid(image, mask, image_shape, mask_shape) -> None:
    if image_shape != mask_shape:
        raise RadiomicsError(f"mask shape {mask_shape} differs from image shape {image_shape}")
    if not np.allclose(image.affine, mask.affine, atol=_AFFINE_TOLERANCE_MM):
        raise RadiomicsError("mask is not on the image's grid (affines differ)")


def _check_inputs(image: np.ndarray, mask: np.ndarray, label: int, min_voxels: int) -> None:
    if image.shape != mask.shape:
        raise RadiomicsError(f"mask shape {mask.shape} differs from image shape {image.shape}")
    count = int(np.count_nonzero(mask == label))
    if count == 0:
        present = np.unique(mask).tolist()
        raise RadiomicsError(
            "mask is empty" if present == [0] else f"label {label} is not in the mask (labels present: {present})"
        )
    if count < min_voxels:
        raise RadiomicsError(f"mask has {count} voxel(s) of label {label}; at least {min_voxels} needed")
    # One pass, no temporary: the sum is finite exactly when every voxel is (float64 accumulator).
    if not math.isfinite(float(image.sum(dtype=np.float64))):
        raise RadiomicsError(f"image has {int(np.count_nonzero(~np.isfinite(image)))} non-finite voxels (NaN/inf)")
