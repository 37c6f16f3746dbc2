"""The automation conditions (hcc_assets.defs.automation) against an instance's event log, tick by
tick, with Dagster's own evaluation of a daemon tick: what each evaluation requests after new model
versions, a refused retrain, a new patient and the refresh cron. No run executes here; the real
daemon runs the same conditions in test_daemon.py."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.asset_daemon_cursor import AssetDaemonCursor
from dagster._core.definitions.automation_tick_evaluation_context import AutomationTickEvaluationContext
from dagster._core.definitions.declarative_automation.automation_condition_evaluator import (
    AutomationConditionEvaluator,
)
from dagster._core.events import DagsterEvent, DagsterEventType, StepMaterializationData
from dagster_shared.serdes import deserialize_value, serialize_value

from hcc_assets.definitions import defs
from hcc_assets_tests.defs.helpers import PER_PATIENT_ASSET_NAMES, in_memory_instance

KEY = dg.AssetKey
COHORT_LEVEL = [
    "cohort",
    "liver_segmentation_model",
    "hcc_classifier",
    "explainable_features",
    "explainability_sweep",
    "radiomic_model",
    "explainable_model",
    "model_metrics",
    "coefficients",
    "report",
]
BLOCKING_CHECKS = [("cohort", "both_classes_in_both_splits"), ("hcc_classifier", "beats_chance_on_training")]
MASK_CHECKS = ["mask_not_empty", "liver_volume_plausible"]  # blocking
ANALYSIS = {
    "explainable_features",
    "explainability_sweep",
    "radiomic_model",
    "explainable_model",
    "model_metrics",
    "coefficients",
    "report",
}


def _materialize(instance, name: str, version: str, partition: str | None = None) -> None:
    instance.report_runless_asset_event(
        dg.AssetMaterialization(asset_key=name, partition=partition, tags={"dagster/data_version": version})
    )


def _check(instance, asset: str, check: str, passed: bool, partition: str | None = None) -> None:
    instance.report_runless_asset_event(
        dg.AssetCheckEvaluation(asset_key=KEY(asset), check_name=check, passed=passed, partition=partition)
    )


class Ticks:
    """Successive evaluations sharing one cursor, as the automation sensor's ticks do, through the
    daemon's own tick evaluation (AutomationTickEvaluationContext; the cursor stored serialized
    between ticks, as the daemon stores it). `dg.evaluate_automation_conditions` evaluates the same
    conditions but rebuilds each cursor reading the dynamic partitions from the instance once per
    condition node, uncached: three quarters of this module's time."""

    def __init__(self, instance):
        self.instance = instance
        self.cursor = serialize_value(AssetDaemonCursor.empty())
        self.graph = defs.resolve_asset_graph()
        self.names = set(PER_PATIENT_ASSET_NAMES + COHORT_LEVEL)

    def __call__(self, when: dt.datetime | None = None) -> dict[str, set]:
        cursor = deserialize_value(self.cursor, AssetDaemonCursor)
        tick = AutomationTickEvaluationContext(
            evaluation_id=cursor.evaluation_id + 1,
            instance=self.instance,
            asset_graph=self.graph,
            cursor=cursor,
            materialize_run_tags={},
            observe_run_tags={},
            auto_observe_asset_keys=set(),
            asset_selection=dg.AssetSelection.all() | dg.AssetSelection.all_asset_checks(),
            logger=logging.getLogger("hcc_assets_tests.automation"),
            emit_backfills=False,
            evaluation_time=when,
        )
        run_requests, new_cursor, _ = tick.evaluate()
        self.cursor = serialize_value(new_cursor)
        requested: dict[str, set] = {}
        for request in run_requests:
            for key in request.asset_selection or []:
                if key.to_user_string() in self.names:
                    requested.setdefault(key.to_user_string(), set()).add(request.partition_key)
        return requested


