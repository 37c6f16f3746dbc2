import math
import re
from collections import Counter

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from hcc_assets import radiomics
from hcc_assets_tests.radiomics.conftest import textured_liver


@pytest.fixture(scope="module")
def features(liver_volume):
    return radiomics.extract(*liver_volume)


def test_features_are_finite_and_named_by_class(features):
    assert all(re.fullmatch(r"original_[a-z]+_\w+", name) for name in features)
    assert not [name for name in features if name.startswith("diagnostics_")]
    assert all(isinstance(value, float) and math.isfinite(value) for value in features.values())


def test_counts_per_class_are_as_documented(features):
    counts = Counter(name.split("_")[1] for name in features)
    assert counts == radiomics.FEATURE_COUNTS
    assert sum(counts.values()) == 107
    study = radiomics.study_features(features)
    assert Counter(name.split("_")[1] for name in study) == {"shape": 14, "firstorder": 18, "glcm": 24, "glrlm": 16}


def test_extraction_is_deterministic(liver_volume, features):
    assert radiomics.extract(*liver_volume) == features


def test_pyradiomics_runs_itk_single_threaded_and_the_setting_is_restored(liver_volume, monkeypatch):
    """ITK's multi-threaded normalisation added its threads' partial sums in the order they ended,
    so on a busy machine a demo patient's features differed in their last bits between runs."""
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    seen = []
    execute = RadiomicsFeatureExtractor.execute

    def recording(self, *args, **kwargs):
        seen.append(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())
        return execute(self, *args, **kwargs)

    monkeypatch.setattr(RadiomicsFeatureExtractor, "execute", recording)
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
    try:
        radiomics.extract(*liver_volume)
        assert seen == [1]
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 2
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def test_shape_features_see_the_true_voxel_size(features):
    voxel_mm3 = 4.0 * 4.0 * 8.0
    mask_voxels = np.count_nonzero(textured_liver()[1].dataobj)
    assert features["original_shape_VoxelVolume"] == pytest.approx(mask_voxels * voxel_mm3)


