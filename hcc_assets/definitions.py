"""The one Definitions object: assets, checks, jobs, sensors, schedules, resources."""

import dagster as dg

from hcc_assets.defs.automation import automation_sensor
from hcc_assets.defs.jobs import (
    ALL_ASSETS,
    analysis_job,
    cohort_job,
    in_process_first_executor,
    patient_features_job,
    patient_ingest_job,
    patient_pipeline_job,
    patient_predictions_job,
)
from hcc_assets.defs.maintenance import maintenance_job, maintenance_schedule
from hcc_assets.defs.resources import ComputeResource, default_lake_resource
from hcc_assets.defs.sensors import incoming_scans_sensor

defs = dg.Definitions(
    assets=ALL_ASSETS,
    jobs=[
        patient_ingest_job,
        patient_features_job,
        patient_predictions_job,
        patient_pipeline_job,
        cohort_job,
        analysis_job,
        maintenance_job,
    ],
    sensors=[incoming_scans_sensor, automation_sensor()],
    schedules=[maintenance_schedule],
    resources={"lake": default_lake_resource(), "compute": ComputeResource()},
    executor=in_process_first_executor,
)
