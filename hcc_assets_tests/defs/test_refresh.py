"""The refresh chain's decisions, with Dagster's sensor/schedule test contexts on a real temp
instance and a real temp feature store (rows written directly: no training needed to ask
"which features are stale?")."""

from __future__ import annotations

import uuid

import dagster as dg
import numpy as np
import polars as pl
import pytest
from dagster._core.test_utils import create_run_for_test

from hcc_assets.defs.refresh import (analysis_refresh_sensor, cohort_refresh_schedule, refresh_cron,
                                     refresh_features_sensor)
from hcc_assets.defs.resources import LakeResource
from hcc_assets.featurestore import FeatureStore
from hcc_assets.featurestore.freshness import CLASSIFIER, SEGMENTATION

COHORT = ["pt-a", "pt-b", "pt-c"]
NEW = "pt-new"  # ingested by the drop zone after the cohort was split: not in cohort_split


def _rows(store: FeatureStore, table: str, pid: str, row: dict) -> None:
    frame = pl.DataFrame([{"patient_id": pid, **row}], infer_schema_length=None)
    store.replace_partition(table, pid, FeatureStore.with_provenance(frame, version="test", run_id=uuid.uuid4().hex))


def register(store: FeatureStore, name: str, version: str) -> None:
    row = pl.DataFrame([{"model_name": name, "kind": "test", "path": f"/models/{version}", "init": "test",
                         "params": "{}", "training_patients": COHORT, "metrics": "{}"}],
                       schema_overrides={"training_patients": pl.List(pl.String)})
    store.register_model(FeatureStore.with_provenance(row, version=version, run_id=uuid.uuid4().hex))


def embed(store: FeatureStore, pid: str, version: str) -> None:
    _rows(store, "deep_embeddings", pid, {"model_version": version,
                                          "embedding": pl.Series([np.zeros(128, np.float32)], dtype=pl.Array(pl.Float32, 128))[0]})


def mask(store: FeatureStore, pid: str, version: str) -> None:
    _rows(store, "liver_masks", pid, {"model_version": version, "path": f"/{pid}/mask.nii.gz", "sha256": "0" * 64,
                                      "liver_voxels": 1000, "liver_ml": 1500.0})


@pytest.fixture
def lake(tmp_path) -> LakeResource:
    lake = LakeResource(root=str(tmp_path / "lake"), quiet_seconds=3600)
    store = lake.store
    for pid in [*COHORT, NEW]:
        _rows(store, "volumes", pid, {"kind": "preprocessed", "path": f"/{pid}.nii.gz", "sha256": "0" * 64,
                                      "shape": [128, 128, 64], "spacing_mm": [1.0, 1.0, 1.0], "orientation": "RAS"})
    cohort = pl.DataFrame({"patient_id": COHORT, "hcc": [True, False, True], "source": ["x"] * 3,
                           "split": ["train", "train", "validation"], "seed": [0] * 3})
    store.replace_table("cohort_split", FeatureStore.with_provenance(cohort, version="test", run_id="r0"))
    register(store, SEGMENTATION, "seg-1")
    register(store, CLASSIFIER, "clf-1")
    for pid in [*COHORT, NEW]:
        mask(store, pid, "seg-1")
        embed(store, pid, "clf-1")
    return lake


@pytest.fixture
def instance():
    with dg.instance_for_test() as instance:
        yield instance


def _cohort_refresh_success(instance):
    """A real RUN_SUCCESS event and run (of a trivial job; the sensor's monitored_jobs filter is
    the daemon's business, not the function's)."""

    @dg.op
    def noop():
        return None

    @dg.job(name="cohort_refresh")
    def stand_in():
        noop()

    result = stand_in.execute_in_process(instance=instance)
    return result.get_run_success_event(), result.dagster_run


def features_tick(instance, lake) -> list[dg.RunRequest] | dg.SkipReason:
    event, run = _cohort_refresh_success(instance)
    context = dg.build_run_status_sensor_context(sensor_name="refresh_features_sensor", dagster_event=event,
                                                 dagster_instance=instance, dagster_run=run, resources={"lake": lake})
    return refresh_features_sensor(context)


def analysis_tick(instance, lake, cursor) -> dg.SensorResult:
    return analysis_refresh_sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources={"lake": lake}))


# -- refresh_features_sensor ---------------------------------------------------------------------


