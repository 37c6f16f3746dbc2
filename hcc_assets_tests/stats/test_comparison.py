"""Paired AUC comparison: DeLong's test against an independent O(m n) computation, and the paired
bootstrap of the AUC difference."""

import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from hcc_assets.stats.comparison import delong_test, paired_bootstrap_auc_difference
from hcc_assets.stats.metrics import bootstrap_metrics


def _psi(x: float, y: float) -> float:
    return 1.0 if x > y else 0.5 if x == y else 0.0


def _delong_by_definition(y, p_a, p_b):
    """DeLong et al. (1988) written out pair by pair: structural components V10 (per positive) and
    V01 (per negative), their sample covariances, S = S10/m + S01/n; returns (aucs, S)."""
    y = np.asarray(y, dtype=bool)
    components = []
    for p in (np.asarray(p_a), np.asarray(p_b)):
        positives, negatives = p[y], p[~y]
        v10 = [sum(_psi(x, z) for z in negatives) / len(negatives) for x in positives]
        v01 = [sum(_psi(x, z) for x in positives) / len(positives) for z in negatives]
        components.append((v10, v01))
    m, n = int(y.sum()), int((~y).sum())
    aucs = [float(np.mean(v10)) for v10, _ in components]
    s10 = np.zeros((2, 2))
    s01 = np.zeros((2, 2))
    for r in range(2):
        for s in range(2):
            s10[r, s] = sum((components[r][0][i] - aucs[r]) * (components[s][0][i] - aucs[s]) for i in range(m)) / (
                m - 1
            )
            s01[r, s] = sum((components[r][1][j] - aucs[r]) * (components[s][1][j] - aucs[s]) for j in range(n)) / (
                n - 1
            )
    return aucs, s10 / m + s01 / n


def _random_case(rng, n=40, rounding=None):
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]  # both classes, at least 2 of each with the next line
    y[2:4] = [0, 1]
    p_a = np.clip(0.5 * y + rng.normal(0.25, 0.25, n), 0, 1)
    p_b = np.clip(0.3 * y + 0.5 * p_a + rng.normal(0.1, 0.25, n), 0, 1)  # correlated with a
    if rounding is not None:  # ties within and across classes
        p_a, p_b = np.round(p_a, rounding), np.round(p_b, rounding)
    return y, p_a, p_b


@pytest.mark.parametrize("rounding", [None, 1])
def test_delong_matches_sklearn_auc_and_the_pairwise_variance(rounding):
    rng = np.random.default_rng(11)
    for _ in range(5):
        y, p_a, p_b = _random_case(rng, rounding=rounding)
        result = delong_test(y, p_a, p_b)
        assert result.auc_a == pytest.approx(roc_auc_score(y, p_a), abs=1e-12)
        assert result.auc_b == pytest.approx(roc_auc_score(y, p_b), abs=1e-12)
        assert result.difference == pytest.approx(result.auc_a - result.auc_b, abs=1e-15)
        aucs, covariance = _delong_by_definition(y, p_a, p_b)
        assert [result.auc_a, result.auc_b] == pytest.approx(aucs, abs=1e-12)
        variance = covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]
        assert result.se == pytest.approx(math.sqrt(variance), rel=1e-9)
        assert result.se_a == pytest.approx(math.sqrt(covariance[0, 0]), rel=1e-9)
        assert result.se_b == pytest.approx(math.sqrt(covariance[1, 1]), rel=1e-9)
        assert result.correlation == pytest.approx(
            covariance[0, 1] / math.sqrt(covariance[0, 0] * covariance[1, 1]), rel=1e-9
        )
        z = result.difference / math.sqrt(variance)
        assert result.z == pytest.approx(z, rel=1e-9)
        assert result.p_value == pytest.approx(2 * norm.sf(abs(z)), rel=1e-9)
        assert result.ci_low == pytest.approx(result.difference - 1.959963984540054 * result.se, rel=1e-9)
        assert result.ci_high == pytest.approx(result.difference + 1.959963984540054 * result.se, rel=1e-9)
        assert result.n == len(y) and result.n_positive == int(np.sum(y)) and result.n_negative == len(y) - np.sum(y)


def test_identical_predictors_differ_by_zero_with_p_one():
    y, p_a, _ = _random_case(np.random.default_rng(2))
    result = delong_test(y, p_a, p_a.copy())
    assert result.difference == 0.0 and result.se == 0.0
    assert result.z == 0.0 and result.p_value == 1.0
    assert result.ci_low == 0.0 and result.ci_high == 0.0
    assert result.se_a > 0


