"""The study's analysis as cohort-level assets (group `analysis`):

    radiomic_features + deep_embedding + cohort -> explainable_features -> explainability_sweep
    radiomic_features -> radiomic_model ; explainable_features -> explainable_model
    radiomic_model + explainable_model + hcc_classifier -> model_metrics, coefficients -> report

Thin wiring around `hcc_assets.stats` (filtering, association, LASSO, bootstrap, Logit refit) and
`hcc_assets.featurestore.queries` (training matrices from SQL). Everything that is fitted is fitted
on training patients only; validation patients are only ever predicted.

Feature-store tables: `explainable_correlations`, `explainability_sweep`, `models` (rows
'radiomic_model', 'explainable_model'), `predictions` (models 'radiomic', 'explainable'),
`model_metrics` (view `table_1`), `model_comparisons`, `confusion_matrices`, `calibration`,
`coefficients`. Each model's `version` is a content hash of its training data, configuration and
code version.
"""

import json
import tempfile
import time
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

from hcc_assets import radiomics
from hcc_assets.core.versioning import SHORT, content_version
from hcc_assets.defs.automation import analyse_when_settled, follow_analysis
from hcc_assets.defs.cohort import cohort
from hcc_assets.defs.deep import MODEL_NAME as CLASSIFIER_NAME
from hcc_assets.defs.deep import PREDICTION_MODEL as DEEP_MODEL
from hcc_assets.defs.deep import deep_embedding, hcc_classifier
from hcc_assets.defs.deployment import deployed
from hcc_assets.defs.metadata import figure_metadata, markdown_table
from hcc_assets.defs.resources import LakeResource
from hcc_assets.defs.segmentation import (
    RADIOMICS_STAGE,
    liver_mask,
    liver_segmentation_model,
    radiomic_features,
)
from hcc_assets.featurestore import FeatureStore, reads, registry
from hcc_assets.featurestore.queries import (
    FeatureMatrix,
    embedding_matrix,
    excluded_patients,
    latest_feature_set_version,
    radiomics_matrix,
)
from hcc_assets.lake import LIVER_MASK_FILE, NIFTI_FILE, DataLake

ANALYSIS_VERSION = "1"
GROUP = "analysis"
RADIOMIC_MODEL, EXPLAINABLE_MODEL = "radiomic", "explainable"
REGISTRY_NAMES = {RADIOMIC_MODEL: "radiomic_model", EXPLAINABLE_MODEL: "explainable_model"}
MODELS_DIR = "models"
# The study's handcrafted set: 14 shape, 18 first-order and 40 GLCM/GLRLM features.
STUDY_PREFIXES = tuple(f"original_{name}_" for name in radiomics.STUDY_FEATURE_CLASSES)
HOLDOUT_SCHEME = "holdout_bootstrap"


def _digest(*parts) -> str:
    return content_version(parts, length=SHORT, default=str)


def _matrix_digest(matrix: FeatureMatrix) -> str:
    return _digest(
        matrix.patient_ids,
        matrix.feature_names,
        matrix.hcc.tolist(),
        matrix.split.tolist(),
        content_version(np.ascontiguousarray(matrix.values).tobytes(), length=None),
    )


def _fail(what: str, problem: str) -> dg.Failure:
    return dg.Failure(description=f"{what}: {problem}", allow_retries=False)


def _classifier_version(store: FeatureStore, what: str) -> str:
    model = registry.current_model(store, CLASSIFIER_NAME)
    if model is None:
        raise _fail(what, "no hcc_classifier is registered; materialize the cohort_refresh job first")
    return model["version"]


def _feature_set(store: FeatureStore, what: str) -> str:
    version = latest_feature_set_version(store)
    if version is None:
        raise _fail(what, "no radiomic features in the feature store; materialize radiomic_features first")
    return version


def _handcrafted(store: FeatureStore, what: str, study_features_only: bool) -> FeatureMatrix:
    return radiomics_matrix(store, _feature_set(store, what), STUDY_PREFIXES if study_features_only else ())


def _with_both(dl: FeatureMatrix, hc: FeatureMatrix) -> tuple[FeatureMatrix, FeatureMatrix]:
    """The same patients, in the same order, in both matrices."""
    common = sorted(set(dl.patient_ids) & set(hc.patient_ids))
    return dl.subset(common), hc.subset(common)