class PipelineRun:
    """A patient_pipeline run as the drop-zone sensor makes it (the job, no asset selection; its
    materializations planned when it is created), whose events are stored as its steps would.
    With `assets`: a run of just those assets, as the automation requests a patient's refresh;
    with no partition, a run of cohort_refresh (a retrain, e.g. `assets=["hcc_classifier"]`, which
    plans its check too)."""

    def __init__(self, instance, partition: str | None, assets: list[str] | None = None):
        self.instance, self.partition = instance, partition
        trigger = "automation" if assets else "drop_zone"
        self.run = instance.create_run_for_job(
            defs.resolve_job_def("patient_pipeline" if partition else "cohort_refresh"),
            tags={"dagster/partition": partition, "hcc_assets/trigger": trigger} if partition else {},
            status=dg.DagsterRunStatus.NOT_STARTED,
            asset_selection={KEY(name) for name in assets} if assets else None,
        )

    def _event(self, event_type: DagsterEventType, step: str | None = None, data=None) -> None:
        event = DagsterEvent(event_type.value, job_name=self.run.job_name, step_key=step, event_specific_data=data)
        self.instance.report_dagster_event(event, run_id=self.run.run_id)

    def start(self) -> None:
        self._event(DagsterEventType.RUN_START)

    def materialize(self, name: str, version: str = "v1") -> None:
        materialization = dg.AssetMaterialization(
            asset_key=name, partition=self.partition, tags={"dagster/data_version": version}
        )
        self._event(DagsterEventType.ASSET_MATERIALIZATION, name, StepMaterializationData(materialization))
        if name == "liver_mask":
            for check in MASK_CHECKS:
                evaluation = dg.AssetCheckEvaluation(
                    asset_key=KEY(name), check_name=check, passed=True, partition=self.partition
                )
                self._event(DagsterEventType.ASSET_CHECK_EVALUATION, name, evaluation)

    def check(self, asset: str, check: str, passed: bool) -> None:
        evaluation = dg.AssetCheckEvaluation(asset_key=KEY(asset), check_name=check, passed=passed)
        self._event(DagsterEventType.ASSET_CHECK_EVALUATION, asset, evaluation)

    def succeed(self) -> None:
        self._event(DagsterEventType.RUN_SUCCESS)

    def fail(self) -> None:
        self._event(DagsterEventType.RUN_FAILURE)


def _during(monkeypatch, tick: Ticks, event) -> dict[str, set]:
    """An evaluation during which `event` happens: after Dagster's evaluator read the asset records
    (its view of what was materialized) and before it asks which runs are in progress. On the real
    daemon that is a step of a run finishing while the automation sensor evaluates, under load."""
    prefetch = AutomationConditionEvaluator.prefetch

    def prefetch_then_event(self: AutomationConditionEvaluator) -> None:
        prefetch(self)
        event()

    with monkeypatch.context() as patched:
        patched.setattr(AutomationConditionEvaluator, "prefetch", prefetch_then_event)
        return tick()


@pytest.fixture
def settled():
    """Two patients, p1 fully processed, p2 whose ingest failed (no preprocessed volume); every
    cohort-level asset materialized; the first evaluation done."""
    with in_memory_instance() as instance:
        instance.add_dynamic_partitions("patients", ["p1", "p2"])
        for name in PER_PATIENT_ASSET_NAMES:
            _materialize(instance, name, "v1", "p1")
        _materialize(instance, "raw_scan", "v1", "p2")
        for name in COHORT_LEVEL:
            _materialize(instance, name, "v1")
        for asset, check in BLOCKING_CHECKS:
            _check(instance, asset, check, True)
        for check in MASK_CHECKS:
            _check(instance, "liver_mask", check, True, "p1")
        ticks = Ticks(instance)
        assert ticks() == {}  # nothing on the first evaluation: it only records the state
        yield instance, ticks