def test_a_clearly_better_predictor_gives_a_small_p():
    rng = np.random.default_rng(4)
    y = np.repeat([0, 1], 60)
    good = y + rng.normal(0, 0.4, y.size)  # AUC near 0.96
    poor = y + rng.normal(0, 3.0, y.size)  # AUC near 0.6
    result = delong_test(y, good, poor)
    assert result.difference > 0.2
    assert result.p_value < 1e-4 and result.z > 0 and result.ci_low > 0
    # the test is antisymmetric in its two predictors
    swapped = delong_test(y, poor, good)
    assert swapped.difference == pytest.approx(-result.difference)
    assert swapped.z == pytest.approx(-result.z) and swapped.p_value == pytest.approx(result.p_value)


def test_delong_p_is_not_small_for_two_equally_good_independent_predictors():
    rng = np.random.default_rng(9)
    y = np.repeat([0, 1], 50)
    result = delong_test(y, y + rng.normal(0, 1, y.size), y + rng.normal(0, 1, y.size))
    assert result.p_value > 0.05


def test_delong_edge_cases():
    with pytest.raises(ValueError):
        delong_test([1, 1, 1], [0.2, 0.3, 0.4], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        delong_test([1, 0], [0.2, 0.3], [0.1])
    one_positive = delong_test([1, 0, 0], [0.9, 0.2, 0.3], [0.1, 0.2, 0.3])
    assert one_positive.auc_a == 1.0 and one_positive.auc_b == 0.0
    assert math.isnan(one_positive.se) and math.isnan(one_positive.p_value)
    # both structural components differ by the same constant: se 0 with a nonzero difference
    perfect_vs_constant = delong_test([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], [0.5, 0.5, 0.5, 0.5])
    assert perfect_vs_constant.difference == 0.5 and perfect_vs_constant.se == 0.0
    assert perfect_vs_constant.z == math.inf and perfect_vs_constant.p_value == 0.0


def test_paired_bootstrap_holds_the_difference_and_repeats_with_the_seed():
    rng = np.random.default_rng(5)
    y, p_a, p_b = _random_case(rng, n=60)
    first = paired_bootstrap_auc_difference(y, p_a, p_b, n_resamples=500, seed=3)
    assert first.difference == pytest.approx(roc_auc_score(y, p_a) - roc_auc_score(y, p_b), abs=1e-12)
    assert first.ci_low <= first.difference <= first.ci_high
    assert first.n == 60 and first.n_resamples == 500
    assert first.n_resamples_used + first.n_degenerate == 500
    assert first == paired_bootstrap_auc_difference(y, p_a, p_b, n_resamples=500, seed=3)
    other = paired_bootstrap_auc_difference(y, p_a, p_b, n_resamples=500, seed=4)
    assert (other.ci_low, other.ci_high) != (first.ci_low, first.ci_high)
    same = paired_bootstrap_auc_difference(y, p_a, p_a, n_resamples=200, seed=3)
    assert same.difference == 0.0 and same.mean == 0.0 and same.ci_low == 0.0 and same.ci_high == 0.0


def test_paired_bootstrap_draws_the_patients_bootstrap_metrics_draws():
    """With a constant predictor b (AUC 0.5 on every resample holding both classes) the mean
    difference is bootstrap_metrics' mean AUC of a minus 0.5: the same resamples, same seed."""
    rng = np.random.default_rng(6)
    y, p_a, _ = _random_case(rng, n=12)
    paired = paired_bootstrap_auc_difference(y, p_a, np.full(y.size, 0.3), n_resamples=2000, seed=8)
    auc = {e.metric: e for e in bootstrap_metrics(y, p_a, n_resamples=2000, seed=8)}["roc_auc"]
    assert paired.n_degenerate == auc.n_degenerate and paired.n_resamples_used == auc.n_resamples_used
    assert paired.mean == pytest.approx(auc.mean - 0.5, abs=1e-12)


def test_paired_bootstrap_counts_and_skips_single_class_resamples():
    # 1 HCC patient among 6: a resample misses it with probability (5/6)^6 = 0.33
    y = [1, 0, 0, 0, 0, 0]
    result = paired_bootstrap_auc_difference(
        y, [0.9, 0.1, 0.2, 0.3, 0.4, 0.5], [0.3, 0.1, 0.2, 0.6, 0.4, 0.5], n_resamples=1000, seed=0
    )
    assert 250 < result.n_degenerate < 420
    assert result.n_resamples_used == 1000 - result.n_degenerate
    assert math.isfinite(result.mean) and math.isfinite(result.ci_low)
    with pytest.raises(ValueError):
        paired_bootstrap_auc_difference(y, y, y, n_resamples=0)
