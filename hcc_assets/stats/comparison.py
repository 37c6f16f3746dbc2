"""Paired comparison of two models' ROC AUCs on the same patients.

Two answers to "is model A's AUC different from model B's?", both paired (the two models score the
same patients, so their AUCs are correlated and an unpaired comparison would overstate the
uncertainty of the difference):

- ``delong_test``: DeLong, DeLong & Clarke-Pearson (1988), the asymptotic test of two correlated
  AUCs, in the fast midrank form of Sun & Xu (2014);
- ``paired_bootstrap_auc_difference``: the percentile interval of AUC(A) - AUC(B) over bootstrap
  resamples that draw the same patients for both models.

Conventions as in ``hcc_assets.stats.metrics``: HCC (1/True) is the positive class, ties count
one half, the difference is always ``auc_a - auc_b``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import norm, rankdata

from hcc_assets.stats.metrics import _validated, auc_rows, bootstrap_draws


@dataclass
class DeLongResult:
    """DeLong's test of AUC(a) = AUC(b) on ``n`` patients (``n_positive`` HCC).

    ``se`` is the standard error of ``difference`` = ``auc_a`` - ``auc_b``, ``z`` = difference / se,
    ``p_value`` two-sided, ``ci_low``/``ci_high`` the Wald interval difference -/+ z_(1-alpha/2) se.
    ``se_a``/``se_b`` are each AUC's own DeLong standard error and ``correlation`` the correlation
    of the two AUC estimates. With a single patient in a class the variance is undefined: se, z, p
    and the interval are NaN. When se is 0 (identical predictors, or two predictors whose
    structural components differ by a constant) z is 0 and p 1 for a zero difference, else
    z = +/-inf and p = 0.
    """

    auc_a: float
    auc_b: float
    difference: float
    se: float
    z: float
    p_value: float
    ci_low: float
    ci_high: float
    se_a: float
    se_b: float
    correlation: float
    n: int
    n_positive: int
    n_negative: int


def _structural_components(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(AUCs, V10, V01) of k predictors, Sun & Xu's midrank form.

    ``positive`` is (k x m), ``negative`` (k x n). V10[r, i] is the fraction of negatives that
    positive i outscores under predictor r (ties one half) and V01[r, j] the fraction of positives
    that outscore negative j; both average to the AUC. With T_Z the midranks in the pooled m + n
    scores and T_X, T_Y the midranks within the positives and negatives:
    V10 = (T_Z[positive] - T_X) / n, V01 = 1 - (T_Z[negative] - T_Y) / m. O((m + n) log(m + n)).
    """
    m, n = positive.shape[1], negative.shape[1]
    pooled = rankdata(np.hstack([positive, negative]), axis=1)
    within_positive = rankdata(positive, axis=1)
    within_negative = rankdata(negative, axis=1)
    v10 = (pooled[:, :m] - within_positive) / n
    v01 = 1.0 - (pooled[:, m:] - within_negative) / m
    aucs = (pooled[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    return aucs, v10, v01


def delong_test(y_true, probability_a, probability_b, alpha: float = 0.05) -> DeLongResult:
    """DeLong's paired test of two correlated ROC AUCs (DeLong et al. 1988; Sun & Xu 2014).

    The AUC of predictor r is the mean of its structural components V10 (one per HCC patient) or
    V01 (one per healthy patient). The covariance of the two AUC estimates is
    S = S10 / m + S01 / n, where S10 and S01 are the 2 x 2 sample covariances (denominators m - 1
    and n - 1) of the components over the m HCC and n healthy patients; the variance of the
    difference is var(V10_a - V10_b) / m + var(V01_a - V01_b) / n, which equals
    S_aa + S_bb - 2 S_ab and is exactly 0 for identical predictors.

    Hand-written because none of the libraries in the environment offers it: scipy.stats has
    Mann-Whitney but no paired AUC test, scikit-learn only point estimates (roc_auc_score) and
    statsmodels (0.15) no ROC comparison; the usual implementations (R's pROC::roc.test, the
    MLstat/yandexdataschool gist) are not Python packages here. The unit tests check it against
    scikit-learn's AUC and an O(m n) computation of the structural components.
    """
    labels, scores_a = _validated(y_true, probability_a)
    _, scores_b = _validated(y_true, probability_b)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    m, n = int(labels.sum()), int((~labels).sum())
    if m == 0 or n == 0:
        raise ValueError(f"DeLong's test needs both classes; got {m} HCC and {n} healthy patient(s)")
    scores = np.vstack([scores_a, scores_b])
    aucs, v10, v01 = _structural_components(scores[:, labels], scores[:, ~labels])
    difference = float(aucs[0] - aucs[1])
    if m < 2 or n < 2:
        se = se_a = se_b = correlation = z = p = low = high = float("nan")
    else:
        covariance = np.cov(v10) / m + np.cov(v01) / n
        se_a, se_b = (float(np.sqrt(covariance[i, i])) for i in (0, 1))
        correlation = float(covariance[0, 1] / (se_a * se_b)) if se_a > 0 and se_b > 0 else float("nan")
        # the difference's own components: exactly 0 for identical predictors (no cancellation)
        se = float(np.sqrt(np.var(v10[0] - v10[1], ddof=1) / m + np.var(v01[0] - v01[1], ddof=1) / n))
        if se > 0:
            z = difference / se
            p = float(2 * norm.sf(abs(z)))
        elif difference == 0:
            z, p = 0.0, 1.0
        else:
            z, p = float(np.copysign(np.inf, difference)), 0.0
        half = float(norm.ppf(1 - alpha / 2)) * se
        low, high = difference - half, difference + half
    return DeLongResult(
        auc_a=float(aucs[0]),
        auc_b=float(aucs[1]),
        difference=difference,
        se=se,
        z=float(z),
        p_value=float(p),
        ci_low=float(low),
        ci_high=float(high),
        se_a=float(se_a),
        se_b=float(se_b),
        correlation=float(correlation),
        n=m + n,
        n_positive=m,
        n_negative=n,
    )


@dataclass
class PairedBootstrap:
    """AUC(a) - AUC(b) over paired bootstrap resamples.

    ``difference`` is the observed difference on all ``n`` patients, ``mean`` and the percentile
    interval ``ci_low``/``ci_high`` are over the ``n_resamples_used`` resamples holding both
    classes; ``n_degenerate`` resamples held a single class and were skipped (AUC undefined).
    """

    auc_a: float
    auc_b: float
    difference: float
    mean: float
    ci_low: float
    ci_high: float
    n: int
    n_resamples: int
    n_resamples_used: int
    n_degenerate: int


def paired_bootstrap_auc_difference(
    y_true, probability_a, probability_b, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05
) -> PairedBootstrap:
    """Percentile bootstrap of AUC(a) - AUC(b): each resample draws ``n`` patients with
    replacement from ``np.random.default_rng(seed)`` (the draws ``bootstrap_metrics`` makes with
    the same seed and ``n``) and scores the same patients with both models. Resamples with a
    single class are kept in the stream (the draws do not depend on the labels) but skipped;
    ``n_degenerate`` counts them. When none is usable, mean and interval are NaN."""
    labels, scores_a = _validated(y_true, probability_a)
    _, scores_b = _validated(y_true, probability_b)
    n = labels.size
    observed = auc_rows(labels[None, :], np.vstack([scores_a, scores_b]))  # both rows share the labels
    differences = []
    for indices in bootstrap_draws(n, n_resamples, seed, alpha):  # bootstrap_metrics' draws
        resampled = labels[indices]
        differences.append(auc_rows(resampled, scores_a[indices]) - auc_rows(resampled, scores_b[indices]))
    values = np.concatenate(differences)
    used = values[np.isfinite(values)]
    if used.size:
        mean = float(used.mean())
        low, high = (float(v) for v in np.percentile(used, [100 * alpha / 2, 100 * (1 - alpha / 2)]))
    else:
        mean = low = high = float("nan")
    return PairedBootstrap(
        auc_a=float(observed[0]),
        auc_b=float(observed[1]),
        difference=float(observed[0] - observed[1]),
        mean=mean,
        ci_low=low,
        ci_high=high,
        n=n,
        n_resamples=int(n_resamples),
        n_resamples_used=int(used.size),
        n_degenerate=int(values.size - used.size),
    )
