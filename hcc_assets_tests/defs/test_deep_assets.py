"""Real Dagster materializations of hcc_classifier and deep_embedding (real torch/MONAI, no mocks).

Small on purpose: 8 synthetic patients preprocessed to 32x32x16 (conv1..layer4 halve it five
times, so layer4 still sees one voxel) and a depth-10 ResNet trained for a few epochs on one thread.
"""

import json
import shutil

import dagster as dg
import numpy as np
import pytest

from hcc_assets.defs import deep
from hcc_assets.defs.cohort import cohort
from hcc_assets.defs.resources import LakeResource
from hcc_assets.synthetic.cohort import SynthConfig, synthesize_cohort
from hcc_assets_tests.conftest import SMALL_COHORT
from hcc_assets_tests.defs.helpers import PATIENT_ASSETS, check_figure, failure_message, in_memory_instance
from hcc_assets_tests.model_configs import UNTRAINED_CLASSIFIER, suite_compute
from hcc_assets_tests.scratch import module_scratch

SHAPE = [32, 32, 16]
INGEST_CONFIG = {"ops": {"preprocessed_volume": {"config": {"target_shape": SHAPE}}}}
# Small and quick, and it learns on this cohort: the check must pass on it. With 2 validation
# patients the best-validation-loss epoch is noise, so whether the kept model beats chance depends
# on the split; the pseudonym key (hence the patient ids, hence the split) and all seeds are pinned.
TRAIN = dict(depth=10, lr=0.05, min_epochs=15, max_epochs=15, patience=15, batch_size=4, seed=0)
PSEUDONYM_KEY = "hcc-deep-assets-test"
# Learning switched off (a vanishing step): the model stays at its seeded initialization.
NO_LEARNING = UNTRAINED_CLASSIFIER


def ingest(instance, lake, pid) -> None:
    result = dg.materialize(
        PATIENT_ASSETS, partition_key=pid, instance=instance, resources={"lake": lake}, run_config=INGEST_CONFIG
    )
    assert result.success


def train(instance, lake, raise_on_error=True, **config) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [deep.hcc_classifier],
        instance=instance,
        resources={"lake": lake, "compute": suite_compute()},
        run_config={"ops": {"hcc_classifier": {"config": config}}},
        raise_on_error=raise_on_error,
    )


def embed(instance, lake, pid, raise_on_error=True) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [deep.deep_embedding],
        partition_key=pid,
        instance=instance,
        resources={"lake": lake, "compute": suite_compute()},
        raise_on_error=raise_on_error,
    )


def data_version(result, asset) -> str:
    return result.asset_materializations_for_node(asset)[0].tags["dagster/data_version"]


@pytest.fixture(scope="module")
def trained(small_cohort, tmp_path_factory):
    """Ingest 8 patients, split, a deep_embedding attempt before any classifier, train, embed all."""
    source, _ = small_cohort
    with module_scratch(tmp_path_factory, "deep") as root, in_memory_instance() as instance:
        incoming = root / "incoming"
        shutil.copytree(source, incoming)
        (root / "lake" / "private").mkdir(parents=True)
        (root / "lake" / "private" / "pseudonym.key").write_text(PSEUDONYM_KEY)
        lake = LakeResource(root=str(root / "lake"), incoming=str(incoming), quiet_seconds=3600)
        pids = sorted(lake.ready_patients())
        instance.add_dynamic_partitions("patients", pids)
        for pid in pids:
            ingest(instance, lake, pid)
        assert dg.materialize([cohort], instance=instance, resources={"lake": lake}).success
        no_model = embed(instance, lake, pids[0], raise_on_error=False)
        classifier = train(instance, lake, **TRAIN)
        embeddings = {pid: embed(instance, lake, pid) for pid in pids}
        yield dict(
            instance=instance,
            lake=lake,
            root=root,
            pids=pids,
            no_model=no_model,
            classifier=classifier,
            embeddings=embeddings,
        )


def test_embedding_before_any_classifier_fails_naming_the_patient(trained):
    result, pid = trained["no_model"], trained["pids"][0]
    assert not result.success
    message = failure_message(result)
    assert f"patient {pid}" in message and "hcc_classifier" in message