def _paired_features(store: FeatureStore, what: str, study_features_only: bool) -> tuple[FeatureMatrix, FeatureMatrix]:
    """Embeddings of the current classifier and handcrafted features of the same patients."""
    return _with_both(
        embedding_matrix(store, _classifier_version(store, what)), _handcrafted(store, what, study_features_only)
    )


# -- explainable_features ----------------------------------------------------------------------


class ExplainableFeaturesConfig(dg.Config):
    threshold: float = 0.5  # the study's |r| >= 0.5
    measure: str = "pearson"  # pearson | spearman | distance
    study_features_only: bool = True  # correlate with the study's 72 handcrafted features


@dg.asset(
    deps=[radiomic_features, deep_embedding, cohort, hcc_classifier, liver_segmentation_model],
    code_version=ANALYSIS_VERSION,
    group_name=GROUP,
    automation_condition=analyse_when_settled(),
    kinds={"scikitlearn", "duckdb"},
    description="Explainable DL features: the deep-embedding dimensions with |association| >= threshold "
    "(default Pearson |r| >= 0.5) to at least one handcrafted radiomic feature, computed on training "
    "patients only. The full correlation map is `explainable_correlations` (related = which handcrafted "
    "features each DL feature relates to; kept = the selected DL features).",
)
def explainable_features(
    context: dg.AssetExecutionContext,
    config: deployed(ExplainableFeaturesConfig, "explainable_features"),
    lake: LakeResource,
) -> dg.MaterializeResult:
    from hcc_assets.stats.association import association_long_table, select_explainable

    what = "explainable_features"
    store = lake.store
    dl, hc = _paired_features(store, what, config.study_features_only)
    dl_train, hc_train = dl.rows("train"), hc.rows("train")
    if dl_train.n < 3:
        raise _fail(
            what,
            f"{dl_train.n} training patients have both radiomic features and a deep embedding of "
            f"model {dl.version}; at least 3 are needed (materialize radiomic_features and deep_embedding)",
        )
    selection = select_explainable(
        dl_train.values, hc_train.values, hc.feature_names, threshold=config.threshold, measure=config.measure
    )
    version = _digest(ANALYSIS_VERSION, config.model_dump(), _matrix_digest(dl_train), _matrix_digest(hc_train))
    table = association_long_table(selection, dl.feature_names, hc.feature_names).with_columns(
        pl.lit(config.threshold).alias("threshold"),
        pl.lit(dl.version).alias("embedding_version"),
        pl.lit(hc.version).alias("feature_set_version"),
        pl.lit(dl_train.n, dtype=pl.Int32).alias("n_patients"),
    )
    store.replace_table(
        "explainable_correlations", FeatureStore.with_provenance(table, version=version, run_id=context.run.run_id)
    )
    kept_rows = [
        {
            "dl_feature": dl.feature_names[i],
            "n_related": len(selection.related[i]),
            "strongest": selection.related[i][0][0] if selection.related[i] else "",
            "value": selection.related[i][0][1] if selection.related[i] else None,
        }
        for i in selection.kept
    ]
    context.log.info(
        f"{what}: {len(selection.kept)} of {len(dl.feature_names)} DL features have "
        f"|{config.measure}| >= {config.threshold} to a handcrafted feature ({dl_train.n} training patients)"
    )
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "selection_version": version,
            "n_kept": len(selection.kept),
            "n_dl_features": len(dl.feature_names),
            "n_handcrafted_features": len(hc.feature_names),
            "n_training_patients": dl_train.n,
            "measure": config.measure,
            "threshold": config.threshold,
            "embedding_version": dl.version,
            "feature_set_version": hc.version,
            "kept": markdown_table(kept_rows, ["dl_feature", "n_related", "strongest", "value"]),
        },
    )


# -- explainability_sweep ----------------------------------------------------------------------


class ExplainabilitySweepConfig(dg.Config):
    thresholds: list[float] = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    measures: list[str] = ["pearson", "spearman", "distance"]
    seed: int = 0
    study_features_only: bool = True


