"""The real Dagster daemon on workspace.yaml (what `make ui` starts), end to end, in one session:

1. hands-off: a patient folder copied into incoming/ becomes that patient's raw_scan ...
   hcc_prediction, made with the current models, and rows in the feature store, with no further
   action: one run of the per-patient pipeline, requested by the drop-zone sensor;
2. then the refresh, by declarative automation alone: a new hcc_classifier version -> every
   patient's deep_embedding and hcc_prediction again, one run per patient (segmentation model
   kept: masks untouched) -> the analysis once, when those have settled, with the deployment's
   cohort settings -> every patient's prediction again from the refitted explainable model.

The lake is a copy of the suite's prepared lake (conftest.prepared_lake: cohort ingested, both
models trained, every patient's features made with classifier v1; the per-patient run config, a
32x32x16 grid, is the deployment file the daemon's runs read: see hands_off.py), with its
DAGSTER_HOME, in which this process then predicts every patient with classifier v1, so the daemon
finds those patients ingested and the models current. The daemon and everything it starts run in
their own process group, killed at the end whatever happens. Once the daemon's sensors tick, a
new patient is dropped; once its rows are in, the classifier is retrained here, as a user
materializes it from the UI, and the daemon runs everything else on its own. That
the refresh cron requests exactly this retrain (cohort and classifier in one run, the deployment's
settings as the config defaults) is test_automation's, through Dagster's own evaluation of the
conditions: no test waits for a real cron minute. One daemon session for both flows: the daemon,
its code server and the prepared lake are the slow part, not the flows.
"""

from __future__ import annotations

import datetime as dt
import importlib
import os
import time

import dagster as dg
import pytest
import yaml

from hcc_assets.defs.automation import AUTOMATION_TRIGGER, TRIGGER_TAG
from hcc_assets.defs.warm_runs import WARM_PID_TAG
from hcc_assets.synthetic.cohort import SynthConfig, synthesize_cohort
from hcc_assets_tests.conftest import SMALL_COHORT
from hcc_assets_tests.defs.hands_off import (
    CLASSIFIER,
    SEGMENTATION,
    Daemon,
    copy_prepared,
    drop_patient,
    format_breakdown,
    latency_breakdown,
    run_errors,
    wait_for_rows,
    wait_for_sensor,
)
from hcc_assets_tests.defs.helpers import PER_PATIENT_ASSET_NAMES
from hcc_assets_tests.model_configs import CLASSIFIER_TRAINING, suite_compute

# The retrain differs from the prepared classifier: a new version. It must pass the blocking
# beats-chance check on training data with the weights of its best validation-loss epoch, and with
# 2 validation patients that epoch is often the first; this seed's is epoch 18 (train accuracy 1.0)
# on this cohort and split (seeds 1 and 3 pick epochs 1-2 and fail the check, stopping the chain).
RETRAIN = {
    **CLASSIFIER_TRAINING,
    "seed": 2,
    "lr": 0.05,
    "batch_size": 6,
    "min_epochs": 30,
    "max_epochs": 30,
    "patience": 30,
    "accept_below_chance": False,
}
COHORT_SETTINGS = {
    "ops": {
        "explainability_sweep": {"config": {"thresholds": [0.5], "measures": ["pearson"]}},
        "model_metrics": {"config": {"n_bootstrap": 200, "cv_repeats": 0}},  # 8 patients: no nested CV
    }
}
TERMINAL = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
ANALYSIS = {
    "explainable_features",
    "explainability_sweep",
    "explainable_model",
    "model_metrics",
    "coefficients",
    "report",
}


ASSETS = dg.load_assets_from_modules(
    [
        importlib.import_module(f"hcc_assets.defs.{name}")
        for name in ("ingest", "cohort", "segmentation", "deep", "analysis", "predictions")
    ]
)