def test_a_new_classifier_refreshes_patients_then_the_analysis_once_they_settle(settled):
    instance, tick = settled
    _materialize(instance, "hcc_classifier", "v2")
    _check(instance, "hcc_classifier", "beats_chance_on_training", True)
    # every patient with a volume gets its embedding and prediction again, in one run per patient;
    # the patient without a volume is left alone; the analysis does not start in this evaluation
    # (the refreshes it requests are not running yet); each refresh comes once it held for two
    # evaluations (automation._held)
    assert tick() == {}
    assert tick() == {"deep_embedding": {"p1"}, "hcc_prediction": {"p1"}}
    _materialize(instance, "deep_embedding", "v2", "p1")
    _materialize(instance, "hcc_prediction", "v2", "p1")
    # settled since the previous evaluation: the whole analysis, in one evaluation (one run)
    assert tick() == {name: {None} for name in ANALYSIS - {"radiomic_model"}}
    for name in ANALYSIS - {"radiomic_model"}:
        _materialize(instance, name, "v2")
    assert tick() == {}
    assert tick() == {"hcc_prediction": {"p1"}}  # the refitted explainable model predicts again
    _materialize(instance, "hcc_prediction", "v3", "p1")
    assert tick() == {}


def test_a_refresh_run_that_ends_during_an_evaluation_still_gets_the_refitted_models_prediction(settled, monkeypatch):
    """The last patient refresh ends while an evaluation runs, after Dagster read the asset records
    and before it asked which runs are in progress (seen on the real daemon, test_daemon): that
    evaluation sees nothing running, yet not the patient's new prediction. The analysis waits one
    more evaluation, which sees that prediction; otherwise the prediction and the refitted
    explainable model reach the same evaluation, and the patient is never predicted by that model."""
    instance, tick = settled
    _materialize(instance, "hcc_classifier", "v2")
    _check(instance, "hcc_classifier", "beats_chance_on_training", True)
    assert tick() == {}
    assert tick() == {"deep_embedding": {"p1"}, "hcc_prediction": {"p1"}}
    refresh = PipelineRun(instance, "p1", ["deep_embedding", "hcc_prediction"])
    refresh.start()
    refresh.materialize("deep_embedding")
    assert tick() == {}  # the embedding is made, the prediction still running

    def prediction_made_and_run_ended() -> None:
        refresh.materialize("hcc_prediction")
        refresh.succeed()

    assert _during(monkeypatch, tick, prediction_made_and_run_ended) == {}  # looks settled: held
    assert tick() == {name: {None} for name in ANALYSIS - {"radiomic_model"}}  # sees the prediction
    for name in ANALYSIS - {"radiomic_model"}:
        _materialize(instance, name, "v2")
    assert tick() == {}
    assert tick() == {"hcc_prediction": {"p1"}}  # the refitted explainable model predicts p1 again
    _materialize(instance, "hcc_prediction", "v3", "p1")
    assert tick() == {}


def test_a_retrain_refreshes_embedding_and_prediction_together_even_while_its_check_runs(settled):
    """The retrain run stores the new classifier, then (a fraction of a second later, more under
    load) its blocking check. Evaluations in between see a new model whose check is running: the
    embedding waits for the check, and so must the prediction, or they are requested apart (seen on
    the real daemon, test_daemon: one prediction-only run per patient, one tick before its
    embedding). The analysis stays one evaluation behind both, as without the wait."""
    instance, tick = settled
    retrain = PipelineRun(instance, None, ["hcc_classifier"])
    retrain.start()
    retrain.materialize("hcc_classifier", "v2")
    assert tick() == {}
    assert tick() == {}  # its check is still running: nothing is due yet
    retrain.check("hcc_classifier", "beats_chance_on_training", True)
    retrain.succeed()
    assert tick() == {}  # due from now, held one evaluation (_held)
    assert tick() == {"deep_embedding": {"p1"}, "hcc_prediction": {"p1"}}  # one run, without the analysis
    refresh = PipelineRun(instance, "p1", ["deep_embedding", "hcc_prediction"])
    refresh.start()
    assert tick() == {}  # the refresh runs
    refresh.materialize("deep_embedding", "v2")
    refresh.materialize("hcc_prediction", "v2")
    refresh.succeed()
    assert tick() == {}  # settled once: held
    assert tick() == {name: {None} for name in ANALYSIS - {"radiomic_model"}}


