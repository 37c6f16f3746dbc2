"""hcc_prediction through real Dagster runs on a small lake (8 labelled patients, nnU-Net and a
depth-10 classifier trained briefly, the radiomic LASSO fitted): every ingested patient gets P(HCC)
from each current model, labelled or not; gaps carry their reason; a retrain adds rows and keeps
the old ones; a refused retrain changes nothing. The probabilities are checked against the
models' own predictions (the `predictions` table, written by the forward pass over the volume and
by the LASSO fit), not recomputed with the code under test."""

from __future__ import annotations

import importlib
import json
import os
import shutil

import dagster as dg
import numpy as np
import polars as pl
import pytest

from hcc_assets import runner
from hcc_assets.featurestore import FeatureStore, registry
from hcc_assets.steps.prediction import predict_patient
from hcc_assets.synthetic.cohort import SynthConfig, synthesize_cohort
from hcc_assets_tests.conftest import SMALL_COHORT
from hcc_assets_tests.defs.hands_off import TEST_PATIENT_CONFIG, copy_prepared
from hcc_assets_tests.model_configs import CLASSIFIER_TRAINING, UNTRAINED_CLASSIFIER, suite_compute
from hcc_assets_tests.scratch import module_scratch

ASSETS = dg.load_assets_from_modules(
    [
        importlib.import_module(f"hcc_assets.defs.{name}")
        for name in ("ingest", "cohort", "segmentation", "deep", "analysis", "predictions")
    ]
)
# 8 patients: 2-fold CV for the LASSO (3-fold needs 3 of each class among the 6 training patients)
LASSO = {"config": {"cv_folds": 2}}
EMBED = TEST_PATIENT_CONFIG["ops"]["deep_embedding"]
IMPLAUSIBLE = {"config": {"liver_volume_ml_min": 1e6, "liver_volume_ml_max": 2e6}}  # no liver is this big


def _materialize(lake, instance, selection, partition_key=None, ops=None, ok=True):
    result = dg.materialize(
        ASSETS,
        selection=selection,
        partition_key=partition_key,
        instance=instance,
        resources={"lake": lake, "compute": suite_compute()},
        run_config={"ops": {k: v for k, v in (ops or {}).items() if k in selection}},
        raise_on_error=False,
    )
    if ok:
        assert result.success, [e.step_failure_data.error.message for e in result.all_events if e.is_step_failure]
    return result


@pytest.fixture(scope="module")
def predicted(prepared_lake, tmp_path_factory):
    """The lake after: every patient's features (the prepared lake's, conftest.prepared_lake, and
    the new patient's), radiomic_model, then hcc_prediction for all, including one unlabelled
    patient and one whose mask the blocking checks refuse."""
    with module_scratch(tmp_path_factory, "predictions") as root, pytest.MonkeyPatch.context() as patch:
        patch.setenv("DAGSTER_HOME", str(root / "dagster_home"))
        for name in [n for n in os.environ if n.startswith("HCC_ASSETS_")]:
            patch.delenv(name)
        prepared = copy_prepared(prepared_lake, root / "lake", root / "dagster_home")
        # the unlabelled patient came back for a follow-up scan: its second study is partition <pid>.s2
        new = synthesize_cohort(
            root / "new", SynthConfig(**{**SMALL_COHORT, "patients": 1, "seed": 99, "follow_up_fraction": 1.0})
        )[0]
        shutil.copytree(root / "new" / new.patient_key, prepared.root / "incoming" / new.patient_key)
        lake = prepared.lake
        unlabelled = lake.pseudonym(new.patient_key)
        follow_up = f"{unlabelled}.s2"
        bad_mask = prepared.patients[0]
        with prepared.instance() as instance:
            instance.add_dynamic_partitions("patients", [unlabelled, follow_up])
            for pid in (unlabelled, follow_up):
                _materialize(
                    lake,
                    instance,
                    ["raw_scan", "nifti_volume", "preprocessed_volume"],
                    pid,
                    TEST_PATIENT_CONFIG["ops"],
                )
            for pid in (unlabelled, follow_up):
                _materialize(
                    lake,
                    instance,
                    ["liver_mask", "radiomic_features", "deep_embedding"],
                    pid,
                    {"deep_embedding": EMBED},
                )
            _materialize(lake, instance, ["radiomic_model"], ops={"radiomic_model": LASSO})
            refused_mask = _materialize(
                lake, instance, ["liver_mask", "radiomic_features"], bad_mask, {"liver_mask": IMPLAUSIBLE}, ok=False
            )
            for pid in [*prepared.patients, unlabelled, follow_up]:
                _materialize(lake, instance, ["hcc_prediction"], pid)
            yield dict(
                prepared=prepared,
                lake=lake,
                instance=instance,
                unlabelled=unlabelled,
                follow_up=follow_up,
                follow_up_days=new.follow_up_days,
                bad_mask=bad_mask,
                refused_mask=refused_mask,
                root=root,
            )


