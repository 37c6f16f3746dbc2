"""Exports (group `export`): the feature store as Parquet in the data lake.

    model_metrics + coefficients + explainability_sweep -> feature_store_parquet

Thin wiring around `hcc_assets.featurestore.parquet.export_parquet`. It runs at the end of the
analysis_refresh job, so the files follow every analysis (and with it the features it read).
"""

import hashlib

import dagster as dg

from hcc_assets.defs.analysis import coefficients, explainability_sweep, model_metrics
from hcc_assets.defs.metadata import markdown_table
from hcc_assets.defs.resources import LakeResource
from hcc_assets.featurestore.parquet import EXPORT_FOLDER, MANIFEST_NAME, export_parquet

EXPORT_VERSION = "1"
GROUP = "export"


class FeatureStoreParquetConfig(dg.Config):
    tables: list[str] = []  # empty: every table and the views radiomics, deep_features, table_1


@dg.asset(
    deps=[model_metrics, coefficients, explainability_sweep],
    code_version=EXPORT_VERSION,
    group_name=GROUP,
    kinds={"duckdb", "parquet"},
    description="The feature store as Parquet in the data lake, for machines without the DuckDB file: "
    f"`{EXPORT_FOLDER}/<table>.parquet` per table and view (rows sorted by their key columns, all from one "
    f"read of the store) and `{EXPORT_FOLDER}/{MANIFEST_NAME}` written last (row counts, sha256). Query with "
    "DuckDB's read_parquet; see docs/scaling.md.",
)
def feature_store_parquet(context: dg.AssetExecutionContext, config: FeatureStoreParquetConfig,
                          lake: LakeResource) -> dg.MaterializeResult:
    data_lake = lake.lake
    exported = export_parquet(lake.store, data_lake, tables=config.tables or None)
    rows = {name: info["rows"] for name, info in exported.items()}
    context.log.info(f"exported {len(exported)} tables ({sum(rows.values())} rows) to {data_lake.path(EXPORT_FOLDER)}")
    digest = hashlib.sha256("".join(f"{n}:{i['sha256']}" for n, i in sorted(exported.items())).encode()).hexdigest()
    return dg.MaterializeResult(
        data_version=dg.DataVersion(digest[:16]),
        metadata={
            "path": dg.MetadataValue.path(data_lake.path(EXPORT_FOLDER)),
            "manifest": dg.MetadataValue.path(data_lake.path(EXPORT_FOLDER, MANIFEST_NAME)),
            "n_tables": len(exported),
            "n_rows": sum(rows.values()),
            "rows": dg.MetadataValue.json(rows),
            "tables": markdown_table(
                [{"table": n, "kind": i["kind"], "rows": i["rows"], "bytes": i["bytes"], "sha256": i["sha256"][:12]}
                 for n, i in exported.items()], ["table", "kind", "rows", "bytes", "sha256"]),
        },
    )
