"""Per patient: what is current, stale or failed, and why (for `hcc-assets status`).

Input is reads.patient_status (the feature store) plus the last failure of each partition's runs
(the Dagster instance); output names patients by pseudonym only.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

CURRENT, STALE, MISSING, FAILED = "current", "stale", "missing", "failed"


@dataclass(frozen=True)
class PatientState:
    patient_id: str
    split: str  # train | validation | unlabelled
    mask: str
    radiomics: str
    embedding: str
    predictions: str
    problems: list[str]

    @property
    def overall(self) -> str:
        states = (self.mask, self.radiomics, self.embedding)
        if self.problems and any(s in (MISSING, FAILED) or s.startswith("excluded") for s in states):
            return FAILED
        if any(s == STALE for s in states):
            return STALE
        return CURRENT if self.predictions else MISSING


def _versioned(made_with: str | None, current: str | None) -> str:
    if made_with is None:
        return MISSING
    return CURRENT if current is None or made_with == current else STALE


def patient_states(
    status: pl.DataFrame, failures: dict[str, str], warnings: dict[str, list[str]] | None = None
) -> list[PatientState]:
    """One PatientState per row of reads.patient_status; `failures`: patient -> last run error;
    `warnings`: patient -> its failed warning checks (the results stand; the reader should know)."""
    states = []
    for row in status.iter_rows(named=True):
        problems = []
        if row["ingest_status"] != "ok":
            problems.append(f"ingest: {row['ingest_status']}")
        if not row["preprocessed"]:
            problems.append("no preprocessed volume")
        mask = _versioned(row["mask_model"], row["current_mask_model"])
        if row["radiomics_excluded"]:
            radiomics = "excluded"
            problems.append(f"radiomics excluded: {row['radiomics_excluded']}")
        else:
            radiomics = f"{row['n_radiomic']} features" if row["n_radiomic"] else MISSING
        embedding = _versioned(row["embedding_model"], row["current_classifier"])
        if row["current_classifier"] is None:
            problems.append("no usable hcc_classifier (none current)")
        if mask == STALE:
            problems.append(f"mask from segmentation {row['mask_model']}, current {row['current_mask_model']}")
        if embedding == STALE:
            problems.append(f"embedding from classifier {row['embedding_model']}, current {row['current_classifier']}")
        if row["prediction_gaps"]:
            problems.append(f"unavailable predictions: {row['prediction_gaps']}")
        if row["patient_id"] in failures:
            problems.append(f"last run failed: {failures[row['patient_id']]}")
        problems += [f"warning: {warning}" for warning in (warnings or {}).get(row["patient_id"], [])]
        split = row["split"] or "unlabelled"
        states.append(
            PatientState(row["patient_id"], split, mask, radiomics, embedding, row["predictions"] or "", problems)
        )
    return states


def format_states(states: list[PatientState]) -> str:
    """A plain-text table, one patient per line, then the problems indented under it."""
    header = f"{'patient':18s} {'split':11s} {'state':8s} {'mask':8s} {'radiomics':13s} {'embedding':9s} predictions"
    lines = [header, "-" * len(header)]
    for state in states:
        lines.append(
            f"{state.patient_id:18s} {state.split:11s} {state.overall:8s} {state.mask:8s} "
            f"{state.radiomics:13s} {state.embedding:9s} {state.predictions}"
        )
        lines += [f"    {problem}" for problem in state.problems]
    counts: dict[str, int] = {}
    for state in states:
        counts[state.overall] = counts.get(state.overall, 0) + 1
    lines.append(f"{len(states)} patients: " + ", ".join(f"{n} {name}" for name, n in sorted(counts.items())))
    return "\n".join(lines)
