"""The study's analysis as cohort-level assets (group `analysis`):

    radiomic_features + deep_embedding + cohort -> explainable_features -> explainability_sweep
    radiomic_features -> radiomic_model ; explainable_features -> explainable_model
    radiomic_model + explainable_model + hcc_classifier -> model_metrics, coefficients -> report

Thin wiring: each asset reads its config and resources, calls its use case in
`hcc_assets.steps.analysis` and turns the result into a materialization. Everything that is fitted
is fitted on training patients only; validation patients are only ever predicted.

Feature-store tables: `explainable_correlations`, `explainability_sweep`, `models` (rows
'radiomic_model', 'explainable_model'), `predictions` (models 'radiomic', 'explainable'),
`model_metrics` (view `table_1`), `model_comparisons`, `confusion_matrices`, `calibration`,
`coefficients`. Each model's `version` is a content hash of its training data, configuration and
code version.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

from hcc_assets.core.versioning import content_version
from hcc_assets.defs.automation import analyse_when_settled, follow_analysis
from hcc_assets.defs.cohort import cohort
from hcc_assets.defs.deep import MODEL_NAME as CLASSIFIER_NAME
from hcc_assets.defs.deep import deep_embedding, hcc_classifier
from hcc_assets.defs.deployment import deployed
from hcc_assets.defs.metadata import figure_metadata
from hcc_assets.defs.resources import LakeResource
from hcc_assets.defs.segmentation import liver_mask, liver_segmentation_model, radiomic_features
from hcc_assets.defs.settings_config import config_from_settings
from hcc_assets.featurestore import reads
from hcc_assets.lake import LIVER_MASK_FILE, NIFTI_FILE
from hcc_assets.steps import analysis as steps
from hcc_assets.steps.analysis import ANALYSIS_VERSION, AnalysisError, LassoModel, LassoSettings

GROUP = "analysis"


@contextmanager
def _failures() -> Iterator[None]:
    """A problem the user must fix fails the run without retries, described as the step says it."""
    try:
        yield
    except AnalysisError as error:
        raise dg.Failure(description=str(error), allow_retries=False) from None


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
    with _failures():
        result = steps.select_explainable_features(
            lake.store, steps.SelectionSettings(**config.model_dump()), context.run.run_id
        )
    context.log.info(result.summary)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(result.version),
        metadata={
            "selection_version": result.version,
            "n_kept": result.n_kept,
            "n_dl_features": result.n_dl_features,
            "n_handcrafted_features": result.n_handcrafted_features,
            "n_training_patients": result.n_training_patients,
            "measure": config.measure,
            "threshold": config.threshold,
            "embedding_version": result.embedding_version,
            "feature_set_version": result.feature_set_version,
            "kept": dg.MetadataValue.md(result.kept),
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
    with _failures():
        result = steps.sweep_explainability(lake.store, steps.SweepSettings(**config.model_dump()), context.run.run_id)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(result.version),
        metadata={"settings": result.n_settings, "seconds": result.seconds, "sweep": dg.MetadataValue.md(result.table)},
    )


# -- LASSO models --------------------------------------------------------------------------------


LassoModelConfig = config_from_settings(LassoSettings, "LassoModelConfig")


def _lasso_materialization(model: LassoModel) -> dg.MaterializeResult:
    return dg.MaterializeResult(
        data_version=dg.DataVersion(model.version),
        metadata={
            "model_version": model.version,
            "path": dg.MetadataValue.path(model.folder),
            "n_train": model.n_train,
            "n_validation": model.n_validation,
            "n_input_features": model.n_input_features,
            "n_constant_dropped": model.n_constant_dropped,
            "n_quasi_constant_dropped": model.n_quasi_constant_dropped,
            "best_lambda": model.best_lambda,
            "n_selected": model.n_selected,
            "train_accuracy": model.train_accuracy,
            "cv_grid": dg.MetadataValue.md(model.cv_grid),
            "selected": dg.MetadataValue.md(model.selected),
            "fit_seconds": model.fit_seconds,
            **{
                k: (dg.MetadataValue.json(v) if isinstance(v, (dict, list)) else v)
                for k, v in model.extra_params.items()
            },
        },
    )


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
    with _failures():
        model = steps.fit_radiomic_model(lake.lake, lake.store, config.settings(), context.run.run_id, context.log)
    return _lasso_materialization(model)


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
    with _failures():
        model = steps.fit_explainable_model(lake.lake, lake.store, config.settings(), context.run.run_id)
    return _lasso_materialization(model)


# -- model_metrics -------------------------------------------------------------------------------


ModelMetricsConfig = config_from_settings(steps.MetricsSettings, "ModelMetricsConfig")


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
    with _failures():
        result = steps.compute_model_metrics(lake.store, config.settings(), context.run.run_id, context.log)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(result.data_version),
        metadata={
            "table_1": dg.MetadataValue.md(result.table_1),
            "paired_comparisons": dg.MetadataValue.md(result.paired_comparisons),
            "confusion_matrices": dg.MetadataValue.md(result.confusion_matrices),
            "brier_scores": dg.MetadataValue.json(result.brier_scores),
            "model_versions": dg.MetadataValue.json(result.model_versions),
            "n_bootstrap": config.n_bootstrap,
            "bootstrap_seed": config.bootstrap_seed,
            "cv_scheme": result.cv_scheme,
            "seconds": result.seconds,
        },
    )


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
    result = steps.refit_coefficients(lake.lake, lake.store, context.run.run_id, context.log)
    return dg.MaterializeResult(
        metadata={
            "n_rows": result.n_rows,
            "refit": dg.MetadataValue.json(result.refit),
            "coefficients": dg.MetadataValue.md(result.table),
        },
    )


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
