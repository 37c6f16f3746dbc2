"""The study's future work: other association thresholds and measures for explainable DL features.

For each (measure, threshold) the explainable selection is made on training patients, a LASSO is
fitted on the kept DL features of the training patients, and validation accuracy/AUC are taken
on the validation patients, which neither step has seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from hcc_assets.stats.association import Measure, association_matrix, selection_from_matrix
from hcc_assets.stats.filtering import AllFeaturesDroppedError
from hcc_assets.stats.lasso import fit_lasso, predict_proba
from hcc_assets.stats.metrics import classification_metrics

SWEEP_SCHEMA = {
    "measure": pl.String,
    "threshold": pl.Float64,
    "n_kept": pl.Int64,
    "n_selected": pl.Int64,
    "cv_accuracy": pl.Float64,
    "val_accuracy": pl.Float64,
    "val_roc_auc": pl.Float64,
}


def explainability_sweep(
    dl_train: np.ndarray,
    hc_train: np.ndarray,
    hc_names: Sequence[str],
    y_train: np.ndarray,
    dl_val: np.ndarray,
    y_val: np.ndarray,
    thresholds: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
    measures: Sequence[Measure] = ("pearson", "spearman", "distance"),
    seed: int = 0,
) -> pl.DataFrame:
    """One row per (measure, threshold): n_kept, n_selected, cv_accuracy, val_accuracy, val_roc_auc.

    Where no DL feature passes the threshold (or the variance filter drops every kept one),
    n_kept is the count that passed, n_selected is 0 and the three scores are NaN. The
    association matrix is computed once per measure. DL features are named ``dl_000`` ... in the
    lasso fit; val_roc_auc is NaN when the validation set holds one class.
    """
    dl_train = np.asarray(dl_train, dtype=float)
    dl_val = np.asarray(dl_val, dtype=float)
    if dl_val.ndim != 2 or dl_val.shape[1] != dl_train.shape[1]:
        raise ValueError(f"dl_val must have the {dl_train.shape[1]} columns of dl_train, got shape {dl_val.shape}")
    dl_names = [f"dl_{index:03d}" for index in range(dl_train.shape[1])]
    nan = float("nan")
    rows = []
    for measure in measures:
        matrix = association_matrix(dl_train, hc_train, measure)
        for threshold in thresholds:
            selection = selection_from_matrix(matrix, hc_names, threshold, measure)
            row = {
                "measure": measure,
                "threshold": float(threshold),
                "n_kept": len(selection.kept),
                "n_selected": 0,
                "cv_accuracy": nan,
                "val_accuracy": nan,
                "val_roc_auc": nan,
            }
            if selection.kept:
                try:
                    fit = fit_lasso(
                        dl_train[:, selection.kept], y_train, [dl_names[i] for i in selection.kept], seed=seed
                    )
                except AllFeaturesDroppedError:
                    fit = None
                if fit is not None:
                    scores = classification_metrics(y_val, predict_proba(fit, dl_val[:, selection.kept]))
                    row.update(
                        n_selected=len(fit.selected),
                        cv_accuracy=fit.best_cv_accuracy,
                        val_accuracy=scores["accuracy"],
                        val_roc_auc=scores["roc_auc"],
                    )
            rows.append(row)
    return pl.DataFrame(rows, schema=SWEEP_SCHEMA)
