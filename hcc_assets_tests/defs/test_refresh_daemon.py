"""The refresh under the real Dagster daemon, end to end, by declarative automation alone:

    a new hcc_classifier version -> every patient's deep_embedding and hcc_prediction again, one
    run per patient (segmentation model kept: masks untouched) -> the analysis once, when those
    have settled, with the deployment's cohort settings -> every patient's prediction again from
    the refitted explainable model.

The lake is prepared in this process (cohort ingested, both models trained, every patient's
features and predictions made with classifier v1); once the daemon's automation sensor runs, the
classifier is retrained here, as a user materializes it from the UI, and the daemon runs everything
else on its own. That the refresh cron requests exactly this retrain (cohort and classifier in one
run, the deployment's settings as the config defaults) is test_automation's, through Dagster's own
evaluation of the conditions: no test waits for a real cron minute.
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
from hcc_assets.defs.resources import ComputeResource
from hcc_assets.defs.warm_runs import WARM_PID_TAG
from hcc_assets_tests.defs.hands_off import (
    CLASSIFIER,
    SEGMENTATION,
    TEST_PATIENT_CONFIG,
    Daemon,
    prepare_lake,
    run_errors,
    wait_for_sensor,
)
from hcc_assets_tests.model_configs import CLASSIFIER_TRAINING

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


def _features_and_predictions_with_the_first_classifier(prepared) -> None:
    resources = {"lake": prepared.lake, "compute": ComputeResource(device="cpu", cpu_threads=2)}
    with prepared.instance() as instance:
        for pid in prepared.patients:
            result = dg.materialize(
                ASSETS,
                selection=["liver_mask", "radiomic_features", "deep_embedding", "hcc_prediction"],
                partition_key=pid,
                instance=instance,
                resources=resources,
                run_config={"ops": {"deep_embedding": TEST_PATIENT_CONFIG["ops"]["deep_embedding"]}},
                raise_on_error=False,
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


def _assets(run: dg.DagsterRun) -> set[str]:
    return {key.to_user_string() for key in run.asset_selection or []}


def _daemon_runs(instance, daemon, besides: str) -> list[dg.DagsterRun]:
    """The runs made since the daemon started, besides the run `besides` (the test's own), oldest first."""
    since = dt.datetime.fromtimestamp(daemon.started_at, dt.UTC)
    return [r for r in reversed(instance.get_runs(dg.RunsFilter(created_after=since))) if r.run_id != besides]


@pytest.mark.slow
def test_a_retrain_makes_automation_refresh_patients_and_analyse_once(
    small_cohort, liver_model_folder, tmp_path, monkeypatch
):
    started = time.time()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    for name in [n for n in os.environ if n.startswith("HCC_ASSETS_")]:
        monkeypatch.delenv(name)
    source, _ = small_cohort
    prepared = prepare_lake(
        tmp_path / "lake", source, patient_config=TEST_PATIENT_CONFIG, liver_model=liver_model_folder
    )
    _features_and_predictions_with_the_first_classifier(prepared)
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
        wait_for_sensor(instance, daemon, name="hcc_automation")
        up_at = time.time()
        retrain = dg.materialize(
            ASSETS,
            selection=["cohort", "hcc_classifier"],
            instance=instance,
            resources={"lake": prepared.lake, "compute": ComputeResource(device="cpu", cpu_threads=2)},
            run_config={"ops": {"hcc_classifier": {"config": RETRAIN}}},
            raise_on_error=False,
        )
        assert retrain.success, [e.step_failure_data.error.message for e in retrain.all_events if e.is_step_failure]
        new = store.query("SELECT version FROM models WHERE model_name = ? AND current", [CLASSIFIER]).item()
        retrained_at = time.time()

        def settled():
            explainable = store.query("SELECT version FROM models WHERE model_name = 'explainable_model' AND current")
            if new == first or explainable.height == 0:
                return None
            predictions = store.query("SELECT patient_id, model, model_version FROM current_hcc_predictions")
            done = {(r["model"], r["model_version"]) for r in predictions.iter_rows(named=True)}
            runs = _daemon_runs(instance, daemon, besides=retrain.run_id)
            idle = runs and all(r.status in TERMINAL for r in runs)
            wanted = {("deep", new), ("explainable", explainable.item())}
            complete = wanted <= done and predictions.filter(predictions["model_version"] == new).height == len(
                prepared.patients
            )
            return idle and complete and done

        _wait("every patient refreshed and predicted by the refitted models", daemon, instance, settled, timeout_s=900)
        settled_at = time.time()
        print(
            f"\nprepared in {prepared_at - started:.0f} s; daemon up in {up_at - prepared_at:.0f} s; retrain "
            f"{retrained_at - up_at:.0f} s; the daemon's refresh settled in {settled_at - retrained_at:.0f} s"
        )
        time.sleep(11)  # two more automation ticks: nothing else may be requested
        runs = _daemon_runs(instance, daemon, besides=retrain.run_id)
        evaluations = instance.schedule_storage.get_auto_materialize_asset_evaluations(
            key=dg.AssetKey("deep_embedding"), limit=100
        )

    # the retrain: a new version with its own settings; the automation never retrains by itself
    assert new != first
    params = store.query("SELECT params FROM models WHERE version = ?", [new]).item()
    assert '"seed": 2' in params and '"batch_size": 6' in params
    registry = dict(store.query("SELECT version, current FROM models WHERE model_name = ?", [CLASSIFIER]).rows())
    assert registry == {first: False, new: True}  # the old version stays queryable
    assert not [r for r in runs if {"cohort", "hcc_classifier"} & _assets(r)]
    assert {r.tags.get(TRIGGER_TAG) for r in runs} == {AUTOMATION_TRIGGER}
    # one re-embedding run per patient, embedding and prediction together; masks untouched
    embed_runs = [r for r in runs if "deep_embedding" in _assets(r)]
    assert sorted(r.tags["dagster/partition"] for r in embed_runs) == sorted(prepared.patients)
    assert all(
        _assets(r) == {"deep_embedding", "hcc_prediction"} and r.status == dg.DagsterRunStatus.SUCCESS
        for r in embed_runs
    )
    assert store.query("SELECT DISTINCT model_version FROM deep_embeddings").rows() == [(new,)]
    assert store.query("SELECT patient_id, run_id FROM liver_masks ORDER BY 1").rows() == masks_before
    assert store.query("SELECT count(*) FROM models WHERE model_name = ? AND current", [SEGMENTATION]).item() == 1
    # the analysis once, after every refresh had finished, in one run
    analysis_runs = [r for r in runs if ANALYSIS & _assets(r)]
    assert [(_assets(r), r.status) for r in analysis_runs] == [(ANALYSIS, dg.DagsterRunStatus.SUCCESS)]
    analysis_created = _created_at(prepared, analysis_runs[0].run_id)
    assert all(_ended_at(prepared, r.run_id) <= analysis_created for r in embed_runs)
    assert store.query(
        "SELECT n_resamples FROM current_model_metrics WHERE scheme = 'holdout_bootstrap' "
        "AND model = 'deep' AND metric = 'accuracy'"
    ).rows() == [(200,)]  # the deployment's setting
    # then the predictions again (the explainable model changed), once per patient, and nothing else
    predict_runs = [r for r in runs if _assets(r) == {"hcc_prediction"}]
    assert sorted(r.tags["dagster/partition"] for r in predict_runs) == sorted(prepared.patients)
    assert len(runs) == 2 * len(prepared.patients) + 1
    # once the daemon's warm process is up (it preloads while the first runs start cold), every run
    # forks from it (WarmRunLauncher) instead of spawning cold
    warm = [WARM_PID_TAG in r.tags for r in runs]
    assert sum(warm) >= len(runs) // 2 and all(warm[warm.index(True) :]), warm
    # every patient's P(HCC) from both classifier versions is kept; the current view shows the new one
    versions = store.query(
        "SELECT patient_id, count(DISTINCT model_version) AS n FROM hcc_predictions WHERE model = 'deep' GROUP BY 1"
    )
    assert versions["n"].to_list() == [2] * len(prepared.patients)
    assert set(store.query("SELECT DISTINCT version FROM predictions WHERE model = 'deep'")["version"]) == {first, new}
    assert (prepared.root / "reports" / "report.html").exists()
    # the automation's evaluations are recorded (the UI's Automation tab): why each ran or not
    recorded = [e.get_evaluation_with_run_ids() for e in evaluations]
    assert {e.evaluation.condition_snapshot.label for e in recorded} == {"refresh when an input changes"}
    assert sum(len(e.run_ids) for e in recorded) == 1  # the one evaluation that requested the refresh


def _created_at(prepared, run_id: str) -> float:
    with prepared.instance() as instance:
        return instance.get_run_record_by_id(run_id).create_timestamp.timestamp()


def _ended_at(prepared, run_id: str) -> float:
    with prepared.instance() as instance:
        return instance.get_run_record_by_id(run_id).end_time
