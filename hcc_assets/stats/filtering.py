"""Feature filtering and the study's LASSO pipeline (variance filter -> z-score -> L1 logistic).

The study drops constant (sd = 0) and quasi-constant (sd <= 0.001) features, z-scores the rest and
fits an L1-penalised logistic regression with C = 1/lambda, lambda log-spaced from 1e-3 to 1e3.
Every step here is an sklearn estimator so that it is fitted on training rows only, also inside
cross-validation folds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sklearn
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

# Large enough that liblinear converges on the study's ~32 x 128 matrices at lambda = 1e-3.
LOGISTIC_MAX_ITER = 10_000


class AllFeaturesDroppedError(ValueError):
    """The variance filter would leave no column (a ValueError, so callers may catch either)."""


def _non_finite_message(X: np.ndarray, feature_names: Sequence[str] | None) -> str | None:
    """A message naming how many non-finite values there are and in which columns, or None."""
    bad = ~np.isfinite(X)
    total = int(bad.sum())
    if total == 0:
        return None
    per_column = bad.sum(axis=0)
    columns = np.flatnonzero(per_column)
    described = []
    for index in columns[:5]:
        name = f" ({feature_names[index]!r})" if feature_names is not None else ""
        described.append(f"column {index}{name}: {int(per_column[index])}")
    more = f", and {len(columns) - 5} more columns" if len(columns) > 5 else ""
    return f"{total} non-finite value(s) (NaN or inf) in X; " + ", ".join(described) + more


class VarianceFilter(BaseEstimator, TransformerMixin):
    """Drop constant and quasi-constant columns, judged on the rows passed to ``fit`` only.

    The spread is the sample standard deviation (ddof=1), as R's ``sd`` and most statistics texts
    use; a column is constant when its sd is exactly 0 and quasi-constant when
    0 < sd <= ``quasi_constant_sd``. The threshold is absolute, so it is meant for raw feature
    values (before z-scoring, after which every sd is 1).

    Attributes after ``fit``: ``kept_mask_`` (bool per input column), ``n_constant_``,
    ``n_quasi_constant_``, ``sd_`` (per-column sd), ``n_features_in_`` and, when fitted on a
    table with column names, ``feature_names_in_``.
    """

    def __init__(self, quasi_constant_sd: float = 0.001):
        self.quasi_constant_sd = quasi_constant_sd

    def _as_matrix(self, X) -> np.ndarray:
        matrix = np.asarray(X, dtype=float)
        if matrix.ndim != 2:
            raise ValueError(f"VarianceFilter expects a 2-D matrix, got shape {matrix.shape}")
        return matrix

    def fit(self, X, y=None):
        if hasattr(X, "columns"):
            self.feature_names_in_ = np.asarray([str(c) for c in X.columns], dtype=object)
        elif hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        matrix = self._as_matrix(X)
        names = getattr(self, "feature_names_in_", None)
        message = _non_finite_message(matrix, names)
        if message is not None:
            raise ValueError(f"VarianceFilter.fit: {message}")
        if matrix.shape[0] < 2:
            raise ValueError(f"VarianceFilter needs at least 2 rows to estimate a spread, got {matrix.shape[0]}")
        if self.quasi_constant_sd < 0:
            raise ValueError(f"quasi_constant_sd must be >= 0, got {self.quasi_constant_sd}")
        self.n_features_in_ = matrix.shape[1]
        # A column of identical values can give a tiny non-zero sd by rounding; compare to the
        # range instead so "constant" means what it says.
        constant = np.ptp(matrix, axis=0) == 0
        self.sd_ = np.where(constant, 0.0, matrix.std(axis=0, ddof=1))
        quasi_constant = ~constant & (self.sd_ <= self.quasi_constant_sd)
        self.kept_mask_ = ~(constant | quasi_constant)
        self.n_constant_ = int(constant.sum())
        self.n_quasi_constant_ = int(quasi_constant.sum())
        if not self.kept_mask_.any():
            raise AllFeaturesDroppedError(
                f"VarianceFilter dropped all {matrix.shape[1]} columns "
                f"({self.n_constant_} constant, {self.n_quasi_constant_} with sd <= {self.quasi_constant_sd})"
            )
        return self

    def transform(self, X):
        if not hasattr(self, "kept_mask_"):
            raise ValueError("VarianceFilter is not fitted yet; call fit first")
        matrix = self._as_matrix(X)
        if matrix.shape[1] != self.n_features_in_:
            raise ValueError(f"VarianceFilter was fitted on {self.n_features_in_} columns, got {matrix.shape[1]}")
        message = _non_finite_message(matrix, getattr(self, "feature_names_in_", None))
        if message is not None:
            raise ValueError(f"VarianceFilter.transform: {message}")
        return matrix[:, self.kept_mask_]

    def get_feature_names_out(self, input_features=None):
        if not hasattr(self, "kept_mask_"):
            raise ValueError("VarianceFilter is not fitted yet; call fit first")
        if input_features is None:
            input_features = getattr(self, "feature_names_in_", None)
        if input_features is None:
            input_features = [f"x{i}" for i in range(self.n_features_in_)]
        names = np.asarray([str(name) for name in input_features], dtype=object)
        if len(names) != self.n_features_in_:
            raise ValueError(f"expected {self.n_features_in_} input feature names, got {len(names)}")
        return names[self.kept_mask_]


def lambda_grid(n: int = 7, low: float = 1e-3, high: float = 1e3) -> np.ndarray:
    """``n`` log-spaced penalties from ``low`` to ``high``, ascending; the study uses C = 1/lambda."""
    if n < 1 or not (0 < low <= high):
        raise ValueError(f"need n >= 1 and 0 < low <= high, got n={n}, low={low}, high={high}")
    return np.logspace(np.log10(low), np.log10(high), n)


def _l1_logistic_arguments() -> dict:
    """L1 penalty spelled the way the installed sklearn wants it.

    sklearn 1.8 deprecated ``penalty`` (FutureWarning) in favour of ``l1_ratio=1``; before 1.8,
    ``l1_ratio`` is ignored (with a warning) unless ``penalty="elasticnet"``.
    """
    major, minor = (int(part) for part in sklearn.__version__.split(".")[:2])
    if (major, minor) >= (1, 8):
        return {"l1_ratio": 1.0}
    return {"penalty": "l1"}


def make_lasso_pipeline(C: float = 1.0, seed: int = 0) -> Pipeline:
    """VarianceFilter -> StandardScaler -> L1 logistic regression (liblinear).

    liblinear is exact and fast on small matrices and converges on separable data, where saga
    does not; note that it also penalises the intercept (``intercept_scaling=1``), so under a
    very strong penalty every prediction tends to 0.5 rather than to the training prevalence.
    The step names are ``filter``, ``scale`` and ``logistic``.
    """
    return Pipeline(
        [
            ("filter", VarianceFilter()),
            ("scale", StandardScaler()),
            (
                "logistic",
                LogisticRegression(
                    C=C, solver="liblinear", random_state=seed, max_iter=LOGISTIC_MAX_ITER, **_l1_logistic_arguments()
                ),
            ),
        ]
    )
