"""Calibration of predicted P(HCC): does a patient given 0.8 have HCC 80% of the time?

``calibration_bins`` is the reliability-diagram table (scikit-learn's ``calibration_curve`` with
``strategy="uniform"``, plus each bin's edges and patient count) and ``brier_score`` the mean
squared difference between the probability and the 0/1 label (0 is perfect; always predicting
the prevalence p scores p(1 - p)). The plot is ``hcc_assets.stats.report.calibration_figure``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hcc_assets.stats.metrics import _validated


@dataclass
class CalibrationBin:
    """One bin of predicted probabilities: ``bin`` (0-based) covers (``low``, ``high``] (the first
    bin also holds ``low`` itself); ``n`` patients, ``mean_predicted`` their mean P(HCC) and
    ``observed_rate`` the fraction of them with HCC."""

    bin: int
    low: float
    high: float
    n: int
    mean_predicted: float
    observed_rate: float


def calibration_bins(y_true, probability, n_bins: int = 10) -> list[CalibrationBin]:
    """The non-empty bins of ``n_bins`` equal-width bins of [0, 1], in order.

    Edges as scikit-learn's ``calibration_curve(strategy="uniform")``: a probability on an inner
    edge belongs to the lower bin. Probabilities outside [0, 1] raise ValueError."""
    labels, scores = _validated(y_true, probability)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if scores.min() < 0 or scores.max() > 1:
        raise ValueError("probabilities must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.searchsorted(edges[1:-1], scores)
    total = np.bincount(index, minlength=n_bins)
    predicted = np.bincount(index, weights=scores, minlength=n_bins)
    observed = np.bincount(index, weights=labels.astype(float), minlength=n_bins)
    return [
        CalibrationBin(
            bin=int(i),
            low=float(edges[i]),
            high=float(edges[i + 1]),
            n=int(total[i]),
            mean_predicted=float(predicted[i] / total[i]),
            observed_rate=float(observed[i] / total[i]),
        )
        for i in range(n_bins)
        if total[i]
    ]


def brier_score(y_true, probability) -> float:
    """Mean of (probability - label)^2 over the patients."""
    labels, scores = _validated(y_true, probability)
    return float(np.mean((scores - labels.astype(float)) ** 2))
