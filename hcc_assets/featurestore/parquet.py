"""The feature store as Parquet in the data lake, for machines that do not hold the DuckDB file.

    <lake root>/feature_store_parquet/<table>.parquet   one file per table or view, rows sorted
    <lake root>/feature_store_parquet/_manifest.json    written last: tables, row counts, sha256

Any DuckDB (or Arrow, Spark, polars) reads the files with `read_parquet`, locally or over s3://
with httpfs (docs/scaling.md). How a snapshot is taken:

1. Under the store's shared lock (a read connection: no writer meanwhile) the DuckDB file is
   copied to a local temporary folder; writers wait for that copy only (0.2 s for the 476 MB store
   of 100k patients x 250 features, whose whole export takes 20-25 s on 2 cores).
2. A read-only connection to the copy runs `COPY (SELECT * FROM <table> ORDER BY <keys>, <every
   other column>) TO '<local temp>' (FORMAT parquet)` for every table: all files come from the same
   state of the store, and the same store gives byte-identical files (same DuckDB version).
3. The old `_manifest.json` is removed (no manifest: an export is under way), each file is
   uploaded through the lake's fsspec filesystem to a temporary name and moved into place
   (`DataLake.put_file`), then the new manifest is written.

A reader that needs several tables from one snapshot reads the manifest, the files, then the
manifest again: same `exported_at` (and the files' sha256 as listed) means one snapshot. Exporting
only some tables (`tables=`) keeps the other tables' entries in the manifest, each with its own
`exported_at`.

No dagster here: the asset (hcc_assets/defs/export.py) and `hcc-assets export-parquet` call
`export_parquet`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import duckdb

from hcc_assets.featurestore.queries import sql_string
from hcc_assets.featurestore.schema import DERIVED_TABLES, TABLES, create_statements
from hcc_assets.featurestore.store import FeatureStore, FeatureStoreError
from hcc_assets.lake import DataLake

EXPORT_FOLDER = "feature_store_parquet"
MANIFEST_NAME = "_manifest.json"
MANIFEST_FORMAT = "hcc-assets/feature_store_parquet"
MANIFEST_VERSION = 1

# Views worth a file of their own (their SQL lives in the store, not in the files).
VIEWS = ("radiomics", "deep_features", "table_1")

# Rows are written sorted by these columns, then by every other column in table order, so a
# snapshot does not depend on the order rows were inserted in.
ORDER_KEYS: dict[str, tuple[str, ...]] = {
    "patients": ("patient_id",),
    "scans": ("patient_id", "series_key"),
    "volumes": ("patient_id", "kind"),
    "cohort_split": ("patient_id",),
    "liver_masks": ("patient_id", "model_version"),
    "radiomic_features": ("patient_id", "feature_set_version", "feature"),
    "exclusions": ("patient_id", "stage"),
    "models": ("model_name", "version"),
    "training_history": ("model_name", "version", "epoch"),
    "predictions": ("model", "patient_id", "split"),
    "deep_embeddings": ("patient_id", "model_version"),
    "explainable_correlations": ("version", "measure", "dl_feature", "handcrafted_feature"),
    "explainability_sweep": ("measure", "threshold"),
    "model_metrics": ("model", "scheme", "metric", "version"),
    "coefficients": ("model", "feature"),
    "radiomic_vectors": ("patient_id", "feature_set_version"),
    "radiomic_feature_names": ("feature_names_id",),
    "radiomics": ("patient_id", "feature_set_version"),
    "deep_features": ("patient_id", "model_version"),
    "table_1": ("scheme", "model"),
}


def exportable_tables() -> list[str]:
    """Every table of the store (base, then derived), then the views: the default export."""
    return [*TABLES, *DERIVED_TABLES, *VIEWS]


def schema_version() -> str:
    """A digest of the store's table definitions: changes whenever a column does."""
    return hashlib.sha256("\n".join(create_statements()).encode()).hexdigest()[:16]