def _current(store: FeatureStore) -> pl.DataFrame:
    return store.query("SELECT * FROM current_hcc_predictions ORDER BY patient_id, model")


def test_every_patient_gets_a_row_per_model_with_the_models_own_probabilities(predicted):
    store, prepared = predicted["lake"].store, predicted["prepared"]
    current = _current(store)
    everyone = sorted([*prepared.patients, predicted["unlabelled"], predicted["follow_up"]])
    assert sorted(set(current["patient_id"])) == everyone
    assert current.group_by("patient_id").len()["len"].to_list() == [3] * len(everyone)
    deep = current.filter(pl.col("model") == "deep")
    classifier = registry.current_version(store, "hcc_classifier")
    assert set(deep["status"]) == {"predicted"} and set(deep["model_version"]) == {classifier}
    # the classifier's forward pass over each volume (written when it was trained) gives the same P(HCC)
    own = store.query(
        "SELECT patient_id, probability FROM predictions WHERE model = 'deep' AND version = ?", [classifier]
    )
    joined = deep.join(own, on="patient_id", suffix="_own")
    assert joined.height == len(prepared.patients)
    np.testing.assert_allclose(joined["probability"], joined["probability_own"], atol=1e-5)
    radiomic = current.filter((pl.col("model") == "radiomic") & (pl.col("status") == "predicted"))
    lasso = registry.current_version(store, "radiomic_model")
    own = store.query(
        "SELECT patient_id, probability FROM predictions WHERE model = 'radiomic' AND version = ?", [lasso]
    )
    joined = radiomic.join(own, on="patient_id", suffix="_own")
    assert joined.height >= len(prepared.patients) - 1  # all but the patient whose mask was refused
    np.testing.assert_allclose(joined["probability"], joined["probability_own"], atol=1e-9)
    decided = current.filter(pl.col("status") == "predicted")
    assert (decided["decision"] == (decided["probability"] > decided["threshold"])).all()
    explainable = current.filter(pl.col("model") == "explainable")
    assert set(explainable["status"]) == {"unavailable"}
    assert set(explainable["reason"]) == {"no explainable_model is registered yet (materialize the analysis)"}


def test_an_unlabelled_patient_is_predicted_never_trained_on_or_evaluated(predicted):
    store, pid = predicted["lake"].store, predicted["unlabelled"]
    rows = {r["model"]: r for r in _current(store).filter(pl.col("patient_id") == pid).iter_rows(named=True)}
    assert rows["deep"]["status"] == rows["radiomic"]["status"] == "predicted"
    assert 0.0 <= rows["deep"]["probability"] <= 1.0
    assert store.query("SELECT count(*) FROM cohort_split WHERE patient_id = ?", [pid]).item() == 0
    for model in store.query("SELECT training_patients, training_set FROM models").iter_rows(named=True):
        assert pid not in model["training_patients"]
        assert pid not in json.loads(model["training_set"] or "{}").get("patients", [])
    assert store.query("SELECT count(*) FROM predictions WHERE patient_id = ?", [pid]).item() == 0  # evaluation


def test_a_follow_up_study_has_its_own_features_and_predictions_linked_to_its_patient(predicted):
    store, pid, follow_up = predicted["lake"].store, predicted["unlabelled"], predicted["follow_up"]
    studies = store.query(
        "SELECT patient_id, study_index, days_since_first FROM studies WHERE patient = ? ORDER BY study_index", [pid]
    ).rows()
    assert studies == [(pid, 1, 0), (follow_up, 2, predicted["follow_up_days"])]
    for table in ("liver_masks", "deep_embeddings", "hcc_predictions"):
        keys = store.query(f"SELECT DISTINCT patient_id FROM {table} WHERE patient_id IN (?, ?)", [pid, follow_up])
        assert sorted(keys["patient_id"]) == [pid, follow_up], table
    features = store.query(
        "SELECT patient_id, count(*) AS n FROM radiomic_features WHERE patient_id IN (?, ?) GROUP BY 1 ORDER BY 1",
        [pid, follow_up],
    ).rows()
    assert [key for key, _ in features] == [pid, follow_up] and features[0][1] == features[1][1] > 0
    masks = dict(
        store.query("SELECT patient_id, sha256 FROM liver_masks WHERE patient_id IN (?, ?)", [pid, follow_up]).rows()
    )
    assert masks[pid] != masks[follow_up]  # each study segmented on its own volume
    rows = _current(store).filter(pl.col("patient_id") == follow_up)
    assert dict(zip(rows["model"], rows["status"], strict=True))["deep"] == "predicted"
    assert store.query("SELECT count(*) FROM cohort_split WHERE patient_id = ?", [follow_up]).item() == 0


