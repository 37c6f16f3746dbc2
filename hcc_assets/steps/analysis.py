"""The study's analysis, one use case per cohort-level asset of hcc_assets.defs.analysis:

    select_explainable_features, sweep_explainability, fit_radiomic_model, fit_explainable_model,
    compute_model_metrics, refit_coefficients

Plain Python over the feature store and the lake around `hcc_assets.stats` (filtering, association,
LASSO, bootstrap, Logit refit) and `hcc_assets.featurestore.queries` (training matrices from SQL).
Everything that is fitted is fitted on training patients only; validation patients are only ever
predicted. Each use case writes its tables and returns a small result (metadata values, Markdown
tables as text, the data version); a problem the user must fix is an AnalysisError.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import polars as pl

from hcc_assets import radiomics
from hcc_assets.core.versioning import SHORT, content_version
from hcc_assets.featurestore import FeatureStore, reads, registry
from hcc_assets.featurestore.queries import (
    FeatureMatrix,
    embedding_matrix,
    excluded_patients,
    latest_feature_set_version,
    radiomics_matrix,
)
from hcc_assets.lake import DataLake
from hcc_assets.stats.report import COEFFICIENT_COLUMNS
from hcc_assets.steps.prediction import DEEP as DEEP_MODEL
from hcc_assets.steps.prediction import MODEL_NAMES, RADIOMICS_STAGE
from hcc_assets.steps.tables import markdown_table

if TYPE_CHECKING:
    from hcc_assets.stats.association import Measure

ANALYSIS_VERSION = "1"
CLASSIFIER_NAME = MODEL_NAMES[DEEP_MODEL]
RADIOMIC_MODEL, EXPLAINABLE_MODEL = "radiomic", "explainable"
REGISTRY_NAMES = {RADIOMIC_MODEL: "radiomic_model", EXPLAINABLE_MODEL: "explainable_model"}
MODELS_DIR = "models"
# The study's handcrafted set: 14 shape, 18 first-order and 40 GLCM/GLRLM features.
STUDY_PREFIXES = tuple(f"original_{name}_" for name in radiomics.STUDY_FEATURE_CLASSES)
HOLDOUT_SCHEME = "holdout_bootstrap"


class AnalysisError(Exception):
    """Something the user must fix (materialize an upstream asset, change a setting): `what: problem`."""

    def __init__(self, what: str, problem: str):
        super().__init__(f"{what}: {problem}")
        self.what, self.problem = what, problem


class Log(Protocol):
    """Where progress and warnings go (the asset's `context.log`; a logging.Logger in tests)."""

    def info(self, msg: str, /) -> object: ...

    def warning(self, msg: str, /) -> object: ...


def digest(*parts) -> str:
    return content_version(parts, length=SHORT, default=str)


def matrix_digest(matrix: FeatureMatrix) -> str:
    return digest(
        matrix.patient_ids,
        matrix.feature_names,
        matrix.hcc.tolist(),
        matrix.split.tolist(),
        content_version(np.ascontiguousarray(matrix.values).tobytes(), length=None),
    )


def classifier_version(store: FeatureStore, what: str) -> str:
    model = registry.current_model(store, CLASSIFIER_NAME)
    if model is None:
        raise AnalysisError(what, "no hcc_classifier is registered; materialize the cohort_refresh job first")
    return model["version"]


def feature_set(store: FeatureStore, what: str) -> str:
    version = latest_feature_set_version(store)
    if version is None:
        raise AnalysisError(what, "no radiomic features in the feature store; materialize radiomic_features first")
    return version


def handcrafted(store: FeatureStore, what: str, study_features_only: bool) -> FeatureMatrix:
    return radiomics_matrix(store, feature_set(store, what), STUDY_PREFIXES if study_features_only else ())


def with_both(dl: FeatureMatrix, hc: FeatureMatrix) -> tuple[FeatureMatrix, FeatureMatrix]:
    """The same patients, in the same order, in both matrices."""
    common = sorted(set(dl.patient_ids) & set(hc.patient_ids))
    return dl.subset(common), hc.subset(common)


def paired_features(store: FeatureStore, what: str, study_features_only: bool) -> tuple[FeatureMatrix, FeatureMatrix]:
    """Embeddings of the current classifier and handcrafted features of the same patients."""
    return with_both(
        embedding_matrix(store, classifier_version(store, what)), handcrafted(store, what, study_features_only)
    )


# -- explainable_features ----------------------------------------------------------------------


@dataclass(frozen=True)
class SelectionSettings:
    threshold: float = 0.5  # the study's |r| >= 0.5
    measure: Measure = "pearson"
    study_features_only: bool = True  # correlate with the study's 72 handcrafted features


@dataclass(frozen=True)
class ExplainableFeatures:
    version: str
    n_kept: int
    n_dl_features: int
    n_handcrafted_features: int
    n_training_patients: int
    embedding_version: str
    feature_set_version: str
    kept: str  # Markdown: dl_feature, n_related, strongest, value
    summary: str  # one line for the log


def kept_rows(selection, dl_names: list[str]) -> list[dict]:
    """One row per selected DL feature: how many handcrafted features it relates to, and the strongest."""
    return [
        {
            "dl_feature": dl_names[i],
            "n_related": len(selection.related[i]),
            "strongest": selection.related[i][0][0] if selection.related[i] else "",
            "value": selection.related[i][0][1] if selection.related[i] else None,
        }
        for i in selection.kept
    ]


def select_explainable_features(store: FeatureStore, settings: SelectionSettings, run_id: str) -> ExplainableFeatures:
    """The DL features associated with a handcrafted one on the training patients; replaces
    `explainable_correlations`."""
    from hcc_assets.stats.association import association_long_table, select_explainable

    what = "explainable_features"
    dl, hc = paired_features(store, what, settings.study_features_only)
    dl_train, hc_train = dl.rows("train"), hc.rows("train")
    if dl_train.n < 3:
        raise AnalysisError(
            what,
            f"{dl_train.n} training patients have both radiomic features and a deep embedding of "
            f"model {dl.version}; at least 3 are needed (materialize radiomic_features and deep_embedding)",
        )
    selection = select_explainable(
        dl_train.values, hc_train.values, hc.feature_names, threshold=settings.threshold, measure=settings.measure
    )
    version = digest(ANALYSIS_VERSION, asdict(settings), matrix_digest(dl_train), matrix_digest(hc_train))
    table = association_long_table(selection, dl.feature_names, hc.feature_names).with_columns(
        pl.lit(settings.threshold).alias("threshold"),
        pl.lit(dl.version).alias("embedding_version"),
        pl.lit(hc.version).alias("feature_set_version"),
        pl.lit(dl_train.n, dtype=pl.Int32).alias("n_patients"),
    )
    store.replace_table("explainable_correlations", FeatureStore.with_provenance(table, version=version, run_id=run_id))
    return ExplainableFeatures(
        version=version,
        n_kept=len(selection.kept),
        n_dl_features=len(dl.feature_names),
        n_handcrafted_features=len(hc.feature_names),
        n_training_patients=dl_train.n,
        embedding_version=dl.version,
        feature_set_version=hc.version,
        kept=markdown_table(kept_rows(selection, dl.feature_names), ["dl_feature", "n_related", "strongest", "value"]),
        summary=f"{what}: {len(selection.kept)} of {len(dl.feature_names)} DL features have "
        f"|{settings.measure}| >= {settings.threshold} to a handcrafted feature ({dl_train.n} training patients)",
    )


# -- explainability_sweep ----------------------------------------------------------------------


@dataclass(frozen=True)
class SweepSettings:
    thresholds: list[float]
    measures: list[Measure]
    seed: int = 0
    study_features_only: bool = True


@dataclass(frozen=True)
class Sweep:
    version: str
    n_settings: int
    seconds: float
    table: str  # Markdown, every column


def sweep_explainability(store: FeatureStore, settings: SweepSettings, run_id: str) -> Sweep:
    """The selection swept over thresholds and measures, each with the downstream LASSO's accuracy;
    replaces `explainability_sweep`."""
    from hcc_assets.stats.sweep import explainability_sweep as sweep

    what = "explainability_sweep"
    dl, hc = paired_features(store, what, settings.study_features_only)
    dl_train, hc_train, dl_val = dl.rows("train"), hc.rows("train"), dl.rows("validation")
    if dl_train.n < 6 or dl_val.n < 1:
        raise AnalysisError(what, f"{dl_train.n} training / {dl_val.n} validation patients with both feature kinds")
    started = time.perf_counter()
    table = sweep(
        dl_train.values,
        hc_train.values,
        hc.feature_names,
        dl_train.hcc,
        dl_val.values,
        dl_val.hcc,
        thresholds=tuple(settings.thresholds),
        measures=tuple(settings.measures),
        seed=settings.seed,
    )
    version = digest(ANALYSIS_VERSION, asdict(settings), matrix_digest(dl), matrix_digest(hc))
    store.replace_table("explainability_sweep", FeatureStore.with_provenance(table, version=version, run_id=run_id))
    return Sweep(
        version, table.height, round(time.perf_counter() - started, 2), markdown_table(table.to_dicts(), table.columns)
    )


# -- LASSO models --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LassoSettings:
    """The study's LASSO: C = 1/lambda, lambda 7 log-spaced values in [1e-3, 1e3], 3-fold CV on accuracy."""

    seed: int = 0
    cv_folds: int = 3
    n_lambdas: int = 7
    lambda_min: float = 1e-3
    lambda_max: float = 1e3
    study_features_only: bool = True  # radiomic model: the study's 72 features (False: every class)

    def lambdas(self) -> np.ndarray:
        from hcc_assets.stats.filtering import lambda_grid

        return lambda_grid(self.n_lambdas, self.lambda_min, self.lambda_max)


@dataclass(frozen=True)
class LassoModel:
    """A fitted, saved and registered LASSO model, and what its materialization shows."""

    version: str
    folder: str
    n_train: int
    n_validation: int
    n_input_features: int
    n_constant_dropped: int
    n_quasi_constant_dropped: int
    best_lambda: float
    n_selected: int
    train_accuracy: float
    cv_grid: str  # Markdown: lambda, C, cv_accuracy, sd
    selected: str  # Markdown: feature, beta
    fit_seconds: float  # rounded to ms
    extra_params: dict  # the model-specific params, also in `models.params`
    fit: object  # the LassoFit


def upload_folder(data_lake: DataLake, local: Path, target: str) -> None:
    for file in sorted(local.iterdir()):
        if file.is_file():
            data_lake.write_bytes(f"{target}/{file.name}", file.read_bytes())


def download_folder(data_lake: DataLake, source: str, local: Path) -> Path:
    for entry in data_lake.fs.ls(source, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("."):
            (local / name).write_bytes(data_lake.read_bytes(entry))
    return local


def load_lasso_of(data_lake: DataLake, row: dict):
    """The LassoFit saved for the registry row `row` (its folder, local or remote)."""
    from hcc_assets.stats.lasso import load_lasso

    with tempfile.TemporaryDirectory() as staging:
        return load_lasso(download_folder(data_lake, row["path"], Path(staging)))


def load_registered_lasso(data_lake: DataLake, store: FeatureStore, model: str):
    """(LassoFit, registry row) of the current LASSO model `model` ('radiomic' | 'explainable')."""
    row = registry.current_model(store, REGISTRY_NAMES[model])
    if row is None:
        raise AnalysisError(model, f"no {REGISTRY_NAMES[model]} is registered; materialize it first")
    return load_lasso_of(data_lake, row), row


def fit_register_predict(
    data_lake: DataLake,
    store: FeatureStore,
    model: str,
    matrix: FeatureMatrix,
    settings: LassoSettings,
    extra_params: dict,
    data_snapshot: int,
    run_id: str,
) -> LassoModel:
    """Fit the LASSO on the training rows of `matrix` (read at `data_snapshot`), save and register
    it with that snapshot and what it read, and store P(HCC) for every patient of `matrix` in
    `predictions` (beside earlier versions' rows)."""
    from hcc_assets.stats.lasso import fit_lasso, predict_proba, save_lasso

    train = matrix.rows("train")
    if train.n < 2 * settings.cv_folds or len(set(train.hcc.tolist())) < 2:
        raise AnalysisError(
            REGISTRY_NAMES[model],
            f"{train.n} training patients ({int(train.hcc.sum())} HCC); "
            f"{settings.cv_folds}-fold CV needs both classes with at least {settings.cv_folds} each",
        )
    started = time.perf_counter()
    try:
        fit = fit_lasso(
            train.values,
            train.hcc,
            matrix.feature_names,
            seed=settings.seed,
            cv_folds=settings.cv_folds,
            lambdas=settings.lambdas(),
        )
    except ValueError as error:
        raise AnalysisError(REGISTRY_NAMES[model], str(error)) from None
    seconds = time.perf_counter() - started
    version = digest(ANALYSIS_VERSION, model, asdict(settings), matrix_digest(train), extra_params)
    folder = data_lake.path(MODELS_DIR, REGISTRY_NAMES[model], version)
    with tempfile.TemporaryDirectory() as staging:
        save_lasso(fit, staging)
        upload_folder(data_lake, Path(staging), folder)

    probabilities = predict_proba(fit, matrix.values)
    store.replace_versions(
        "predictions",
        FeatureStore.with_provenance(
            pl.DataFrame(
                {
                    "model": [model] * matrix.n,
                    "patient_id": matrix.patient_ids,
                    "split": matrix.split.tolist(),
                    "probability": probabilities.astype(np.float64),
                    "label": matrix.hcc.astype(bool).tolist(),
                }
            ),
            version=version,
            run_id=run_id,
        ),
    )
    train_accuracy = float(np.mean((predict_proba(fit, train.values) > 0.5) == train.hcc))
    params = {
        "penalty": "l1",
        "C_grid": [float(1 / lam) for lam in fit.lambdas],
        "lambdas": [float(x) for x in fit.lambdas],
        "best_lambda": float(fit.best_lambda),
        "best_C": float(fit.best_C),
        "cv_folds": settings.cv_folds,
        "seed": settings.seed,
        "n_input_features": len(matrix.feature_names),
        "n_constant": int(fit.n_constant),
        "n_quasi_constant": int(fit.n_quasi_constant),
        "selected": fit.selected,
        "code_version": ANALYSIS_VERSION,
        **extra_params,
    }
    metrics = {
        "cv_accuracy_mean": [float(x) for x in fit.cv_accuracy_mean],
        "cv_accuracy_sd": [float(x) for x in fit.cv_accuracy_sd],
        "train_accuracy": train_accuracy,
        "fit_seconds": seconds,
    }
    kind = registry.RADIOMICS if model == RADIOMIC_MODEL else registry.EMBEDDINGS
    store.register_model(
        registry.model_row(
            REGISTRY_NAMES[model],
            "lasso_logistic",
            folder,
            init=None,
            params=params,
            metrics=metrics,
            training_patients=train.patient_ids,
            training_set=registry.matrix_spec(kind, train),
            version=version,
            run_id=run_id,
        ),
        data_snapshot=data_snapshot,
    )
    cv_rows = [
        {"lambda": float(lam), "C": float(1 / lam), "cv_accuracy": float(m), "sd": float(s)}
        for lam, m, s in zip(fit.lambdas, fit.cv_accuracy_mean, fit.cv_accuracy_sd)
    ]
    coefficient_rows = [{"feature": name, "beta": float(fit.coefficients[name])} for name in fit.selected]
    return LassoModel(
        version=version,
        folder=folder,
        n_train=train.n,
        n_validation=matrix.rows("validation").n,
        n_input_features=len(matrix.feature_names),
        n_constant_dropped=int(fit.n_constant),
        n_quasi_constant_dropped=int(fit.n_quasi_constant),
        best_lambda=float(fit.best_lambda),
        n_selected=len(fit.selected),
        train_accuracy=train_accuracy,
        cv_grid=markdown_table(cv_rows, ["lambda", "C", "cv_accuracy", "sd"]),
        selected=markdown_table(coefficient_rows, ["feature", "beta"]),
        fit_seconds=round(seconds, 3),
        extra_params=extra_params,
        fit=fit,
    )


def exclusion_reasons(excluded_reasons: list[str], n_missing: int) -> dict[str, int]:
    """How many patients each reason excluded; `n_missing` more have no features of the current set."""
    reasons: dict[str, int] = {}
    for reason in excluded_reasons:
        reasons[reason] = reasons.get(reason, 0) + 1
    if n_missing:
        reasons["no radiomic features of the current feature set"] = n_missing
    return reasons


def fit_radiomic_model(data_lake: DataLake, store: FeatureStore, settings: LassoSettings, run_id: str, log: Log):
    """The baseline LASSO on the handcrafted features; patients whose radiomics failed or are
    missing are excluded, with the count and reasons in the model's params."""
    snapshot = store.current_snapshot()
    at = store.at(snapshot=snapshot)  # every read from one snapshot, recorded with the model
    matrix = handcrafted(at, "radiomic_model", settings.study_features_only)
    cohort_rows = reads.cohort_split(at)
    excluded = excluded_patients(at, RADIOMICS_STAGE)
    missing = sorted(set(cohort_rows["patient_id"]) - set(matrix.patient_ids) - set(excluded["patient_id"]))
    reasons = exclusion_reasons(excluded["reason"].to_list(), len(missing))
    n_excluded = excluded.height + len(missing)
    if n_excluded:
        log.warning(
            f"radiomic_model: {n_excluded} patient(s) excluded (radiomics failed or missing): "
            + "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items()))
        )
    extra = {
        "feature_set_version": matrix.version,
        "n_excluded": n_excluded,
        "excluded_hcc": int(excluded["hcc"].sum()) if excluded.height else 0,
        "exclusion_reasons": reasons,
    }
    return fit_register_predict(data_lake, store, RADIOMIC_MODEL, matrix, settings, extra, snapshot, run_id)


def fit_explainable_model(data_lake: DataLake, store: FeatureStore, settings: LassoSettings, run_id: str):
    """The LASSO on the explainable DL features (explainable_features' selection)."""
    snapshot = store.current_snapshot()
    at = store.at(snapshot=snapshot)  # every read from one snapshot, recorded with the model
    kept, selection_version, embedding_version = reads.explainable_selection(at)
    if not selection_version:
        raise AnalysisError("explainable_model", "explainable_features has not been materialized")
    if not kept:
        raise AnalysisError(
            "explainable_model",
            "no DL feature reached the association threshold to any handcrafted "
            "feature; lower explainable_features.threshold or see explainability_sweep",
        )
    matrix = embedding_matrix(at, embedding_version).columns(kept)
    extra = {
        "selection_version": selection_version,
        "embedding_version": embedding_version,
        "n_explainable": len(kept),
    }
    return fit_register_predict(data_lake, store, EXPLAINABLE_MODEL, matrix, settings, extra, snapshot, run_id)


# -- model_metrics -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricsSettings:
    """Held-out bootstrap and repeated stratified cross-validation of every model's metrics."""

    n_bootstrap: int = 1000
    bootstrap_seed: int = 0
    cv_splits: int = 5
    cv_repeats: int = 5
    cv_seed: int = 0
    threshold: float = 0.5  # P(HCC) above which a patient is called HCC
    calibration_bins: int = 10  # equal-width bins of P(HCC) for the calibration table and plot


METRICS_SCHEMA = {
    "model": pl.String,
    "scheme": pl.String,
    "metric": pl.String,
    "estimate": pl.Float64,
    "mean": pl.Float64,
    "ci_low": pl.Float64,
    "ci_high": pl.Float64,
    "n": pl.Int32,
    "n_resamples": pl.Int32,
    "n_degenerate": pl.Int32,
    "version": pl.String,
}
COMPARISON_SCHEMA = {
    "model_a": pl.String,
    "model_b": pl.String,
    "version_a": pl.String,
    "version_b": pl.String,
    "n": pl.Int32,
    "n_positive": pl.Int32,
    "auc_a": pl.Float64,
    "auc_b": pl.Float64,
    "auc_difference": pl.Float64,
    "bootstrap_mean": pl.Float64,
    "ci_low": pl.Float64,
    "ci_high": pl.Float64,
    "n_resamples": pl.Int32,
    "n_degenerate": pl.Int32,
    "seed": pl.Int32,
    "delong_se": pl.Float64,
    "delong_z": pl.Float64,
    "delong_p": pl.Float64,
    "delong_ci_low": pl.Float64,
    "delong_ci_high": pl.Float64,
    "version": pl.String,
}
CONFUSION_SCHEMA = {
    "model": pl.String,
    "threshold": pl.Float64,
    "n": pl.Int32,
    "tp": pl.Int32,
    "fp": pl.Int32,
    "tn": pl.Int32,
    "fn": pl.Int32,
    "version": pl.String,
}
CALIBRATION_SCHEMA = {
    "model": pl.String,
    "n_bins": pl.Int32,
    "bin": pl.Int32,
    "bin_low": pl.Float64,
    "bin_high": pl.Float64,
    "n": pl.Int32,
    "mean_predicted": pl.Float64,
    "observed_rate": pl.Float64,
    "brier_score": pl.Float64,
    "version": pl.String,
}
COMPARISON_COLUMNS = [
    "model_a",
    "model_b",
    "n",
    "auc_a",
    "auc_b",
    "auc_difference",
    "ci_low",
    "ci_high",
    "delong_z",
    "delong_p",
    "n_degenerate",
]
CONFUSION_COLUMNS = ["model", "threshold", "n", "tp", "fp", "tn", "fn"]


@dataclass(frozen=True)
class ModelMetrics:
    data_version: str
    table_1: str  # Markdown of the view table_1
    paired_comparisons: str  # Markdown, COMPARISON_COLUMNS
    confusion_matrices: str  # Markdown, CONFUSION_COLUMNS
    brier_scores: dict[str, float]  # model -> Brier score
    model_versions: dict[str, str]  # model -> version of its validation predictions
    cv_scheme: str
    seconds: float


def threshold_rows(
    model: str, version: str, y: np.ndarray, p: np.ndarray, settings: MetricsSettings
) -> tuple[dict, list[dict]]:
    """(confusion-matrix row, calibration rows) of one model's validation predictions."""
    from hcc_assets.stats.calibration import brier_score, calibration_bins
    from hcc_assets.stats.metrics import confusion_matrix

    counts = confusion_matrix(y, p, settings.threshold)
    confusion = {
        "model": model,
        "threshold": counts.threshold,
        "n": counts.n,
        "tp": counts.tp,
        "fp": counts.fp,
        "tn": counts.tn,
        "fn": counts.fn,
        "version": version,
    }
    brier = brier_score(y, p)
    calibration = [
        {
            "model": model,
            "n_bins": settings.calibration_bins,
            "bin": b.bin,
            "bin_low": b.low,
            "bin_high": b.high,
            "n": b.n,
            "mean_predicted": b.mean_predicted,
            "observed_rate": b.observed_rate,
            "brier_score": brier,
            "version": version,
        }
        for b in calibration_bins(y, p, settings.calibration_bins)
    ]
    return confusion, calibration


def paired_comparisons(validation: dict[str, pl.DataFrame], settings: MetricsSettings) -> tuple[list[dict], list[str]]:
    """DeLong's test and the paired bootstrap of the AUC difference for each pair of models, on
    the validation patients both models scored (sorted by patient id, so the bootstrap draws are
    reproducible). Returns (rows, why pairs were skipped)."""
    from itertools import combinations

    from hcc_assets.stats.comparison import delong_test, paired_bootstrap_auc_difference

    rows, skipped = [], []
    for model_a, model_b in combinations(list(validation), 2):
        both = (
            validation[model_a]
            .select(
                "patient_id",
                pl.col("label").alias("label_a"),
                pl.col("probability").alias("p_a"),
            )
            .join(
                validation[model_b].select(
                    "patient_id", pl.col("label").alias("label_b"), pl.col("probability").alias("p_b")
                ),
                on="patient_id",
            )
            .sort("patient_id")
        )
        if (both["label_a"] != both["label_b"]).any():
            raise AnalysisError(
                "model_metrics",
                f"{model_a} and {model_b} predictions disagree on the label of "
                f"{int((both['label_a'] != both['label_b']).sum())} validation patient(s)",
            )
        y = both["label_a"].cast(pl.Int8).to_numpy()
        n_positive = int(y.sum())
        if n_positive < 2 or both.height - n_positive < 2:
            skipped.append(
                f"{model_a} vs {model_b}: {both.height} common validation patients, {n_positive} HCC "
                "(a paired AUC comparison needs at least 2 of each class)"
            )
            continue
        p_a, p_b = both["p_a"].to_numpy(), both["p_b"].to_numpy()
        delong = delong_test(y, p_a, p_b)
        boot = paired_bootstrap_auc_difference(
            y, p_a, p_b, n_resamples=settings.n_bootstrap, seed=settings.bootstrap_seed
        )
        version_a, version_b = validation[model_a]["version"][0], validation[model_b]["version"][0]
        rows.append(
            {
                "model_a": model_a,
                "model_b": model_b,
                "version_a": version_a,
                "version_b": version_b,
                "n": both.height,
                "n_positive": n_positive,
                "auc_a": delong.auc_a,
                "auc_b": delong.auc_b,
                "auc_difference": delong.difference,
                "bootstrap_mean": boot.mean,
                "ci_low": boot.ci_low,
                "ci_high": boot.ci_high,
                "n_resamples": boot.n_resamples_used,
                "n_degenerate": boot.n_degenerate,
                "seed": settings.bootstrap_seed,
                "delong_se": delong.se,
                "delong_z": delong.z,
                "delong_p": delong.p_value,
                "delong_ci_low": delong.ci_low,
                "delong_ci_high": delong.ci_high,
                "version": f"{version_a}|{version_b}",
            }
        )
    return rows, skipped


def estimate_rows(model: str, scheme: str, estimates) -> list[dict]:
    return [
        {
            "model": model,
            "scheme": scheme,
            "metric": e.metric,
            "estimate": e.estimate,
            "mean": e.mean,
            "ci_low": e.ci_low,
            "ci_high": e.ci_high,
            "n": e.n,
            "n_resamples": e.n_resamples_used,
            "n_degenerate": e.n_degenerate,
        }
        for e in estimates
    ]


FitPredict = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def lasso_fit_predict(settings: LassoSettings) -> FitPredict:
    """The LASSO fit on (x_train, y_train), predicting x_test: one CV fold of the whole fit."""
    from hcc_assets.stats.lasso import fit_lasso, predict_proba

    def fit_predict(x_train, y_train, x_test):
        fit = fit_lasso(
            x_train,
            y_train,
            [f"f{i}" for i in range(x_train.shape[1])],
            seed=settings.seed,
            cv_folds=settings.cv_folds,
            lambdas=settings.lambdas(),
        )
        return predict_proba(fit, x_test)

    return fit_predict


def explainable_fit_predict(lasso: LassoSettings, selection: dict, n_dl: int, hc_names: list[str]) -> FitPredict:
    """The whole explainable fit inside each fold: association selection, then filter + LASSO.
    The columns are the `n_dl` DL features, then the handcrafted ones."""
    from hcc_assets.stats.association import select_explainable
    from hcc_assets.stats.filtering import AllFeaturesDroppedError

    fit_predict_lasso = lasso_fit_predict(lasso)

    def fit_predict(x_train, y_train, x_test):
        chosen = select_explainable(
            x_train[:, :n_dl],
            x_train[:, n_dl:],
            hc_names,
            threshold=selection["threshold"],
            measure=selection["measure"],
        ).kept
        prior = np.full(len(x_test), float(np.mean(y_train)))
        if not chosen:  # nothing explainable in this fold: the model can only predict the prior
            return prior
        try:
            return fit_predict_lasso(x_train[:, chosen], y_train, x_test[:, chosen])
        except AllFeaturesDroppedError:  # every chosen feature constant in this fold: same as none
            return prior

    return fit_predict


def lasso_settings_from_params(params: dict) -> LassoSettings:
    """The settings a registered model was fitted with, from its `models.params`."""
    lambdas = params.get("lambdas") or []
    return LassoSettings(
        seed=params.get("seed", 0),
        cv_folds=params.get("cv_folds", 3),
        n_lambdas=len(lambdas) or 7,
        lambda_min=min(lambdas or [1e-3]),
        lambda_max=max(lambdas or [1e3]),
    )


def lasso_settings_of(store: FeatureStore, model: str) -> LassoSettings:
    """The configuration the registered model was fitted with, so CV refits the same thing."""
    row = registry.current_model(store, REGISTRY_NAMES[model])
    if row is None:
        return LassoSettings()
    return lasso_settings_from_params(json.loads(row["params"]))


def study_names(store: FeatureStore) -> list[str]:
    version = latest_feature_set_version(store)
    if version is None:
        return []
    return [n for n in reads.radiomic_feature_names(store, version) if n.startswith(STUDY_PREFIXES)]


def selection_config(store: FeatureStore) -> dict:
    measure, threshold, n_handcrafted = reads.selection_settings(store)
    n_study = len(study_names(store))
    return {
        "measure": measure or "pearson",
        "threshold": float(threshold if threshold is not None else 0.5),
        "study_features_only": n_handcrafted <= n_study,
    }


def compute_model_metrics(store: FeatureStore, settings: MetricsSettings, run_id: str, log: Log) -> ModelMetrics:
    """Holdout bootstrap metrics, confusion matrices and calibration of every model with validation
    predictions, paired comparisons, and repeated CV of the whole LASSO fits; adds versions to
    `model_metrics`, `model_comparisons`, `confusion_matrices` and `calibration`."""
    from hcc_assets.stats.metrics import bootstrap_metrics, repeated_cv_metrics

    rows: list[dict] = []
    versions: dict[str, str] = {}
    validations: dict[str, pl.DataFrame] = {}
    confusion_rows: list[dict] = []
    calibration_rows: list[dict] = []
    started = time.perf_counter()
    for model in (RADIOMIC_MODEL, DEEP_MODEL, EXPLAINABLE_MODEL):
        predictions = reads.current_predictions(store, model)
        validation = predictions.filter(pl.col("split") == "validation")
        if validation.height == 0:
            log.warning(f"model_metrics: no validation predictions of model {model}; skipped")
            continue
        versions[model] = validation["version"][0]
        validations[model] = validation
        y, p = validation["label"].cast(pl.Int8).to_numpy(), validation["probability"].to_numpy()
        estimates = bootstrap_metrics(
            y, p, n_resamples=settings.n_bootstrap, seed=settings.bootstrap_seed, threshold=settings.threshold
        )
        rows += [r | {"version": versions[model]} for r in estimate_rows(model, HOLDOUT_SCHEME, estimates)]
        confusion, calibration = threshold_rows(model, versions[model], y, p, settings)
        confusion_rows.append(confusion)
        calibration_rows += calibration
    comparison_rows, skipped = paired_comparisons(validations, settings)
    for reason in skipped:
        log.warning(f"model_metrics: paired comparison skipped, {reason}")
    log.info(
        f"model_metrics: {settings.n_bootstrap} bootstrap resamples of {len(versions)} models and "
        f"{len(comparison_rows)} paired comparisons in {time.perf_counter() - started:.1f}s"
    )

    # Repeated CV of the whole LASSO fit over every patient with features (the deep model would need
    # k x r CNN trainings: not run on CPU by default).
    scheme = f"repeated_cv_{settings.cv_splits}x{settings.cv_repeats}"

    def progress(model: str) -> Callable[[str], None]:
        def line(text: str) -> None:
            log.info(f"model_metrics {model} {scheme}: {text}")

        return line

    lasso_settings = lasso_settings_of(store, RADIOMIC_MODEL)
    if settings.cv_repeats > 0 and RADIOMIC_MODEL in versions:
        hc = handcrafted(store, "model_metrics", lasso_settings.study_features_only)
        estimates = repeated_cv_metrics(
            lasso_fit_predict(lasso_settings),
            hc.values,
            hc.hcc,
            n_splits=settings.cv_splits,
            n_repeats=settings.cv_repeats,
            seed=settings.cv_seed,
            progress=progress(RADIOMIC_MODEL),
        )
        rows += [r | {"version": versions[RADIOMIC_MODEL]} for r in estimate_rows(RADIOMIC_MODEL, scheme, estimates)]
    if settings.cv_repeats > 0 and EXPLAINABLE_MODEL in versions:
        selection = selection_config(store)
        dl, hc = paired_features(store, "model_metrics", selection["study_features_only"])
        estimates = repeated_cv_metrics(
            explainable_fit_predict(
                lasso_settings_of(store, EXPLAINABLE_MODEL), selection, len(dl.feature_names), hc.feature_names
            ),
            np.hstack([dl.values, hc.values]),
            dl.hcc,
            n_splits=settings.cv_splits,
            n_repeats=settings.cv_repeats,
            seed=settings.cv_seed,
            progress=progress(EXPLAINABLE_MODEL),
        )
        rows += [
            r | {"version": versions[EXPLAINABLE_MODEL]} for r in estimate_rows(EXPLAINABLE_MODEL, scheme, estimates)
        ]
    if not rows:
        raise AnalysisError("model_metrics", "no model has validation predictions; materialize the models first")

    table = pl.DataFrame(rows, schema=METRICS_SCHEMA)
    for name, frame in (
        ("model_comparisons", pl.DataFrame(comparison_rows, schema=COMPARISON_SCHEMA)),
        ("confusion_matrices", pl.DataFrame(confusion_rows, schema=CONFUSION_SCHEMA)),
        ("calibration", pl.DataFrame(calibration_rows, schema=CALIBRATION_SCHEMA)),
        ("model_metrics", table),
    ):
        if frame.height:
            store.replace_versions(name, FeatureStore.with_provenance(frame, version=None, run_id=run_id))
    table_1 = reads.table_1(store)
    return ModelMetrics(
        data_version=digest(
            table.drop("version").to_dicts(), versions, comparison_rows, confusion_rows, calibration_rows
        ),
        table_1=markdown_table(table_1.to_dicts(), table_1.columns),
        paired_comparisons=markdown_table(comparison_rows, COMPARISON_COLUMNS),
        confusion_matrices=markdown_table(confusion_rows, CONFUSION_COLUMNS),
        brier_scores={r["model"]: r["brier_score"] for r in calibration_rows},
        model_versions=versions,
        cv_scheme=scheme,
        seconds=round(time.perf_counter() - started, 2),
    )


# -- coefficients --------------------------------------------------------------------------------

COEFFICIENT_SCHEMA = {
    "model": pl.String,
    "feature": pl.String,
    "beta": pl.Float64,
    "std_error": pl.Float64,
    "z": pl.Float64,
    "p_value": pl.Float64,
    "odds_change_pct": pl.Float64,
    "lasso_beta": pl.Float64,
    "related_handcrafted": pl.String,
    "status": pl.String,
    "version": pl.String,
}


@dataclass(frozen=True)
class Coefficients:
    n_rows: int
    refit: dict[str, str]  # model -> the Logit refit's message
    table: str  # Markdown, COEFFICIENT_COLUMNS


def standardized_selected(fit, values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The training features as the LASSO saw them (filtered, z-scored), restricted to its selection."""
    pipeline = fit.pipeline
    transformed = pipeline[:-1].transform(values)
    kept_names = list(np.asarray(fit.feature_names)[pipeline[0].kept_mask_])
    index = [kept_names.index(name) for name in fit.selected]
    return transformed[:, index], list(fit.selected)


def related_summary(rows: pl.DataFrame, limit: int = 5) -> dict[str, str]:
    """DL feature -> 'handcrafted (+r); ...' of its first `limit` related handcrafted features."""
    out: dict[str, list[str]] = {}
    for row in rows.iter_rows(named=True):
        out.setdefault(row["dl_feature"], []).append(f"{row['handcrafted_feature']} ({row['value']:+.2f})")
    return {k: "; ".join(v[:limit]) + (f"; +{len(v) - limit} more" if len(v) > limit else "") for k, v in out.items()}


def related_handcrafted(store: FeatureStore, limit: int = 5) -> dict[str, str]:
    return related_summary(reads.related_handcrafted(store), limit)


def refit_coefficients(data_lake: DataLake, store: FeatureStore, run_id: str, log: Log) -> Coefficients:
    """An unpenalized Logit refit of each registered LASSO's selected standardized training
    features; adds a version of `coefficients`. A model not registered is skipped with a warning."""
    from hcc_assets.stats.coefficients import logit_refit

    rows: list[dict] = []
    messages: dict[str, str] = {}
    related = related_handcrafted(store)
    for model in (RADIOMIC_MODEL, EXPLAINABLE_MODEL):
        try:
            fit, row = load_registered_lasso(data_lake, store, model)
        except AnalysisError as error:
            log.warning(f"coefficients: {error}")
            continue
        training = set(row["training_patients"])
        params = json.loads(row["params"])
        if model == RADIOMIC_MODEL:
            matrix = radiomics_matrix(store, params["feature_set_version"], ())
        else:
            matrix = embedding_matrix(store, params["embedding_version"])
        matrix = matrix.columns(fit.feature_names).subset(sorted(training))
        standardized, names = standardized_selected(fit, matrix.values)
        refit, message = logit_refit(standardized, matrix.hcc, names)
        messages[model] = message
        for r in refit:
            rows.append(
                {
                    "model": model,
                    "feature": r.feature,
                    "beta": r.beta,
                    "std_error": r.std_error,
                    "z": r.z,
                    "p_value": r.p_value,
                    "odds_change_pct": r.odds_change_pct,
                    "lasso_beta": float(fit.coefficients.get(r.feature, np.nan)),
                    "related_handcrafted": related.get(r.feature) if model == EXPLAINABLE_MODEL else None,
                    "status": r.status,
                    "version": row["version"],
                }
            )
    table = pl.DataFrame(rows, schema=COEFFICIENT_SCHEMA)
    store.replace_versions("coefficients", FeatureStore.with_provenance(table, version=None, run_id=run_id))
    return Coefficients(table.height, messages, markdown_table(table.to_dicts(), COEFFICIENT_COLUMNS))
