"""Model-grid preprocessing, mask resampling and previews."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydantic
import pytest

from hcc_assets.imaging import geometry
from hcc_assets.imaging.nifti import make_nifti
from hcc_assets.imaging.preprocess import (
    PreprocessConfig,
    preprocess_volume,
    resample_mask_like,
    resize_affine,
    resize_volume,
)
from hcc_assets.imaging.preview import mid_slice_png, radiological_axial_slice
from hcc_assets_tests.imaging.test_dicom_series import oblique_orientation

SMALL = PreprocessConfig(target_shape=(24, 20, 10))


def world_of(affine: np.ndarray, shape) -> np.ndarray:
    """World (RAS mm) coordinates of every voxel centre, shape (*shape, 3)."""
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def centre_of(image: nib.Nifti1Image) -> np.ndarray:
    return image.affine[:3, :3] @ ((np.asarray(image.shape[:3]) - 1) / 2) + image.affine[:3, 3]


def body_phantom(orientation, shape=(40, 36, 14), spacing=(1.5, 1.25, 5.0)) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """A DICOM-like (LPS-ordered) volume: bright ellipsoid body in dark air, a box 'liver' mask."""
    affine = geometry.affine_ras(orientation, (-30.0, -25.0, -30.0), (spacing[1], spacing[0]), spacing[2])
    world = world_of(affine, shape)
    centre = world.reshape(-1, 3).mean(axis=0)
    relative = (world - centre) / np.array([25.0, 20.0, 30.0])
    body = (relative**2).sum(-1) < 1
    rng = np.random.default_rng(0)
    data = np.where(body, 400.0 + 50 * relative[..., 0], 0.0) + rng.normal(0, 5, shape)
    liver = body & (relative[..., 0] > 0.2)  # patient's right: RAS x grows toward the right
    labels = body.astype(np.uint8) + liver  # 1 body, 2 'liver'
    return make_nifti(np.abs(data).astype(np.float32), affine), make_nifti(labels, affine)


@pytest.mark.parametrize("orientation", [(1, 0, 0, 0, 1, 0), oblique_orientation(12, 8)], ids=["axial", "oblique"])
def test_preprocess_grid_orientation_and_centre(orientation):
    image, _ = body_phantom(orientation)
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")  # DICOM row/column order
    result = preprocess_volume(image, SMALL)
    assert result.shape == (24, 20, 10) and result.get_data_dtype() == np.float32
    assert nib.aff2axcodes(result.affine) == ("R", "A", "S")
    np.testing.assert_allclose(centre_of(result), centre_of(image), atol=1e-4)  # float32 sform
    # the whole FOV is kept: the new grid spans the same extent along each axis
    canonical = nib.as_closest_canonical(image)
    extent = np.asarray(canonical.header.get_zooms()[:3]) * canonical.shape
    np.testing.assert_allclose(np.asarray(result.header.get_zooms()[:3]) * result.shape, extent, rtol=1e-6)
    assert int(result.header["sform_code"]) == 1 and result.header["descrip"].item() == b""


def test_default_shape_is_the_study_grid():
    assert PreprocessConfig().target_shape == (128, 128, 64)


def test_zscore_over_body_and_percentile_range():
    image, labels = body_phantom((1, 0, 0, 0, 1, 0))
    result = preprocess_volume(image, SMALL)
    data = np.asarray(result.dataobj)
    body = np.asarray(resample_mask_like(labels, result).dataobj) > 0
    # statistics come from every voxel above the body threshold, partial-volume edges included
    assert abs(data[body].mean()) < 0.5 and 0.3 < data[body].std() < 1.5
    assert data[~body].mean() < -2  # air lies far below the body mean
    scaled = np.asarray(preprocess_volume(image, SMALL.model_copy(update={"intensity": "percentile"})).dataobj)
    assert scaled.min() == pytest.approx(0.0, abs=1e-6) and scaled.max() == pytest.approx(1.0, abs=1e-6)


def test_resize_keeps_world_positions():
    # a field linear in world coordinates must stay the same function of world position
    affine = geometry.affine_ras(oblique_orientation(), (5.0, 7.0, -20.0), (1.2, 0.9), 4.0)
    shape, target = (30, 26, 12), (20, 16, 9)
    field = (world_of(affine, shape) @ np.array([0.3, -0.2, 0.5])).astype(np.float32)
    resized = resize_volume(field, target, order=1)
    new_affine = resize_affine(affine, shape, target)
    expected = world_of(new_affine, target) @ np.array([0.3, -0.2, 0.5])
    interior = (slice(2, -2),) * 3  # edges are clamped ('nearest'), the inside is exact
    np.testing.assert_allclose(resized[interior], expected[interior], atol=1e-3)


def test_mask_resampled_onto_the_preprocessed_grid():
    image, mask = body_phantom(oblique_orientation(10, 5))
    result = preprocess_volume(image, SMALL)
    resampled = resample_mask_like(mask, result)
    assert resampled.shape == result.shape and np.allclose(resampled.affine, result.affine)
    labels = np.asarray(resampled.dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1, 2}

    def centroid(img):
        return world_of(img.affine, img.shape)[np.asarray(img.dataobj) == 2].mean(axis=0)

    np.testing.assert_allclose(centroid(resampled), centroid(mask), atol=3.0)  # within a coarse voxel

    def volume_ml(img):
        return (np.asarray(img.dataobj) == 2).sum() * np.prod(img.header.get_zooms()[:3]) / 1000

    assert volume_ml(resampled) == pytest.approx(volume_ml(mask), rel=0.15)


def test_preview_is_radiological_png():
    image, mask = body_phantom((1, 0, 0, 0, 1, 0))
    plane = radiological_axial_slice(mask)
    columns = np.nonzero((plane == 2).any(axis=0))[0]
    # the 'liver' sits on the patient's right, which the viewer sees on the left
    assert columns.mean() < plane.shape[1] / 2
    png = mid_slice_png(image, mask, title="pt-0123456789ab T2")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert mid_slice_png(preprocess_volume(image, SMALL)).startswith(b"\x89PNG")
    # a mask on another grid is resampled onto the image first
    assert mid_slice_png(preprocess_volume(image, SMALL), mask).startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "bad",
    [
        {"target_shape": (0, 10, 10)},
        {"clip_percentiles": (99.0, 1.0)},
        {"intensity": "minmax"},
        {"interpolation_order": 7},
        {"unknown": 1},
    ],
)
def test_config_rejects_nonsense(bad):
    with pytest.raises(pydantic.ValidationError):
        PreprocessConfig(**bad)
