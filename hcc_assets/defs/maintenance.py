"""Feature-store housekeeping (group `maintenance`): compaction, snapshot expiry, file clean-up.

Thin wiring around `hcc_assets.featurestore.maintenance.maintain`; its own job and a daily
schedule ($HCC_ASSETS_MAINTENANCE_CRON), apart from the analysis, so compaction never holds up a
patient's run. Retention: $HCC_ASSETS_SNAPSHOT_RETENTION_DAYS (default 90; "never": keep all);
snapshots a registered model was trained on are always kept.
"""

import os

import dagster as dg

from hcc_assets.defs.deployment import deployed
from hcc_assets.defs.resources import LakeResource
from hcc_assets.featurestore.maintenance import RetentionPolicy, maintain

MAINTENANCE_VERSION = "1"
GROUP = "maintenance"
RETENTION_ENV = "HCC_ASSETS_SNAPSHOT_RETENTION_DAYS"
CRON_ENV = "HCC_ASSETS_MAINTENANCE_CRON"


def _default_keep_days() -> float | None:
    value = os.environ.get(RETENTION_ENV, "90").strip().lower()
    return None if value in ("never", "none", "") else float(value)


class FeatureStoreMaintenanceConfig(dg.Config):
    keep_days: float | None = None  # None: $HCC_ASSETS_SNAPSHOT_RETENTION_DAYS (default 90)
    keep_all_snapshots: bool = False  # True: expire nothing, only compact
    file_grace_hours: float = 1.0


@dg.asset(
    code_version=MAINTENANCE_VERSION,
    group_name=GROUP,
    kinds={"duckdb"},
    description="Compacts the DuckLake feature store (merges the small per-patient Parquet files; time travel "
    "is kept), expires snapshots past the retention window except those a registered model was trained on, "
    "and deletes data files no kept snapshot reads.",
)
def feature_store_maintenance(
    context: dg.AssetExecutionContext,
    config: deployed(FeatureStoreMaintenanceConfig, "feature_store_maintenance"),
    lake: LakeResource,
) -> dg.MaterializeResult:
    keep_days = (
        None
        if config.keep_all_snapshots
        else (config.keep_days if config.keep_days is not None else _default_keep_days())
    )
    report = maintain(lake.store, RetentionPolicy(keep_days=keep_days, file_grace_hours=config.file_grace_hours))
    context.log.info(
        f"feature store: {report.data_files_before} -> {report.data_files_after} data files, "
        f"{report.snapshots_expired} of {report.snapshots_before} snapshots expired, "
        f"{report.files_deleted} files deleted in {report.seconds:.1f} s"
    )
    return dg.MaterializeResult(
        metadata={
            **{k: v for k, v in report.as_dict().items() if k != "kept_for_models"},
            "kept_for_models": dg.MetadataValue.json(report.kept_for_models),
            "keep_days": keep_days if keep_days is not None else "never",
        }
    )


maintenance_job = dg.define_asset_job(
    name="feature_store_maintenance_job",
    selection=dg.AssetSelection.groups(GROUP),
    description="Compaction, snapshot expiry and file clean-up of the feature store.",
)

maintenance_schedule = dg.ScheduleDefinition(
    name="feature_store_maintenance_schedule",
    job=maintenance_job,
    cron_schedule=os.environ.get(CRON_ENV, "30 3 * * *"),
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily feature-store housekeeping (default 03:30 UTC; $HCC_ASSETS_MAINTENANCE_CRON).",
)
