import dagster as dg

# Per patient: ingest, then the features that need a trained model (mask, radiomics, embedding).
patient_ingest_job = dg.define_asset_job(
    name="patient_ingest",
    selection=dg.AssetSelection.groups("ingest"),
    description="Ingest one patient partition: raw_scan -> nifti_volume -> preprocessed_volume.",
)

patient_features_job = dg.define_asset_job(
    name="patient_features",
    selection=dg.AssetSelection.groups("features"),
    description="Model-derived features of one patient partition from the current models.",
)

patient_pipeline_job = dg.define_asset_job(
    name="patient_pipeline",
    selection=dg.AssetSelection.groups("ingest", "features"),
    description="Everything per patient; what the drop-zone sensor runs for a new study.",
)

cohort_job = dg.define_asset_job(
    name="cohort_refresh",
    selection=dg.AssetSelection.groups("cohort", "models"),
    description="Cohort-level assets over all ingested patients: split and model training.",
)

analysis_job = dg.define_asset_job(
    name="analysis_refresh",
    selection=dg.AssetSelection.groups("analysis"),
    description="The study's analysis over every patient's features: explainable DL features, LASSO models, "
    "metrics with bootstrap CIs, coefficients and the report.",
)

cohort_refresh_schedule = dg.ScheduleDefinition(
    job=cohort_job,
    cron_schedule="0 2 * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Nightly refresh of cohort-level assets (not on every new patient).",
)