@dg.asset(
    deps=[explainable_features],
    code_version=ANALYSIS_VERSION,
    group_name=GROUP,
    automation_condition=follow_analysis(),
    kinds={"scikitlearn", "duckdb"},
    description="Beyond the study (its future work): the explainable-feature selection swept over thresholds "
    "and association measures (Pearson, Spearman, distance correlation), each with the downstream LASSO "
    "model's cross-validated and validation accuracy. Table `explainability_sweep`.",
)
def explainability_sweep(
    context: dg.AssetExecutionContext,
    config: deployed(ExplainabilitySweepConfig, "explainability_sweep"),
    lake: LakeResource,
) -> dg.MaterializeResult:
    from hcc_assets.stats.sweep import explainability_sweep as sweep

    what = "explainability_sweep"
    store = lake.store
    dl, hc = _paired_features(store, what, config.study_features_only)
    dl_train, hc_train, dl_val = dl.rows("train"), hc.rows("train"), dl.rows("validation")
    if dl_train.n < 6 or dl_val.n < 1:
        raise _fail(what, f"{dl_train.n} training / {dl_val.n} validation patients with both feature kinds")
    started = time.perf_counter()
    table = sweep(
        dl_train.values,
        hc_train.values,
        hc.feature_names,
        dl_train.hcc,
        dl_val.values,
        dl_val.hcc,
        thresholds=tuple(config.thresholds),
        measures=tuple(config.measures),
        seed=config.seed,
    )
    version = _digest(ANALYSIS_VERSION, config.model_dump(), _matrix_digest(dl), _matrix_digest(hc))
    store.replace_table(
        "explainability_sweep", FeatureStore.with_provenance(table, version=version, run_id=context.run.run_id)
    )
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "settings": table.height,
            "seconds": round(time.perf_counter() - started, 2),
            "sweep": markdown_table(table.to_dicts(), table.columns),
        },
    )


# -- LASSO models --------------------------------------------------------------------------------


class LassoModelConfig(dg.Config):
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


def _upload_folder(data_lake: DataLake, local: Path, target: str) -> None:
    for file in sorted(local.iterdir()):
        if file.is_file():
            data_lake.write_bytes(f"{target}/{file.name}", file.read_bytes())