def test_features_refresh_requests_only_stale_patients_once_per_model_version(instance, lake):
    from hcc_assets.definitions import defs

    assert isinstance(features_tick(instance, lake), dg.SkipReason)  # all current: nothing to do

    register(lake.store, CLASSIFIER, "clf-2")  # retrained classifier: every patient re-embedded, not re-masked
    requests = features_tick(instance, lake)
    assert sorted(r.partition_key for r in requests) == sorted([*COHORT, NEW])
    assert {tuple(r.asset_selection) for r in requests} == {(dg.AssetKey("deep_embedding"),)}
    assert all(r.run_key == f"{r.partition_key}:clf=clf-2:seg=seg-1" for r in requests)
    assert all(r.tags["hcc_assets/trigger"] == "refresh" for r in requests)
    assert all(int(r.tags["dagster/priority"]) < 0 for r in requests)  # behind new scans in the run queue
    job_assets = defs.resolve_job_def("patient_features").asset_layer.executable_asset_keys
    assert all(set(r.asset_selection) <= job_assets for r in requests)
    # the same state asks with the same run keys: the daemon launches each at most once
    assert [r.run_key for r in features_tick(instance, lake)] == [r.run_key for r in requests]

    for pid in COHORT:
        embed(lake.store, pid, "clf-2")
    assert [r.partition_key for r in features_tick(instance, lake)] == [NEW]

    register(lake.store, SEGMENTATION, "seg-2")  # a new segmentation model: re-mask (and radiomics) too
    requests = {r.partition_key: r for r in features_tick(instance, lake)}
    assert sorted(requests) == sorted([*COHORT, NEW])
    assert set(requests["pt-a"].asset_selection) == {dg.AssetKey("liver_mask"), dg.AssetKey("radiomic_features")}
    assert set(requests[NEW].asset_selection) == {dg.AssetKey("liver_mask"), dg.AssetKey("radiomic_features"),
                                                  dg.AssetKey("deep_embedding")}
    assert requests["pt-a"].run_key == "pt-a:clf=clf-2:seg=seg-2"
    assert {k.name for k in requests["pt-a"].asset_check_keys} >= {"mask_not_empty", "features_finite"}


def test_old_model_versions_stay_in_the_registry(lake):
    register(lake.store, CLASSIFIER, "clf-2")
    models = lake.store.query("SELECT version, current FROM models WHERE model_name = ? ORDER BY version", [CLASSIFIER])
    assert models.rows() == [("clf-1", False), ("clf-2", True)]


# -- analysis_refresh_sensor ---------------------------------------------------------------------


def test_analysis_runs_once_per_state_and_only_when_features_are_current(instance, lake):
    first = analysis_tick(instance, lake, None)
    assert [r.run_key for r in first.run_requests] == [f"analysis:{first.cursor}"]
    again = analysis_tick(instance, lake, first.cursor)
    assert not again.run_requests and again.cursor is None  # same state: nothing, cursor kept

    register(lake.store, CLASSIFIER, "clf-2")  # embeddings now stale
    stale = analysis_tick(instance, lake, first.cursor)
    assert not stale.run_requests and "no embedding from the current hcc_classifier" in stale.skip_reason.skip_message
    embed(lake.store, "pt-a", "clf-2")
    embed(lake.store, "pt-b", "clf-2")
    assert not analysis_tick(instance, lake, first.cursor).run_requests  # pt-c still stale

    embed(lake.store, "pt-c", "clf-2")
    # a cohort patient's features run in flight: wait; a new (non-cohort) patient's run does not block
    busy = create_run_for_test(instance, job_name="patient_features", status=dg.DagsterRunStatus.STARTED,
                               tags={"dagster/partition": "pt-b"})
    create_run_for_test(instance, job_name="patient_pipeline", status=dg.DagsterRunStatus.NOT_STARTED,
                        tags={"dagster/partition": NEW})
    waiting = analysis_tick(instance, lake, first.cursor)
    assert not waiting.run_requests and "waiting for 1 run" in waiting.skip_reason.skip_message
    instance.report_run_failed(busy)

    second = analysis_tick(instance, lake, first.cursor)
    assert len(second.run_requests) == 1 and second.cursor not in (None, first.cursor)
    assert second.run_requests[0].run_key == f"analysis:{second.cursor}"
    assert not analysis_tick(instance, lake, second.cursor).run_requests

    # the drop zone re-delivered a cohort patient: same model, new rows -> a new state, one more analysis
    embed(lake.store, "pt-a", "clf-2")
    third = analysis_tick(instance, lake, second.cursor)
    assert len(third.run_requests) == 1 and third.cursor != second.cursor
    # ... and a new non-cohort patient's features change nothing the analysis reads
    embed(lake.store, NEW, "clf-2")
    assert not analysis_tick(instance, lake, third.cursor).run_requests


def test_analysis_waits_for_masks_of_a_new_segmentation_model_and_a_running_cohort_refresh(instance, lake):
    register(lake.store, SEGMENTATION, "seg-2")
    result = analysis_tick(instance, lake, None)
    assert not result.run_requests and "liver mask from another segmentation model" in result.skip_reason.skip_message
    for pid in COHORT:
        mask(lake.store, pid, "seg-2")
    create_run_for_test(instance, job_name="cohort_refresh", status=dg.DagsterRunStatus.STARTED)
    assert not analysis_tick(instance, lake, None).run_requests


def test_analysis_already_newer_than_its_inputs_is_not_repeated_by_a_new_daemon(instance, lake):
    # e.g. `make demo` ran the analysis itself, then `make ui` starts the daemon (no cursor yet)
    run = create_run_for_test(instance, job_name="analysis_refresh", status=dg.DagsterRunStatus.STARTED)
    instance.report_run_failed(run)  # not a success: does not count
    assert len(analysis_tick(instance, lake, None).run_requests) == 1

    @dg.op
    def noop():
        return None

    @dg.job(name="analysis_refresh")
    def stand_in():
        noop()

    assert stand_in.execute_in_process(instance=instance).success
    result = analysis_tick(instance, lake, None)
    assert not result.run_requests and result.cursor  # remembered as done
    embed(lake.store, "pt-a", "clf-1")  # newer inputs: runs
    assert len(analysis_tick(instance, lake, result.cursor).run_requests) == 1