def test_an_implausible_mask_blocks_radiomics_but_not_the_deep_prediction(predicted):
    store, pid, result = predicted["lake"].store, predicted["bad_mask"], predicted["refused_mask"]
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["liver_volume_plausible"] is False
    # what `hcc-assets materialize/predict/status` print for the run: the check and its numbers
    assert runner.failure_line(result.all_events).startswith(
        "liver_mask: blocking check liver_volume_plausible failed (liver_ml "
    )
    assert not [
        e
        for e in result.all_events
        if e.event_type_value == "ASSET_MATERIALIZATION" and e.asset_key == dg.AssetKey("radiomic_features")
    ]  # the blocking check stopped it
    assert store.query("SELECT count(*) FROM radiomic_features WHERE patient_id = ?", [pid]).item() == 0
    rows = {r["model"]: r for r in _current(store).filter(pl.col("patient_id") == pid).iter_rows(named=True)}
    assert rows["deep"]["status"] == "predicted"
    assert rows["radiomic"]["status"] == "unavailable"
    assert rows["radiomic"]["reason"].startswith("radiomics excluded: liver mask implausible: liver volume")


def test_a_retrain_refreshes_predictions_and_keeps_the_old_ones_a_refused_one_changes_nothing(predicted):
    lake, instance = predicted["lake"], predicted["instance"]
    store = lake.store
    first = registry.current_version(store, "hcc_classifier")
    pid = predicted["unlabelled"]
    retrain = {**CLASSIFIER_TRAINING, "seed": 5}
    _materialize(lake, instance, ["hcc_classifier"], ops={"hcc_classifier": {"config": retrain}}, ok=False)
    second = registry.current_version(store, "hcc_classifier")
    assert second != first
    # before its embedding is refreshed, the patient's prediction says which version made it
    _materialize(lake, instance, ["hcc_prediction"], pid)
    deep = _current(store).filter((pl.col("patient_id") == pid) & (pl.col("model") == "deep")).row(0, named=True)
    assert deep["model_version"] == first and f"hcc_classifier {second} is current" in deep["reason"]
    _materialize(lake, instance, ["deep_embedding", "hcc_prediction"], pid, {"deep_embedding": EMBED})
    versions = store.query(
        "SELECT model_version FROM hcc_predictions WHERE patient_id = ? AND model = 'deep' ORDER BY materialized_at",
        [pid],
    )["model_version"].to_list()
    assert set(versions) == {first, second}  # the old prediction is kept beside the new one
    deep = _current(store).filter((pl.col("patient_id") == pid) & (pl.col("model") == "deep")).row(0, named=True)
    assert deep["model_version"] == second and deep["reason"] is None

    refused = _materialize(
        lake, instance, ["hcc_classifier"], ops={"hcc_classifier": {"config": UNTRAINED_CLASSIFIER}}, ok=False
    )
    assert {c.check_name: c.passed for c in refused.get_asset_check_evaluations()} == {
        "beats_chance_on_training": False
    }
    assert registry.current_version(store, "hcc_classifier") == second
    _materialize(lake, instance, ["hcc_prediction"], pid)
    deep = _current(store).filter((pl.col("patient_id") == pid) & (pl.col("model") == "deep")).row(0, named=True)
    assert deep["model_version"] == second


def test_with_no_usable_classifier_the_prediction_says_why(tmp_path):
    """Only a refused classifier in the registry: every model's row is 'unavailable' with its reason."""
    store = FeatureStore(tmp_path / "fs.sqlite")
    refused = registry.model_row(
        "hcc_classifier",
        "resnet3d",
        "nowhere",
        init=None,
        params={},
        metrics={"beats_chance_on_training": False},
        training_patients=[],
        training_set=None,
        version="refused1",
        run_id="r",
    )
    store.register_model(refused, current=False)
    result = predict_patient(
        store,
        "pt-x",
        0.5,
        load_classifier=lambda v: pytest.fail("nothing to load"),
        load_lasso=lambda name: pytest.fail("nothing to load"),
    )
    rows = {m.model: m for m in result.models}
    assert all(m.probability is None for m in rows.values())
    assert rows["deep"].reason == (
        "no usable hcc_classifier: the retrain refused1 was refused "
        "(beats_chance_on_training failed) and no earlier version passed"
    )
    assert "no radiomic_model is registered yet" in rows["radiomic"].reason
    assert rows["explainable"].reason.startswith("no usable hcc_classifier")
    assert result.rows()["status"].to_list() == ["unavailable"] * 3