def _download_folder(data_lake: DataLake, source: str, local: Path) -> Path:
    for entry in data_lake.fs.ls(source, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("."):
            (local / name).write_bytes(data_lake.read_bytes(entry))
    return local


def load_lasso_of(lake: LakeResource, row: dict):
    """The LassoFit saved for the registry row `row` (its folder, local or remote)."""
    from hcc_assets.stats.lasso import load_lasso

    with tempfile.TemporaryDirectory() as staging:
        return load_lasso(_download_folder(lake.lake, row["path"], Path(staging)))


def load_registered_lasso(lake: LakeResource, model: str):
    """(LassoFit, registry row) of the current LASSO model `model` ('radiomic' | 'explainable')."""
    row = registry.current_model(lake.store, REGISTRY_NAMES[model])
    if row is None:
        raise _fail(model, f"no {REGISTRY_NAMES[model]} is registered; materialize it first")
    return load_lasso_of(lake, row), row


def _fit_register_predict(
    context,
    lake: LakeResource,
    model: str,
    matrix: FeatureMatrix,
    config: LassoModelConfig,
    extra_params: dict,
    data_snapshot: int,
) -> tuple[dg.MaterializeResult, object]:
    """Fit the LASSO on the training rows of `matrix` (read at `data_snapshot`), save and register
    it with that snapshot and what it read, and store P(HCC) for every patient of `matrix` in
    `predictions` (beside earlier versions' rows)."""
    from hcc_assets.stats.lasso import fit_lasso, predict_proba, save_lasso

    train = matrix.rows("train")
    if train.n < 2 * config.cv_folds or len(set(train.hcc.tolist())) < 2:
        raise _fail(
            REGISTRY_NAMES[model],
            f"{train.n} training patients ({int(train.hcc.sum())} HCC); "
            f"{config.cv_folds}-fold CV needs both classes with at least {config.cv_folds} each",
        )
    started = time.perf_counter()
    try:
        fit = fit_lasso(
            train.values,
            train.hcc,
            matrix.feature_names,
            seed=config.seed,
            cv_folds=config.cv_folds,
            lambdas=config.lambdas(),
        )
    except ValueError as error:
        raise _fail(REGISTRY_NAMES[model], str(error)) from None
    seconds = time.perf_counter() - started
    version = _digest(ANALYSIS_VERSION, model, config.model_dump(), _matrix_digest(train), extra_params)
    folder = lake.lake.path(MODELS_DIR, REGISTRY_NAMES[model], version)
    with tempfile.TemporaryDirectory() as staging:
        save_lasso(fit, staging)
        _upload_folder(lake.lake, Path(staging), folder)

    probabilities = predict_proba(fit, matrix.values)
    run_id = context.run.run_id
    lake.store.replace_versions(
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
        "cv_folds": config.cv_folds,
        "seed": config.seed,
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
    lake.store.register_model(
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
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "model_version": version,
            "path": dg.MetadataValue.path(folder),
            "n_train": train.n,
            "n_validation": matrix.rows("validation").n,
            "n_input_features": len(matrix.feature_names),
            "n_constant_dropped": int(fit.n_constant),
            "n_quasi_constant_dropped": int(fit.n_quasi_constant),
            "best_lambda": float(fit.best_lambda),
            "n_selected": len(fit.selected),
            "train_accuracy": train_accuracy,
            "cv_grid": markdown_table(cv_rows, ["lambda", "C", "cv_accuracy", "sd"]),
            "selected": markdown_table(coefficient_rows, ["feature", "beta"]),
            "fit_seconds": round(seconds, 3),
            **{k: (dg.MetadataValue.json(v) if isinstance(v, (dict, list)) else v) for k, v in extra_params.items()},
        },
    ), fit


@dg.asset(
    deps=[radiomic_features, cohort, liver_segmentation_model],
    code_version=ANALYSIS_VERSION,
    group_name=GROUP,
    automation_condition=analyse_when_settled(),
    kinds={"scikitlearn", "duckdb"},
    description="The baseline: L1 logistic regression (constant/quasi-constant filter, z-score, LASSO; "
    "C = 1/lambda over 7 lambdas in [1e-3, 1e3], seeded 3-fold CV on accuracy) on the handcrafted "
    "radiomic features of the training patients. Patients whose radiomics failed are excluded, with the "
    "count and reasons in metadata and `models.params`, as in the study.",
)
def radiomic_model(
    context: dg.AssetExecutionContext, config: deployed(LassoModelConfig, "radiomic_model"), lake: LakeResource
) -> dg.MaterializeResult:
    snapshot = lake.store.current_snapshot()
    store = lake.store.at(snapshot=snapshot)  # every read from one snapshot, recorded with the model
    matrix = _handcrafted(store, "radiomic_model", config.study_features_only)
    cohort_rows = reads.cohort_split(store)
    excluded = excluded_patients(store, RADIOMICS_STAGE)
    missing = sorted(set(cohort_rows["patient_id"]) - set(matrix.patient_ids) - set(excluded["patient_id"]))
    reasons: dict[str, int] = {}
    for reason in excluded["reason"].to_list():
        reasons[reason] = reasons.get(reason, 0) + 1
    if missing:
        reasons["no radiomic features of the current feature set"] = len(missing)
    n_excluded = excluded.height + len(missing)
    if n_excluded:
        context.log.warning(
            f"radiomic_model: {n_excluded} patient(s) excluded (radiomics failed or missing): "
            + "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items()))
        )
    result, _ = _fit_register_predict(
        context,
        lake,
        RADIOMIC_MODEL,
        matrix,
        config,
        {
            "feature_set_version": matrix.version,
            "n_excluded": n_excluded,
            "excluded_hcc": int(excluded["hcc"].sum()) if excluded.height else 0,
            "exclusion_reasons": reasons,
        },
        snapshot,
    )
    return result


@dg.asset(
    deps=[explainable_features],
    code_version=ANALYSIS_VERSION,
    group_name=GROUP,
    automation_condition=follow_analysis(),
    kinds={"scikitlearn", "duckdb"},
    description="L1 logistic regression (same filter, scaling, grid and CV as radiomic_model) on the explainable "
    "DL features of the training patients.",
)
def explainable_model(
    context: dg.AssetExecutionContext, config: deployed(LassoModelConfig, "explainable_model"), lake: LakeResource
) -> dg.MaterializeResult:
    snapshot = lake.store.current_snapshot()
    store = lake.store.at(snapshot=snapshot)  # every read from one snapshot, recorded with the model
    kept, selection_version, embedding_version = reads.explainable_selection(store)
    if not selection_version:
        raise _fail("explainable_model", "explainable_features has not been materialized")
    if not kept:
        raise _fail(
            "explainable_model",
            "no DL feature reached the association threshold to any handcrafted "
            "feature; lower explainable_features.threshold or see explainability_sweep",
        )
    matrix = embedding_matrix(store, embedding_version).columns(kept)
    result, _ = _fit_register_predict(
        context,
        lake,
        EXPLAINABLE_MODEL,
        matrix,
        config,
        {
            "selection_version": selection_version,
            "embedding_version": embedding_version,
            "n_explainable": len(kept),
        },
        snapshot,
    )
    return result


# -- model_metrics -------------------------------------------------------------------------------


class ModelMetricsConfig(dg.Config):
    n_bootstrap: int = 1000
    bootstrap_seed: int = 0
    cv_splits: int = 5
    cv_repeats: int = 5
    cv_seed: int = 0
    threshold: float = 0.5  # P(HCC) above which a patient is called HCC
    calibration_bins: int = 10  # equal-width bins of P(HCC) for the calibration table and plot


def _predictions(store: FeatureStore, model: str) -> pl.DataFrame:
    return reads.current_predictions(store, model)


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


def _threshold_rows(
    model: str, version: str, y: np.ndarray, p: np.ndarray, config: ModelMetricsConfig
) -> tuple[dict, list[dict]]:
    """(confusion-matrix row, calibration rows) of one model's validation predictions."""
    from hcc_assets.stats.calibration import brier_score, calibration_bins
    from hcc_assets.stats.metrics import confusion_matrix

    counts = confusion_matrix(y, p, config.threshold)
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
            "n_bins": config.calibration_bins,
            "bin": b.bin,
            "bin_low": b.low,
            "bin_high": b.high,
            "n": b.n,
            "mean_predicted": b.mean_predicted,
            "observed_rate": b.observed_rate,
            "brier_score": brier,
            "version": version,
        }
        for b in calibration_bins(y, p, config.calibration_bins)
    ]
    return confusion, calibration


