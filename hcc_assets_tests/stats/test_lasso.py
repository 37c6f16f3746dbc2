import json
import warnings

import numpy as np
import pytest

from hcc_assets.stats.lasso import SUMMARY_FILE, fit_lasso, load_lasso, predict_proba, save_lasso
from hcc_assets.stats.metrics import classification_metrics

NAMES = [f"f{i}" for i in range(20)]


def separable_cohort(seed: int = 1, n_train: int = 60, n_validation: int = 40):
    """Feature f0 carries the label (+-1 plus small noise); f1..f18 are noise; f19 is constant."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n_train // 2), np.ones(n_train - n_train // 2), rng.integers(0, 2, n_validation)].astype(int)
    X = rng.standard_normal((len(y), 20))
    X[:, 0] = 2 * y - 1 + 0.3 * rng.standard_normal(len(y))
    X[:, 19] = 4.0
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


@pytest.fixture(scope="module")
def separable_fit():
    X_train, y_train, X_val, y_val = separable_cohort()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FutureWarning/ConvergenceWarning from the search
        fit = fit_lasso(X_train, y_train, NAMES, seed=0)
    return fit, X_val, y_val


def test_selects_the_informative_feature_and_validates(separable_fit):
    fit, X_val, y_val = separable_fit
    assert "f0" in fit.selected
    assert len(fit.selected) <= 3
    assert fit.coefficients["f0"] > 0
    assert fit.n_constant == 1 and "f19" not in fit.coefficients
    assert classification_metrics(y_val, predict_proba(fit, X_val))["accuracy"] >= 0.9


def test_cv_results_and_tie_break(separable_fit):
    fit, _, _ = separable_fit
    assert fit.lambdas == pytest.approx([1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3])
    assert len(fit.cv_accuracy_mean) == len(fit.cv_accuracy_sd) == 7
    best = max(fit.cv_accuracy_mean)
    tied = [lam for lam, mean in zip(fit.lambdas, fit.cv_accuracy_mean) if mean >= best - 1e-9]
    assert len(tied) > 1  # the case the tie-break exists for
    assert fit.best_lambda == max(tied)  # strongest penalty among the best
    assert fit.best_C == pytest.approx(1 / fit.best_lambda)
    assert fit.best_cv_accuracy == best
    assert pytest.approx(fit.best_C) == fit.pipeline.named_steps["logistic"].C


def test_same_seed_same_fit():
    X_train, y_train, X_val, _ = separable_cohort(seed=2)
    first = fit_lasso(X_train, y_train, NAMES, seed=3)
    second = fit_lasso(X_train, y_train, NAMES, seed=3)
    assert first.cv_accuracy_mean == second.cv_accuracy_mean and first.coefficients == second.coefficients
    assert np.array_equal(predict_proba(first, X_val), predict_proba(second, X_val))


def test_clear_errors_for_unusable_labels():
    X = np.random.default_rng(0).standard_normal((10, 3))
    with pytest.raises(ValueError, match="single class"):
        fit_lasso(X, np.ones(10, dtype=int), ["a", "b", "c"])
    with pytest.raises(ValueError, match="fewer than cv_folds=3"):
        fit_lasso(X, np.r_[1, 1, np.zeros(8)].astype(int), ["a", "b", "c"])
    with pytest.raises(ValueError, match="3 columns but 2"):
        fit_lasso(X, np.r_[np.ones(5), np.zeros(5)].astype(int), ["a", "b"])


def test_save_load_round_trip(separable_fit, tmp_path):
    fit, X_val, _ = separable_fit
    folder = save_lasso(fit, tmp_path / "model")
    loaded = load_lasso(folder)
    assert np.array_equal(predict_proba(loaded, X_val), predict_proba(fit, X_val))
    assert loaded.selected == fit.selected and loaded.best_lambda == fit.best_lambda
    summary = json.loads((folder / SUMMARY_FILE).read_text(), parse_constant=lambda c: pytest.fail(c))
    assert summary["selected"] == fit.selected
    assert summary["cv_accuracy_mean"] == fit.cv_accuracy_mean
    assert summary["best_lambda"] == fit.best_lambda
    assert sorted(p.name for p in folder.iterdir()) == ["lasso.joblib", "lasso_summary.json"]  # no temp files
    save_lasso(fit, folder)  # overwriting is fine
    with pytest.raises(FileNotFoundError):
        load_lasso(tmp_path / "missing")
