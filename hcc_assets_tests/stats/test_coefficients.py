import math

import numpy as np
import pytest
import statsmodels.api as sm

from hcc_assets.stats.coefficients import is_separated, logit_refit, odds_change_pct


def well_posed(seed: int = 0, n: int = 60):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 2))
    y = (rng.random(n) < 1 / (1 + np.exp(-(0.3 + 1.2 * X[:, 0])))).astype(int)
    return X, y


def all_nan(row) -> bool:
    return all(math.isnan(v) for v in (row.beta, row.std_error, row.z, row.p_value, row.odds_change_pct))


def test_well_posed_matches_statsmodels():
    X, y = well_posed()
    rows, message = logit_refit(X, y, ["a", "b"])
    reference = sm.Logit(y, sm.add_constant(X)).fit(disp=0)
    assert message.startswith("ok")
    assert [row.feature for row in rows] == ["a", "b"]  # intercept not reported
    for k, row in enumerate(rows, start=1):
        assert row.status == "ok"
        assert row.beta == pytest.approx(reference.params[k])
        assert row.std_error == pytest.approx(reference.bse[k])
        assert row.z == pytest.approx(reference.params[k] / reference.bse[k])
        assert row.p_value == pytest.approx(reference.pvalues[k])
        assert row.odds_change_pct == pytest.approx((math.exp(row.beta) - 1) * 100)
    assert rows[0].odds_change_pct > 0  # higher 'a' raises the odds of HCC


def test_odds_change_examples():
    # beta = ln 2 doubles the odds: +100 %; beta = -ln 2 halves them: -50 %
    X, y = well_posed(seed=1)
    rows, _ = logit_refit(X[:, :1], y, ["a"])
    assert odds_change_pct(math.log(2)) == pytest.approx(100.0)
    assert odds_change_pct(-math.log(2)) == pytest.approx(-50.0)
    assert odds_change_pct(0.0) == 0.0
    assert rows[0].odds_change_pct == pytest.approx(odds_change_pct(rows[0].beta))


def test_complete_separation_gives_no_numbers():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((30, 1))
    y = (x[:, 0] > 0).astype(int)
    rows, message = logit_refit(x, y, ["split"])
    assert rows[0].status == "separation" and all_nan(rows[0])
    assert "separation" in message


def test_quasi_complete_separation_is_caught():
    # one tied pair at x = 0 holds one patient of each class; every other patient is separated
    x = np.r_[np.linspace(-2, -0.1, 10), [0.0, 0.0], np.linspace(0.1, 2, 10)]
    y = np.r_[np.zeros(10), [0, 1], np.ones(10)].astype(int)
    rows, _ = logit_refit(x[:, None], y, ["q"])
    assert rows[0].status == "separation" and all_nan(rows[0])


def test_separation_check_does_not_fire_on_overlapping_classes():
    X, y = well_posed()
    assert not is_separated(sm.add_constant(X), y)


def test_duplicated_and_near_duplicated_columns_are_singular():
    X, y = well_posed()
    rows, message = logit_refit(np.c_[X[:, 0], X[:, 0]], y, ["a", "a_copy"])
    assert [row.status for row in rows] == ["singular", "singular"] and all(all_nan(r) for r in rows)
    assert "rank" in message
    near = np.c_[X[:, 0], X[:, 0] + 1e-10 * np.random.default_rng(3).standard_normal(len(y))]
    rows, _ = logit_refit(near, y, ["a", "a_near"])
    assert rows[0].status == "singular"


def test_no_features_selected():
    rows, message = logit_refit(np.empty((10, 0)), np.r_[np.ones(5), np.zeros(5)], [])
    assert rows == [] and "no features" in message
