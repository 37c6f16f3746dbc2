"""Which per-patient features come from the current models, and what the analysis would read.

Plain SQL over the feature store (no Dagster): the refresh sensors turn these answers into runs,
and a user can ask the same questions in a notebook. "Current" is the `models` row with
current = true for a model name (FeatureStore.register_model keeps every version, one current).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from hcc_assets.featurestore.registry import current_version
from hcc_assets.featurestore.store import FeatureStore

CLASSIFIER = "hcc_classifier"
SEGMENTATION = "liver_segmentation"


@dataclass(frozen=True)
class StaleFeatures:
    """Ingested patients whose model-derived features are missing or from another model version."""

    classifier_version: str | None
    segmentation_version: str | None
    masks: list[str] = field(default_factory=list)  # liver_mask (and so radiomic_features) to redo
    embeddings: list[str] = field(default_factory=list)  # deep_embedding to redo

    def patients(self) -> list[str]:
        return sorted(set(self.masks) | set(self.embeddings))


def stale_features(store: FeatureStore) -> StaleFeatures:
    """Every patient with a preprocessed volume (ingest succeeded) whose liver mask is not from the
    current segmentation model, or whose embedding is not from the current classifier. A model that
    is not registered makes nothing stale (there is nothing to compute with)."""
    classifier = current_version(store, CLASSIFIER)
    segmentation = current_version(store, SEGMENTATION)
    ingested = "SELECT DISTINCT patient_id FROM volumes WHERE kind = 'preprocessed'"
    masks: list[str] = []
    embeddings: list[str] = []
    if segmentation is not None:
        masks = store.query(
            f"SELECT i.patient_id FROM ({ingested}) i LEFT JOIN liver_masks m USING (patient_id) "
            "WHERE m.model_version IS DISTINCT FROM ? ORDER BY 1", [segmentation])["patient_id"].to_list()
    if classifier is not None:
        embeddings = store.query(
            f"SELECT i.patient_id FROM ({ingested}) i LEFT JOIN deep_embeddings e USING (patient_id) "
            "WHERE e.model_version IS DISTINCT FROM ? ORDER BY 1", [classifier])["patient_id"].to_list()
    return StaleFeatures(classifier, segmentation, masks, embeddings)


@dataclass(frozen=True)
class AnalysisInputs:
    """What the analysis group would read: the cohort, the current models and the feature rows of
    every cohort patient. `state` is a digest of all of it (which rows, by the run that wrote them);
    `ready` is False, with `reason`, while some cohort patient's features are not current."""

    state: str
    ready: bool
    reason: str
    n_patients: int
    newest: object  # the newest materialized_at among these rows (a datetime), None when empty


def analysis_inputs(store: FeatureStore) -> AnalysisInputs:
    classifier = current_version(store, CLASSIFIER)
    segmentation = current_version(store, SEGMENTATION)
    cohort = store.query("SELECT patient_id, split, hcc, run_id, materialized_at FROM cohort_split ORDER BY patient_id")
    rows = {
        "embeddings": store.query("SELECT e.patient_id, e.model_version, e.run_id, e.materialized_at FROM deep_embeddings e "
                                  "JOIN cohort_split USING (patient_id) ORDER BY 1"),
        "masks": store.query("SELECT m.patient_id, m.model_version, m.run_id, m.materialized_at FROM liver_masks m "
                             "JOIN cohort_split USING (patient_id) ORDER BY 1"),
        "radiomics": store.query("SELECT r.patient_id, r.feature_set_version AS model_version, r.run_id, "
                                 "max(r.materialized_at) AS materialized_at FROM radiomic_features r "
                                 "JOIN cohort_split USING (patient_id) GROUP BY ALL ORDER BY 1"),
    }
    identity = {
        "classifier": classifier,
        "segmentation": segmentation,
        "cohort": [[r["patient_id"], r["split"], r["hcc"]] for r in cohort.iter_rows(named=True)],
        **{name: [[r["patient_id"], r["model_version"], r["run_id"]] for r in frame.iter_rows(named=True)]
           for name, frame in rows.items()},
    }
    state = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    stamps = [t for frame in (cohort, *rows.values()) for t in frame["materialized_at"].to_list() if t is not None]
    newest = max(stamps) if stamps else None

    cohort_ids = set(cohort["patient_id"].to_list())
    current_embeddings = {r["patient_id"] for r in rows["embeddings"].iter_rows(named=True)
                          if r["model_version"] == classifier}
    old_masks = sorted(r["patient_id"] for r in rows["masks"].iter_rows(named=True)
                       if r["model_version"] != segmentation)
    if classifier is None:
        ready, reason = False, "no hcc_classifier is registered"
    elif not cohort_ids:
        ready, reason = False, "cohort_split is empty"
    elif cohort_ids - current_embeddings:
        ready, reason = False, (f"{len(cohort_ids - current_embeddings)} of {len(cohort_ids)} cohort patients have no "
                                f"embedding from the current hcc_classifier {classifier}")
    elif old_masks:
        ready, reason = False, (f"{len(old_masks)} cohort patients have a liver mask from another segmentation "
                                f"model than the current {segmentation}")
    else:
        ready, reason = True, f"features of all {len(cohort_ids)} cohort patients are current"
    return AnalysisInputs(state, ready, reason, len(cohort_ids), newest)