def _predictions_with_the_first_classifier(prepared) -> None:
    resources = {"lake": prepared.lake, "compute": suite_compute()}
    with prepared.instance() as instance:
        for pid in prepared.patients:
            result = dg.materialize(
                ASSETS, selection=["hcc_prediction"], partition_key=pid, instance=instance, resources=resources
            )
            assert result.success, [e.step_failure_data.error.message for e in result.all_events if e.is_step_failure]


def _wait(what: str, daemon: Daemon, instance: dg.DagsterInstance, condition, timeout_s: float):
    """Poll `condition` until it returns something; fail at once when a run the daemon made fails."""
    deadline = time.time() + timeout_s
    since = dt.datetime.fromtimestamp(daemon.started_at, dt.UTC)
    while time.time() < deadline:
        daemon.check_alive()
        failed = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE], created_after=since))
        if failed:
            raise AssertionError(
                f"while waiting for {what}: run {failed[0].run_id} ({failed[0].job_name}) failed: "
                f"{run_errors(instance, failed[0].run_id)}"
            )
        value = condition()
        if value:
            return value
        time.sleep(1)
    runs = [
        (sorted(k.to_user_string() for k in r.asset_selection or []), r.status.value, r.tags.get("dagster/partition"))
        for r in instance.get_runs()
    ]
    raise AssertionError(f"no {what} after {timeout_s:.0f} s; runs {runs}\n{daemon.log_tail()}")


def _why_requested(instance: dg.DagsterInstance, run: dg.DagsterRun) -> list[str]:
    """The automation evaluations that requested `run`: asset and the condition labels that were true."""
    found = []
    for key in run.asset_selection or []:
        for record in instance.schedule_storage.get_auto_materialize_asset_evaluations(key=key, limit=50):
            evaluation = record.get_evaluation_with_run_ids()
            if run.run_id in evaluation.run_ids:
                found.append(f"{key.to_user_string()}: {evaluation.evaluation}"[:3000])
    return found


def _assets(run: dg.DagsterRun) -> set[str]:
    return {key.to_user_string() for key in run.asset_selection or []}


def _daemon_runs(instance, since: dt.datetime, besides: str) -> list[dg.DagsterRun]:
    """The runs made since `since`, besides the run `besides` (the test's own), oldest first."""
    return [r for r in reversed(instance.get_runs(dg.RunsFilter(created_after=since))) if r.run_id != besides]


def _check_hands_off(prepared, instance: dg.DagsterInstance, pid: str, runs: list[dg.DagsterRun]) -> None:
    """The dropped patient: one run, requested by the sensor, of the per-patient pipeline, and rows
    made with the models that were current when the scan arrived."""
    assert [(r.job_name, r.status) for r in runs] == [("patient_pipeline", dg.DagsterRunStatus.SUCCESS)], [
        (r.job_name, sorted(_assets(r)), r.tags.get(TRIGGER_TAG), _why_requested(instance, r)) for r in runs
    ]
    assert runs[0].tags["dagster/sensor_name"] == "incoming_scans_sensor"
    assert runs[0].tags["hcc_assets/trigger"] == "drop_zone"
    assert int(runs[0].tags["dagster/priority"]) > 0  # ahead of queued refresh runs
    # the prepared patients were recognised as ingested: the sensor launched nothing else
    launched = instance.get_runs(dg.RunsFilter(tags={"dagster/sensor_name": "incoming_scans_sensor"}))
    assert [r.tags["dagster/partition"] for r in launched] == [pid]
    assert pid in instance.get_dynamic_partitions("patients")
    for name in PER_PATIENT_ASSET_NAMES:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(name), asset_partitions=[pid]), limit=1
        ).records
        assert records and records[0].run_id == runs[0].run_id, name
    store = prepared.lake.store
    assert (
        store.query("SELECT model_version FROM liver_masks WHERE patient_id = ?", [pid]).item()
        == prepared.versions[SEGMENTATION]
    )
    assert (
        store.query("SELECT model_version FROM deep_embeddings WHERE patient_id = ?", [pid]).item()
        == prepared.versions[CLASSIFIER]
    )
    assert store.query("SELECT count(*) FROM radiomic_features WHERE patient_id = ?", [pid]).item() > 50
    assert store.query("SELECT count(*) FROM volumes WHERE patient_id = ?", [pid]).item() == 2  # nifti + preprocessed
    # its P(HCC) from the current classifier, unlabelled as it is; the LASSO models are not trained
    # yet in this lake, and the rows say so
    predictions = {
        r["model"]: r
        for r in store.query("SELECT * FROM current_hcc_predictions WHERE patient_id = ?", [pid]).iter_rows(named=True)
    }
    assert set(predictions) == {"deep", "radiomic", "explainable"}
    deep = predictions["deep"]
    assert deep["status"] == "predicted" and deep["model_version"] == prepared.versions[CLASSIFIER]
    assert 0.0 <= deep["probability"] <= 1.0 and deep["decision"] == (deep["probability"] > 0.5)
    assert predictions["radiomic"]["status"] == "unavailable"
    assert "radiomic_model" in predictions["radiomic"]["reason"]
    assert store.query("SELECT count(*) FROM cohort_split WHERE patient_id = ?", [pid]).item() == 0
    # the deployment's run config reached the sensor's run: the volume is on its grid
    shape = store.query("SELECT shape FROM volumes WHERE patient_id = ? AND kind = 'preprocessed'", [pid]).item()
    assert list(shape) == [32, 32, 16]