def test_a_retrain_that_keeps_its_version_or_is_refused_changes_nothing(settled):
    instance, tick = settled
    _materialize(instance, "hcc_classifier", "v1")  # reused saved model: same data version
    assert tick() == {}
    _materialize(instance, "hcc_classifier", "v9")  # a new version whose blocking check failed
    _check(instance, "hcc_classifier", "beats_chance_on_training", False)
    assert tick() == {}
    requested = tick()
    assert "deep_embedding" not in requested and not ANALYSIS & set(requested)
    # hcc_prediction does re-run: it says which (still current) version made each prediction
    assert requested == {"hcc_prediction": {"p1"}}


def test_a_new_segmentation_model_redoes_masks_and_radiomics_in_one_run(settled):
    instance, tick = settled
    _materialize(instance, "liver_segmentation_model", "v2")
    assert tick() == {}
    assert tick() == {"liver_mask": {"p1"}, "radiomic_features": {"p1"}, "hcc_prediction": {"p1"}}
    for name in ("liver_mask", "radiomic_features", "hcc_prediction"):
        _materialize(instance, name, "v2", "p1")
    assert set(tick()) == ANALYSIS  # radiomic_model too: the radiomics changed


def test_a_new_patient_whose_pipeline_stopped_before_its_prediction_is_predicted(settled):
    instance, tick = settled
    instance.add_dynamic_partitions("patients", ["p3"])
    assert tick() == {}  # no volume yet: the drop-zone sensor's run is still ingesting it
    run = PipelineRun(instance, "p3")
    run.start()
    for name in ("raw_scan", "nifti_volume", "preprocessed_volume", "liver_mask", "deep_embedding"):
        run.materialize(name)
    assert tick() == {}  # the run may still make the prediction
    run.fail()  # radiomics failed, so the run skipped the prediction
    assert tick() == {}
    # the deep prediction, the radiomic gap stated; the failed step is tried once more in that run
    # (its inputs are new since it last ran; a failure of the input itself fails again, and says why)
    assert tick() == {"radiomic_features": {"p3"}, "hcc_prediction": {"p3"}}
    _materialize(instance, "hcc_prediction", "v1", "p3")
    assert tick() == {}


@pytest.mark.parametrize("mid_tick", [False, True], ids=["steps-between-ticks", "steps-during-ticks"])
def test_a_new_patients_own_pipeline_run_is_never_duplicated(settled, monkeypatch, mid_tick):
    """The drop-zone sensor adds the partition, then its patient_pipeline run makes every
    per-patient asset: the automation requests nothing for it, whenever its evaluations fall: before
    the run exists, while it is queued, between its steps, or (mid_tick) while each step finishes."""
    instance, tick = settled
    instance.add_dynamic_partitions("patients", ["p3"])
    assert tick() == {}  # before the sensor created the run
    run = PipelineRun(instance, "p3")
    assert tick() == {}  # queued
    run.start()
    assert tick() == {}
    for name in PER_PATIENT_ASSET_NAMES:
        if mid_tick:
            assert _during(monkeypatch, tick, lambda name=name: run.materialize(name)) == {}, name
        else:
            run.materialize(name)
        assert tick() == {}, name
    run.succeed()
    assert tick() == {}
    assert tick() == {}