def test_no_analysis_without_a_classifier(instance, tmp_path):
    lake = LakeResource(root=str(tmp_path / "empty"))
    result = analysis_tick(instance, lake, None)
    assert not result.run_requests and "no hcc_classifier" in result.skip_reason.skip_message


# -- cohort_refresh_schedule ---------------------------------------------------------------------


def _schedule_request(instance, lake) -> dg.RunRequest:
    result = cohort_refresh_schedule(dg.build_schedule_context(instance=instance, resources={"lake": lake}))
    return result


def test_schedule_keeps_the_segmentation_model_unless_told_to_retrain(instance, lake, monkeypatch, tmp_path):
    monkeypatch.delenv("HCC_ASSETS_REFRESH_SEGMENTATION", raising=False)
    request = _schedule_request(instance, lake)
    assert set(request.asset_selection) == {dg.AssetKey("cohort"), dg.AssetKey("hcc_classifier")}
    assert {k.name for k in request.asset_check_keys} >= {"both_classes_in_both_splits", "beats_chance_on_training"}
    assert request.tags["hcc_assets/trigger"] == "schedule"

    monkeypatch.setenv("HCC_ASSETS_REFRESH_SEGMENTATION", "1")
    assert _schedule_request(instance, lake).asset_selection is None  # the whole cohort_refresh job

    monkeypatch.delenv("HCC_ASSETS_REFRESH_SEGMENTATION")
    fresh = LakeResource(root=str(tmp_path / "fresh"))  # no segmentation model registered yet: train one
    assert _schedule_request(instance, fresh).asset_selection is None


def test_refresh_cron_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("HCC_ASSETS_REFRESH_CRON", raising=False)
    assert refresh_cron() == "0 2 * * 0"
    monkeypatch.setenv("HCC_ASSETS_REFRESH_CRON", "30 3 * * *")
    assert refresh_cron() == "30 3 * * *"


def test_deployment_run_config_reaches_each_run_limited_to_its_assets(instance, lake, monkeypatch, tmp_path):
    """Dagster refuses run config for an op a run does not execute, so one deployment file per level
    (patients, cohort) must be cut down to each run's assets, subsets included."""
    import yaml

    from hcc_assets.defs.jobs import patient_run_config

    patient_file, cohort_file = tmp_path / "patient.yaml", tmp_path / "cohort.yaml"
    patient_file.write_text(yaml.safe_dump({"ops": {
        "preprocessed_volume": {"config": {"target_shape": [32, 32, 16]}},
        "deep_embedding": {"config": {"allow_model_below_chance": True}},
        "liver_mask": {"config": {"min_dice_liver": 0.5}}}}))
    cohort_file.write_text(yaml.safe_dump({"ops": {
        "hcc_classifier": {"config": {"medicalnet_checkpoint": "/models/resnet_50_23dataset.pth"}},
        "liver_segmentation_model": {"config": {"epochs": 3}},
        "model_metrics": {"config": {"n_bootstrap": 200}}}}))
    monkeypatch.setenv("HCC_ASSETS_PATIENT_RUN_CONFIG", str(patient_file))
    monkeypatch.setenv("HCC_ASSETS_COHORT_RUN_CONFIG", str(cohort_file))

    assert set(patient_run_config(["liver_mask", "radiomic_features", "deep_embedding"])["ops"]) == \
        {"liver_mask", "deep_embedding"}
    assert patient_run_config(["deep_embedding"])["execution"] == {"config": {"in_process": {}}}

    register(lake.store, CLASSIFIER, "clf-2")  # only embeddings are stale
    requests = features_tick(instance, lake)
    assert requests and all(r.run_config["ops"] == {"deep_embedding": {"config": {"allow_model_below_chance": True}}}
                            for r in requests)

    monkeypatch.delenv("HCC_ASSETS_REFRESH_SEGMENTATION", raising=False)
    scheduled = _schedule_request(instance, lake)  # segmentation model reused: no config for it
    assert scheduled.run_config["ops"] == {
        "hcc_classifier": {"config": {"medicalnet_checkpoint": "/models/resnet_50_23dataset.pth"}}}
    monkeypatch.setenv("HCC_ASSETS_REFRESH_SEGMENTATION", "1")
    assert set(_schedule_request(instance, lake).run_config["ops"]) == {"hcc_classifier", "liver_segmentation_model"}

    for pid in [*COHORT, NEW]:
        embed(lake.store, pid, "clf-2")
    analysis = analysis_tick(instance, lake, None)
    assert analysis.run_requests, analysis.skip_reason
    assert analysis.run_requests[0].run_config["ops"] == {"model_metrics": {"config": {"n_bootstrap": 200}}}