@pytest.mark.slow
def test_a_dropped_scan_is_processed_hands_off_then_a_retrain_refreshes_every_patient_and_the_analysis_once(
    prepared_lake, tmp_path, monkeypatch
):
    started = time.time()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))  # restored after the test
    for name in [n for n in os.environ if n.startswith("HCC_ASSETS_")]:
        monkeypatch.delenv(name)  # the prepared lake's own key and settings, as the daemon will see them
    prepared = copy_prepared(prepared_lake, tmp_path / "lake", tmp_path / "dagster_home")
    assert all(prepared.versions.values()), prepared.versions
    _predictions_with_the_first_classifier(prepared)
    new_patient = synthesize_cohort(tmp_path / "new", SynthConfig(**{**SMALL_COHORT, "patients": 1, "seed": 99}))[0]
    pid = prepared.lake.pseudonym(new_patient.patient_key)
    assert pid not in prepared.patients
    everyone = sorted([*prepared.patients, pid])
    store = prepared.lake.store
    first = prepared.versions[CLASSIFIER]
    masks_before = store.query("SELECT patient_id, run_id FROM liver_masks ORDER BY 1").rows()
    assert store.query("SELECT DISTINCT model_version FROM deep_embeddings").rows() == [(first,)]
    (prepared.root / "cohort_settings.yaml").write_text(yaml.safe_dump(COHORT_SETTINGS))

    daemon = Daemon(prepared, tmp_path / "daemon.log")
    daemon.env.update(
        {
            "HCC_ASSETS_AUTOMATION_INTERVAL_S": "1",  # the asset daemon then ticks every 5 s, its shortest loop
            "HCC_ASSETS_COHORT_RUN_CONFIG": str(prepared.root / "cohort_settings.yaml"),
        }
    )
    prepared_at = time.time()
    with daemon, prepared.instance() as instance:
        wait_for_sensor(instance, daemon)  # the daemon is up and has seen the prepared drop zone
        wait_for_sensor(instance, daemon, name="hcc_automation")
        up_at = time.time()

        # 1. hands-off: a new scan in the drop zone
        dropped = drop_patient(tmp_path / "new" / new_patient.patient_key, prepared.root / "incoming")
        rows = wait_for_rows(prepared, instance, daemon, pid, timeout_s=240)
        deadline = time.time() + 60
        while time.time() < deadline:
            new_patient_runs = instance.get_runs(dg.RunsFilter(tags={"dagster/partition": pid}))
            if new_patient_runs and all(r.status in TERMINAL for r in new_patient_runs):
                break
            time.sleep(0.5)
        print(
            f"\nnew scan -> rows, {pid}:\n"
            + format_breakdown(latency_breakdown(instance, pid, dropped, rows), rows - dropped)
        )
        _check_hands_off(prepared, instance, pid, new_patient_runs)
        masks_before.append((pid, new_patient_runs[0].run_id))
        hands_off_at = time.time()

        # 2. the refresh: a user retrains the classifier; the automation does the rest
        retrain = dg.materialize(
            ASSETS,
            selection=["cohort", "hcc_classifier"],
            instance=instance,
            resources={"lake": prepared.lake, "compute": suite_compute()},
            run_config={"ops": {"hcc_classifier": {"config": RETRAIN}}},
            raise_on_error=False,
        )
        assert retrain.success, [e.step_failure_data.error.message for e in retrain.all_events if e.is_step_failure]
        new = store.query("SELECT version FROM models WHERE model_name = ? AND current", [CLASSIFIER]).item()
        retrained_at = time.time()
        refresh_since = dt.datetime.fromtimestamp(hands_off_at, dt.UTC)

        def refresh_runs() -> list[dg.DagsterRun]:
            return _daemon_runs(instance, refresh_since, besides=retrain.run_id)

        def settled():
            explainable = store.query("SELECT version FROM models WHERE model_name = 'explainable_model' AND current")
            if new == first or explainable.height == 0:
                return None
            predictions = store.query("SELECT patient_id, model, model_version FROM current_hcc_predictions")
            made_with = {(r["patient_id"], r["model"]): r["model_version"] for r in predictions.iter_rows(named=True)}
            runs = refresh_runs()
            idle = runs and all(r.status in TERMINAL for r in runs)
            # every patient predicted by the new classifier and by the refitted explainable model (the
            # requests may come over more than one tick: one patient's predictions alone do not settle it)
            complete = all(
                made_with.get((p, "deep")) == new and made_with.get((p, "explainable")) == explainable.item()
                for p in everyone
            )
            return idle and complete

        _wait("every patient refreshed and predicted by the refitted models", daemon, instance, settled, timeout_s=900)
        settled_at = time.time()
        print(
            f"\nprepared in {prepared_at - started:.0f} s; daemon up in {up_at - prepared_at:.0f} s; hands-off "
            f"{hands_off_at - up_at:.0f} s; retrain {retrained_at - hands_off_at:.0f} s; the daemon's refresh settled "
            f"in {settled_at - retrained_at:.0f} s"
        )
        # two more automation ticks, whole: nothing else may be requested
        wait_for_sensor(instance, daemon, name="hcc_automation", since=settled_at, ticks=2, timeout_s=120)
        runs = refresh_runs()
        all_daemon_runs = _daemon_runs(instance, dt.datetime.fromtimestamp(daemon.started_at, dt.UTC), retrain.run_id)
        evaluations = instance.schedule_storage.get_auto_materialize_asset_evaluations(
            key=dg.AssetKey("deep_embedding"), limit=100
        )

    # the hands-off run was the only run before the retrain
    refresh_ids = {r.run_id for r in runs}
    assert [r.run_id for r in all_daemon_runs if r.run_id not in refresh_ids] == [new_patient_runs[0].run_id]
    # the retrain: a new version with its own settings; the automation never retrains by itself
    assert new != first
    params = store.query("SELECT params FROM models WHERE version = ?", [new]).item()
    assert '"seed": 2' in params and '"batch_size": 6' in params
    registry = dict(store.query("SELECT version, current FROM models WHERE model_name = ?", [CLASSIFIER]).rows())
    assert registry == {first: False, new: True}  # the old version stays queryable
    assert not [r for r in runs if {"cohort", "hcc_classifier"} & _assets(r)]
    assert {r.tags.get(TRIGGER_TAG) for r in runs} == {AUTOMATION_TRIGGER}
    # one re-embedding run per patient (the dropped one too), embedding and prediction together; masks untouched
    embed_runs = [r for r in runs if "deep_embedding" in _assets(r)]
    assert sorted(r.tags["dagster/partition"] for r in embed_runs) == everyone
    assert all(
        _assets(r) == {"deep_embedding", "hcc_prediction"} and r.status == dg.DagsterRunStatus.SUCCESS
        for r in embed_runs
    )
    assert store.query("SELECT DISTINCT model_version FROM deep_embeddings").rows() == [(new,)]
    assert store.query("SELECT patient_id, run_id FROM liver_masks ORDER BY 1").rows() == sorted(masks_before)
    assert store.query("SELECT count(*) FROM models WHERE model_name = ? AND current", [SEGMENTATION]).item() == 1
    # the analysis once, after every refresh had finished, in one run; the unlabelled patient is not in it
    analysis_runs = [r for r in runs if ANALYSIS & _assets(r)]
    assert [(_assets(r), r.status) for r in analysis_runs] == [(ANALYSIS, dg.DagsterRunStatus.SUCCESS)]
    analysis_created = _created_at(prepared, analysis_runs[0].run_id)
    assert all(_ended_at(prepared, r.run_id) <= analysis_created for r in embed_runs)
    assert store.query(
        "SELECT n_resamples FROM current_model_metrics WHERE scheme = 'holdout_bootstrap' "
        "AND model = 'deep' AND metric = 'accuracy'"
    ).rows() == [(200,)]  # the deployment's setting
    assert store.query("SELECT count(*) FROM cohort_split WHERE patient_id = ?", [pid]).item() == 0
    # then the predictions again (the explainable model changed), once per patient, and nothing else
    predict_runs = [r for r in runs if _assets(r) == {"hcc_prediction"}]
    assert sorted(r.tags["dagster/partition"] for r in predict_runs) == everyone
    assert len(runs) == 2 * len(everyone) + 1
    # the first run the daemon launches starts cold and starts its warm process (it preloads beside
    # that run); once warm, every run forks from it (WarmRunLauncher) instead of spawning cold
    warm = [WARM_PID_TAG in r.tags for r in all_daemon_runs]
    assert sum(warm) >= len(all_daemon_runs) // 2 and all(warm[warm.index(True) :]), warm
    # every patient's P(HCC) from both classifier versions is kept; the current view shows the new one
    versions = store.query(
        "SELECT patient_id, count(DISTINCT model_version) AS n FROM hcc_predictions WHERE model = 'deep' GROUP BY 1"
    )
    assert versions["n"].to_list() == [2] * len(everyone)
    assert set(store.query("SELECT DISTINCT version FROM predictions WHERE model = 'deep'")["version"]) == {first, new}
    # the dropped patient now has the radiomic and explainable predictions the LASSO models give
    statuses = dict(store.query("SELECT model, status FROM current_hcc_predictions WHERE patient_id = ?", [pid]).rows())
    assert statuses["explainable"] == "predicted", statuses
    assert (prepared.root / "reports" / "report.html").exists()
    # the automation's evaluations are recorded (the UI's Automation tab): why each ran or not
    recorded = [e.get_evaluation_with_run_ids() for e in evaluations]
    assert {e.evaluation.condition_snapshot.label for e in recorded} == {"refresh when an input changes"}
    # one evaluation requested the refresh: one run per patient, straight from the tick (no backfill)
    requesting = [e for e in recorded if e.run_ids]
    assert len(requesting) == 1, [sorted(e.run_ids) for e in requesting]
    assert set(requesting[0].run_ids) == {r.run_id for r in embed_runs}


def _created_at(prepared, run_id: str) -> float:
    with prepared.instance() as instance:
        return instance.get_run_record_by_id(run_id).create_timestamp.timestamp()


def _ended_at(prepared, run_id: str) -> float:
    with prepared.instance() as instance:
        return instance.get_run_record_by_id(run_id).end_time
