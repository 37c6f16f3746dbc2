"""The pure parts of hcc_classifier's use case: the model version and the beats-chance rule."""

import dataclasses
import hashlib

import numpy as np
import pytest

from hcc_assets.steps import classifier
from hcc_assets.steps.classifier import ChanceRule, ClassifierError, ClassifierSettings, TrainingSet

ROWS = [
    {"patient_id": "p1", "split": "train", "hcc": True},
    {"patient_id": "p2", "split": "train", "hcc": False},
    {"patient_id": "p3", "split": "validation", "hcc": True},
    {"patient_id": "p4", "split": "train", "hcc": False},
]


def _data(rows=ROWS, digests=None, shape=(4, 4, 2)) -> TrainingSet:
    digests = digests or {r["patient_id"]: f"sha-{r['patient_id']}" for r in rows}
    volumes = {r["patient_id"]: np.zeros(shape, dtype=np.float32) for r in rows}
    return TrainingSet(snapshot=1, rows=rows, volumes=volumes, digests=digests, missing=[])


SMALL = ClassifierSettings(depth=10)


def _version(settings=SMALL, device="cpu", init="seeded", data=None, amp=False) -> str:
    config = settings.to_domain(device, amp)
    return classifier.classifier_version(classifier.classifier_identity(config, device, init, data or _data()))


def test_training_set_splits_and_grid():
    data = _data()
    assert [r["patient_id"] for r in data.train] == ["p1", "p2", "p4"]
    assert [r["patient_id"] for r in data.validation] == ["p3"]
    assert data.input_shape == [4, 4, 2] and all(isinstance(n, int) for n in data.input_shape)


def test_the_version_is_short_and_stable():
    version = _version()
    assert len(version) == 12 and version == _version()


@pytest.mark.parametrize(
    "change",
    [
        dict(settings=ClassifierSettings(depth=10, lr=0.01)),
        dict(settings=ClassifierSettings(depth=10, seed=1)),
        dict(settings=ClassifierSettings(depth=18)),
        dict(settings=ClassifierSettings(depth=10, use_trunk_cache=False)),
        dict(amp=True),
        dict(device="cuda:0"),
        dict(init="medicalnet:abc"),
        dict(data=_data(shape=(4, 4, 4))),
        dict(data=_data(digests={"p1": "other", "p2": "sha-p2", "p3": "sha-p3", "p4": "sha-p4"})),
        dict(data=_data(rows=[{**r, "hcc": not r["hcc"]} if r["patient_id"] == "p2" else r for r in ROWS])),
        dict(data=_data(rows=[{**r, "split": "validation"} if r["patient_id"] == "p4" else r for r in ROWS])),
        dict(data=_data(rows=ROWS[:3])),
    ],
)
def test_the_version_changes_with_what_determines_the_weights(change):
    assert _version(**change) != _version()


@pytest.mark.parametrize(
    "same",
    [
        # the MedicalNet file counts by its hash (the init), not by where it lies
        dict(settings=ClassifierSettings(depth=10, medicalnet_checkpoint="/a/resnet.pth"), init="medicalnet:abc"),
        dict(settings=ClassifierSettings(depth=10, force_retrain=True)),
        dict(settings=ClassifierSettings(depth=10, accept_below_chance=True)),
    ],
)
def test_the_version_ignores_what_does_not_change_the_weights(same):
    reference = dict(init=same.get("init", "seeded"))
    assert _version(**same) == _version(**reference)


def test_the_device_counts_by_its_type_only():
    assert _version(device="cuda:0") == _version(device="cuda:1") != _version(device="cpu")


def test_the_settings_mirror_the_asset_config():
    from hcc_assets.defs.deep import HccClassifierConfig

    assert HccClassifierConfig().settings() == ClassifierSettings()
    assert [f.name for f in dataclasses.fields(ClassifierSettings)] == list(HccClassifierConfig.model_fields)


def test_init_identity(tmp_path):
    from hcc_assets.deep import SEEDED_RANDOM_INIT

    assert classifier.init_identity("") == SEEDED_RANDOM_INIT
    weights = tmp_path / "resnet.pth"
    weights.write_bytes(b"weights")
    assert classifier.init_identity(str(weights)) == "medicalnet:" + hashlib.sha256(b"weights").hexdigest()
    with pytest.raises(ClassifierError, match=r"^hcc_classifier: medicalnet_checkpoint .*missing.pth is not a file$"):
        classifier.init_identity(str(tmp_path / "missing.pth"))


def test_majority_rate():
    assert classifier.majority_rate([True, False, False]) == pytest.approx(2 / 3)
    assert classifier.majority_rate([True, True]) == 1.0
    assert classifier.majority_rate([True, False]) == 0.5


def test_beats_chance_is_strictly_above_the_majority_rate():
    assert ChanceRule(0.75, 0.5).passed and ChanceRule(0.75, 0.5).accepted
    at_chance = ChanceRule(0.5, 0.5)
    assert not at_chance.passed and not at_chance.accepted
    assert not ChanceRule(0.4, 0.6).passed


def test_a_passing_model_has_no_description():
    assert ChanceRule(0.9, 0.5).description("v1") is None


def test_a_refused_retrain_names_the_version_in_use():
    rule = ChanceRule(0.5, 0.625)
    shortfall = "training accuracy 0.500 is not above the majority-class rate 0.625; "
    assert rule.description("old") == shortfall + "retrain refused, current version: old"
    assert rule.description(None) == shortfall + "retrain refused, current version: none"
    assert rule.refusal("new", "old") == "hcc_classifier new refused: " + shortfall + "version old stays current"
    assert rule.refusal("new", None) == (
        "hcc_classifier new refused: "
        + shortfall
        + "no usable classifier: no deep embeddings or deep predictions until a retrain passes"
    )


def test_accepting_below_chance_registers_it_but_the_check_still_fails():
    rule = ChanceRule(0.5, 0.625, accept_below_chance=True)
    assert rule.accepted and not rule.passed
    assert rule.description("new") == (
        "training accuracy 0.500 is not above the majority-class rate 0.625; "
        "registered as current anyway (accept_below_chance)"
    )
