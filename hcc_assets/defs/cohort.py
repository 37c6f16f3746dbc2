"""Cohort level: labels and the seeded, stratified 80:20 split."""

import dagster as dg
import polars as pl

from hcc_assets.core.versioning import content_version
from hcc_assets.defs.automation import on_refresh_cron
from hcc_assets.defs.deployment import deployed
from hcc_assets.defs.ingest import preprocessed_volume
from hcc_assets.defs.metadata import markdown_table
from hcc_assets.defs.resources import LakeResource
from hcc_assets.featurestore import FeatureStore, reads
from hcc_assets.intake.dropzone import validate_labels
from hcc_assets.stats.split import stratified_split

COHORT_VERSION = "2"
LABELS_STAGE = "labels"


class CohortConfig(dg.Config):
    validation_fraction: float = 0.2
    seed: int = 20230601


@dg.asset(
    deps=[preprocessed_volume],
    code_version=COHORT_VERSION,
    group_name="cohort",
    automation_condition=on_refresh_cron(),
    kinds={"duckdb"},
    description="Labels (HCC yes/no, source) of every ingested patient and the study's seeded, "
    "stratified 80:20 train/validation split; feature-store table `cohort_split`. A patient whose "
    "label is not 0/1 or who is listed twice with different labels is left out, with the reason in "
    "`exclusions` (stage labels) and the `labels_valid` check.",
    check_specs=[
        dg.AssetCheckSpec("both_classes_in_both_splits", asset="cohort", blocking=True),
        dg.AssetCheckSpec(
            "labels_valid", asset="cohort", description="every labelled patient has one 0/1 label and was ingested"
        ),
    ],
)
def cohort(
    context: dg.AssetExecutionContext, config: deployed(CohortConfig, "cohort"), lake: LakeResource
) -> dg.MaterializeResult:
    store = lake.store
    run_id = context.run.run_id
    ingested = reads.ingested_patients(store)
    by_key, problems = validate_labels(lake.incoming_dir)
    labels = {lake.pseudonym(key): value for key, value in by_key.items()}
    # messages name pseudonyms only: a drop-folder name can be a record number
    problem_rows = [(lake.pseudonym(p.patient_key) if p.patient_key else "", p.problem) for p in problems]
    for pid, problem in problem_rows:
        context.log.warning(f"labels: {pid + ': ' if pid else ''}{problem}")
    label_exclusions = pl.DataFrame(
        [{"patient_id": pid, "stage": LABELS_STAGE, "reason": problem} for pid, problem in problem_rows if pid],
        schema={"patient_id": pl.String, "stage": pl.String, "reason": pl.String},
    )
    store.replace_where(
        "exclusions",
        {"stage": LABELS_STAGE},
        FeatureStore.with_provenance(label_exclusions, version=f"cohort@{COHORT_VERSION}", run_id=run_id),
    )

    included = sorted(ingested & labels.keys())
    split = stratified_split(included, [labels[p][0] for p in included], config.validation_fraction, config.seed)
    rows = pl.DataFrame(
        {
            "patient_id": included,
            "hcc": [labels[p][0] for p in included],
            "source": [labels[p][1] for p in included],
            "split": [split[p] for p in included],
            "seed": [config.seed] * len(included),
        },
        schema={"patient_id": pl.String, "hcc": pl.Boolean, "source": pl.String, "split": pl.String, "seed": pl.Int32},
    )
    store.replace_table(
        "cohort_split", FeatureStore.with_provenance(rows, version=f"cohort@{COHORT_VERSION}", run_id=run_id)
    )
    counts = rows.group_by("split", "hcc").len().sort("split", "hcc")
    per_split = {f"{r['split']}_{'hcc' if r['hcc'] else 'healthy'}": r["len"] for r in counts.iter_rows(named=True)}
    ok = all(per_split.get(f"{s}_{c}", 0) > 0 for s in ("train", "validation") for c in ("hcc", "healthy"))
    unknown = sorted(labels.keys() - ingested)
    unlabelled = sorted(ingested - labels.keys())
    label_report = [{"patient_id": pid, "problem": problem} for pid, problem in problem_rows] + [
        {"patient_id": pid, "problem": "labelled, but no ingested volume (unknown patient, or ingest failed)"}
        for pid in unknown
    ]
    # the split's content: a re-materialization that changes nothing does not retrain anything downstream
    content = content_version(rows.to_dicts())
    return dg.MaterializeResult(
        data_version=dg.DataVersion(content),
        metadata={
            "n_patients": len(included),
            "ingested_without_label": len(unlabelled),
            "labelled_not_ingested": len(unknown),
            "label_problems": len(problem_rows),
            **{k: int(v) for k, v in per_split.items()},
            "seed": config.seed,
        },
        check_results=[
            dg.AssetCheckResult(check_name="both_classes_in_both_splits", passed=ok, metadata=per_split),
            dg.AssetCheckResult(
                check_name="labels_valid",
                passed=not label_report,
                severity=dg.AssetCheckSeverity.WARN,
                description=None
                if not label_report
                else f"{len(label_report)} label problem(s): "
                + "; ".join(f"{r['patient_id'] or 'manifest'}: {r['problem']}" for r in label_report[:10]),
                metadata={
                    "problems": markdown_table(label_report, ["patient_id", "problem"]),
                    "ingested_without_label": len(unlabelled),
                },
            ),
        ],
    )
