"""Model-grid preprocessing: RAS orientation, whole-FOV resize, intensity normalization.

The resize maps voxel edges to voxel edges (scipy's grid_mode): the field of view and its centre
stay where they are in the world, and the affine is updated to say so.
"""

from __future__ import annotations

from typing import Literal

import nibabel as nib
import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from scipy import ndimage

from hcc_assets.imaging.nifti import make_nifti

BODY_THRESHOLD = 0.1  # of the clipped intensity range: MR background (air) lies below it
MIN_BODY_FRACTION = 0.01


class PreprocessConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target_shape: tuple[int, int, int] = (128, 128, 64)
    intensity: Literal["zscore", "percentile"] = "zscore"
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    interpolation_order: int = 1

    @field_validator("target_shape")
    @classmethod
    def _positive_shape(cls, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(shape) < 1:
            raise ValueError("target_shape entries must be >= 1")
        return shape

    @field_validator("interpolation_order")
    @classmethod
    def _spline_order(cls, order: int) -> int:
        if not 0 <= order <= 5:
            raise ValueError("interpolation_order must be 0..5")
        return order

    @model_validator(mode="after")
    def _ordered_percentiles(self) -> PreprocessConfig:
        low, high = self.clip_percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ValueError("clip_percentiles must satisfy 0 <= low < high <= 100")
        return self


def resize_affine(affine: np.ndarray, old_shape, new_shape) -> np.ndarray:
    """The affine after an edge-to-edge resize of the whole FOV from `old_shape` to `new_shape`.

    New voxel i' centre sits at old continuous index (i' + 0.5) * step - 0.5.
    """
    step = np.asarray(old_shape[:3], dtype=float) / np.asarray(new_shape[:3], dtype=float)
    new_to_old = np.eye(4)
    new_to_old[:3, :3] = np.diag(step)
    new_to_old[:3, 3] = (step - 1.0) / 2.0
    return np.asarray(affine, dtype=float) @ new_to_old


def resize_volume(data: np.ndarray, target_shape, order: int) -> np.ndarray:
    """float32 resize of the whole FOV; smoothed first when shrinking so it does not alias."""
    step = np.asarray(data.shape[:3], dtype=float) / np.asarray(target_shape, dtype=float)
    data = np.asarray(data, dtype=np.float32)
    if order > 0 and (step > 1.0).any():
        data = ndimage.gaussian_filter(data, sigma=np.maximum(0.0, (step - 1.0) / 2.0), mode="nearest")
    return ndimage.affine_transform(
        data,
        step,
        offset=(step - 1.0) / 2.0,
        output_shape=tuple(int(s) for s in target_shape),
        order=order,
        mode="nearest",
        output=np.float32,
    )


def normalize_intensity(data: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Clip to the configured percentiles, then z-score over the body or scale to [0, 1]."""
    data = np.nan_to_num(np.asarray(data, dtype=np.float32), copy=False)
    low, high = (float(v) for v in np.percentile(data, config.clip_percentiles))
    np.clip(data, low, high, out=data)
    if config.intensity == "percentile":
        span = high - low
        if span <= 0:
            return np.zeros_like(data)
        data -= np.float32(low)
        data /= np.float32(span)
        return data
    body = data > low + BODY_THRESHOLD * (high - low)
    sample = data[body] if body.mean() >= MIN_BODY_FRACTION else data.ravel()
    mean, std = float(sample.mean(dtype=np.float64)), float(sample.std(dtype=np.float64))
    data -= np.float32(mean)
    data /= np.float32(std if std > 0 else 1.0)
    return data


def preprocess_volume(image: nib.Nifti1Image, config: PreprocessConfig) -> nib.Nifti1Image:
    """RAS orientation, whole FOV resized to `config.target_shape`, normalized intensities."""
    canonical = nib.as_closest_canonical(image)
    data = np.asarray(canonical.dataobj, dtype=np.float32)
    if data.ndim != 3:
        data = data.reshape(data.shape[:3])  # a trailing singleton axis; more would be 4D input
    resized = resize_volume(data, config.target_shape, config.interpolation_order)
    del data
    affine = resize_affine(canonical.affine, canonical.shape, config.target_shape)
    return make_nifti(normalize_intensity(resized, config), affine)


def resample_mask_like(mask: nib.Nifti1Image, reference: nib.Nifti1Image) -> nib.Nifti1Image:
    """The mask on `reference`'s voxel grid, nearest neighbour (labels stay labels), uint8."""
    reference_to_mask = np.linalg.inv(mask.affine) @ reference.affine
    labels = np.asarray(mask.dataobj).astype(np.uint8)
    if labels.ndim != 3:
        labels = labels.reshape(labels.shape[:3])
    resampled = ndimage.affine_transform(
        labels,
        reference_to_mask[:3, :3],
        offset=reference_to_mask[:3, 3],
        output_shape=reference.shape[:3],
        order=0,
        mode="constant",
        cval=0,
        output=np.uint8,
    )
    return make_nifti(resampled, reference.affine)
