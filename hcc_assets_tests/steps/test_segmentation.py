"""The pure pieces of hcc_assets.steps.segmentation: mask-problem rules, check outcomes, the grid
check, training-case selection, the predictor cache, and the result objects the assets render."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

from hcc_assets.core.errors import PatientInputError
from hcc_assets.steps import segmentation as steps

THRESHOLDS = steps.MaskThresholds(
    liver_volume_ml_min=500.0, liver_volume_ml_max=4000.0, min_largest_component_fraction=0.9, min_dice_liver=0.9
)


def _quality(**overrides) -> dict:
    quality = {
        "liver_voxels": 1000,
        "liver_volume_ml": 1500.0,
        "spleen_volume_ml": 200.0,
        "liver_volume_plausible": True,
        "liver_components": 1,
        "liver_largest_component_fraction": 1.0,
        "liver_at_edge_fraction": 0.0,
        "liver_at_edge": "",
        "dice_liver": None,
        "dice_spleen": None,
    }
    return {**quality, **overrides}


def _image(shape=(4, 5, 6), affine=None) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.zeros(shape, dtype=np.uint8), np.diag([1.5, 1.5, 3.0, 1.0]) if affine is None else affine)


# -- mask-problem rules ----------------------------------------------------------------------


def test_a_plausible_mask_has_no_problem():
    assert steps.mask_problem(_quality(), THRESHOLDS.volume_range) is None


def test_an_empty_mask_is_a_problem_before_its_volume():
    quality = _quality(liver_voxels=0, liver_volume_ml=0.0, liver_volume_plausible=False)
    assert steps.mask_problem(quality, THRESHOLDS.volume_range) == "the mask has no liver voxels"


def test_an_implausible_volume_names_the_volume_and_the_range():
    quality = _quality(liver_volume_ml=123.4, liver_volume_plausible=False)
    assert steps.mask_problem(quality, [500.0, 4000.0]) == "liver volume 123 mL outside 500-4000 mL"


def test_the_problem_follows_the_plausibility_flag_not_the_range():
    # mask_quality decides plausibility with the same limits; the rule does not re-measure
    assert steps.mask_problem(_quality(liver_volume_ml=100.0), THRESHOLDS.volume_range) is None


# -- check outcomes --------------------------------------------------------------------------


def test_mask_checks_without_reference():
    checks = {c.name: c for c in steps.mask_checks(_quality(), False, THRESHOLDS)}
    assert list(checks) == [
        "mask_not_empty",
        "liver_volume_plausible",
        "single_main_component",
        "liver_within_field_of_view",
        "dice_vs_reference",
    ]
    assert all(c.passed for c in checks.values())
    assert [c.warn for c in checks.values()] == [False, False, True, True, False]
    assert checks["dice_vs_reference"].metadata == {"reference": "no reference"}
    assert checks["liver_within_field_of_view"].metadata == {
        "liver_at_edge_fraction": 0.0,
        "edge": "none",
        "threshold": 0.05,
    }
    assert checks["liver_volume_plausible"].metadata == {"liver_ml": 1500.0, "range_ml": [500.0, 4000.0]}


def test_mask_checks_fail_on_an_empty_fragmented_mask_with_poor_dice():
    quality = _quality(
        liver_voxels=0,
        liver_volume_plausible=False,
        liver_components=3,
        liver_largest_component_fraction=0.5,
        dice_liver=0.8,
        dice_spleen=0.7,
        liver_at_edge_fraction=0.28,
        liver_at_edge="slice 1 of 26",
    )
    checks = {c.name: c for c in steps.mask_checks(quality, True, THRESHOLDS)}
    assert not any(c.passed for c in checks.values())
    assert checks["dice_vs_reference"].warn and checks["single_main_component"].warn
    assert checks["liver_within_field_of_view"].warn
    assert checks["liver_within_field_of_view"].metadata["edge"] == "slice 1 of 26"
    assert checks["dice_vs_reference"].metadata == {"dice_liver": 0.8, "dice_spleen": 0.7, "threshold": 0.9}
    assert checks["single_main_component"].metadata == {
        "largest_component_fraction": 0.5,
        "components": 3,
        "threshold": 0.9,
    }


def test_thresholds_are_inclusive():
    quality = _quality(
        liver_largest_component_fraction=0.9, dice_liver=0.9, dice_spleen=0.5, liver_at_edge_fraction=0.05
    )
    checks = {c.name: c for c in steps.mask_checks(quality, True, THRESHOLDS)}
    assert checks["single_main_component"].passed and checks["dice_vs_reference"].passed
    assert checks["liver_within_field_of_view"].passed


# -- grid check ------------------------------------------------------------------------------


def test_the_same_grid_passes_within_tolerance():
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    nudged = affine.copy()
    nudged[0, 3] += steps.GRID_TOLERANCE_MM / 2
    steps.check_same_grid(_image(affine=nudged), _image(affine=affine))


def test_another_shape_fails_the_grid_check():
    with pytest.raises(RuntimeError, match=r"stored mask grid \(4, 5, 7\) does not match the volume's \(4, 5, 6\)"):
        steps.check_same_grid(_image((4, 5, 7)), _image((4, 5, 6)))


def test_a_shifted_affine_fails_the_grid_check():
    shifted = np.diag([1.5, 1.5, 3.0, 1.0])
    shifted[2, 3] = 0.01
    with pytest.raises(RuntimeError, match="does not match"):
        steps.check_same_grid(_image(affine=shifted), _image())


# -- training cases --------------------------------------------------------------------------


def test_training_cases_are_sorted_without_held_out_and_capped():
    candidates = ["p3", "p1", "p2", "p4"]
    assert steps.select_training_cases(candidates, {"p2"}, 0) == ["p1", "p3", "p4"]
    assert steps.select_training_cases(candidates, {"p2"}, 2) == ["p1", "p3"]
    assert steps.select_training_cases(candidates, set(), 10) == ["p1", "p2", "p3", "p4"]


def test_no_valid_model_in_a_missing_or_empty_folder(tmp_path):
    assert steps.valid_model_in(tmp_path / "absent") is None
    (tmp_path / "Trainer__Plans__2d").mkdir()  # the right name, but no checkpoint or plans
    assert steps.valid_model_in(tmp_path) is None


def test_per_epoch_rows_pair_the_summary_lists():
    summary = {
        "training_seconds": 3.0,
        "train_loss": [1.0, 0.5],
        "val_loss": [1.1, 0.6],
        "pseudo_dice_per_label": [[0.1, 0.2], [0.8, 0.7]],
        "seconds_per_epoch": [1.5, 1.5],
    }
    trained = steps.TrainedModel("v1", "/m", False, None, 2, 1, 3.0, summary)  # type: ignore[arg-type]
    assert trained.per_epoch == [
        {"epoch": 0, "train_loss": 1.0, "val_loss": 1.1, "pseudo_dice": [0.1, 0.2], "seconds": 1.5},
        {"epoch": 1, "train_loss": 0.5, "val_loss": 0.6, "pseudo_dice": [0.8, 0.7], "seconds": 1.5},
    ]


# -- predictor cache -------------------------------------------------------------------------


class _FakeSegmenter:
    loaded: list[tuple[str, str]] = []

    def __init__(self, folder: str, device: str):
        if "broken" in folder:
            raise ValueError("no plans.json")
        self.folder = folder
        _FakeSegmenter.loaded.append((folder, device))


@pytest.fixture
def fake_segmenter(monkeypatch):
    monkeypatch.setattr(steps, "LiverSegmenter", _FakeSegmenter)
    monkeypatch.setattr(steps, "_SEGMENTERS", {})
    _FakeSegmenter.loaded = []
    return _FakeSegmenter


def test_one_predictor_per_model_and_device(fake_segmenter, tmp_path):
    first = steps.segmenter(str(tmp_path / "a"), "v1", "cpu")
    assert steps.segmenter(str(tmp_path / "a"), "v1", "cpu") is first
    assert len(fake_segmenter.loaded) == 1
    second = steps.segmenter(str(tmp_path / "b"), "v2", "cpu")  # a new model replaces the old one
    assert second is not first and list(steps._SEGMENTERS) == [(str(tmp_path / "b"), "v2", "cpu")]
    assert steps.segmenter(str(tmp_path / "a"), "v1", "cpu") is not first  # loaded again


def test_a_model_that_cannot_load_is_a_patient_input_error(fake_segmenter, tmp_path):
    model = {"path": str(tmp_path / "broken"), "version": "v9", "init": "trained"}
    with pytest.raises(PatientInputError) as raised:
        steps.segment_liver(None, "p1", model, "cpu", THRESHOLDS)  # type: ignore[arg-type]
    assert str(raised.value) == (
        "the current liver segmentation model v9 cannot be loaded (ValueError: no plans.json); "
        "re-materialize liver_segmentation_model (force_retrain) or fix its model_folder"
    )
    assert not steps._SEGMENTERS


# -- result objects --------------------------------------------------------------------------


def test_liver_mask_row_metadata_and_version():
    quality = _quality(dice_liver=0.95, dice_spleen=None)
    made = steps.LiverMask(
        "p1", {"version": "v1", "init": "trained"}, "/lake/p1/mask.nii.gz", "ab" * 32, _image(), _image(), quality, True
    )
    assert made.data_version == "ab" * 8
    assert made.row()["model_version"] == "v1" and made.row()["dice_spleen"] is None
    metadata = made.metadata()
    assert metadata["dice_liver"] == 0.95 and metadata["dice_spleen"] == "no reference"
    assert metadata["shape"] == [4, 5, 6] and metadata["model_init"] == "trained"


def test_radiomic_features_version_counts_and_finite_check():
    features = {"original_shape_VoxelVolume": 10.0, "original_glcm_Contrast": 1.0, "original_glcm_Idm": math.nan}
    result = steps.RadiomicFeatures("fs1", features)
    assert result.names == sorted(features)
    [finite] = result.checks()
    assert finite.name == "features_finite" and not finite.passed and finite.metadata == {"n_features": 3}
    assert steps.RadiomicFeatures("fs1", {**features, "original_glcm_Idm": 0.5}).checks()[0].passed
    assert result.metadata()["features_per_class"] == {"glcm": 2, "shape": 1}
    # the data version follows the values and the feature set
    assert result.data_version == steps.RadiomicFeatures("fs1", dict(reversed(features.items()))).data_version
    assert result.data_version != steps.RadiomicFeatures("fs2", features).data_version
    assert (
        result.data_version != steps.RadiomicFeatures("fs1", {**features, "original_glcm_Contrast": 2.0}).data_version
    )
