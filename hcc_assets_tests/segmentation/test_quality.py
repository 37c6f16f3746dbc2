import struct
import zlib

import nibabel as nib
import numpy as np
import pytest

from hcc_assets.segmentation import MaskQualityConfig, keep_largest_components, mask_quality, overlay_png
from hcc_assets_tests.segmentation.synthetic import synthetic_case

VOXEL = (2.0, 2.0, 5.0)  # 20 mm^3 = 0.02 mL


def labels_image(data, affine=None):
    return nib.Nifti1Image(data.astype(np.uint8), np.diag([*VOXEL, 1.0]) if affine is None else affine)


def test_volume_components_and_plausibility():
    data = np.zeros((100, 100, 20), np.uint8)
    data[10:60, 10:60, 2:12] = 1  # 25,000 voxels = 500 mL
    data[80:90, 80:90, 15:20] = 1  # detached fragment: 500 voxels
    data[70:80, 10:20, 2:7] = 2  # 500 spleen voxels
    quality = mask_quality(labels_image(data))
    assert quality["liver_voxels"] == 25_500
    assert quality["liver_volume_ml"] == pytest.approx(510.0)
    assert quality["spleen_volume_ml"] == pytest.approx(10.0)
    assert quality["liver_components"] == 2
    assert quality["liver_largest_component_fraction"] == pytest.approx(25_000 / 25_500, abs=1e-6)
    assert quality["liver_volume_plausible"] and quality["dice_liver"] is None
    assert not mask_quality(labels_image(data), config=MaskQualityConfig(liver_volume_ml_min=600))[
        "liver_volume_plausible"
    ]


def test_only_the_largest_liver_and_spleen_are_kept_and_fragments_are_counted_on_the_prediction():
    data = np.zeros((100, 100, 20), np.uint8)
    data[10:60, 10:60, 2:12] = 1  # the liver: 25,000 voxels
    data[60, 60, 12] = 1  # touches it at a corner only: joined (nnU-Net's full connectivity)
    data[80:90, 80:90, 15:20] = 1  # a stray island called liver: 500 voxels
    data[70:80, 10:20, 2:7] = 2  # the spleen: 500 voxels
    data[95:97, 95:97, 0:2] = 2  # a stray spleen island: 8 voxels
    affine = np.diag([*VOXEL, 1.0])
    affine[:3, 3] = (-100.0, 20.0, 7.5)
    prediction = labels_image(data, affine)
    kept = keep_largest_components(prediction)
    expected = data.copy()
    expected[80:90, 80:90, 15:20] = 0
    expected[95:97, 95:97, 0:2] = 0
    assert np.array_equal(np.asarray(kept.dataobj), expected)
    assert kept.shape == prediction.shape and np.array_equal(kept.affine, affine)
    assert np.count_nonzero(np.asarray(prediction.dataobj) == 1) == 25_501  # the input is left as it was
    quality = mask_quality(kept, prediction=prediction)
    # the kept liver's volume; the network's three liver components (face connectivity), of which
    # the largest held 25,000 of 25,501 voxels
    assert quality["liver_voxels"] == 25_001
    assert quality["liver_components"] == 3
    assert quality["liver_largest_component_fraction"] == pytest.approx(25_000 / 25_501, abs=1e-6)
    assert mask_quality(kept)["liver_components"] == 2  # the corner voxel, on the mask itself
    nothing = labels_image(np.zeros((5, 5, 5), np.uint8))
    assert not np.any(np.asarray(keep_largest_components(nothing).dataobj))


