"""Cohort level: labels and the seeded, stratified 80:20 split (hcc_assets.steps.cohort)."""

import dagster as dg

from hcc_assets.defs.automation import on_refresh_cron
from hcc_assets.defs.deployment import deployed
from hcc_assets.defs.ingest import preprocessed_volume
from hcc_assets.defs.metadata import markdown_table
from hcc_assets.defs.resources import LakeResource
from hcc_assets.steps.cohort import COHORT_VERSION, LABELS_STAGE, build_cohort

__all__ = ["COHORT_CHECKS", "COHORT_VERSION", "LABELS_STAGE", "CohortConfig", "cohort"]


class CohortConfig(dg.Config):
    validation_fraction: float = 0.2
    seed: int = 20230601


COHORT_CHECKS = [
    dg.AssetCheckSpec("both_classes_in_both_splits", asset="cohort", blocking=True),
    dg.AssetCheckSpec(
        "labels_valid", asset="cohort", description="every labelled patient has one 0/1 label and was ingested"
    ),
]


@dg.asset(
    deps=[preprocessed_volume],
    code_version=COHORT_VERSION,
    group_name="cohort",
    automation_condition=on_refresh_cron(),
    kinds={"duckdb"},
    description="Labels (HCC yes/no, source) of every ingested patient and the study's seeded, "
    "stratified 80:20 train/validation split; feature-store table `cohort_split`. A patient whose "
    "label is not 0/1 or who is listed twice with different labels is left out, with the reason in "
    "`exclusions` (stage labels) and the `labels_valid` check. A patient whose chosen T2 series is "
    "lossy-compressed is ingested and predicted but left out too (`exclusions` stage lossy). One study "
    "per patient is in the cohort: the one the manifest's optional `study` column names, else the "
    "earliest; follow-up studies are ingested and predicted, not trained on.",
    check_specs=COHORT_CHECKS,
)
def cohort(
    context: dg.AssetExecutionContext, config: deployed(CohortConfig, "cohort"), lake: LakeResource
) -> dg.MaterializeResult:
    store, run_id = lake.store, context.run.run_id
    # label problems are logged as warnings too; messages name pseudonyms only
    result = build_cohort(
        store, lake.incoming_dir, lake.pseudonym, config.validation_fraction, config.seed, run_id, context.log.warning
    )
    return dg.MaterializeResult(
        data_version=dg.DataVersion(result.data_version),
        metadata=result.metadata,
        check_results=[
            dg.AssetCheckResult(
                check_name="both_classes_in_both_splits", passed=result.both_classes, metadata=result.per_split
            ),
            dg.AssetCheckResult(
                check_name="labels_valid",
                passed=not result.label_report,
                severity=dg.AssetCheckSeverity.WARN,
                description=result.labels_description,
                metadata={
                    "problems": markdown_table(result.label_report, ["patient_id", "problem"]),
                    "ingested_without_label": result.ingested_without_label,
                },
            ),
        ],
    )
