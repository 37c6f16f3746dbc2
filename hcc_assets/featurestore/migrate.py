"""Moving a single-file DuckDB feature store (before DuckLake) into the DuckLake store.

The old file is opened read-only; every table it shares with the current schema is copied, in
one transaction, into a DuckLake store that holds no rows yet; derived tables are rebuilt. Columns the old file lacks stay
NULL (e.g. `models.data_snapshot`: old models cannot say what they were trained on).
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from hcc_assets.featurestore.schema import DERIVED_REFRESHERS, TABLES
from hcc_assets.featurestore.store import FeatureStore, FeatureStoreError


def migrate_duckdb_file(source: Path, store: FeatureStore) -> dict[str, int]:
    """Copy the tables of the DuckDB file `source` into `store`; table -> rows copied."""
    if not source.is_file():
        raise FeatureStoreError(f"{source.name}: no such file")
    try:
        old = duckdb.connect(str(source), read_only=True)
    except duckdb.Error as error:
        raise FeatureStoreError(
            f"{source.name} cannot be opened as a DuckDB file: {str(error).splitlines()[0]}"
        ) from None
    try:
        present = {r[0] for r in old.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        frames = {}
        for table in [t for t in TABLES if t in present]:
            frames[table] = old.execute(f"SELECT * FROM {table}").fetch_arrow_table()
    finally:
        old.close()
    store.refuse_legacy = False  # `source` is usually the very file that makes a new catalog refuse
    if store.query("SELECT (SELECT count(*) FROM patients) + (SELECT count(*) FROM models) AS n").item():
        raise FeatureStoreError("the DuckLake feature store already holds rows; migrate into an empty one")

    def copy(con) -> dict[str, int]:
        counts = {}
        for table, rows in frames.items():
            con.register("old_rows", rows)
            con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM old_rows")
            con.unregister("old_rows")
            counts[table] = rows.num_rows
        for source, refreshers in DERIVED_REFRESHERS.items():  # derived tables are rebuilt, not copied
            for refresh in refreshers:
                refresh(con, "TRUE")
            FeatureStore._refresh_views(source, con)
        return counts

    return store.transaction(copy, what=f"migrate {source.name}")
