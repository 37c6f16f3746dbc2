"""The cohort, without Dagster: labels of the ingested patients and the seeded, stratified
train/validation split (feature-store table `cohort_split`), with label problems as exclusions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from hcc_assets.core.versioning import content_version
from hcc_assets.featurestore import FeatureStore, reads
from hcc_assets.intake.dropzone import label_studies, validate_labels
from hcc_assets.intake.pseudonym import split_partition_key, study_partition_key
from hcc_assets.stats.split import stratified_split

COHORT_VERSION = "4"  # 4: one study per patient: the manifest's `study`, else the earliest
LABELS_STAGE = "labels"
LOSSY_STAGE = "lossy"  # labelled, ingested, but its T2 was lossy-compressed: not in the study cohort
LOSSY_REASON = "the chosen T2 series is lossy-compressed (scans.lossy); ingested and predicted, not trained on"


@dataclass(frozen=True)
class CohortResult:
    data_version: str  # the split's content: a re-materialization that changes nothing retrains nothing
    metadata: dict[str, int]  # counts (patients, label problems, per split and class) and the seed
    per_split: dict[str, int]  # "<split>_<hcc|healthy>" -> patients
    both_classes: bool  # both classes in both splits (the blocking check)
    label_report: list[dict]  # {"patient_id", "problem"}: label problems, then labelled but not ingested
    ingested_without_label: int

    @property
    def labels_description(self) -> str | None:
        """The labels_valid check's description: None without problems, else the first ten."""
        if not self.label_report:
            return None
        return f"{len(self.label_report)} label problem(s): " + "; ".join(
            f"{r['patient_id'] or 'manifest'}: {r['problem']}" for r in self.label_report[:10]
        )


def build_cohort(
    store: FeatureStore,
    incoming: Path,
    pseudonym: Callable[[str], str],
    validation_fraction: float,
    seed: int,
    run_id: str,
    warn: Callable[[str], None] = lambda message: None,
) -> CohortResult:
    """Replace `cohort_split` with the labelled, ingested patients split train/validation, and the
    `exclusions` of stage labels with this run's label problems (each also passed to `warn`).
    Patients whose chosen T2 is lossy-compressed are left out, as `exclusions` of stage lossy.
    Labels come from the drop zone's manifests (`incoming`), keyed by drop-folder name: `pseudonym`
    maps a name to its pseudonym, and messages name pseudonyms only.

    One study per patient is in the cohort: the one the manifest's optional `study` column names
    (a study index), else the earliest (the bare pseudonym). The patient's other studies (follow-ups)
    are ingested and predicted, not trained or evaluated on. Cohort rows are keyed by that study's
    partition key."""
    ingested = reads.ingested_patients(store)
    by_key, problems = validate_labels(incoming)
    named, study_problems = label_studies(incoming)
    problems += study_problems  # a study that cannot be told excludes the patient, like a bad label
    by_key = {key: value for key, value in by_key.items() if key not in {p.patient_key for p in study_problems}}
    # the labelled study of each patient: pt-<id> (earliest) unless the manifest names another
    labels = {study_partition_key(pseudonym(key), named.get(key, 1)): value for key, value in by_key.items()}
    # messages name pseudonyms only: a drop-folder name can be a record number
    problem_rows = [(pseudonym(p.patient_key) if p.patient_key else "", p.problem) for p in problems]
    for pid, problem in problem_rows:
        warn(f"labels: {pid + ': ' if pid else ''}{problem}")
    label_exclusions = pl.DataFrame(
        [{"patient_id": pid, "stage": LABELS_STAGE, "reason": problem} for pid, problem in problem_rows if pid],
        schema={"patient_id": pl.String, "stage": pl.String, "reason": pl.String},
    )
    store.replace_where(
        "exclusions",
        {"stage": LABELS_STAGE},
        FeatureStore.with_provenance(label_exclusions, version=f"cohort@{COHORT_VERSION}", run_id=run_id),
    )

    # lossy pixels (JPEG / JPEG 2000 artefacts) are not what the models should learn from; the patient
    # is still ingested and predicted. Written only when there is something to write or to clear:
    # every write is a snapshot that concurrent writers conflict with.
    lossy = sorted(reads.lossy_t2_patients(store) & ingested & labels.keys())
    if lossy or reads.excluded_at(store, LOSSY_STAGE):
        lossy_exclusions = pl.DataFrame(
            [{"patient_id": pid, "stage": LOSSY_STAGE, "reason": LOSSY_REASON} for pid in lossy],
            schema={"patient_id": pl.String, "stage": pl.String, "reason": pl.String},
        )
        store.replace_where(
            "exclusions",
            {"stage": LOSSY_STAGE},
            FeatureStore.with_provenance(lossy_exclusions, version=f"cohort@{COHORT_VERSION}", run_id=run_id),
        )
    included = sorted((ingested & labels.keys()) - set(lossy))
    split = stratified_split(included, [labels[p][0] for p in included], validation_fraction, seed)
    rows = pl.DataFrame(
        {
            "patient_id": included,
            "hcc": [labels[p][0] for p in included],
            "source": [labels[p][1] for p in included],
            "split": [split[p] for p in included],
            "seed": [seed] * len(included),
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
    labelled_patients = {split_partition_key(key)[0] for key in labels}
    other_studies = [key for key in unlabelled if split_partition_key(key)[0] in labelled_patients]
    label_report = [{"patient_id": pid, "problem": problem} for pid, problem in problem_rows] + [
        {"patient_id": pid, "problem": "labelled, but no ingested volume (unknown patient, or ingest failed)"}
        for pid in unknown
    ]
    return CohortResult(
        data_version=content_version(rows.to_dicts()),
        metadata={
            "n_patients": len(included),
            "ingested_without_label": len(unlabelled),
            "other_studies_of_labelled": len(other_studies),
            "labelled_not_ingested": len(unknown),
            "label_problems": len(problem_rows),
            "lossy_excluded": len(lossy),
            **{k: int(v) for k, v in per_split.items()},
            "seed": seed,
        },
        per_split=per_split,
        both_classes=ok,
        label_report=label_report,
        ingested_without_label=len(unlabelled),
    )
