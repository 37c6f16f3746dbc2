import dagster as dg

# Per-patient runs execute their steps in the run's own process: one start-up (importing dagster,
# torch, nnU-Net, pyradiomics: ~5-10 s on 2 cores) per run instead of one per step, which is most
# of a new scan's latency. Parallelism comes from several runs at once (`concurrency.runs` in
# dagster.yaml). This is only the default: run config `execution: {config: {multiprocess: {}}}`
# still selects the multiprocess executor (the CLI's `--executor multiprocess` does).
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}

# Per patient: ingest, then the features that need a trained model (mask, radiomics, embedding).
patient_ingest_job = dg.define_asset_job(
    name="patient_ingest",
    selection=dg.AssetSelection.groups("ingest"),
    config=IN_PROCESS,
    description="Ingest one patient partition: raw_scan -> nifti_volume -> preprocessed_volume.",
)

patient_features_job = dg.define_asset_job(
    name="patient_features",
    selection=dg.AssetSelection.groups("features"),
    config=IN_PROCESS,
    description="Model-derived features of one patient partition from the current models; what the "
    "refresh chain runs for every patient whose mask or embedding is not from the current model.",
)

patient_pipeline_job = dg.define_asset_job(
    name="patient_pipeline",
    selection=dg.AssetSelection.groups("ingest", "features"),
    config=IN_PROCESS,
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