def test_predict_command_runs_one_folder_through_dagster_and_prints_its_predictions(predicted):
    """`hcc-assets predict <export.zip>`, as a user runs it (its own process, the lake's settings):
    a PACS's ZIP export is unpacked into the drop zone and ingested like the folder it holds."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    prepared, root = predicted["prepared"], predicted["root"]
    # a walk-in with a follow-up study: both studies go through the pipeline
    new = synthesize_cohort(
        root / "walk_in", SynthConfig(**{**SMALL_COHORT, "patients": 1, "seed": 123, "follow_up_fraction": 1.0})
    )[0]
    folder = root / "walk_in" / new.patient_key
    archive = Path(shutil.make_archive(str(root / "zips" / new.patient_key), "zip", root / "walk_in", new.patient_key))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HCC_ASSETS_")},
        "DAGSTER_HOME": str(prepared.home),
        "HCC_ASSETS_LAKE": str(prepared.root),
        "OMP_WAIT_POLICY": "PASSIVE",
        "HCC_ASSETS_PATIENT_RUN_CONFIG": str(prepared.root / "patient_run_config.yaml"),
    }
    command = [str(Path(sys.executable).parent / "hcc-assets"), "predict"]
    done = subprocess.run([*command, str(archive)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    pid = predicted["lake"].pseudonym(new.patient_key)
    assert f"patient {pid}: patient_pipeline ok" in done.stdout
    assert f"patient {pid}.s2: patient_pipeline ok" in done.stdout
    deep_line = next(line for line in done.stdout.splitlines() if line.strip().startswith("deep"))
    assert "P(HCC) = " in deep_line and "hcc_classifier" in deep_line
    assert new.patient_key not in done.stdout  # pseudonyms only
    with prepared.instance() as instance:
        runs = instance.get_runs(dg.RunsFilter(tags={"dagster/partition": pid}))
        assert [(r.job_name, r.status) for r in runs] == [("patient_pipeline", dg.DagsterRunStatus.SUCCESS)]
    rows = predicted["lake"].store.query(
        "SELECT model, status FROM current_hcc_predictions WHERE patient_id = ?", [pid]
    )
    assert dict(rows.rows())["deep"] == "predicted"
    assert (prepared.root / "incoming" / new.patient_key / ".complete").exists()
    again = subprocess.run([*command, str(folder)], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "already holds a study folder of this name" in again.stderr


def test_status_command_says_per_patient_what_is_current_stale_or_failed(predicted):
    import subprocess
    import sys
    from pathlib import Path

    prepared = predicted["prepared"]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HCC_ASSETS_")},
        "DAGSTER_HOME": str(prepared.home),
        "HCC_ASSETS_LAKE": str(prepared.root),
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    done = subprocess.run(
        [str(Path(sys.executable).parent / "hcc-assets"), "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    by_patient = {line.split()[0]: line for line in lines if line.startswith("pt-")}
    assert set(prepared.patients) | {predicted["unlabelled"]} <= set(by_patient)
    assert by_patient[predicted["unlabelled"]].split()[1] == "unlabelled"
    bad = lines.index(by_patient[predicted["bad_mask"]])
    assert by_patient[predicted["bad_mask"]].split()[2] == "failed"
    assert "radiomics excluded: liver mask implausible" in lines[bad + 1]
    # the retrain above left most embeddings on the old classifier: stale, and why
    stale = [line for line in by_patient.values() if line.split()[2] == "stale"]
    assert stale and any("embedding from classifier" in line for line in lines)
    assert f"{len(by_patient)} patients: " in lines[-2]
    # each patient's failed warning checks (a liver cut off by the field of view, a low Dice) under it
    with prepared.instance() as instance:
        warned = runner.latest_check_warnings(instance, list(by_patient))
    printed = {line.strip() for line in lines if line.startswith("    warning: ")}
    assert printed == {f"warning: {line}" for lines_of in warned.values() for line in lines_of}
    # the refused retrain of the test above: the version in use and why the other was refused
    assert lines[-1].endswith("(beats_chance_on_training)") and "in use; retrain" in lines[-1]
