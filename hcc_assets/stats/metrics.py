"""Validation metrics with bootstrap and repeated-CV uncertainty.

Conventions (all documented here once):

- A patient is predicted HCC when its probability is strictly above ``threshold``; this is what
  ``LogisticRegression.predict`` does at 0.5, so validation accuracy and CV accuracy agree.
- ``zero_division=0``: precision with no predicted positives, recall with no actual positives,
  specificity with no actual negatives, NPV (negative predictive value) with no predicted
  negatives and F1 with neither true positives nor errors are 0.0 (sklearn's ``zero_division=0``).
- specificity = TN / (TN + FP), NPV = TN / (TN + FN) (recall is the sensitivity, precision the PPV).
- ROC AUC is the Mann-Whitney probability that an HCC patient scores above a healthy one, ties
  counting one half; it is NaN when ``y_true`` holds a single class.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata
from sklearn.model_selection import RepeatedStratifiedKFold

log = logging.getLogger(__name__)

METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "specificity", "npv")


@dataclass
class MetricEstimate:
    """One metric with its uncertainty.

    ``estimate`` is the point value (full validation set for the bootstrap; mean over folds for
    repeated CV), ``mean`` the mean over resamples/folds that were used, ``ci_low``/``ci_high``
    the percentile interval, ``n`` the number of patients, ``n_resamples_used`` how many
    resamples/folds entered ``mean`` and the interval, and ``n_degenerate`` how many had a single
    class in ``y_true`` (see ``bootstrap_metrics`` for what happens to them).
    """

    metric: str
    estimate: float
    mean: float
    ci_low: float
    ci_high: float
    n: int
    n_resamples_used: int
    n_degenerate: int


def _validated(y_true, probability) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(y_true)
    scores = np.asarray(probability, dtype=float)
    if labels.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(f"y_true and probability must be 1-D and equally long, got {labels.shape}, {scores.shape}")
    if labels.size == 0:
        raise ValueError("no patients to score")
    if not set(np.unique(labels).tolist()) <= {0, 1}:
        raise ValueError(f"y_true must hold 0/1 or booleans, got {sorted(set(np.unique(labels).tolist()))}")
    if not np.isfinite(scores).all():
        raise ValueError(f"probability holds {int((~np.isfinite(scores)).sum())} non-finite value(s)")
    return labels.astype(bool), scores


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0.0 where the denominator is 0 (zero_division=0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), 0.0)


def auc_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of (resamples x patients) boolean ``labels`` and ``scores``; NaN for a
    row with a single class. Mann-Whitney: the sum of the positives' average ranks minus its
    minimum, over the number of (positive, negative) pairs, so ties count one half."""
    ranks = rankdata(scores, axis=1)
    n_positive = labels.sum(axis=1)
    n_negative = labels.shape[1] - n_positive
    positive_rank_sum = np.where(labels, ranks, 0.0).sum(axis=1)
    pairs = n_positive * n_negative
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(
            pairs > 0, (positive_rank_sum - n_positive * (n_positive + 1) / 2) / np.maximum(pairs, 1), np.nan
        )