def _paired_comparisons(
    validation: dict[str, pl.DataFrame], config: ModelMetricsConfig
) -> tuple[list[dict], list[str]]:
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
            raise _fail(
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
        boot = paired_bootstrap_auc_difference(y, p_a, p_b, n_resamples=config.n_bootstrap, seed=config.bootstrap_seed)
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
                "seed": config.bootstrap_seed,
                "delong_se": delong.se,
                "delong_z": delong.z,
                "delong_p": delong.p_value,
                "delong_ci_low": delong.ci_low,
                "delong_ci_high": delong.ci_high,
                "version": f"{version_a}|{version_b}",
            }
        )
    return rows, skipped


def _estimate_rows(model: str, scheme: str, estimates) -> list[dict]:
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


def _lasso_fit_predict(lake_config: LassoModelConfig):
    from hcc_assets.stats.lasso import fit_lasso, predict_proba

    def fit_predict(x_train, y_train, x_test):
        fit = fit_lasso(
            x_train,
            y_train,
            [f"f{i}" for i in range(x_train.shape[1])],
            seed=lake_config.seed,
            cv_folds=lake_config.cv_folds,
            lambdas=lake_config.lambdas(),
        )
        return predict_proba(fit, x_test)

    return fit_predict


def _explainable_fit_predict(lasso: LassoModelConfig, selection: dict, n_dl: int, hc_names: list[str]):
    """The whole explainable fit inside each fold: association selection, then filter + LASSO."""
    from hcc_assets.stats.association import select_explainable
    from hcc_assets.stats.filtering import AllFeaturesDroppedError

    fit_predict_lasso = _lasso_fit_predict(lasso)

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


def _progress_logger(context: dg.AssetExecutionContext, prefix: str):
    return lambda line: context.log.info(f"{prefix}: {line}")


