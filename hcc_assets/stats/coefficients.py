"""Unpenalised logistic refit of the LASSO-selected features, for beta, z, p and change in odds.

The study reports beta, z, p and the change in odds of the selected explainable features. On
~32 patients such a refit is often ill-posed: the classes can be (quasi-)separated, which sends
the maximum-likelihood betas to infinity, or columns can be collinear. statsmodels then returns
finite-looking but meaningless numbers, often without a warning, so this module checks first and
reports a status with NaN numbers instead.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import statsmodels.api as sm
from scipy.optimize import linprog
from statsmodels.tools.sm_exceptions import (
    ConvergenceWarning,
    HessianInversionWarning,
    PerfectSeparationError,
    PerfectSeparationWarning,
)

STATUSES = ("ok", "separation", "singular", "not_converged")
# Backstops after the exact checks: on z-scored features a |beta| this large (odds x e^15 per SD)
# or a standard error this large only arises from separation or near-collinearity.
MAX_PLAUSIBLE_ABS_BETA = 15.0
MAX_PLAUSIBLE_STD_ERROR = 1e3
MAX_ITERATIONS = 200
# A design whose condition number exceeds this is treated as rank-deficient: the betas of
# nearly collinear columns are not identifiable in any useful sense.
MAX_CONDITION_NUMBER = 1e8


@dataclass
class CoefficientRow:
    """One feature of the refit; numbers are NaN unless ``status == "ok"``."""

    feature: str
    beta: float
    std_error: float
    z: float
    p_value: float
    odds_change_pct: float
    status: str


def odds_change_pct(beta: float) -> float:
    """Percent change in the odds of HCC per unit (one SD on the z-scored scale): (e^beta - 1) * 100."""
    return (math.exp(beta) - 1.0) * 100.0


def _empty_rows(names: Sequence[str], status: str) -> list[CoefficientRow]:
    nan = float("nan")
    return [CoefficientRow(str(name), nan, nan, nan, nan, nan, status) for name in names]


def is_separated(design: np.ndarray, y: np.ndarray) -> bool:
    """Whether some non-zero direction separates the classes completely or quasi-completely.

    Linear programme (after Konis, 2007): with s_i = +1 for HCC and -1 for healthy, maximise
    sum_i s_i x_i.b subject to s_i x_i.b >= 0 for every patient and -1 <= b <= 1. The optimum
    is positive exactly when a hyperplane puts every patient on its own side or on the plane,
    with at least one strictly on its side: the case where the MLE does not exist.
    ``design`` includes the intercept column.
    """
    signs = np.where(y == 1, 1.0, -1.0)
    signed = design * signs[:, None]
    result = linprog(
        c=-signed.sum(axis=0),
        A_ub=-signed,
        b_ub=np.zeros(len(y)),
        bounds=[(-1.0, 1.0)] * design.shape[1],
        method="highs",
    )
    if result.status != 0:
        return False
    scale = max(1.0, float(np.abs(signed).sum()))
    return -result.fun > 1e-7 * scale


def logit_refit(
    X_selected_standardized: np.ndarray, y: np.ndarray, names: Sequence[str]
) -> tuple[list[CoefficientRow], str]:
    """Unpenalised logistic regression with an intercept (statsmodels Logit, Newton) on the
    selected, z-scored features. Returns one row per feature (intercept excluded) and a message.

    Status, checked in this order; every status except "ok" gives NaN numbers for all rows:

    - "singular": the design (with intercept) is rank-deficient or nearly so (condition number
      above ``MAX_CONDITION_NUMBER``), e.g. a duplicated or constant column; or the Hessian
      cannot be inverted (LinAlgError, NaN or huge standard errors without separation).
    - "separation": the linear programme in ``is_separated`` finds complete or quasi-complete
      separation, or statsmodels reports perfect separation, or |beta| is implausibly large.
    - "not_converged": Newton did not converge in ``MAX_ITERATIONS`` steps.
    """
    matrix = np.asarray(X_selected_standardized, dtype=float)
    labels = np.asarray(y)
    names = [str(name) for name in names]
    if matrix.ndim == 1:
        matrix = matrix[:, None]
    if matrix.shape[1] == 0 or not names:
        return [], "no features selected: nothing to refit"
    if matrix.shape != (labels.shape[0], len(names)):
        raise ValueError(f"X is {matrix.shape}, expected ({labels.shape[0]}, {len(names)}) for y and names")
    if not np.isfinite(matrix).all():
        raise ValueError(f"X holds {int((~np.isfinite(matrix)).sum())} non-finite value(s)")
    if not set(np.unique(labels).tolist()) <= {0, 1} or np.unique(labels).size < 2:
        raise ValueError("y must hold both classes, coded 0/1 or as booleans")
    labels = labels.astype(float)
    design = sm.add_constant(matrix, has_constant="add")

    singular_values = np.linalg.svd(design, compute_uv=False)
    rank = int((singular_values > singular_values[0] / MAX_CONDITION_NUMBER).sum())
    if rank < design.shape[1]:
        return _empty_rows(names, "singular"), (
            f"singular design: numerical rank {rank} < {design.shape[1]} columns (intercept + {len(names)} "
            f"features, condition number limit {MAX_CONDITION_NUMBER:g}); a feature is constant or "
            "(nearly) a linear combination of others"
        )
    if is_separated(design, labels):
        return _empty_rows(names, "separation"), (
            "complete or quasi-complete separation: a combination of the features splits HCC from healthy "
            "patients, so the unpenalised maximum-likelihood betas are infinite and z/p are meaningless"
        )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = sm.Logit(labels, design).fit(method="newton", maxiter=MAX_ITERATIONS, disp=0)
        except PerfectSeparationError as error:
            return _empty_rows(names, "separation"), f"statsmodels reports perfect separation: {error}"
        except np.linalg.LinAlgError as error:
            return _empty_rows(names, "singular"), f"singular Hessian: {error}"
    categories = {type(record.message) for record in caught}
    if PerfectSeparationWarning in categories:
        return _empty_rows(names, "separation"), "statsmodels reports perfect separation"

    betas = np.asarray(result.params, dtype=float)[1:]
    std_errors = np.asarray(result.bse, dtype=float)[1:]
    if not result.mle_retvals.get("converged", False) or ConvergenceWarning in categories:
        return _empty_rows(names, "not_converged"), (
            f"Newton did not converge in {MAX_ITERATIONS} iterations; the estimates are not maximum-likelihood"
        )
    if HessianInversionWarning in categories or not np.isfinite(std_errors).all():
        return _empty_rows(names, "singular"), "the Hessian could not be inverted: standard errors are undefined"
    if (np.abs(betas) > MAX_PLAUSIBLE_ABS_BETA).any():
        return _empty_rows(names, "separation"), (
            f"|beta| > {MAX_PLAUSIBLE_ABS_BETA} on the z-scored scale: near-separation, estimates unreliable"
        )
    if (std_errors > MAX_PLAUSIBLE_STD_ERROR).any():
        return _empty_rows(names, "singular"), (
            f"standard error > {MAX_PLAUSIBLE_STD_ERROR:g}: features nearly collinear, estimates unreliable"
        )

    z_values = np.asarray(result.tvalues, dtype=float)[1:]
    p_values = np.asarray(result.pvalues, dtype=float)[1:]
    rows = [
        CoefficientRow(
            feature=name,
            beta=float(beta),
            std_error=float(std_error),
            z=float(z),
            p_value=float(p),
            odds_change_pct=odds_change_pct(float(beta)),
            status="ok",
        )
        for name, beta, std_error, z, p in zip(names, betas, std_errors, z_values, p_values)
    ]
    iterations = result.mle_retvals.get("iterations")
    return rows, (
        f"ok: unpenalised logistic refit of {len(names)} feature(s) on {len(labels)} patients, "
        f"converged in {iterations} iterations"
    )