def test_classifier_registers_model_history_predictions_and_figure(trained):
    result, lake, pids = trained["classifier"], trained["lake"], trained["pids"]
    store = lake.store
    assert result.success
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"beats_chance_on_training": True}

    models = store.query("SELECT * FROM models WHERE model_name = 'hcc_classifier' AND current")
    assert models.height == 1
    model = models.row(0, named=True)
    version = model["version"]
    assert data_version(result, "hcc_classifier") == version and len(version) == 12
    assert model["kind"] == "resnet3d" and model["init"].startswith("seeded-random")
    assert model["path"].endswith(f"models/classifier/{version}")
    assert (trained["root"] / "lake" / "models" / "classifier" / version / "classifier.pt").is_file()
    params, metrics = json.loads(model["params"]), json.loads(model["metrics"])
    assert params["depth"] == 10 and params["input_shape"] == SHAPE and params["lr"] == TRAIN["lr"]
    assert metrics["beats_chance_on_training"] is True and metrics["train_acc"] > metrics["majority_rate"]

    split = store.query("SELECT patient_id, split, hcc FROM cohort_split ORDER BY patient_id")
    assert sorted(model["training_patients"]) == split.filter(split["split"] == "train")["patient_id"].to_list()

    history = store.query(
        "SELECT epoch, train_loss, val_loss, version FROM training_history "
        "WHERE model_name = 'hcc_classifier' ORDER BY epoch"
    )
    assert history["epoch"].to_list() == list(range(1, TRAIN["max_epochs"] + 1))
    assert set(history["version"]) == {version} and history["train_loss"].is_finite().all()

    predictions = store.query(
        "SELECT patient_id, split, probability, label, version FROM predictions "
        "WHERE model = 'deep' ORDER BY patient_id"
    )
    assert predictions["patient_id"].to_list() == pids == split["patient_id"].to_list()
    assert predictions["split"].to_list() == split["split"].to_list()
    assert predictions["label"].to_list() == split["hcc"].to_list()
    assert predictions["probability"].is_between(0, 1).all() and set(predictions["version"]) == {version}

    meta = result.asset_materializations_for_node("hcc_classifier")[0].metadata
    # Figure 2 is a lake file of this model version; metadata links it and carries only a thumbnail
    data_lake = lake.lake
    figure = data_lake.cohort_figure("hcc_classifier", version, "figure_2")
    assert figure.endswith(f"figures/hcc_classifier/{version}/figure_2.png")
    check_figure(meta, "figure_2", data_lake, figure, "Figure 2: accuracy and loss over epochs")
    assert meta["history"].value.count("\n") == TRAIN["max_epochs"] + 1
    assert meta["init"].value.startswith("seeded-random") and meta["device"].value == "cpu"
    for key in ("best_epoch", "stopped_early", "train_accuracy", "validation_accuracy", "timings_s"):
        assert key in meta, key


def test_rematerializing_reuses_the_saved_model_and_keeps_the_data_version(trained):
    again = train(trained["instance"], trained["lake"], **TRAIN)
    meta = again.asset_materializations_for_node("hcc_classifier")[0].metadata
    assert meta["reused_saved_model"].value is True
    assert data_version(again, "hcc_classifier") == data_version(trained["classifier"], "hcc_classifier")
    assert trained["lake"].store.query("SELECT count(*) FROM training_history").item() == TRAIN["max_epochs"]


def test_every_patient_has_a_deterministic_embedding_in_sql(trained):
    instance, lake, pids = trained["instance"], trained["lake"], trained["pids"]
    store = lake.store
    version = store.query("SELECT version FROM models WHERE model_name = 'hcc_classifier' AND current").item()
    rows = store.query("SELECT patient_id, model_version FROM deep_embeddings ORDER BY patient_id")
    assert rows["patient_id"].to_list() == pids and set(rows["model_version"]) == {version}
    wide = store.query("SELECT * FROM deep_features ORDER BY patient_id")
    assert wide.height == len(pids)
    assert [c for c in wide.columns if c.startswith("dl_")] == [f"dl_{i:03d}" for i in range(128)]
    matrix = wide.select([f"dl_{i:03d}" for i in range(128)]).to_numpy()
    assert np.isfinite(matrix).all() and (matrix >= 0).all()  # ReLU activations
    assert len({row.tobytes() for row in matrix}) == len(pids)  # patients differ

    pid = pids[-1]
    before = store.query("SELECT embedding FROM deep_embeddings WHERE patient_id = ?", [pid]).item().to_numpy()
    deep._CLASSIFIERS.clear()  # reload the model from its folder, as a fresh worker would
    again = embed(instance, lake, pid)
    after = store.query("SELECT embedding FROM deep_embeddings WHERE patient_id = ?", [pid]).item().to_numpy()
    assert np.array_equal(before, after)
    assert data_version(again, "deep_embedding") == data_version(trained["embeddings"][pid], "deep_embedding")
    assert store.query("SELECT count(*) FROM deep_embeddings").item() == len(pids)


def test_a_new_patient_gets_an_embedding_without_retraining(trained):
    instance, lake, pids = trained["instance"], trained["lake"], trained["pids"]
    store = lake.store
    models_before = store.query("SELECT version, run_id FROM models").rows()
    synthesize_cohort(lake.incoming_dir, SynthConfig(**{**SMALL_COHORT, "patients": 1, "seed": 97}))
    new = sorted(set(lake.ready_patients()) - set(pids))
    assert len(new) == 1
    instance.add_dynamic_partitions("patients", new)
    ingest(instance, lake, new[0])
    result = embed(instance, lake, new[0])
    assert result.success
    assert store.query("SELECT version, run_id FROM models").rows() == models_before
    row = store.query("SELECT model_version FROM deep_embeddings WHERE patient_id = ?", [new[0]])
    assert row.item() == models_before[0][0]
    assert store.query("SELECT count(*) FROM deep_features").item() == len(pids) + 1