@dg.asset(
    deps=[radiomic_model, explainable_model, hcc_classifier],
    code_version=ANALYSIS_VERSION,
    group_name=GROUP,
    automation_condition=follow_analysis(),
    kinds={"scikitlearn", "duckdb"},
    description="Accuracy, precision, recall, F1, ROC AUC, specificity and NPV of the radiomic, deep and "
    "explainable models on the validation patients, with the mean and 95% percentile CI over seeded bootstrap "
    "resamples (scheme holdout_bootstrap), and, for the LASSO models, repeated stratified k-fold CV of the whole fit "
    "(scheme repeated_cv_<k>x<r>). Table `model_metrics`; view `table_1` is the study's Table 1. Beside it: "
    "`model_comparisons` (each pair of models on the validation patients both scored: AUC difference with a "
    "paired-bootstrap 95% CI and DeLong's test), `confusion_matrices` (at the threshold) and `calibration` "
    "(binned predicted vs observed HCC rate, Brier score).",
)
def model_metrics(
    context: dg.AssetExecutionContext, config: deployed(ModelMetricsConfig, "model_metrics"), lake: LakeResource
) -> dg.MaterializeResult:
    from hcc_assets.stats.metrics import bootstrap_metrics, repeated_cv_metrics

    store = lake.store
    rows: list[dict] = []
    versions: dict[str, str] = {}
    validations: dict[str, pl.DataFrame] = {}
    confusion_rows: list[dict] = []
    calibration_rows: list[dict] = []
    started = time.perf_counter()
    for model in (RADIOMIC_MODEL, DEEP_MODEL, EXPLAINABLE_MODEL):
        predictions = _predictions(store, model)
        validation = predictions.filter(pl.col("split") == "validation")
        if validation.height == 0:
            context.log.warning(f"model_metrics: no validation predictions of model {model}; skipped")
            continue
        versions[model] = validation["version"][0]
        validations[model] = validation
        y, p = validation["label"].cast(pl.Int8).to_numpy(), validation["probability"].to_numpy()
        estimates = bootstrap_metrics(
            y, p, n_resamples=config.n_bootstrap, seed=config.bootstrap_seed, threshold=config.threshold
        )
        rows += [r | {"version": versions[model]} for r in _estimate_rows(model, HOLDOUT_SCHEME, estimates)]
        confusion, calibration = _threshold_rows(model, versions[model], y, p, config)
        confusion_rows.append(confusion)
        calibration_rows += calibration
    comparison_rows, skipped = _paired_comparisons(validations, config)
    for reason in skipped:
        context.log.warning(f"model_metrics: paired comparison skipped, {reason}")
    context.log.info(
        f"model_metrics: {config.n_bootstrap} bootstrap resamples of {len(versions)} models and "
        f"{len(comparison_rows)} paired comparisons in {time.perf_counter() - started:.1f}s"
    )

    # Repeated CV of the whole LASSO fit over every patient with features (the deep model would need
    # k x r CNN trainings: not run on CPU by default).
    scheme = f"repeated_cv_{config.cv_splits}x{config.cv_repeats}"
    lasso_config = _lasso_config_of(store, RADIOMIC_MODEL)
    if config.cv_repeats > 0 and RADIOMIC_MODEL in versions:
        hc = _handcrafted(store, "model_metrics", lasso_config.study_features_only)
        estimates = repeated_cv_metrics(
            _lasso_fit_predict(lasso_config),
            hc.values,
            hc.hcc,
            n_splits=config.cv_splits,
            n_repeats=config.cv_repeats,
            seed=config.cv_seed,
            progress=_progress_logger(context, f"model_metrics {RADIOMIC_MODEL} {scheme}"),
        )
        rows += [r | {"version": versions[RADIOMIC_MODEL]} for r in _estimate_rows(RADIOMIC_MODEL, scheme, estimates)]
    if config.cv_repeats > 0 and EXPLAINABLE_MODEL in versions:
        selection = _selection_config(store)
        dl, hc = _paired_features(store, "model_metrics", selection["study_features_only"])
        estimates = repeated_cv_metrics(
            _explainable_fit_predict(
                _lasso_config_of(store, EXPLAINABLE_MODEL), selection, len(dl.feature_names), hc.feature_names
            ),
            np.hstack([dl.values, hc.values]),
            dl.hcc,
            n_splits=config.cv_splits,
            n_repeats=config.cv_repeats,
            seed=config.cv_seed,
            progress=_progress_logger(context, f"model_metrics {EXPLAINABLE_MODEL} {scheme}"),
        )
        rows += [
            r | {"version": versions[EXPLAINABLE_MODEL]} for r in _estimate_rows(EXPLAINABLE_MODEL, scheme, estimates)
        ]
    if not rows:
        raise _fail("model_metrics", "no model has validation predictions; materialize the models first")

    table = pl.DataFrame(
        rows,
        schema={
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
        },
    )
    comparisons = pl.DataFrame(comparison_rows, schema=COMPARISON_SCHEMA)
    confusions = pl.DataFrame(confusion_rows, schema=CONFUSION_SCHEMA)
    calibrations = pl.DataFrame(calibration_rows, schema=CALIBRATION_SCHEMA)
    run_id = context.run.run_id
    for name, frame in (
        ("model_comparisons", comparisons),
        ("confusion_matrices", confusions),
        ("calibration", calibrations),
        ("model_metrics", table),
    ):
        if frame.height:
            store.replace_versions(name, FeatureStore.with_provenance(frame, version=None, run_id=run_id))
    table_1 = reads.table_1(store)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(
            _digest(table.drop("version").to_dicts(), versions, comparison_rows, confusion_rows, calibration_rows)
        ),
        metadata={
            "table_1": markdown_table(table_1.to_dicts(), table_1.columns),
            "paired_comparisons": markdown_table(
                comparison_rows,
                [
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
                ],
            ),
            "confusion_matrices": markdown_table(confusion_rows, ["model", "threshold", "n", "tp", "fp", "tn", "fn"]),
            "brier_scores": dg.MetadataValue.json({r["model"]: r["brier_score"] for r in calibration_rows}),
            "model_versions": dg.MetadataValue.json(versions),
            "n_bootstrap": config.n_bootstrap,
            "bootstrap_seed": config.bootstrap_seed,
            "cv_scheme": scheme,
            "seconds": round(time.perf_counter() - started, 2),
        },
    )


