"""When assets re-materialize on their own: Dagster declarative automation (AutomationCondition),
evaluated by one automation sensor (`hcc_automation`). The UI's Automation tab shows every
evaluation, per asset and partition, with the sub-condition that was true or false.

    cohort, hcc_classifier      on each tick of $HCC_ASSETS_REFRESH_CRON (default Sundays 02:00 UTC);
    liver_segmentation_model    the same, only with $HCC_ASSETS_REFRESH_SEGMENTATION=1 or while none
                                was ever trained (a trained nnU-Net is kept: retraining takes hours)
    liver_mask, radiomic_features, deep_embedding
                                a patient's partition again when a model it was made with changes
                                (new data version, blocking checks passed: a refused retrain changes
                                nothing) and none of its inputs is missing or running
    hcc_prediction              the same for any model or input, and for a new patient whose
                                pipeline run failed before it (e.g. radiomics failed: the deep
                                prediction still comes, with the radiomic gap stated)
    analysis (explainable_features, radiomic_model, then the rest in the same run)
                                once a cohort-level input changed and every per-patient input has
                                settled (nothing running); failed partitions do not hold it back

New scans are the drop-zone sensor's (sensors.py): it adds the partition and requests the whole
per-patient pipeline at once, prediction included, which is faster than any automation tick.
"""

from __future__ import annotations

import os

import dagster as dg

AC = dg.AutomationCondition

REFRESH_CRON_ENV = "HCC_ASSETS_REFRESH_CRON"
DEFAULT_REFRESH_CRON = "0 2 * * 0"  # weekly: Sundays at 02:00 UTC
RETRAIN_SEGMENTATION_ENV = "HCC_ASSETS_REFRESH_SEGMENTATION"
INTERVAL_ENV = "HCC_ASSETS_AUTOMATION_INTERVAL_S"
DEFAULT_INTERVAL_S = 30
TRIGGER_TAG = "hcc_assets/trigger"
AUTOMATION_TRIGGER = "automation"

PER_PATIENT_GROUPS = ("ingest", "features", "predictions")
COHORT_LEVEL_GROUPS = ("cohort", "models")
ANALYSIS_GROUP = "analysis"


def refresh_cron() -> str:
    return os.environ.get(REFRESH_CRON_ENV, "").strip() or DEFAULT_REFRESH_CRON