def test_a_liver_cut_by_the_field_of_view_is_measured_at_the_face_it_touches():
    data = np.zeros((40, 30, 20), np.uint8)
    data[10:30, 5:25, 3:15] = 1  # clear of every face
    assert mask_quality(labels_image(data))["liver_at_edge_fraction"] == 0.0
    assert mask_quality(labels_image(data))["liver_at_edge"] == ""
    data[12:28, 8:22, 0:3] = 1  # the scan starts below the dome: 16 x 14 of the 20 x 20 cross-section
    quality = mask_quality(labels_image(data))
    assert quality["liver_at_edge_fraction"] == pytest.approx(16 * 14 / 400, abs=1e-4)
    assert quality["liver_at_edge"] == "slice 1 of 20"
    data[10:30, 29, 3:15] = 1  # and a slab on the last row (240 voxels; the widest row holds 240 + 48)
    quality = mask_quality(labels_image(data))
    assert quality["liver_at_edge"] == "row 30 of 30"
    assert quality["liver_at_edge_fraction"] == pytest.approx(240 / 288, abs=1e-4)
    empty = mask_quality(labels_image(np.zeros((5, 5, 5), np.uint8)))
    assert (empty["liver_at_edge_fraction"], empty["liver_at_edge"]) == (0.0, "")


def test_volume_uses_the_true_voxel_size_of_an_oblique_grid():
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(VOXEL)
    data = np.zeros((10, 10, 10), np.uint8)
    data[:5, :5, :2] = 1
    assert mask_quality(labels_image(data, affine))["liver_volume_ml"] == pytest.approx(50 * 0.02)


def test_empty_mask_is_implausible_and_has_no_components():
    quality = mask_quality(labels_image(np.zeros((5, 5, 5), np.uint8)))
    assert quality["liver_voxels"] == 0 and quality["liver_components"] == 0
    assert quality["liver_largest_component_fraction"] == 0.0 and not quality["liver_volume_plausible"]


def test_dice_against_a_reference():
    prediction = np.zeros((20, 20, 4), np.uint8)
    reference = np.zeros_like(prediction)
    prediction[0:10, :, :] = 1  # 800 voxels
    reference[5:15, :, :] = 1  # 800 voxels, 400 shared
    reference[18:, :, :] = 2  # spleen only in the reference
    quality = mask_quality(labels_image(prediction), labels_image(reference))
    assert quality["dice_liver"] == pytest.approx(0.5)
    assert quality["dice_spleen"] == 0.0
    with pytest.raises(ValueError, match="grid"):
        mask_quality(labels_image(prediction), labels_image(reference[:, :, :3]))


def _decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks = 8, {}
    while position < len(data):
        (length,), kind = struct.unpack(">I", data[position : position + 4]), data[position + 4 : position + 8]
        chunks[kind] = data[position + 8 : position + 8 + length]
        position += 12 + length
    width, height = struct.unpack(">II", chunks[b"IHDR"][:8])
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, 1 + 3 * width)
    return rows[:, 1:].reshape(height, width, 3)


def test_overlay_png_colours_liver_and_spleen_in_radiological_view():
    image, mask = synthetic_case(seed=3)
    pixels = _decode_png(overlay_png(image, mask))
    assert pixels.shape == (288, 288, 3)  # 48 pixels enlarged 6x to reach 256
    reddish = (pixels[..., 0] > pixels[..., 2] + 40).mean(axis=0)
    bluish = (pixels[..., 2] > pixels[..., 0] + 40).mean(axis=0)
    assert reddish.sum() > 0 and bluish.sum() > 0
    # Radiological convention: the liver (patient's right) on the viewer's left, spleen on the right.
    columns = np.arange(pixels.shape[1])
    assert (columns * reddish).sum() / reddish.sum() < (columns * bluish).sum() / bluish.sum()


def test_overlay_png_does_not_depend_on_stored_orientation():
    image, mask = synthetic_case(seed=3)
    flipped_image = image.as_reoriented(np.array([[0, -1], [1, -1], [2, 1]]))
    flipped_mask = mask.as_reoriented(np.array([[0, -1], [1, -1], [2, 1]]))
    assert overlay_png(image, mask) == overlay_png(flipped_image, flipped_mask)
