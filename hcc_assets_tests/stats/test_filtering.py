import warnings

import numpy as np
import pytest

from hcc_assets.stats.filtering import AllFeaturesDroppedError, VarianceFilter, lambda_grid, make_lasso_pipeline


def training_matrix(rng) -> np.ndarray:
    """Columns: constant, quasi-constant (sd ~ 0.0005), informative, just above the limit (sd ~ 0.002)."""
    n = 20
    return np.c_[
        np.full(n, 3.0),
        5.0 + 0.0005 * rng.standard_normal(n),
        rng.standard_normal(n),
        0.002 * np.r_[np.ones(n // 2), -np.ones(n // 2)],
    ]


def test_drops_constant_and_quasi_constant_columns():
    X = training_matrix(np.random.default_rng(0))
    assert X[:, 1].std(ddof=1) < 0.001 < X[:, 3].std(ddof=1)
    fitted = VarianceFilter().fit(X)
    assert fitted.kept_mask_.tolist() == [False, False, True, True]
    assert fitted.n_constant_ == 1 and fitted.n_quasi_constant_ == 1
    assert fitted.transform(X).shape == (20, 2)
    assert fitted.get_feature_names_out(["c", "q", "x", "y"]).tolist() == ["x", "y"]
    assert fitted.get_feature_names_out().tolist() == ["x2", "x3"]


def test_fit_uses_training_rows_only():
    rng = np.random.default_rng(1)
    train = training_matrix(rng)
    validation = rng.standard_normal((6, 4)) * 10  # every column varies a lot here
    fitted = VarianceFilter().fit(train)
    kept = fitted.kept_mask_.copy()
    out = fitted.transform(validation)
    assert fitted.kept_mask_.tolist() == kept.tolist()
    assert np.array_equal(out, validation[:, kept])
    # had the filter seen the validation rows, it would have kept all columns
    assert VarianceFilter().fit(np.r_[train, validation]).kept_mask_.all()


def test_clear_errors():
    X = np.random.default_rng(2).standard_normal((10, 3))
    X[[1, 4], 2] = np.nan
    X[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"3 non-finite.*column 0.*1.*column 2.*2"):
        VarianceFilter().fit(X)
    with pytest.raises(AllFeaturesDroppedError, match="dropped all 2 columns"):
        VarianceFilter().fit(np.c_[np.ones(5), np.full(5, 2.0)])
    with pytest.raises(ValueError, match="dropped all"):  # it is a ValueError too
        VarianceFilter(quasi_constant_sd=10).fit(np.random.default_rng(0).standard_normal((5, 2)))
    fitted = VarianceFilter().fit(np.random.default_rng(0).standard_normal((5, 2)))
    with pytest.raises(ValueError, match="fitted on 2 columns"):
        fitted.transform(np.zeros((3, 3)))


def test_lambda_grid_is_the_study_grid():
    grid = lambda_grid()
    assert grid == pytest.approx([1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3])
    assert (1 / grid) == pytest.approx([1e3, 1e2, 1e1, 1.0, 1e-1, 1e-2, 1e-3])


def test_lasso_pipeline_is_l1_and_warning_free():
    rng = np.random.default_rng(3)
    X = np.c_[rng.standard_normal((40, 5)), np.ones(40)]
    y = (X[:, 0] > 0).astype(int)
    pipeline = make_lasso_pipeline(C=0.5, seed=7)
    assert list(pipeline.named_steps) == ["filter", "scale", "logistic"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipeline.fit(X, y)
    logistic = pipeline.named_steps["logistic"]
    assert logistic.random_state == 7 and logistic.C == 0.5
    assert logistic.coef_.shape == (1, 5)  # the constant column is gone
    assert (logistic.coef_ == 0).any()  # the L1 penalty zeroes noise columns at this C
