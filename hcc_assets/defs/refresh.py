"""The scheduled refresh chain: cohort-level models on a cron, then every patient's features from
the new models, then the analysis once those features are current.

    cohort_refresh_schedule (cron $HCC_ASSETS_REFRESH_CRON, default Sundays 02:00)
      -> job cohort_refresh: cohort, hcc_classifier (+ liver_segmentation_model only when
         $HCC_ASSETS_REFRESH_SEGMENTATION is set, or when none is registered yet)
    refresh_features_sensor (on cohort_refresh success)
      -> one patient_features run per patient whose mask or embedding is not from the current
         model (run key = patient + model versions: never twice for the same models)
    analysis_refresh_sensor (polls the feature store)
      -> job analysis_refresh once every cohort patient's embedding is from the current classifier,
         no mask is from an older segmentation model, and no run that could change them is in
         flight; run key and cursor = a digest of the rows it would read, so once per state.

New model versions never overwrite old ones: `models` keeps every version with a `current` flag, and
each feature row says which model version made it (`model_version`). The state logic is SQL in
`hcc_assets.featurestore.freshness`; this module only turns it into run requests.
"""

from __future__ import annotations

import os

import dagster as dg

from hcc_assets.defs.cohort import cohort
from hcc_assets.defs.deep import deep_embedding, hcc_classifier
from hcc_assets.defs.jobs import (ANALYSIS_GROUPS, COHORT_GROUPS, analysis_job, asset_names_in_groups, cohort_job,
                                  cohort_run_config, patient_features_job, patient_pipeline_job, patient_run_config)
from hcc_assets.defs.resources import LakeResource, env_seconds
from hcc_assets.defs.segmentation import liver_mask, radiomic_features
from hcc_assets.featurestore import reads
from hcc_assets.featurestore.freshness import SEGMENTATION, analysis_inputs, current_version, stale_features

REFRESH_CRON_ENV = "HCC_ASSETS_REFRESH_CRON"
DEFAULT_REFRESH_CRON = "0 2 * * 0"  # weekly: Sundays at 02:00 (execution_timezone below)
RETRAIN_SEGMENTATION_ENV = "HCC_ASSETS_REFRESH_SEGMENTATION"
REFRESH_INTERVAL_ENV = "HCC_ASSETS_REFRESH_SENSOR_INTERVAL_S"
TRIGGER_TAG = "hcc_assets/trigger"

# Runs in any of these states may still change a patient's features or the models.
IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
             dg.DagsterRunStatus.STARTED]
PER_PATIENT_JOBS = (patient_features_job.name, patient_pipeline_job.name)


def refresh_cron() -> str:
    return os.environ.get(REFRESH_CRON_ENV, "").strip() or DEFAULT_REFRESH_CRON


def retrain_segmentation() -> bool:
    return os.environ.get(RETRAIN_SEGMENTATION_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# -- the schedule -------------------------------------------------------------------------------


@dg.schedule(
    name="cohort_refresh_schedule",
    job=cohort_job,
    cron_schedule=refresh_cron(),
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=f"Re-materializes the cohort-level assets on a cron (${REFRESH_CRON_ENV}, default "
    f"'{DEFAULT_REFRESH_CRON}', weekly): cohort and hcc_classifier. The segmentation model is kept (its "
    f"current version is reused) unless ${RETRAIN_SEGMENTATION_ENV}=1 or none is registered. The classifier "
    "reuses its saved version when its training data did not change. refresh_features_sensor and "
    "analysis_refresh_sensor carry on from there.",
)
def cohort_refresh_schedule(context: dg.ScheduleEvaluationContext, lake: LakeResource) -> dg.RunRequest:
    return refresh_request(lake, retrain_segmentation())


def _names(assets) -> list[str]:
    return [key.to_user_string() for a in assets for key in a.keys]


def refresh_request(lake: LakeResource, retrain_segmentation_model: bool) -> dg.RunRequest:
    """The deployment's cohort run config ($HCC_ASSETS_COHORT_RUN_CONFIG) rides along, limited to
    the assets this run executes."""
    tags = {TRIGGER_TAG: "schedule"}
    if retrain_segmentation_model or current_version(lake.store, SEGMENTATION) is None:
        # the whole job, segmentation model included
        return dg.RunRequest(tags=tags, run_config=cohort_run_config(asset_names_in_groups(*COHORT_GROUPS)))
    return dg.RunRequest(
        asset_selection=[cohort.key, hcc_classifier.key],
        asset_check_keys=[*cohort.check_keys, *hcc_classifier.check_keys],
        run_config=cohort_run_config(_names([cohort, hcc_classifier])),
        tags={**tags, "hcc_assets/segmentation": "reused"},
    )


# -- cohort_refresh succeeded: re-embed (and re-mask) every patient not on the current models -----


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[cohort_job],
    request_job=patient_features_job,
    minimum_interval_seconds=env_seconds(REFRESH_INTERVAL_ENV, 30),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="After a successful cohort_refresh run: one patient_features run per patient whose "
    "embedding is not from the current hcc_classifier (deep_embedding) or whose liver mask is not from "
    "the current segmentation model (liver_mask, radiomic_features). Run key = patient and model "
    "versions, so nothing runs twice for the same models.",
)
def refresh_features_sensor(context: dg.RunStatusSensorContext, lake: LakeResource):
    requests = feature_refresh_requests(lake)
    if not requests:
        return dg.SkipReason("every ingested patient's features are from the current models")
    context.log.info(f"{len(requests)} patient(s) to refresh after cohort_refresh run {context.dagster_run.run_id}")
    return requests