def test_the_refresh_cron_retrains_cohort_and_classifier_not_a_trained_segmentation_model():
    sunday_2am = dt.datetime(2026, 11, 29, 2, 0, tzinfo=dt.UTC)
    with in_memory_instance() as instance:
        for name in COHORT_LEVEL:
            _materialize(instance, name, "v1")
        tick = Ticks(instance)
        assert tick(sunday_2am - dt.timedelta(minutes=5)) == {}
        assert tick(sunday_2am - dt.timedelta(minutes=1)) == {}
        assert tick(sunday_2am + dt.timedelta(minutes=1)) == {"cohort": {None}, "hcc_classifier": {None}}
        assert tick(sunday_2am + dt.timedelta(minutes=2)) == {}  # once per tick


def test_the_refresh_cron_trains_a_segmentation_model_that_was_never_trained():
    sunday_2am = dt.datetime(2026, 11, 29, 2, 0, tzinfo=dt.UTC)
    with in_memory_instance() as instance:
        tick = Ticks(instance)
        assert tick(sunday_2am - dt.timedelta(minutes=1)) == {}
        assert tick(sunday_2am + dt.timedelta(minutes=1)) == {
            "cohort": {None},
            "hcc_classifier": {None},
            "liver_segmentation_model": {None},
        }


def test_deployment_settings_become_the_asset_config_defaults(monkeypatch, tmp_path):
    """Runs launched by automation carry no run config: the deployment files set the defaults that
    every run (and the UI's launchpad) starts from; a run's own config still wins."""
    import yaml

    from hcc_assets.defs import deployment
    from hcc_assets.defs.deep import HccClassifierConfig
    from hcc_assets.defs.ingest import PreprocessedVolumeConfig

    patient_file, cohort_file = tmp_path / "patient.yaml", tmp_path / "cohort.yaml"
    patient_file.write_text(
        yaml.safe_dump(
            {
                "ops": {"preprocessed_volume": {"config": {"target_shape": [32, 32, 16]}}},
                "execution": {"config": {"in_process": {}}},
            }
        )
    )
    cohort_file.write_text(yaml.safe_dump({"ops": {"hcc_classifier": {"config": {"seed": 2, "depth": 10}}}}))
    monkeypatch.setenv(deployment.PATIENT_RUN_CONFIG_ENV, str(patient_file))
    monkeypatch.setenv(deployment.COHORT_RUN_CONFIG_ENV, str(cohort_file))
    deployment._op_settings.cache_clear()
    try:
        classifier = deployment.deployed(HccClassifierConfig, "hcc_classifier")
        assert (classifier().seed, classifier().depth, classifier().lr) == (2, 10, HccClassifierConfig().lr)
        assert classifier(seed=5).seed == 5  # a run's own config wins
        assert list(deployment.deployed(PreprocessedVolumeConfig, "preprocessed_volume")().target_shape) == [32, 32, 16]
        assert deployment.deployed(HccClassifierConfig, "deep_embedding") is HccClassifierConfig  # nothing set

        cohort_file.write_text(yaml.safe_dump({"ops": {"hcc_classifier": {"config": {"sead": 2}}}}))
        deployment._op_settings.cache_clear()
        with pytest.raises(ValueError, match=r"unknown field.*sead"):
            deployment.deployed(HccClassifierConfig, "hcc_classifier")
        cohort_file.write_text(yaml.safe_dump({"resources": {}}))
        deployment._op_settings.cache_clear()
        with pytest.raises(ValueError, match="only `ops"):
            deployment.deployed(HccClassifierConfig, "hcc_classifier")
    finally:
        deployment._op_settings.cache_clear()


