"""When assets re-materialize on their own: Dagster declarative automation (AutomationCondition),
evaluated by one automation sensor (`hcc_automation`). The UI's Automation tab shows every
evaluation, per asset and partition, with the sub-condition that was true or false.

    cohort, hcc_classifier      on each tick of $HCC_ASSETS_REFRESH_CRON (default Sundays 02:00 UTC);
    liver_segmentation_model    the same, only with $HCC_ASSETS_REFRESH_SEGMENTATION=1 or while none
                                was ever trained (a trained nnU-Net is kept: retraining takes hours)
    liver_mask, radiomic_features, deep_embedding
                                a patient's partition again when a model it was made with changes
                                (new data version, blocking checks passed: a refused retrain changes
                                nothing) and none of its inputs is missing or running, in two
                                evaluations in a row (`_held`: never a duplicate of a running step)
    hcc_prediction              the same for any model or input, and for a new patient whose
                                pipeline run could not make it (e.g. radiomics failed: the deep
                                prediction still comes, with the radiomic gap stated)
    analysis (explainable_features, radiomic_model, then the rest in the same run)
                                once a cohort-level input changed and every per-patient input and
                                prediction has settled (nothing running, in two evaluations in a
                                row); failed partitions do not hold it back

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
PREDICTION = dg.AssetKey("hcc_prediction")  # downstream of the analysis, which waits for it (analyse_when_settled)
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
    """Some input has a new data version, or will be made in this evaluation's same run."""
    return AC.any_deps_match(_changed() | AC.will_be_requested()).with_label("an input changed")


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


def _held(condition: AC, label: str) -> AC:
    """`condition` once it has held in two evaluations in a row (one automation tick later), or at
    once when an input is requested in this same evaluation (a new mask, then its radiomics and
    prediction in that run: the input passed this rule itself).

    Why: an evaluation reads the asset records when it starts and asks which runs are in progress
    later (two reads; seconds apart under load). A step of a patient's own pipeline run that
    finishes in between looks, for that one evaluation, neither made nor running, and its partition
    would be requested again (test_automation's steps-during-ticks case). The next evaluation sees
    the materialization, which resets `since_last_handled`; a real refresh still holds then."""
    with_an_input = AC.any_deps_match(AC.will_be_requested()).with_label("an input is requested now")
    return (condition & (~condition.newly_true() | with_an_input)).with_label(label)


def refresh_patient_feature() -> AC:
    """A per-patient feature again when an input has a new data version (a retrained model, a
    re-ingested volume) or will be made in the same run; never over missing or running inputs,
    nor from a model whose blocking checks failed."""
    due = (
        _input_changed().since_last_handled()
        & ~AC.any_deps_missing()
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
        & AC.all_deps_blocking_checks_passed()
    ).with_label("an input changed, and nothing it needs is missing or running")
    return _held(due, "refresh when an input changes")


def refresh_prediction(volume: dg.AssetKey) -> AC:
    """hcc_prediction: as refresh_patient_feature, and also for a partition that is still missing
    (its pipeline run stopped before it); it only needs the patient's `volume`: a missing
    embedding or radiomic row becomes an 'unavailable' prediction with the reason. A model whose
    blocking check failed does re-run it (each prediction says which version is still in use), but
    not while that check is still running: the embedding waits for the check, and the prediction
    must become due with it to go in the same run (a retrain stores its model, then its check)."""
    checking = AC.any_deps_match(AC.any_checks_match(AC.in_progress())).with_label("an input's check is running")
    no_volume = AC.any_deps_missing().allow(dg.AssetSelection.assets(volume)).with_label("no preprocessed volume")
    due = (
        (AC.newly_missing() | _input_changed()).since_last_handled()
        & ~no_volume
        & ~checking
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
    ).with_label("a model or an input changed, or the partition is new, and nothing it needs is running")
    return _held(due, "predict when a model or an input changes")


def analyse_when_settled() -> AC:
    """The top of the analysis (explainable_features, radiomic_model): after a cohort-level input
    (cohort, a model) has a new data version, once no per-patient input and no patient's
    prediction is running, in two evaluations in a row. The per-patient refreshes a change causes
    are requested in the evaluation after it (_held), in runs of their own, and are seen as
    running from the next: the second evaluation sees them.

    Why the predictions, which the analysis does not read: a prediction made while the analysis
    refits the explainable model, and first seen in the same evaluation as that model, counts as
    handled after it (`since_last_handled`), and its patient would never be predicted by the refit.
    Why twice: a refresh run that ends between an evaluation's two reads (see _held) looks neither
    running nor done; the next evaluation sees its prediction before the analysis is requested.
    Why not in the evaluation that first sees a cohort-level input's blocking check: a retrain
    stores its model, then its check; an evaluation in between sees the change with the check
    running, and the per-patient refreshes become due only once the check is seen (then held one
    evaluation, like this), so counting from the check keeps the analysis one evaluation behind them.
    One `newly_true` only: Dagster keys a newly_true's memory by its operand's operator, not the
    operand itself, so two over different AND conditions of one asset would share it."""
    cohort_level = dg.AssetSelection.groups(*COHORT_LEVEL_GROUPS)
    changed_now = AC.any_deps_match(_changed()).allow(cohort_level).with_label("a cohort-level input changed")
    changed_before = (changed_now.since_last_handled() & ~changed_now).with_label("a cohort-level input changed before")
    predicting = AC.asset_matches(PREDICTION, AC.in_progress()).with_label("a patient's prediction is running")
    checked_now = (
        AC.any_deps_match(AC.any_checks_match(AC.newly_updated(), blocking_only=True))
        .allow(cohort_level)
        .with_label("a cohort-level input's check was just evaluated")
    )
    settled = (
        changed_before
        & ~checked_now
        & ~AC.any_deps_in_progress()
        & ~predicting
        & ~AC.in_progress()
        & AC.all_deps_blocking_checks_passed()
    ).with_label("a cohort-level input changed, and nothing per patient is running")
    return (settled & ~settled.newly_true()).with_label("analyse once per-patient inputs settle")


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
        # one run per patient straight into the run queue at the tick that requests it; a backfill
        # (Dagster's default for several partitions) waits for the backfill daemon's next loop,
        # about 20 s more per refresh stage (measured in test_daemon)
        emit_backfills=False,
        description=f"Evaluates every asset's automation condition (hcc_assets.defs.automation) at most every "
        f"${INTERVAL_ENV} s (default {DEFAULT_INTERVAL_S}): the weekly retrain, per-patient refreshes from new "
        "models, predictions, and the analysis once per-patient inputs settle.",
    )
