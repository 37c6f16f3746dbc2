"""The named jobs (what the CLI, the drop-zone sensor and the UI launch) and the default executor."""

import dagster as dg

from hcc_assets.defs import analysis, cohort, deep, ingest, maintenance, predictions, segmentation

ALL_ASSETS = dg.load_assets_from_modules(
    [ingest, cohort, segmentation, deep, analysis, predictions, maintenance]
)  # once: definitions.py uses these
COHORT_GROUPS = ("cohort", "models")  # what cohort_refresh runs
ANALYSIS_GROUPS = ("analysis",)  # what analysis_refresh runs


# Every run executes its steps in the run's own process unless its run config asks for
# `multiprocess`: one start-up (importing dagster, torch, nnU-Net, pyradiomics: ~5-10 s on 2 cores)
# per run instead of one per step, which is most of a new scan's latency. Parallelism comes from
# several runs at once (`concurrency.runs` in dagster.yaml). The default executor, so that runs
# with no run config of their own (sensors, automation, the UI) get it too.
in_process_first_executor = dg.ExecutorDefinition(
    name="in_process_first",
    config_schema=dg.Field(
        dg.multi_or_in_process_executor.config_schema.as_field().config_type, default_value={"in_process": {}}
    ),
    executor_creation_fn=dg.multi_or_in_process_executor.executor_creation_fn,
    description="Dagster's multi_or_in_process_executor with in_process as the default.",
)

# Per patient: ingest, then the features that need a trained model (mask, radiomics, embedding).
patient_ingest_job = dg.define_asset_job(
    name="patient_ingest",
    selection=dg.AssetSelection.groups("ingest"),
    description="Ingest one patient partition: raw_scan -> nifti_volume -> preprocessed_volume.",
)

patient_features_job = dg.define_asset_job(
    name="patient_features",
    selection=dg.AssetSelection.groups("features"),
    description="Model-derived features of one patient partition from the current models (mask, radiomics, embedding).",
)

patient_predictions_job = dg.define_asset_job(
    name="patient_predictions",
    selection=dg.AssetSelection.groups("predictions"),
    description="P(HCC) of one patient partition from every current model (hcc_prediction).",
)

patient_pipeline_job = dg.define_asset_job(
    name="patient_pipeline",
    selection=dg.AssetSelection.groups("ingest", "features", "predictions"),
    description="Everything per patient, prediction included; what the drop-zone sensor runs for a new study.",
)

cohort_job = dg.define_asset_job(
    name="cohort_refresh",
    selection=dg.AssetSelection.groups(*COHORT_GROUPS),
    description="Cohort-level assets over all ingested patients: split and model training.",
)

analysis_job = dg.define_asset_job(
    name="analysis_refresh",
    selection=dg.AssetSelection.groups(*ANALYSIS_GROUPS),
    description="The study's analysis over every patient's features: explainable DL features, LASSO models, "
    "metrics with bootstrap CIs, coefficients and the report.",
)
