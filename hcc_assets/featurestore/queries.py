"""Training-set queries: feature matrices joined to labels and split, as numpy for scikit-learn.

Each returns a `FeatureMatrix`: patients in a fixed order (sorted pseudonyms), feature names in a
fixed order, labels and split, so that every fit on the same store sees the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

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
    frame = store.query("SELECT feature_set_version, max(materialized_at) AS latest FROM radiomic_vectors "
                        "GROUP BY 1 ORDER BY latest DESC LIMIT 1")
    return frame["feature_set_version"][0] if frame.height else None


def feature_names(store: FeatureStore, feature_set_version: str) -> list[str]:
    """The radiomic feature names stored for `feature_set_version`, sorted."""
    frame = store.query("SELECT DISTINCT unnest(n.features) AS feature FROM radiomic_feature_names n "
                        "WHERE n.feature_names_id IN (SELECT DISTINCT feature_names_id FROM radiomic_vectors "
                        "WHERE feature_set_version = ?) ORDER BY 1", [feature_set_version])
    return frame["feature"].to_list()


def radiomics_matrix(store: FeatureStore, feature_set_version: str, prefixes: tuple[str, ...] = ()) -> FeatureMatrix:
    """Radiomic features of every cohort patient that has a complete feature vector of
    `feature_set_version` (features whose name starts with one of `prefixes`; all when empty).

    Reads `radiomic_vectors` (one DOUBLE[] per patient), not the long table: at 100k patients x
    250 features this is a fraction of a second where pivoting 25M long rows takes tens."""
    with store.reader() as con:
        vectors = con.sql(
            "SELECT v.patient_id, v.feature_names_id, v.feature_values, c.hcc, c.split FROM radiomic_vectors v "
            "JOIN cohort_split c USING (patient_id) WHERE v.feature_set_version = ?", params=[feature_set_version],
        ).to_arrow_table()
        name_lists = dict(con.execute(
            "SELECT feature_names_id, features FROM radiomic_feature_names WHERE feature_names_id IN "
            "(SELECT DISTINCT feature_names_id FROM radiomic_vectors WHERE feature_set_version = ?)",
            [feature_set_version]).fetchall())
    # the columns: every stored name (matching `prefixes`) of this version; a patient whose name
    # list lacks one, or whose value is NULL, has no complete vector and is left out
    names = sorted({name for listed in name_lists.values() for name in listed
                    if not prefixes or name.startswith(prefixes)})
    if vectors.num_rows == 0 or not names:
        return _empty(feature_set_version)
    parts = []
    for names_id, listed in name_lists.items():
        if not set(names) <= set(listed):
            continue
        # one name list per version is the rule; filtering would copy every vector
        rows = vectors if len(name_lists) == 1 else vectors.filter(pc.equal(vectors["feature_names_id"], names_id))
        if rows.num_rows:
            values, complete = _as_matrix(rows["feature_values"], len(listed), [listed.index(n) for n in names])
            if not complete.all():
                rows, values = rows.filter(pa.array(complete)), values[complete]
            parts.append((rows, values))
    if not parts:
        return _empty(feature_set_version)
    meta = pl.from_arrow(pa.concat_tables([rows.select(["patient_id", "hcc", "split"]) for rows, _ in parts]))
    values = parts[0][1] if len(parts) == 1 else np.concatenate([v for _, v in parts])
    order = meta["patient_id"].arg_sort().to_numpy()
    if not np.array_equal(order, np.arange(len(order))):  # fixed patient order; skip the copy when sorted
        meta, values = meta[order], values[order]
    return FeatureMatrix(meta["patient_id"].to_list(), names, values,
                         meta["hcc"].cast(pl.Int8).to_numpy().astype(int), meta["split"].to_numpy(),
                         feature_set_version)


def _as_matrix(lists: pa.ChunkedArray, width: int, columns: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(patients x len(columns) float64 matrix, per-patient 'no NULL among columns') from a list
    column whose every entry has `width` elements; zero-copy up to the column selection."""
    flat = pa.concat_arrays([chunk.flatten() for chunk in lists.chunks]) if lists.num_chunks else pa.array([], pa.float64())
    n = len(lists)
    if len(flat) != n * width:
        raise ValueError(f"radiomic vectors of length {len(flat) / max(n, 1):.1f}, expected {width}")
    matrix = flat.to_numpy(zero_copy_only=False).reshape(n, width)
    if columns != list(range(width)):
        matrix = matrix[:, columns]
    if flat.null_count:
        complete = ~flat.is_null().to_numpy(zero_copy_only=False).reshape(n, width)[:, columns].any(axis=1)
    else:
        complete = np.ones(n, dtype=bool)
    return np.ascontiguousarray(matrix, dtype=np.float64), complete


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
