"""Cohort level: labels and the seeded, stratified 80:20 split."""


import dagster as dg
import polars as pl

from hcc_assets.defs.ingest import preprocessed_volume
from hcc_assets.defs.resources import LakeResource
from hcc_assets.featurestore import FeatureStore
from hcc_assets.imaging.dropzone import read_label_manifests
from hcc_assets.stats.split import stratified_split

COHORT_VERSION = "1"


class CohortConfig(dg.Config):
    validation_fraction: float = 0.2
    seed: int = 20230601


@dg.asset(
    deps=[preprocessed_volume],
    code_version=COHORT_VERSION,
    group_name="cohort",
    kinds={"duckdb"},
    description="Labels (HCC yes/no, source) of every ingested patient and the study's seeded, "
    "stratified 80:20 train/validation split; feature-store table `cohort_split`.",
    check_specs=[dg.AssetCheckSpec("both_classes_in_both_splits", asset="cohort", blocking=True)],
)
def cohort(context: dg.AssetExecutionContext, config: CohortConfig, lake: LakeResource) -> dg.MaterializeResult:
    store = lake.store
    ingested = set(store.query("SELECT patient_id FROM volumes WHERE kind = 'preprocessed'")["patient_id"].to_list())
    labels = {}
    for row in read_label_manifests(lake.incoming_dir):
        if row["hcc"] not in ("0", "1"):
            continue
        labels[lake.pseudonym(row["patient_key"])] = (row["hcc"] == "1", row["source"] or None)
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
        "cohort_split", FeatureStore.with_provenance(rows, version=f"cohort@{COHORT_VERSION}", run_id=context.run.run_id)
    )
    counts = rows.group_by("split", "hcc").len().sort("split", "hcc")
    per_split = {f"{r['split']}_{'hcc' if r['hcc'] else 'healthy'}": r["len"] for r in counts.iter_rows(named=True)}
    ok = all(per_split.get(f"{s}_{c}", 0) > 0 for s in ("train", "validation") for c in ("hcc", "healthy"))
    return dg.MaterializeResult(
        metadata={
            "n_patients": len(included),
            "ingested_without_label": len(ingested - labels.keys()),
            "labelled_not_ingested": len(labels.keys() - ingested),
            **{k: int(v) for k, v in per_split.items()},
            "seed": config.seed,
        },
        check_results=[dg.AssetCheckResult(check_name="both_classes_in_both_splits", passed=ok, metadata=per_split)],
    )