def test_the_shipped_fast_demo_settings_name_real_fields_and_change_only_what_they_say(monkeypatch):
    """deploy/fast_demo.yaml (the demo's settings): nnU-Net at 4 mm, the classifier for 20 epochs;
    every other default as it was."""
    from hcc_assets.defs import deployment
    from hcc_assets.defs.deep import HccClassifierConfig
    from hcc_assets.defs.segmentation import LiverSegmentationModelConfig

    settings = Path(__file__).resolve().parents[2] / "deploy" / "fast_demo.yaml"
    monkeypatch.setenv(deployment.COHORT_RUN_CONFIG_ENV, str(settings))
    monkeypatch.delenv(deployment.PATIENT_RUN_CONFIG_ENV, raising=False)
    deployment._op_settings.cache_clear()
    try:
        segmentation = deployment.deployed(LiverSegmentationModelConfig, "liver_segmentation_model")()
        classifier = deployment.deployed(HccClassifierConfig, "hcc_classifier")()
        assert segmentation.spacing == [4.0, 4.0] and LiverSegmentationModelConfig().spacing == [3.2, 3.2]
        assert (classifier.min_epochs, classifier.max_epochs) == (20, 20)
        assert segmentation.model_dump(exclude={"spacing"}) == LiverSegmentationModelConfig().model_dump(
            exclude={"spacing"}
        )
        assert classifier.model_dump(exclude={"min_epochs", "max_epochs"}) == HccClassifierConfig().model_dump(
            exclude={"min_epochs", "max_epochs"}
        )
    finally:
        deployment._op_settings.cache_clear()


def test_a_demo_lake_keeps_its_settings_until_full_takes_them_out(monkeypatch, tmp_path):
    """`hcc-assets demo` copies its settings into <lake>/deployment.yaml; with neither variable set
    every later process on that lake (make ui, sensors, workers) reads them, and a warm run worker
    started before they changed is not reused; a variable, where set, wins; --full removes them."""
    import argparse

    import yaml

    from hcc_assets import cli
    from hcc_assets.defs import deployment
    from hcc_assets.defs.segmentation import LiverSegmentationModelConfig
    from hcc_assets.defs.warm_runs import code_fingerprint

    lake = tmp_path / "lake"
    monkeypatch.setenv("HCC_ASSETS_LAKE", str(lake))
    monkeypatch.delenv(deployment.PATIENT_RUN_CONFIG_ENV, raising=False)
    monkeypatch.delenv(deployment.COHORT_RUN_CONFIG_ENV, raising=False)

    def spacing() -> list[float]:
        deployment._op_settings.cache_clear()
        return list(deployment.deployed(LiverSegmentationModelConfig, "liver_segmentation_model")().spacing)

    try:
        before = code_fingerprint()
        assert cli._demo_settings(str(lake), argparse.Namespace(full=False, settings=None)) is None
        assert (lake / "deployment.yaml").read_text() == (Path(cli.__file__).parents[1] / cli.DEMO_SETTINGS).read_text()
        assert spacing() == [4.0, 4.0]
        assert code_fingerprint() != before

        other = tmp_path / "cohort.yaml"
        other.write_text(yaml.safe_dump({"ops": {"liver_segmentation_model": {"config": {"spacing": [2.0, 2.0]}}}}))
        monkeypatch.setenv(deployment.COHORT_RUN_CONFIG_ENV, str(other))
        assert spacing() == [2.0, 2.0]  # the variable's file alone: the lake's is not merged in
        monkeypatch.delenv(deployment.COHORT_RUN_CONFIG_ENV)

        assert cli._demo_settings(str(lake), argparse.Namespace(full=True, settings=None)) is None
        assert not (lake / "deployment.yaml").exists()
        assert spacing() == [3.2, 3.2]  # the study's
        error = cli._demo_settings(str(lake), argparse.Namespace(full=False, settings=str(tmp_path / "none.yaml")))
        assert error is not None and "no such file" in error
    finally:
        deployment._op_settings.cache_clear()


def test_refresh_cron_comes_from_the_environment(monkeypatch):
    from hcc_assets.defs.automation import refresh_cron

    monkeypatch.delenv("HCC_ASSETS_REFRESH_CRON", raising=False)
    assert refresh_cron() == "0 2 * * 0"
    monkeypatch.setenv("HCC_ASSETS_REFRESH_CRON", "30 3 * * *")
    assert refresh_cron() == "30 3 * * *"
