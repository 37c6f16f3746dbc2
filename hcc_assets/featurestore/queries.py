"""Training-set queries: feature matrices joined to labels and split, as numpy for scikit-learn.

Each returns a `FeatureMatrix`: patients in a fixed order (sorted pseudonyms), feature names in a
fixed order, labels and split, so that every fit on the same store sees the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

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
    values: np.ndarray  # (patients, features) float64; may be read-only (zero-copy from the store): .copy() to edit
    hcc: np.ndarray  # (patients,) int 0/1
    split: np.ndarray  # (patients,) 'train' | 'validation'
    version: str  # feature-set version or embedding model version

    def rows(self, split: str) -> FeatureMatrix:
        return self.subset(self.split == split)

    def subset(self, keep: np.ndarray | list[str]) -> FeatureMatrix:
        if not isinstance(keep, np.ndarray) or keep.dtype != bool:
            wanted = set(keep)
            keep = np.array([pid in wanted for pid in self.patient_ids], dtype=bool)
        return FeatureMatrix(
            [p for p, k in zip(self.patient_ids, keep) if k],
            self.feature_names,
            self.values[keep],
            self.hcc[keep],
            self.split[keep],
            self.version,
        )

    def columns(self, names: list[str]) -> FeatureMatrix:
        index = [self.feature_names.index(name) for name in names]
        return FeatureMatrix(self.patient_ids, list(names), self.values[:, index], self.hcc, self.split, self.version)

    @property
    def n(self) -> int:
        return len(self.patient_ids)


def latest_feature_set_version(store: FeatureStore) -> str | None:
    frame = store.query(
        "SELECT feature_set_version, max(materialized_at) AS latest FROM radiomic_vectors "
        "GROUP BY 1 ORDER BY latest DESC LIMIT 1"
    )
    return frame["feature_set_version"][0] if frame.height else None


def feature_names(store: FeatureStore, feature_set_version: str) -> list[str]:
    """The radiomic feature names stored for `feature_set_version`, sorted."""
    frame = store.query(
        "SELECT DISTINCT unnest(n.features) AS feature FROM radiomic_feature_names n "
        "WHERE n.feature_names_id IN (SELECT DISTINCT feature_names_id FROM radiomic_vectors "
        "WHERE feature_set_version = ?) ORDER BY 1",
        [feature_set_version],
    )
    return frame["feature"].to_list()


def radiomics_matrix(store: FeatureStore, feature_set_version: str, prefixes: tuple[str, ...] = ()) -> FeatureMatrix:
    """Radiomic features of every cohort patient that has a complete feature vector of
    `feature_set_version` (features whose name starts with one of `prefixes`; all when empty).

    Reads `radiomic_vectors` (one DOUBLE[] per patient), not the long table: at 100k patients x
    250 features this takes a fraction of a second where pivoting 25M long rows takes tens."""
    with store.reader() as con:
        return radiomics_matrix_on(con, feature_set_version, prefixes)


def radiomics_matrix_on(con, feature_set_version: str, prefixes: tuple[str, ...] = ()) -> FeatureMatrix:
    """radiomics_matrix on an open connection whose default catalog holds the store's tables (the
    benchmark runs it on a single-file DuckDB copy too)."""
    # the version inlined, not a parameter: DuckDB then filters inside the scan instead of
    # copying every vector through a filter (measured 1.5x); no join in SQL either, since
    # DuckDB builds its hash table on the vectors side and copies them once more. One thread:
    # the result is then one Arrow chunk, reshaped without a copy; with two, the chunks cost
    # a 200 MB copy (and its page faults), more than the second thread saves
    threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
    con.execute("SET threads = 1")
    try:
        vectors = con.sql(
            "SELECT patient_id, feature_names_id, feature_values FROM radiomic_vectors "
            f"WHERE feature_set_version = {sql_string(feature_set_version)}"
        ).to_arrow_table()
        labels = con.sql("SELECT patient_id, hcc, split FROM cohort_split").pl()
        # the name lists these vectors use, from the result (a second scan of the vectors cost 0.03 s)
        used = pc.unique(vectors["feature_names_id"]).to_pylist()
        name_lists = dict(
            con.execute(
                "SELECT feature_names_id, features FROM radiomic_feature_names WHERE list_contains(?, feature_names_id)",
                [used],
            ).fetchall()
        )
    finally:
        con.execute(f"SET threads = {int(threads)}")  # the connection may be shared (one DuckDB per process)
    # the columns: every stored name (matching `prefixes`) of this version; a patient whose name
    # list lacks one, or whose value is NULL, has no complete vector and is left out
    names = sorted(
        {name for listed in name_lists.values() for name in listed if not prefixes or name.startswith(prefixes)}
    )
    if vectors.num_rows == 0 or not names:
        return _empty(feature_set_version)
    values, complete = _vectors_as_matrix(vectors, name_lists, names)
    ids = cast(pl.DataFrame, pl.from_arrow(vectors.select(["patient_id"])))  # a Table gives a DataFrame
    rows = (
        ids.with_columns(pl.Series("row", np.arange(vectors.num_rows)), pl.Series("complete", complete))
        .join(labels, on="patient_id", how="inner", maintain_order="left")
        .filter(pl.col("complete"))
    )
    if not rows["patient_id"].is_sorted():
        rows = rows.sort("patient_id")
    take = rows["row"].to_numpy()
    if not np.array_equal(take, np.arange(vectors.num_rows)):  # copy only when rows drop out or move
        values = values[take]
    return FeatureMatrix(
        rows["patient_id"].to_list(),
        names,
        values,
        rows["hcc"].cast(pl.Int8).to_numpy().astype(int),
        rows["split"].to_numpy(),
        feature_set_version,
    )


def sql_string(value: str) -> str:
    """`value` as an SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def _vectors_as_matrix(
    vectors: pa.Table, name_lists: dict[str, list[str]], names: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(rows x names matrix, per-row 'has every name with a value') of `vectors`, whose rows
    hold their values in the order of their name list."""
    if len(name_lists) == 1:  # the rule: one name list per feature-set version; no copy
        listed = next(iter(name_lists.values()))
        if not set(names) <= set(listed):
            return np.zeros((vectors.num_rows, len(names))), np.zeros(vectors.num_rows, dtype=bool)
        return _as_matrix(vectors["feature_values"], len(listed), [listed.index(n) for n in names])
    values = np.full((vectors.num_rows, len(names)), np.nan)
    complete = np.zeros(vectors.num_rows, dtype=bool)
    names_ids = vectors["feature_names_id"].to_numpy()
    for names_id, listed in name_lists.items():
        selected = names_ids == names_id
        if selected.any() and set(names) <= set(listed):
            part = vectors.filter(pa.array(selected))["feature_values"]
            values[selected], complete[selected] = _as_matrix(part, len(listed), [listed.index(n) for n in names])
    return values, complete


def _as_matrix(lists: pa.ChunkedArray, width: int, columns: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(patients x len(columns) float64 matrix, per-patient 'no NULL among columns') from a list
    column whose every entry has `width` elements; zero-copy up to the column selection."""
    chunks = [chunk.flatten() for chunk in lists.chunks]  # one chunk: no copy; several: one copy
    flat = chunks[0] if len(chunks) == 1 else pa.concat_arrays(chunks) if chunks else pa.array([], pa.float64())
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
        "USING (patient_id) WHERE e.model_version = ? ORDER BY e.patient_id",
        [model_version],
    )
    if frame.height == 0:
        return _empty(model_version, list(DL_FEATURE_NAMES))
    values = np.stack([np.asarray(v, dtype=np.float64) for v in frame["embedding"].to_list()])
    return FeatureMatrix(
        frame["patient_id"].to_list(),
        list(DL_FEATURE_NAMES),
        values,
        frame["hcc"].cast(pl.Int8).to_numpy().astype(int),
        frame["split"].to_numpy(),
        model_version,
    )


def excluded_patients(store: FeatureStore, stage: str) -> pl.DataFrame:
    """Cohort patients recorded in `exclusions` for `stage`, with their reasons."""
    return store.query(
        "SELECT x.patient_id, c.hcc, c.split, x.reason FROM exclusions x JOIN cohort_split c "
        "USING (patient_id) WHERE x.stage = ? ORDER BY 1",
        [stage],
    )


def _empty(version: str, names: list[str] | None = None) -> FeatureMatrix:
    names = names or []
    return FeatureMatrix([], names, np.zeros((0, len(names))), np.zeros(0, dtype=int), np.array([], dtype=str), version)