def retrain_segmentation() -> bool:
    return os.environ.get(RETRAIN_SEGMENTATION_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _changed() -> AC:
    """The dependency has a new data version (not merely a new materialization: a retrain that
    reuses the saved model keeps its version) from a run that did not also run this asset."""
    return (AC.data_version_changed() & ~AC.executed_with_root_target()).with_label("new data version")


def _input_changed() -> AC:
    """A model or another cohort-level input has a new data version, or some input will be made in
    this evaluation's same run.

    A per-patient input's own new version does not count. Those come from the patient's own runs
    (the drop-zone sensor's patient_pipeline, the CLI's jobs): runs of a job, with no asset
    selection, so executed_with_root_target cannot see that they make this asset too (it also only
    looks at the asset's latest materialization, of any patient). Counted, every step of a new
    patient's pipeline armed `since_last_handled` for the next step, and an evaluation that read
    the asset records just before that step's materialization but its in-progress state just
    after (Dagster reads the two at different moments; under load seconds apart) saw it neither
    running nor updated and requested it again (test_a_new_patients_own_pipeline_run_is_never_duplicated).
    """
    per_patient = dg.AssetSelection.groups(*PER_PATIENT_GROUPS)
    return (
        AC.any_deps_match(_changed()).ignore(per_patient).with_label("a model changed")
        | AC.any_deps_match(AC.will_be_requested()).with_label("an input is made in the same run")
    ).with_label("an input changed")


def on_refresh_cron() -> AC:
    """Once per tick of the refresh cron. Not AutomationCondition.on_cron: that also waits until
    every dependency updated after the tick, and the models depend on every patient's volume,
    which for patients ingested long ago never happens."""
    cron = refresh_cron()
    # cron_tick_passed is generic in its key type; since_last_handled wants assets or checks
    tick: AC[dg.AssetKey | dg.AssetCheckKey] = AC.cron_tick_passed(cron, "UTC")
    return (tick.since_last_handled() & ~AC.in_progress()).with_label(f"on cron {cron}")


def segmentation_retrain() -> AC:
    if retrain_segmentation():
        return on_refresh_cron()
    return (on_refresh_cron() & AC.missing()).with_label(f"on cron {refresh_cron()}, only when never trained")


def refresh_patient_feature() -> AC:
    """A per-patient feature again when a model it reads has a new data version or an input will
    be made in the same run (a new mask, then its radiomics); never over missing or running inputs,
    nor from a model whose blocking checks failed. A re-ingested scan is the drop-zone sensor's:
    its patient_pipeline run makes everything again."""
    return (
        _input_changed().since_last_handled()
        & ~AC.any_deps_missing()
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
        & AC.all_deps_blocking_checks_passed()
    ).with_label("refresh when an input changes")


def refresh_prediction(volume: dg.AssetKey) -> AC:
    """hcc_prediction: as refresh_patient_feature, and also for a new partition whose pipeline run
    failed before it (e.g. radiomics failed); it only needs the patient's `volume`: a missing
    embedding or radiomic row becomes an 'unavailable' prediction with the reason.

    The new partition's case asks for execution_failed (its latest planned run failed without
    making it), not merely missing and not in progress: Dagster reads `missing` from the asset
    records it loaded at the start of the evaluation and in-progress runs afterwards, so while the
    pipeline run writes the prediction the partition can look both missing and not running."""
    no_volume = AC.any_deps_missing().allow(dg.AssetSelection.assets(volume)).with_label("no preprocessed volume")
    pipeline_failed = (AC.newly_missing().since_last_handled() & AC.execution_failed()).with_label(
        "new partition, its pipeline run failed before the prediction"
    )
    return (
        (_input_changed().since_last_handled() | pipeline_failed)
        & ~no_volume
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
    ).with_label("predict when a model or an input changes")


def analyse_when_settled() -> AC:
    """The top of the analysis (explainable_features, radiomic_model): after a cohort-level input
    (cohort, a model) has a new data version, once no per-patient input is running. The change
    must be at least one evaluation old, so that the per-patient refreshes it causes (requested in
    that evaluation, in runs of their own) are already seen as running."""
    cohort_level = dg.AssetSelection.groups(*COHORT_LEVEL_GROUPS)
    changed_now = AC.any_deps_match(_changed()).allow(cohort_level).with_label("a cohort-level input changed")
    return (
        changed_now.since_last_handled()
        & ~changed_now
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
        & AC.all_deps_blocking_checks_passed()
    ).with_label("analyse once per-patient inputs settle")


def follow_analysis() -> AC:
    """The rest of the analysis: in the same run as what it reads, or after it got a new data version."""
    upstream = dg.AssetSelection.groups(ANALYSIS_GROUP)
    changed = (
        AC.any_deps_match(_changed() | AC.will_be_requested()).allow(upstream).with_label("analysis input changed")
    )
    return (changed.since_last_handled() & ~AC.any_deps_in_progress() & ~AC.in_progress()).with_label(
        "follow the analysis"
    )


def automation_sensor() -> dg.AutomationConditionSensorDefinition:
    interval = int(os.environ.get(INTERVAL_ENV, "").strip() or DEFAULT_INTERVAL_S)
    return dg.AutomationConditionSensorDefinition(
        "hcc_automation",
        target=dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=interval,
        # refreshes queue behind new scans (the drop-zone sensor's runs have priority 1)
        run_tags={TRIGGER_TAG: AUTOMATION_TRIGGER, "dagster/priority": "-1"},
        description=f"Evaluates every asset's automation condition (hcc_assets.defs.automation) at most every "
        f"${INTERVAL_ENV} s (default {DEFAULT_INTERVAL_S}): the weekly retrain, per-patient refreshes from new "
        "models, predictions, and the analysis once per-patient inputs settle.",
    )