def feature_refresh_requests(lake: LakeResource) -> list[dg.RunRequest]:
    stale = stale_features(lake.store)
    masks, embeddings = set(stale.masks), set(stale.embeddings)
    requests = []
    for pid in stale.patients():
        assets = ([liver_mask, radiomic_features] if pid in masks else []) + ([deep_embedding] if pid in embeddings else [])
        requests.append(dg.RunRequest(
            partition_key=pid,
            run_key=f"{pid}:clf={stale.classifier_version}:seg={stale.segmentation_version}",
            asset_selection=[a.key for a in assets],
            asset_check_keys=[key for a in assets for key in a.check_keys],
            # the per-patient deployment config, only for the assets this run executes
            run_config=patient_run_config(_names(assets)),
            tags={TRIGGER_TAG: "refresh", "dagster/priority": "-1"},  # new scans (priority 1) go first
        ))
    return requests


# -- features current: the analysis, once per state ---------------------------------------------


@dg.sensor(
    job=analysis_job,
    minimum_interval_seconds=env_seconds(REFRESH_INTERVAL_ENV, 30),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Requests analysis_refresh once every cohort patient's embedding is from the current "
    "hcc_classifier, no liver mask is from an older segmentation model and no cohort_refresh or per-patient "
    "run of a cohort patient is in flight. Cursor and run key are a digest of the rows the analysis "
    "would read, so it runs once per state.",
)
def analysis_refresh_sensor(context: dg.SensorEvaluationContext, lake: LakeResource) -> dg.SensorResult:
    inputs = analysis_inputs(lake.store)
    if context.cursor == inputs.state:
        return dg.SensorResult(skip_reason=f"analysis already requested for state {inputs.state}")
    if not inputs.ready:
        return dg.SensorResult(skip_reason=f"features not current: {inputs.reason}")
    busy = _runs_in_flight(context.instance, lake)
    if busy:
        return dg.SensorResult(skip_reason=f"waiting for {busy} run(s) that may change the cohort's features")
    if context.cursor is None and _analysis_newer_than(context.instance, inputs.newest):
        # first evaluation (new daemon, e.g. after `make demo`): the last analysis already read these rows
        return dg.SensorResult(skip_reason=f"the last analysis_refresh run is newer than its inputs ({inputs.state})",
                               cursor=inputs.state)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"analysis:{inputs.state}", tags={TRIGGER_TAG: "features_current"},
                                    run_config=cohort_run_config(asset_names_in_groups(*ANALYSIS_GROUPS)))],
        cursor=inputs.state,
    )


def _runs_in_flight(instance: dg.DagsterInstance, lake: LakeResource) -> int:
    cohort_refresh = instance.get_runs_count(dg.RunsFilter(job_name=cohort_job.name, statuses=IN_FLIGHT))
    cohort_ids = reads.cohort_patients(lake.store)
    per_patient = 0
    for job in PER_PATIENT_JOBS:
        for run in instance.get_runs(dg.RunsFilter(job_name=job, statuses=IN_FLIGHT)):
            per_patient += run.tags.get("dagster/partition") in cohort_ids
    return cohort_refresh + per_patient


def _analysis_newer_than(instance: dg.DagsterInstance, newest) -> bool:
    if newest is None:
        return False
    records = instance.get_run_records(dg.RunsFilter(job_name=analysis_job.name,
                                                     statuses=[dg.DagsterRunStatus.SUCCESS]), limit=1)
    started = records[0].start_time if records else None
    return started is not None and started > newest.timestamp()
