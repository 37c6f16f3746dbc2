import dagster as dg


patient_ingest_job = dg.define_asset_job(
    name="patient_ingest",
    selection=dg.AssetSelection.groups("ingest"),
    description="Every per-patient asset for one patient partition.",
)

cohort_job = dg.define_asset_job(
    name="cohort_refresh",
    selection=dg.AssetSelection.groups("cohort"),
    description="Cohort-level assets over all ingested patients.",
)

cohort_refresh_schedule = dg.ScheduleDefinition(
    job=cohort_job,
    cron_schedule="0 2 * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Nightly refresh of cohort-level assets (not on every new patient).",
)