def test_a_retrain_below_chance_is_refused_and_the_previous_version_stays_in_use(trained, tmp_path):
    # A copy of the lake, so the trained model of the other tests stays current.
    root = tmp_path / "lake"
    shutil.copytree(trained["root"] / "lake", root)
    lake = LakeResource(root=str(root), incoming=trained["lake"].incoming, quiet_seconds=3600)
    previous = lake.store.query("SELECT version FROM models WHERE model_name = 'hcc_classifier' AND current").item()
    with in_memory_instance() as instance:
        instance.add_dynamic_partitions("patients", trained["pids"])
        result = train(instance, lake, raise_on_error=False, **NO_LEARNING)
        checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
        assert checks["beats_chance_on_training"].passed is False
        assert f"retrain refused, current version: {previous}" in checks["beats_chance_on_training"].description
        rows = lake.store.query(
            "SELECT version, current, metrics FROM models WHERE model_name = 'hcc_classifier' ORDER BY materialized_at"
        )
        (kept, kept_current, _), (refused, refused_current, refused_metrics) = rows.rows()
        metrics = json.loads(refused_metrics)
        assert metrics["train_acc"] <= metrics["majority_rate"] and metrics["beats_chance_on_training"] is False
        # the refused version is kept for inspection; the previous one stays current and in use
        assert (kept, kept_current, refused_current) == (previous, True, False) and refused != previous
        assert embed(instance, lake, trained["pids"][0]).success
        made_with = lake.store.query(
            "SELECT model_version FROM deep_embeddings WHERE patient_id = ?", [trained["pids"][0]]
        ).item()
        assert made_with == previous


def test_a_classifier_below_chance_accepted_on_purpose_still_needs_a_second_yes(trained, tmp_path):
    root = tmp_path / "lake"
    shutil.copytree(trained["root"] / "lake", root)
    lake = LakeResource(root=str(root), incoming=trained["lake"].incoming, quiet_seconds=3600)
    with in_memory_instance() as instance:
        instance.add_dynamic_partitions("patients", trained["pids"])
        train(instance, lake, raise_on_error=False, **{**NO_LEARNING, "accept_below_chance": True})
        metrics = json.loads(
            lake.store.query("SELECT metrics FROM models WHERE model_name = 'hcc_classifier' AND current").item()
        )
        assert metrics["beats_chance_on_training"] is False  # registered as current, as asked
        refused = embed(instance, lake, trained["pids"][0], raise_on_error=False)
        assert not refused.success
        assert "beats_chance_on_training" in failure_message(refused)


@pytest.mark.parametrize("damage", ["truncated", "incompatible"])
def test_a_corrupt_or_incompatible_checkpoint_fails_the_partition_clearly(trained, tmp_path, damage):
    import torch

    # A copy of the lake, so the trained model of the other tests stays intact.
    root = tmp_path / "lake"
    shutil.copytree(trained["root"] / "lake", root)
    lake = LakeResource(root=str(root), incoming=trained["lake"].incoming, quiet_seconds=3600)
    version = lake.store.query("SELECT version FROM models WHERE model_name = 'hcc_classifier' AND current").item()
    folder = root / "models" / "classifier" / version
    with lake.store.writer() as con:  # the registry holds absolute paths: point it at the copy
        con.execute(
            "UPDATE models SET path = ? WHERE model_name = 'hcc_classifier' AND version = ?", [str(folder), version]
        )
    checkpoint = folder / "classifier.pt"
    if damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    else:  # a checkpoint of another format (e.g. a raw state dict someone copied in)
        torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, checkpoint)
    deep._CLASSIFIERS.clear()  # this process cached the good model; a fresh worker would not have it
    pid = trained["pids"][0]
    before = lake.store.query("SELECT embedding FROM deep_embeddings WHERE patient_id = ?", [pid])
    with in_memory_instance() as instance:
        instance.add_dynamic_partitions("patients", trained["pids"])
        result = embed(instance, lake, pid, raise_on_error=False)
    assert not result.success
    message = failure_message(result)
    assert f"patient {pid}" in message and version in message and "checkpoint" in message, message
    assert "Traceback" not in message
    # the failed partition's old row is removed rather than left claiming the broken model
    assert before.height == 1
    assert lake.store.query("SELECT count(*) FROM deep_embeddings WHERE patient_id = ?", [pid]).item() == 0
    deep._CLASSIFIERS.clear()
