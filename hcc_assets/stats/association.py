"""Explainable deep features: DL embeddings associated with at least one handcrafted feature.

The study keeps a DL feature when |Pearson r| >= 0.5 with at least one radiomic feature; the
study's future work names other thresholds and measures, so Spearman and distance correlation
are offered too. Associations are computed on training patients only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
from scipy.stats import rankdata

Measure = Literal["pearson", "spearman", "distance"]
MEASURES: tuple[str, ...] = ("pearson", "spearman", "distance")


def _as_patient_matrix(values, what: str) -> np.ndarray:
    matrix = np.asarray(values, dtype=float)
    if matrix.ndim != 2:
        raise ValueError(f"{what} must be 2-D (patients x features), got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{what} holds {int((~np.isfinite(matrix)).sum())} non-finite value(s)")
    return matrix


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r for every column pair; a zero-variance column gives 0 (no linear association)."""
    a_centered = a - a.mean(axis=0)
    b_centered = b - b.mean(axis=0)
    a_norm = np.sqrt((a_centered**2).sum(axis=0))
    b_norm = np.sqrt((b_centered**2).sum(axis=0))
    cross = a_centered.T @ b_centered
    denominator = np.outer(a_norm, b_norm)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(denominator > 0, cross / denominator, 0.0)
    return np.clip(r, -1.0, 1.0)


def _double_centred_distances(matrix: np.ndarray) -> np.ndarray:
    """Per column, the n x n matrix of |x_i - x_j| double-centred (Székely's A_kl); (p, n, n)."""
    columns = matrix.T[:, :, None]
    distances = np.abs(columns - matrix.T[:, None, :])
    return (
        distances
        - distances.mean(axis=1, keepdims=True)
        - distances.mean(axis=2, keepdims=True)
        + distances.mean(axis=(1, 2), keepdims=True)
    )