def export_parquet(store: FeatureStore, lake: DataLake, tables: list[str] | tuple[str, ...] | None = None,
                   folder: str = EXPORT_FOLDER) -> dict[str, dict]:
    """Snapshot `tables` (default: every table and the views in VIEWS) of `store` to
    `<lake>/<folder>/<table>.parquet` and write `<folder>/_manifest.json` last.

    Returns table -> {path, file, kind, rows, sha256, bytes, order_by, columns, exported_at};
    the same entries as the manifest's `tables`."""
    explicit = tables is not None
    names = _resolve(tables)
    exported_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="hcc-parquet-") as staging:
        staged = _snapshot(store, names, Path(staging), explicit)
        old = read_manifest(lake, folder)
        manifest_path = lake.path(folder, MANIFEST_NAME)
        lake.remove(manifest_path)  # no manifest while files change: readers wait or retry
        exported: dict[str, dict] = {}
        for name, (local, rows, columns, kind) in staged.items():
            path = lake.path(folder, local.name)
            sha256 = lake.put_file(local, path)
            exported[name] = {
                "path": path, "file": local.name, "kind": kind, "rows": rows, "sha256": sha256,
                "bytes": local.stat().st_size, "order_by": list(_order_keys(name, columns)),
                "columns": [{"name": c, "type": t} for c, t in columns], "exported_at": exported_at,
            }
    # a partial export keeps the other tables' entries (their files are untouched); a full one
    # lists exactly this snapshot
    keep_old = explicit and old is not None and old.get("schema_version") == schema_version()
    entries = dict(old["tables"]) if keep_old else {}
    entries.update(exported)
    manifest = {
        "format": MANIFEST_FORMAT,
        "manifest_version": MANIFEST_VERSION,
        "schema_version": schema_version(),
        "duckdb_version": duckdb.__version__,
        "exported_at": exported_at,
        "tables": {name: entries[name] for name in sorted(entries)},
    }
    lake.write_bytes(manifest_path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return exported


def read_manifest(lake: DataLake, folder: str = EXPORT_FOLDER) -> dict | None:
    """The manifest of the last complete export, or None (never exported, or an export under way)."""
    path = lake.path(folder, MANIFEST_NAME)
    try:
        return json.loads(lake.read_bytes(path))
    except FileNotFoundError:
        return None


def _resolve(tables) -> list[str]:
    if tables is None:
        return exportable_tables()
    known = exportable_tables()
    unknown = [t for t in tables if t not in known]
    if unknown:
        raise FeatureStoreError(f"cannot export {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    if not tables:
        raise FeatureStoreError("no tables to export")
    return list(dict.fromkeys(tables))  # in the given order, once each


def _snapshot(store: FeatureStore, names: list[str], staging: Path, explicit: bool) -> dict:
    """table -> (local Parquet file, rows, [(column, type)], kind), all from one state of the store.

    The store file is copied under the store's shared lock (no writer can change it meanwhile:
    every writer closes its connection, checkpointed, before it releases its exclusive lock) and
    the Parquet files are written from the copy, so writers wait for a file copy (0.2 s for the
    476 MB store of 100k patients, from the page cache) instead of the whole export (20-25 s)."""
    copy = staging / "store" / store.path.name
    copy.parent.mkdir()
    with store.reader():  # also brings a store of an older version up to the current schema first
        shutil.copyfile(store.path, copy)
        wal = store.path.with_name(store.path.name + ".wal")
        if wal.exists():  # left by a writer that died: part of the store's state
            shutil.copyfile(wal, copy.with_name(copy.name + ".wal"))
    staged = {}
    con = duckdb.connect(str(copy), read_only=True)
    try:
        present = {row[0]: row[1] for row in con.execute(
            "SELECT table_name, 'table' FROM duckdb_tables() UNION ALL "
            "SELECT view_name, 'view' FROM duckdb_views() WHERE NOT internal").fetchall()}
        for name in names:
            if name not in present:
                if explicit:
                    raise FeatureStoreError(f"{name!r} is not in the feature store {store.path.name} yet")
                continue  # a view the store has not created yet
            columns = [(row[0], row[1]) for row in con.execute(f"DESCRIBE SELECT * FROM {_quote(name)}").fetchall()]
            order = ", ".join(_quote(c) for c in _order_keys(name, columns))
            target = staging / f"{name}.parquet"
            rows = con.execute(
                f"COPY (SELECT * FROM {_quote(name)} ORDER BY {order}) TO {sql_string(str(target))} "
                "(FORMAT parquet, COMPRESSION zstd)").fetchone()[0]
            kind = "view" if present[name] == "view" else "derived" if name in DERIVED_TABLES else "table"
            staged[name] = (target, int(rows), columns, kind)
    finally:
        con.close()
    return staged


def _order_keys(name: str, columns: list[tuple[str, str]]) -> tuple[str, ...]:
    keys = tuple(k for k in ORDER_KEYS.get(name, ()) if k in {c for c, _ in columns})
    return keys + tuple(c for c, _ in columns if c not in keys)


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
