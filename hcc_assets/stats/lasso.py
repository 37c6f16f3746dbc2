"""LASSO logistic regression with the study's lambda grid, chosen by stratified k-fold CV accuracy."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline

from hcc_assets.core.files import atomic_write, atomic_write_text
from hcc_assets.stats.filtering import lambda_grid, make_lasso_pipeline

MODEL_FILE = "lasso.joblib"
SUMMARY_FILE = "lasso_summary.json"
# Mean CV accuracies closer than this are treated as equal for the tie-break.
ACCURACY_TIE_TOLERANCE = 1e-9


@dataclass
class LassoFit:
    """A refitted best pipeline plus what the CV search saw.

    ``lambdas`` are ascending and ``cv_accuracy_mean``/``cv_accuracy_sd`` are aligned with them.
    ``selected`` are the features with a non-zero coefficient (among those the variance filter
    kept), and ``coefficients`` are their betas on the z-scored scale.
    """

    pipeline: Pipeline
    feature_names: list[str]
    lambdas: list[float]
    cv_accuracy_mean: list[float]
    cv_accuracy_sd: list[float]
    best_lambda: float
    best_C: float
    selected: list[str]
    coefficients: dict[str, float]
    intercept: float
    n_constant: int
    n_quasi_constant: int
    seed: int

    @property
    def best_cv_accuracy(self) -> float:
        return self.cv_accuracy_mean[self.lambdas.index(self.best_lambda)]

    def summary(self) -> dict:
        """JSON-ready parameters, selection and CV scores (no fitted objects)."""
        return {
            "feature_names": list(self.feature_names),
            "lambdas": list(self.lambdas),
            "C": [1.0 / value for value in self.lambdas],
            "cv_accuracy_mean": list(self.cv_accuracy_mean),
            "cv_accuracy_sd": list(self.cv_accuracy_sd),
            "best_lambda": self.best_lambda,
            "best_C": self.best_C,
            "best_cv_accuracy": self.best_cv_accuracy,
            "selected": list(self.selected),
            "coefficients": dict(self.coefficients),
            "intercept": self.intercept,
            "n_constant": self.n_constant,
            "n_quasi_constant": self.n_quasi_constant,
            "seed": self.seed,
            "tie_break": "largest lambda (strongest penalty) among the best mean CV accuracies",
        }


def _binary_labels(y) -> np.ndarray:
    labels = np.asarray(y)
    if labels.ndim != 1:
        raise ValueError(f"y must be 1-D, got shape {labels.shape}")
    values = set(np.unique(labels).tolist())
    if not values <= {0, 1}:
        raise ValueError(f"y must hold 0 (healthy) / 1 (HCC) or booleans, got values {sorted(values)}")
    return labels.astype(int)


def check_cv_labels(y: np.ndarray, cv_folds: int) -> None:
    """Raise a clear ValueError when stratified ``cv_folds``-fold CV is impossible on ``y``."""
    counts = np.bincount(y, minlength=2)
    if (counts == 0).any():
        raise ValueError(f"y has a single class ({int(counts.argmax())} only, {len(y)} rows); cannot fit a classifier")
    if counts.min() < cv_folds:
        raise ValueError(
            f"class {int(counts.argmin())} has {int(counts.min())} member(s), fewer than cv_folds={cv_folds}; "
            "stratified CV needs at least one per fold"
        )


def _strongest_penalty_among_best(lambdas_in_grid_order: np.ndarray):
    """A GridSearchCV ``refit`` callable: best mean accuracy, ties to the largest lambda."""

    def choose(cv_results: dict) -> int:
        means = np.asarray(cv_results["mean_test_score"], dtype=float)
        best = np.nanmax(means)
        tied = np.flatnonzero(means >= best - ACCURACY_TIE_TOLERANCE)
        return int(tied[np.argmax(lambdas_in_grid_order[tied])])

    return choose


def fit_lasso(
    X: np.ndarray,
    y: np.ndarray,
    feature_names: Sequence[str],
    *,
    seed: int = 0,
    cv_folds: int = 3,
    lambdas=None,
) -> LassoFit:
    """Choose lambda by stratified ``cv_folds``-fold CV accuracy, then refit on all of ``X``.

    Folds: ``StratifiedKFold(cv_folds, shuffle=True, random_state=seed)``. The whole pipeline
    (variance filter, scaler, L1 logistic) is refitted inside each fold. Tie-break: with small
    cohorts several lambdas often share the best mean accuracy; the largest of them (strongest
    penalty, fewest features) wins. ``lambdas`` defaults to the study's ``lambda_grid()``.
    """
    matrix = np.asarray(X, dtype=float)
    labels = _binary_labels(y)
    names = [str(name) for name in feature_names]
    if matrix.ndim != 2 or matrix.shape[0] != len(labels):
        raise ValueError(f"X must be 2-D with one row per label; got X {matrix.shape}, y {labels.shape}")
    if matrix.shape[1] != len(names):
        raise ValueError(f"X has {matrix.shape[1]} columns but {len(names)} feature names were given")
    check_cv_labels(labels, cv_folds)

    grid = np.sort(np.asarray(lambda_grid() if lambdas is None else lambdas, dtype=float))
    if grid.size == 0 or (grid <= 0).any():
        raise ValueError("lambdas must be a non-empty list of positive numbers")
    search = GridSearchCV(
        make_lasso_pipeline(seed=seed),
        param_grid={"logistic__C": list(1.0 / grid)},
        scoring="accuracy",
        cv=StratifiedKFold(cv_folds, shuffle=True, random_state=seed),
        refit=_strongest_penalty_among_best(grid),
        error_score="raise",
    )
    search.fit(matrix, labels)

    best_index = int(search.best_index_)
    pipeline: Pipeline = search.best_estimator_
    variance_filter = pipeline.named_steps["filter"]
    logistic = pipeline.named_steps["logistic"]
    kept_names = list(variance_filter.get_feature_names_out(names))
    betas = logistic.coef_.ravel()
    coefficients = {name: float(beta) for name, beta in zip(kept_names, betas) if beta != 0.0}
    return LassoFit(
        pipeline=pipeline,
        feature_names=names,
        lambdas=[float(value) for value in grid],
        cv_accuracy_mean=[float(value) for value in search.cv_results_["mean_test_score"]],
        cv_accuracy_sd=[float(value) for value in search.cv_results_["std_test_score"]],
        best_lambda=float(grid[best_index]),
        best_C=float(1.0 / grid[best_index]),
        selected=list(coefficients),
        coefficients=coefficients,
        intercept=float(logistic.intercept_[0]),
        n_constant=int(variance_filter.n_constant_),
        n_quasi_constant=int(variance_filter.n_quasi_constant_),
        seed=int(seed),
    )


def predict_proba(fit: LassoFit, X) -> np.ndarray:
    """Probability of HCC (label 1) for each row of ``X`` (same columns as at fit time)."""
    matrix = np.asarray(X, dtype=float)
    if matrix.ndim != 2 or matrix.shape[1] != len(fit.feature_names):
        raise ValueError(f"X must have {len(fit.feature_names)} columns, got shape {matrix.shape}")
    classes = list(fit.pipeline.classes_)
    return fit.pipeline.predict_proba(matrix)[:, classes.index(1)]


def _json_safe(value):
    """Replace NaN/inf with None so the summary is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def save_lasso(fit: LassoFit, folder) -> Path:
    """Write ``lasso.joblib`` (the whole LassoFit) and ``lasso_summary.json``; return the folder."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    atomic_write(target / MODEL_FILE, lambda file: joblib.dump(fit, file))
    summary = json.dumps(_json_safe(fit.summary()), indent=2, sort_keys=True)
    atomic_write_text(target / SUMMARY_FILE, summary + "\n")
    return target


def load_lasso(folder) -> LassoFit:
    """Read back what ``save_lasso`` wrote. Only load folders this platform wrote (joblib unpickles)."""
    path = Path(folder) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {MODEL_FILE} in {folder}")
    fit = joblib.load(path)
    if not isinstance(fit, LassoFit):
        raise TypeError(f"{path} holds a {type(fit).__name__}, not a LassoFit")
    return fit