def _distance_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Székely–Rizzo–Bakirov distance correlation (the V-statistic form) for every column pair.

    dCov^2(X, Y) = mean(A * B) over the n x n double-centred distance matrices, so all pairs come
    from one matrix product of the flattened A's and B's. Values lie in [0, 1]; 0 for a
    zero-variance column. The V-statistic is biased upwards on small samples (independent
    columns of ~30 patients give roughly 0.2-0.3), which matters when choosing a threshold.
    """
    n = a.shape[0]
    a_centred = _double_centred_distances(a).reshape(a.shape[1], n * n)
    b_centred = _double_centred_distances(b).reshape(b.shape[1], n * n)
    covariance_sq = a_centred @ b_centred.T / (n * n)
    a_variance_sq = (a_centred**2).sum(axis=1) / (n * n)
    b_variance_sq = (b_centred**2).sum(axis=1) / (n * n)
    denominator = np.sqrt(np.outer(a_variance_sq, b_variance_sq))
    with np.errstate(divide="ignore", invalid="ignore"):
        # rounding can make dCov^2 a hair negative for independent columns
        ratio = np.where(denominator > 0, np.clip(covariance_sq, 0.0, None) / denominator, 0.0)
    return np.clip(np.sqrt(ratio), 0.0, 1.0)


def association_matrix(dl: np.ndarray, handcrafted: np.ndarray, measure: Measure = "pearson") -> np.ndarray:
    """Association of every DL feature (rows) with every handcrafted feature (columns).

    ``dl`` is patients x n_dl and ``handcrafted`` patients x n_hc, same patients in the same
    order. Returns (n_dl, n_hc). Pearson is signed in [-1, 1]; Spearman is Pearson on average
    ranks (ties share their mean rank); "distance" is distance correlation in [0, 1]. A column
    with zero variance has no association with anything and gives 0, never NaN.
    """
    dl_matrix = _as_patient_matrix(dl, "dl")
    hc_matrix = _as_patient_matrix(handcrafted, "handcrafted")
    if dl_matrix.shape[0] != hc_matrix.shape[0]:
        raise ValueError(f"dl has {dl_matrix.shape[0]} patients but handcrafted has {hc_matrix.shape[0]}")
    if dl_matrix.shape[0] < 3:
        raise ValueError(f"need at least 3 patients to measure an association, got {dl_matrix.shape[0]}")
    if measure == "pearson":
        return _pearson(dl_matrix, hc_matrix)
    if measure == "spearman":
        return _pearson(rankdata(dl_matrix, axis=0), rankdata(hc_matrix, axis=0))
    if measure == "distance":
        return _distance_correlation(dl_matrix, hc_matrix)
    raise ValueError(f"unknown measure {measure!r}; use one of {MEASURES}")


@dataclass
class ExplainableSelection:
    """Which DL features are explainable at ``threshold`` and by which handcrafted features.

    ``kept`` are DL column indices (ascending) with |association| >= threshold to at least one
    handcrafted feature; ``related[i]`` lists (handcrafted name, value) for DL index ``i``,
    sorted by |value| descending; ``matrix`` is the full (n_dl, n_hc) association matrix.
    """

    threshold: float
    measure: str
    kept: list[int]
    related: dict[int, list[tuple[str, float]]]
    matrix: np.ndarray


def selection_from_matrix(
    matrix: np.ndarray, hc_names: Sequence[str], threshold: float, measure: str
) -> ExplainableSelection:
    """Threshold a precomputed association matrix (lets a sweep reuse one matrix per measure)."""
    names = [str(name) for name in hc_names]
    if matrix.shape[1] != len(names):
        raise ValueError(f"association matrix has {matrix.shape[1]} handcrafted columns but {len(names)} names")
    strong = np.abs(matrix) >= threshold
    kept = [int(index) for index in np.flatnonzero(strong.any(axis=1))]
    related = {}
    for index in kept:
        columns = np.flatnonzero(strong[index])
        # stable sort, so equal |values| keep handcrafted column order
        columns = columns[np.argsort(-np.abs(matrix[index, columns]), kind="stable")]
        related[index] = [(names[column], float(matrix[index, column])) for column in columns]
    return ExplainableSelection(threshold=float(threshold), measure=measure, kept=kept, related=related, matrix=matrix)


def select_explainable(
    dl_train: np.ndarray,
    hc_train: np.ndarray,
    hc_names: Sequence[str],
    threshold: float = 0.5,
    measure: Measure = "pearson",
) -> ExplainableSelection:
    """Keep DL features with |association| >= ``threshold`` to at least one handcrafted feature.

    Pass training patients only: the selection is part of the model and must not see
    validation rows.
    """
    matrix = association_matrix(dl_train, hc_train, measure)
    return selection_from_matrix(matrix, hc_names, threshold, measure)


def association_long_table(
    selection: ExplainableSelection, dl_names: Sequence[str], hc_names: Sequence[str]
) -> pl.DataFrame:
    """One row per (DL feature, handcrafted feature) pair, with whether each passes the threshold.

    Columns: dl_feature, handcrafted_feature, measure, value, kept (the DL feature is
    explainable), related (this pair has |value| >= threshold).
    """
    n_dl, n_hc = selection.matrix.shape
    if len(dl_names) != n_dl or len(hc_names) != n_hc:
        raise ValueError(f"matrix is {n_dl} x {n_hc} but got {len(dl_names)} DL and {len(hc_names)} handcrafted names")
    values = selection.matrix.ravel()
    kept_rows = np.zeros(n_dl, dtype=bool)
    kept_rows[selection.kept] = True
    return pl.DataFrame(
        {
            "dl_feature": np.repeat(np.asarray([str(name) for name in dl_names], dtype=object), n_hc).tolist(),
            "handcrafted_feature": [str(name) for name in hc_names] * n_dl,
            "measure": [selection.measure] * (n_dl * n_hc),
            "value": values.astype(float),
            "kept": np.repeat(kept_rows, n_hc),
            "related": np.abs(values) >= selection.threshold,
        },
        schema={
            "dl_feature": pl.String,
            "handcrafted_feature": pl.String,
            "measure": pl.String,
            "value": pl.Float64,
            "kept": pl.Boolean,
            "related": pl.Boolean,
        },
    )