def _lasso_config_of(store: FeatureStore, model: str) -> LassoModelConfig:
    """The configuration the registered model was fitted with, so CV refits the same thing."""
    row = registry.current_model(store, REGISTRY_NAMES[model])
    if row is None:
        return LassoModelConfig()
    params = json.loads(row["params"])
    lambdas = params.get("lambdas") or []
    return LassoModelConfig(
        seed=params.get("seed", 0),
        cv_folds=params.get("cv_folds", 3),
        n_lambdas=len(lambdas) or 7,
        lambda_min=min(lambdas or [1e-3]),
        lambda_max=max(lambdas or [1e3]),
    )


def _selection_config(store: FeatureStore) -> dict:
    measure, threshold, n_handcrafted = reads.selection_settings(store)
    n_study = len(_study_names(store))
    return {
        "measure": measure or "pearson",
        "threshold": float(threshold if threshold is not None else 0.5),
        "study_features_only": n_handcrafted <= n_study,
    }


def _study_names(store: FeatureStore) -> list[str]:
    version = latest_feature_set_version(store)
    if version is None:
        return []
    return [n for n in reads.radiomic_feature_names(store, version) if n.startswith(STUDY_PREFIXES)]


# -- coefficients --------------------------------------------------------------------------------


@dg.asset(
    deps=[radiomic_model, explainable_model],
    code_version=ANALYSIS_VERSION,
    group_name=GROUP,
    automation_condition=follow_analysis(),
    kinds={"statsmodels", "duckdb"},
    description="For each LASSO model's selected features: beta, standard error, z and p from an unpenalized "
    "statsmodels Logit refit on the selected standardized training features, and the change in odds per "
    "unit, (exp(beta) - 1) x 100%. Explainable features list the handcrafted features they correlate with. "
    "A separable or singular refit is reported as such (status), never as numbers. Table `coefficients`.",
)
def coefficients(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
    from hcc_assets.stats.coefficients import logit_refit

    store = lake.store
    rows: list[dict] = []
    messages: dict[str, str] = {}
    related = _related_handcrafted(store)
    for model in (RADIOMIC_MODEL, EXPLAINABLE_MODEL):
        try:
            fit, registry = load_registered_lasso(lake, model)
        except dg.Failure as failure:
            context.log.warning(f"coefficients: {failure.description}")
            continue
        training = set(registry["training_patients"])
        if model == RADIOMIC_MODEL:
            params = json.loads(registry["params"])
            matrix = radiomics_matrix(store, params["feature_set_version"], ())
        else:
            params = json.loads(registry["params"])
            matrix = embedding_matrix(store, params["embedding_version"])
        matrix = matrix.columns(fit.feature_names).subset(sorted(training))
        standardized, names = _standardized_selected(fit, matrix.values)
        refit, message = logit_refit(standardized, matrix.hcc, names)
        messages[model] = message
        for row in refit:
            rows.append(
                {
                    "model": model,
                    "feature": row.feature,
                    "beta": row.beta,
                    "std_error": row.std_error,
                    "z": row.z,
                    "p_value": row.p_value,
                    "odds_change_pct": row.odds_change_pct,
                    "lasso_beta": float(fit.coefficients.get(row.feature, np.nan)),
                    "related_handcrafted": related.get(row.feature) if model == EXPLAINABLE_MODEL else None,
                    "status": row.status,
                    "version": registry["version"],
                }
            )
    table = pl.DataFrame(
        rows,
        schema={
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
        },
    )
    store.replace_versions("coefficients", FeatureStore.with_provenance(table, version=None, run_id=context.run.run_id))
    return dg.MaterializeResult(
        metadata={
            "n_rows": table.height,
            "refit": dg.MetadataValue.json(messages),
            "coefficients": markdown_table(
                table.to_dicts(),
                [
                    "model",
                    "feature",
                    "beta",
                    "std_error",
                    "z",
                    "p_value",
                    "odds_change_pct",
                    "status",
                    "related_handcrafted",
                ],
            ),
        },
    )


def _standardized_selected(fit, values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The training features as the LASSO saw them (filtered, z-scored), restricted to its selection."""
    pipeline = fit.pipeline
    transformed = pipeline[:-1].transform(values)
    kept_names = list(np.asarray(fit.feature_names)[pipeline[0].kept_mask_])
    index = [kept_names.index(name) for name in fit.selected]
    return transformed[:, index], list(fit.selected)


def _related_handcrafted(store: FeatureStore, limit: int = 5) -> dict[str, str]:
    rows = reads.related_handcrafted(store)
    out: dict[str, list[str]] = {}
    for row in rows.iter_rows(named=True):
        out.setdefault(row["dl_feature"], []).append(f"{row['handcrafted_feature']} ({row['value']:+.2f})")
    return {k: "; ".join(v[:limit]) + (f"; +{len(v) - limit} more" if len(v) > limit else "") for k, v in out.items()}


# -- report --------------------------------------------------------------------------------------


class ReportConfig(dg.Config):
    folder: str = "reports"  # under the data lake root


@dg.asset(
    deps=[model_metrics, coefficients, explainability_sweep, liver_mask],
    code_version=ANALYSIS_VERSION,
    group_name=GROUP,
    automation_condition=follow_analysis(),
    kinds={"html"},
    description="The study's report as self-contained HTML (figures embedded; opens in a browser with no server) "
    "and Markdown under data_lake/reports/: cohort summary, Table 1, Figure 1 (slice with mask overlay), "
    "Figure 2 (training curves), ROC curves of the three models, the paired model comparison (AUC difference, "
    "DeLong), confusion matrices, the calibration plot, coefficients and the explainability sweep.",
)
def report(
    context: dg.AssetExecutionContext, config: deployed(ReportConfig, "report"), lake: LakeResource
) -> dg.MaterializeResult:
    from hcc_assets.segmentation import overlay_png
    from hcc_assets.stats.report import build_report, gather_report_inputs

    data_lake = lake.lake

    def case(patient_id: str):
        return (
            data_lake.read_nifti(data_lake.patient_file(patient_id, NIFTI_FILE)),
            data_lake.read_nifti(data_lake.patient_file(patient_id, LIVER_MASK_FILE)),
        )

    inputs = gather_report_inputs(reads.report_tables(lake.store), case, overlay_png)
    rendered = build_report(inputs)
    html_path = lake.lake.path(config.folder, "report.html")
    md_path = lake.lake.path(config.folder, "report.md")
    report_version = content_version(rendered.html)
    figures: dict[str, dg.MetadataValue] = {}  # each figure's file of this version; thumbnails are in `report`
    for name, png in rendered.figures.items():
        lake.lake.write_bytes(lake.lake.path(config.folder, name), png)  # beside report.md, which links them
        stem = name.removesuffix(".png")
        figures.update(
            figure_metadata(
                data_lake, stem, data_lake.cohort_figure("report", report_version, stem), png, stem, thumbnail=False
            )
        )
    lake.lake.write_bytes(md_path, rendered.markdown.encode())
    lake.lake.write_bytes(html_path, rendered.html.encode())
    return dg.MaterializeResult(
        data_version=dg.DataVersion(report_version),
        metadata={
            "html": dg.MetadataValue.path(html_path),
            "markdown": dg.MetadataValue.path(md_path),
            "report": dg.MetadataValue.md(rendered.markdown_inline),
            **figures,
        },
    )


__all__ = [
    "CLASSIFIER_NAME",
    "coefficients",
    "explainability_sweep",
    "explainable_features",
    "explainable_model",
    "model_metrics",
    "radiomic_model",
    "report",
]