def test_conversion_matches_itks_own_nifti_reader(tmp_path):
    # LPS-stored, oblique, anisotropic: every part of the RAS->LPS geometry has to be right.
    angle = np.deg2rad(12)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-3.0, -2.5, 7.0])
    affine[:3, 3] = [120.0, 90.0, -30.0]
    image, mask = textured_liver(affine=affine)
    nib.save(image, tmp_path / "image.nii.gz")
    nib.save(mask, tmp_path / "mask.nii.gz")
    reference = sitk.ReadImage(str(tmp_path / "image.nii.gz"))
    converted = radiomics.to_sitk(image)
    assert converted.GetPixelID() == sitk.sitkFloat32  # no float64 volume
    assert converted.GetSize() == reference.GetSize()
    np.testing.assert_allclose(converted.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(converted.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(converted.GetDirection(), reference.GetDirection(), atol=1e-5)
    assert np.array_equal(sitk.GetArrayViewFromImage(converted), sitk.GetArrayViewFromImage(reference))

    from_nibabel = radiomics.extract(image, mask)
    from_itk = radiomics.extract(reference, sitk.ReadImage(str(tmp_path / "mask.nii.gz")))
    assert from_nibabel.keys() == from_itk.keys()
    for name in from_nibabel:
        assert from_nibabel[name] == pytest.approx(from_itk[name], rel=1e-5, abs=1e-8), name


def test_params_file_changes_the_feature_set_version(tmp_path):
    version = radiomics.feature_set_version()
    assert re.fullmatch(r"pyradiomics-3\.1\.0-[0-9a-f]{12}", version)
    changed = tmp_path / "params.yaml"
    changed.write_text(radiomics.PARAMS_PATH.read_text().replace("binCount: 32", "binCount: 16"))
    assert radiomics.feature_set_version(changed) not in (version, None)


def _with_mask(liver_volume, labels):
    image, mask = liver_volume
    return image, nib.Nifti1Image(labels.astype(np.uint8), mask.affine)


@pytest.mark.parametrize(
    "case, reason",
    [
        ("empty", "mask is empty"),
        ("one voxel", r"mask has 1 voxel\(s\) of label 1; at least 64 needed"),
        ("other label only", r"label 1 is not in the mask \(labels present: \[0, 2\]\)"),
        ("NaN image", "image has 1 non-finite voxels"),
        ("shape", r"mask shape \(40, 40, 11\) differs from image shape \(40, 40, 12\)"),
        ("grid", "not on the image's grid"),
    ],
)
def test_unusable_inputs_raise_with_a_reason(liver_volume, case, reason):
    image, mask = liver_volume
    labels = np.asarray(mask.dataobj).copy()
    if case == "empty":
        image, mask = _with_mask(liver_volume, np.zeros_like(labels))
    elif case == "one voxel":
        single = np.zeros_like(labels)
        single[20, 20, 6] = 1
        image, mask = _with_mask(liver_volume, single)
    elif case == "other label only":
        image, mask = _with_mask(liver_volume, labels * 2)
    elif case == "NaN image":
        data = np.asarray(image.dataobj).copy()
        data[0, 0, 0] = np.nan
        image = nib.Nifti1Image(data, image.affine)
    elif case == "shape":
        mask = nib.Nifti1Image(labels[:, :, :11], mask.affine)
    elif case == "grid":
        moved = mask.affine.copy()
        moved[0, 3] += 2.0
        mask = nib.Nifti1Image(labels, moved)
    with pytest.raises(radiomics.RadiomicsError, match=reason) as raised:
        radiomics.extract(image, mask)
    assert raised.value.reason == str(raised.value)


def test_pyradiomics_failures_become_radiomics_errors(liver_volume):
    image, mask = liver_volume
    flat = nib.Nifti1Image(np.full(image.shape, 7.0, np.float32), image.affine)  # sd 0: normalizing gives NaN
    with pytest.raises(radiomics.RadiomicsError, match="pyradiomics failed: ValueError"):
        radiomics.extract(flat, mask)


def test_mixed_image_types_are_refused(liver_volume):
    image, mask = liver_volume
    with pytest.raises(TypeError):
        radiomics.extract(radiomics.to_sitk(image), mask)


# The same anatomy in other voxel orders, each with the affine that goes with it (nibabel
# orientation transforms: one row per axis, new axis and flip).
OTHER_VOXEL_ORDERS = {
    "transposed (readout and phase swapped)": [[1, 1], [0, 1], [2, 1]],
    "columns mirrored (feet-first)": [[0, -1], [1, 1], [2, 1]],
    "rotated 180 degrees (prone)": [[0, -1], [1, -1], [2, 1]],
    "slices descending": [[0, 1], [1, 1], [2, -1]],
    "transposed and mirrored": [[1, -1], [0, 1], [2, -1]],
}


@pytest.mark.parametrize("order", OTHER_VOXEL_ORDERS)
def test_the_same_anatomy_in_another_voxel_order_gives_the_same_features(order):
    """pyradiomics measures Maximum2DDiameterRow/Column in index planes and triangulates the mesh in
    voxel order; the extraction reads every volume in one standard order first."""
    affine = np.diag([-3.0, -4.0, 8.0, 1.0])  # as an axial DICOM series is stored: LPS, slices ascending
    image, ellipsoid = textured_liver(shape=(44, 36, 12), affine=affine)
    lobe = np.asarray(ellipsoid.dataobj).copy()
    lobe[30:40, 4:14, 1:5] = 1  # no symmetry: every reordering moves the mask
    mask = nib.Nifti1Image(lobe, affine)
    ornt = np.array(OTHER_VOXEL_ORDERS[order])
    stored_image, stored_mask = image.as_reoriented(ornt), mask.as_reoriented(ornt)
    assert not np.array_equal(np.asarray(stored_mask.dataobj), np.asarray(mask.dataobj))

    standard, stored = radiomics.extract(image, mask), radiomics.extract(stored_image, stored_mask)

    assert stored.keys() == standard.keys()
    for name in standard:
        assert stored[name] == pytest.approx(standard[name], rel=1e-9, abs=1e-12), name
    if order.startswith("transposed"):  # pyradiomics on the stored voxels: the two diameters swap
        as_stored = radiomics.extract(radiomics.to_sitk(stored_image), radiomics.to_sitk(stored_mask, dtype=np.uint8))
        assert as_stored["original_shape_Maximum2DDiameterRow"] == pytest.approx(
            standard["original_shape_Maximum2DDiameterColumn"]
        )
        assert as_stored["original_shape_Maximum2DDiameterRow"] != pytest.approx(
            standard["original_shape_Maximum2DDiameterRow"]
        )


def test_the_standard_order_keeps_the_slice_axis_of_any_plane():
    """force2D texture stays in the acquired planes: the slice axis stays last, also for a coronal
    and a sagittal series; an axial series stored the standard way is left as it is."""
    axial = np.diag([-1.5, -1.5, 5.0, 1.0])
    coronal = np.array([[-1.5, 0, 0, 0], [0, 0, 5.0, 0], [0, -1.5, 0, 0], [0, 0, 0, 1]])  # rows L, columns I, slices A
    sagittal = np.array([[0, 0, 5.0, 0], [1.5, 0, 0, 0], [0, -1.5, 0, 0], [0, 0, 0, 1]])  # rows P, columns I, slices R
    assert radiomics.standard_axial_order(axial).tolist() == [[0, 1], [1, 1], [2, 1]]
    for affine in (coronal, sagittal):
        assert radiomics.standard_axial_order(affine)[2, 0] == 2
    assert radiomics.standard_axial_order(coronal).tolist() == [[0, 1], [1, -1], [2, -1]]