def _metric_rows(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Every metric for each row of (resamples x patients) ``labels``/``scores``, vectorised."""
    predicted = scores > threshold
    true_positive = (labels & predicted).sum(axis=1)
    false_positive = (~labels & predicted).sum(axis=1)
    false_negative = (labels & ~predicted).sum(axis=1)
    true_negative = (~labels & ~predicted).sum(axis=1)
    n = labels.shape[1]
    return {
        "accuracy": (true_positive + true_negative) / n,
        "precision": _safe_ratio(true_positive, true_positive + false_positive),
        "recall": _safe_ratio(true_positive, true_positive + false_negative),
        # 2TP / (2TP + FP + FN) equals the harmonic mean of precision and recall, and is 0 when TP = 0
        "f1": _safe_ratio(2 * true_positive, 2 * true_positive + false_positive + false_negative),
        "roc_auc": auc_rows(labels, scores),
        "specificity": _safe_ratio(true_negative, true_negative + false_positive),
        "npv": _safe_ratio(true_negative, true_negative + false_negative),
    }


@dataclass
class ConfusionMatrix:
    """Counts at ``threshold`` (HCC = positive; predicted HCC when the probability is above it)."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn


def confusion_matrix(y_true, probability, threshold: float = 0.5) -> ConfusionMatrix:
    """True/false positives and negatives of one set of patients at ``threshold``."""
    labels, scores = _validated(y_true, probability)
    predicted = scores > threshold
    return ConfusionMatrix(
        threshold=float(threshold),
        tp=int((labels & predicted).sum()),
        fp=int((~labels & predicted).sum()),
        tn=int((~labels & ~predicted).sum()),
        fn=int((labels & ~predicted).sum()),
    )


def classification_metrics(y_true, probability, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (HCC = positive), ROC AUC, specificity and NPV on one set of
    patients."""
    labels, scores = _validated(y_true, probability)
    rows = _metric_rows(labels[None, :], scores[None, :], threshold)
    return {metric: float(rows[metric][0]) for metric in METRICS}


def _summarise(metric: str, estimate: float, values: np.ndarray, n: int, n_degenerate: int, alpha: float):
    used = values[np.isfinite(values)]
    if used.size == 0:
        mean = low = high = float("nan")
    else:
        mean = float(used.mean())
        low, high = (float(v) for v in np.percentile(used, [100 * alpha / 2, 100 * (1 - alpha / 2)]))
    return MetricEstimate(
        metric=metric,
        estimate=float(estimate),
        mean=mean,
        ci_low=low,
        ci_high=high,
        n=int(n),
        n_resamples_used=int(used.size),
        n_degenerate=int(n_degenerate),
    )


def bootstrap_draws(n: int, n_resamples: int, seed: int, alpha: float = 0.05):
    """Resampled patient indices, (chunk, n) at a time, from ``np.random.default_rng(seed)``: the
    one stream every bootstrap here draws, so metrics and paired comparisons with the same seed
    and ``n`` resample the same patients. Chunks bound memory for large validation sets."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // n)
    for start in range(0, n_resamples, chunk):
        yield rng.integers(0, n, size=(min(chunk, n_resamples - start), n))


def bootstrap_metrics(
    y_true, probability, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05, threshold: float = 0.5
) -> list[MetricEstimate]:
    """Percentile bootstrap over validation patients, one ``MetricEstimate`` per metric.

    Each resample draws ``n`` patients with replacement from ``np.random.default_rng(seed)``.
    Degenerate resamples (a single class in ``y_true``) are kept, not redrawn, so the draws do
    not depend on the labels: for ``roc_auc`` they are skipped (undefined) and leave the mean
    and interval; the threshold metrics are computed on them as usual with zero_division=0.
    ``n_degenerate`` counts them for every metric; ``n_resamples_used`` is ``n_resamples`` for
    threshold metrics and ``n_resamples - n_degenerate`` for ``roc_auc``. When no resample is
    usable, mean and interval are NaN. The interval is the (alpha/2, 1 - alpha/2) percentiles.
    """
    labels, scores = _validated(y_true, probability)
    n = labels.size
    point = classification_metrics(labels, scores, threshold)
    estimates = []
    values: dict[str, list[np.ndarray]] = {metric: [] for metric in METRICS}
    n_degenerate = 0
    for indices in bootstrap_draws(n, n_resamples, seed, alpha):
        resampled_labels = labels[indices]
        n_positive = resampled_labels.sum(axis=1)
        n_degenerate += int(((n_positive == 0) | (n_positive == n)).sum())
        for metric, row_values in _metric_rows(resampled_labels, scores[indices], threshold).items():
            values[metric].append(row_values)
    for metric in METRICS:
        estimates.append(_summarise(metric, point[metric], np.concatenate(values[metric]), n, n_degenerate, alpha))
    return estimates


def repeated_cv_metrics(
    fit_predict: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    X,
    y,
    n_splits: int = 5,
    n_repeats: int = 5,
    seed: int = 0,
    alpha: float = 0.05,
    threshold: float = 0.5,
    progress: Callable[[str], None] | None = None,
) -> list[MetricEstimate]:
    """Repeated stratified k-fold estimate of every metric, one value per test fold.

    ``fit_predict(X_train, y_train, X_test)`` must fit everything (filters, scaler, feature
    selection, model) on the training fold and return HCC probabilities for the test fold, so
    nothing leaks. ``estimate`` and ``mean`` are the mean over folds; the interval is the
    (alpha/2, 1 - alpha/2) percentiles of the fold values: a spread of fold results, not a
    confidence interval of the mean (folds share patients and are not independent). ``n`` is
    the total number of patients and ``n_resamples_used`` the number of folds with a finite
    value. When the minority class has fewer than ``n_splits`` members, ``n_splits`` is lowered
    to that count (logged); fewer than 2 raises ValueError. Folds whose test part holds a single
    class count in ``n_degenerate`` and give NaN roc_auc (impossible while stratification holds).
    ``progress`` receives a line after each repeat (folds done, seconds, ETA).
    """
    matrix = np.asarray(X, dtype=float)
    labels = np.asarray(y)
    if matrix.ndim != 2 or matrix.shape[0] != labels.shape[0]:
        raise ValueError(f"X must be 2-D with one row per label; got X {matrix.shape}, y {labels.shape}")
    labels, _ = _validated(labels, np.zeros(labels.shape[0]))
    labels = labels.astype(int)
    minority = int(np.bincount(labels, minlength=2).min())
    if minority < 2:
        raise ValueError(f"the minority class has {minority} patient(s); cross-validation needs at least 2")
    if minority < n_splits:
        log.info("repeated_cv_metrics: lowering n_splits from %d to %d (minority class size)", n_splits, minority)
        n_splits = minority
    folds = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=n_repeats, random_state=seed)
    fold_values: dict[str, list[float]] = {metric: [] for metric in METRICS}
    n_degenerate = 0
    started, total = time.perf_counter(), n_splits * n_repeats
    for done, (train, test) in enumerate(folds.split(matrix, labels), start=1):
        probabilities = np.asarray(fit_predict(matrix[train], labels[train], matrix[test]), dtype=float).ravel()
        if probabilities.shape != test.shape:
            raise ValueError(f"fit_predict returned {probabilities.shape[0]} probabilities for {test.size} test rows")
        if labels[test].min() == labels[test].max():
            n_degenerate += 1
        for metric, value in classification_metrics(labels[test], probabilities, threshold).items():
            fold_values[metric].append(value)
        if progress is not None and done % n_splits == 0:
            elapsed = time.perf_counter() - started
            progress(
                f"repeat {done // n_splits}/{n_repeats} ({done}/{total} folds) in {elapsed:.1f} s, "
                f"ETA {elapsed / done * (total - done):.0f} s"
            )
    estimates = []
    for metric in METRICS:
        values = np.asarray(fold_values[metric])
        finite = values[np.isfinite(values)]
        estimate = float(finite.mean()) if finite.size else float("nan")
        estimates.append(_summarise(metric, estimate, values, labels.size, n_degenerate, alpha))
    return estimates
