"""Training-set queries: feature matrices joined to labels and split, as numpy for scikit-learn.

Each returns a `FeatureMatrix`: patients in a fixed order (sorted pseudonyms), feature names in a
fixed order, labels and split, so that every fit on the same store sees the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from hcc_assets.featurestore.store import FeatureStore

DL_FEATURE_NAMES = tuple(f"dl_{i:03d}" for i in range(128))


@dataclass(frozen=True)
class FeatureMatrix:
    patient_ids: list[str]
    feature_names: list[str]
    values: np.ndarray  # (patients, features) float64
    hcc: np.ndarray  # (patients,) int 0/1
    split: np.ndarray  # (patients,) 'train' | 'validation'
    version: str  # feature-set version or embedding model version

    def rows(self, split: str) -> FeatureMatrix:
        return self.subset(self.split == split)

    def subset(self, keep: np.ndarray | list[str]) -> FeatureMatrix:
        if not isinstance(keep, np.ndarray) or keep.dtype != bool:
            wanted = set(keep)
            keep = np.array([pid in wanted for pid in self.patient_ids], dtype=bool)
        return FeatureMatrix([p for p, k in zip(self.patient_ids, keep) if k], self.feature_names,
                             self.values[keep], self.hcc[keep], self.split[keep], self.version)

    def columns(self, names: list[str]) -> FeatureMatrix:
        index = [self.feature_names.index(name) for name in names]
        return FeatureMatrix(self.patient_ids, list(names), self.values[:, index], self.hcc, self.split, self.version)

    @property
    def n(self) -> int:
        return len(self.patient_ids)


def latest_feature_set_version(store: FeatureStore) -> str | None:
    frame = store.query("SELECT feature_set_version, max(materialized_at) AS latest FROM radiomic_features "
                        "GROUP BY 1 ORDER BY latest DESC LIMIT 1")
    return frame["feature_set_version"][0] if frame.height else None


def radiomics_matrix(store: FeatureStore, feature_set_version: str, prefixes: tuple[str, ...] = ()) -> FeatureMatrix:
    """Radiomic features of every cohort patient that has a complete feature vector of
    `feature_set_version` (features whose name starts with one of `prefixes`; all when empty)."""
    long = store.query(
        "SELECT r.patient_id, r.feature, r.value, c.hcc, c.split FROM radiomic_features r "
        "JOIN cohort_split c USING (patient_id) WHERE r.feature_set_version = ? ORDER BY r.patient_id, r.feature",
        [feature_set_version],
    )
    if prefixes:
        long = long.filter(pl.any_horizontal([pl.col("feature").str.starts_with(p) for p in prefixes]))
    if long.height == 0:
        return _empty(feature_set_version)
    wide = long.pivot(on="feature", index=["patient_id", "hcc", "split"], values="value").sort("patient_id")
    names = sorted(c for c in wide.columns if c not in ("patient_id", "hcc", "split"))
    wide = wide.drop_nulls(names)  # a patient missing any feature has no complete vector
    return FeatureMatrix(wide["patient_id"].to_list(), names, wide.select(names).to_numpy().astype(np.float64),
                         wide["hcc"].cast(pl.Int8).to_numpy().astype(int), wide["split"].to_numpy(),
                         feature_set_version)


def embedding_matrix(store: FeatureStore, model_version: str) -> FeatureMatrix:
    """Deep embeddings (dl_000..dl_127) of every cohort patient embedded by `model_version`."""
    frame = store.query(
        "SELECT e.patient_id, e.embedding, c.hcc, c.split FROM deep_embeddings e JOIN cohort_split c "
        "USING (patient_id) WHERE e.model_version = ? ORDER BY e.patient_id", [model_version])
    if frame.height == 0:
        return _empty(model_version, list(DL_FEATURE_NAMES))
    values = np.stack([np.asarray(v, dtype=np.float64) for v in frame["embedding"].to_list()])
    return FeatureMatrix(frame["patient_id"].to_list(), list(DL_FEATURE_NAMES), values,
                         frame["hcc"].cast(pl.Int8).to_numpy().astype(int), frame["split"].to_numpy(), model_version)


def excluded_patients(store: FeatureStore, stage: str) -> pl.DataFrame:
    """Cohort patients recorded in `exclusions` for `stage`, with their reasons."""
    return store.query("SELECT x.patient_id, c.hcc, c.split, x.reason FROM exclusions x JOIN cohort_split c "
                       "USING (patient_id) WHERE x.stage = ? ORDER BY 1", [stage])


def _empty(version: str, names: list[str] | None = None) -> FeatureMatrix:
    names = names or []
    return FeatureMatrix([], names, np.zeros((0, len(names))), np.zeros(0, dtype=int), np.array([], dtype=str),
                         version)
