"""The DuckDB feature store.

DuckDB admits one writing process at a time, and Dagster's multiprocess executor runs
partitions in parallel processes. Every writer therefore takes an exclusive advisory lock on
`<db>.lock` around a short connection (open, delete-then-insert in one transaction, close);
readers take a shared lock. Waiting is milliseconds per write, and no run fails on DuckDB's
own file lock.

Derived tables (schema.DERIVED_TABLES) are refreshed for the written patients inside the same
transaction as the write, so a reader never sees them disagree with their source.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import duckdb
import polars as pl
import pyarrow as pa

from hcc_assets.featurestore.schema import (DERIVED_REFRESHERS, DERIVED_TABLES, TABLES, VIEW_BUILDERS,
                                           create_statements)

ALL_TABLES = (*TABLES, *DERIVED_TABLES)


class FeatureStoreError(Exception):
    pass


class FeatureStore:
    def __init__(self, path: str | os.PathLike[str], lock_timeout_s: float = 120.0):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.lock_timeout_s = lock_timeout_s

    # -- connections -------------------------------------------------------------------
    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as lock_file:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            deadline = time.monotonic() + self.lock_timeout_s
            while True:
                try:
                    fcntl.flock(lock_file, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise FeatureStoreError(
                            f"feature store busy for {self.lock_timeout_s:.0f}s: {self.path.name}"
                        ) from None
                    time.sleep(0.02)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    @contextmanager
    def writer(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._locked(exclusive=True):
            new_file = not self.path.exists()
            con = duckdb.connect(str(self.path))
            try:
                # writes run unattended (Dagster steps, bulk loads): no progress bar on their stdout.
                # Cosmetic only: DuckDB once refused it as a "global option" in a daemon-run step.
                try:
                    con.execute("SET enable_progress_bar = false")
                except duckdb.Error:
                    pass
                missing = set(ALL_TABLES) - self._tables_in(con)
                for statement in create_statements():
                    con.execute(statement)
                if new_file:  # views exist from the start, empty until their table fills
                    for table in VIEW_BUILDERS:
                        for view_sql in self._views_of(table, con):
                            con.execute(view_sql)
                elif missing & set(DERIVED_TABLES):  # a store written before these tables existed
                    self._rebuild_derived(con)
                yield con
            finally:
                con.close()

    @contextmanager
    def reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        if not self.path.exists():
            with self.writer():
                pass  # create the file and its schema so a first query sees empty tables
        for attempt in range(2):
            with self._locked(exclusive=False):
                con = duckdb.connect(str(self.path), read_only=True)
                try:
                    if attempt == 1 or not set(ALL_TABLES) - self._tables_in(con):
                        yield con
                        return
                finally:
                    con.close()
            with self.writer():
                pass  # a store from an older version: add its missing tables once, then read

    @staticmethod
    def _tables_in(con: duckdb.DuckDBPyConnection) -> set[str]:
        return {row[0] for row in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}

    def _rebuild_derived(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute("BEGIN TRANSACTION")
        for table, refreshers in DERIVED_REFRESHERS.items():
            for refresh in refreshers:
                refresh(con, "TRUE")
            for view_sql in self._views_of(table, con):
                con.execute(view_sql)
        con.execute("COMMIT")

    # -- writes ------------------------------------------------------------------------
    @staticmethod
    def with_provenance(rows: pl.DataFrame, *, version: str | None, run_id: str) -> pl.DataFrame:
        """Add version, run_id and materialized_at; version None keeps the rows' own `version`
        column (tables whose rows belong to different model versions)."""
        now = dt.datetime.now(dt.timezone.utc)
        if version is None and "version" not in rows.columns:
            raise FeatureStoreError("rows without a version column need a version")
        return rows.with_columns(
            *([] if version is None else [pl.lit(version).alias("version")]),
            pl.lit(run_id).alias("run_id"),
            pl.lit(now).alias("materialized_at"),
        )

    def replace_where(self, table: str, match: dict[str, object], rows: pl.DataFrame) -> int:
        """Delete the rows of `table` equal to `match` (all rows when empty) and insert `rows`,
        in one transaction. Every write in the store goes through here or replace_partitions."""
        self._check_table(table)
        where, params = self._where(match)
        if "patient_id" in match:  # derived rows to refresh: the matched patient and those written
            written = rows["patient_id"].unique().to_list() if "patient_id" in rows.columns else []
            patients = {match["patient_id"], *written}
        else:
            patients = None
        return self._replace(table, where, params, rows, patients)

    def replace_partitions(self, table: str, rows: pl.DataFrame, match: dict[str, object] | None = None) -> int:
        """Bulk form of replace_partition: replace the rows (only those equal to `match`, when
        given) of every patient that appears in `rows`, in one transaction. For loading many
        patients at once (backfills, benchmarks) without a transaction per patient."""
        self._check_table(table)
        if rows.height == 0:
            return 0
        if rows["patient_id"].null_count():
            raise FeatureStoreError(f"rows for {table} need a patient_id")
        where, params = self._where(match or {})
        patients = rows["patient_id"].cast(pl.String).unique().to_list()
        return self._replace(table, f"{where} AND patient_id IN (SELECT patient_id FROM written_patients)",
                             params, rows, patients)

    def _replace(self, table: str, where: str, params: list, rows: pl.DataFrame, patients: set | list | None) -> int:
        """Delete `where`, insert `rows`, refresh what derives from `table` for `patients` (None:
        all), rebuild its views; one transaction."""
        with self.writer() as con:
            con.execute("BEGIN TRANSACTION")
            if patients is not None:
                con.register("written_patients", pa.table({"patient_id": pa.array(sorted(patients), pa.string())}))
            con.execute(f"DELETE FROM {table} WHERE {where}", params)
            if rows.height:
                con.register("incoming_rows", rows.to_arrow())
                con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming_rows")
                con.unregister("incoming_rows")
            scope = "TRUE" if patients is None else "patient_id IN (SELECT patient_id FROM written_patients)"
            for refresh in DERIVED_REFRESHERS.get(table, ()):
                refresh(con, scope)
            for view_sql in self._views_of(table, con):
                con.execute(view_sql)
            con.execute("COMMIT")
            if patients is not None:
                con.unregister("written_patients")
        return rows.height

    def replace_partition(
        self, table: str, patient_id: str, rows: pl.DataFrame, match: dict[str, object] | None = None
    ) -> int:
        """Replace the patient's rows in `table` (only those equal to `match`, when given)."""
        if rows.height and set(rows["patient_id"].unique().to_list()) != {patient_id}:
            raise FeatureStoreError(f"rows for {table} must all belong to patient {patient_id}")
        return self.replace_where(table, {"patient_id": patient_id, **(match or {})}, rows)

    def register_model(self, row: pl.DataFrame) -> None:
        """Register one model version (a `models` row with provenance) as the current one of its
        name. Older versions stay, with current = false, so they remain queryable; registering a
        version again replaces its row."""
        if row.height != 1:
            raise FeatureStoreError("register_model takes exactly one row")
        name, version = row["model_name"][0], row["version"][0]
        with self.writer() as con:
            con.execute("BEGIN TRANSACTION")
            con.execute("UPDATE models SET current = false WHERE model_name = ?", [name])
            con.execute("DELETE FROM models WHERE model_name = ? AND version = ?", [name, version])
            con.register("incoming_rows", row.with_columns(pl.lit(True).alias("current")).to_arrow())
            con.execute("INSERT INTO models BY NAME SELECT * FROM incoming_rows")
            con.unregister("incoming_rows")
            con.execute("COMMIT")

    def delete_partition(self, table: str, patient_id: str, match: dict[str, object] | None = None) -> None:
        self.replace_where(table, {"patient_id": patient_id, **(match or {})}, pl.DataFrame())

    def replace_table(self, table: str, rows: pl.DataFrame) -> int:
        """Replace every row of a cohort-level table, atomically."""
        return self.replace_where(table, {}, rows)

    @staticmethod
    def _where(match: dict[str, object]) -> tuple[str, list]:
        for column in match:
            if not column.isidentifier():
                raise FeatureStoreError(f"bad column name {column!r}")
        clauses = [f"{column} = ?" for column in match] or ["TRUE"]
        return " AND ".join(clauses), list(match.values())

    @staticmethod
    def _views_of(table: str, con: duckdb.DuckDBPyConnection) -> list[str]:
        """Views derived from `table`, rebuilt in the same transaction as its rows (wide views
        have one column per feature, so their definition follows the data)."""
        return [sql for builder in VIEW_BUILDERS.get(table, ()) for sql in builder(con)]

    # -- reads -------------------------------------------------------------------------
    def query(self, sql: str, params: list | None = None) -> pl.DataFrame:
        """Run a read-only query; the connection cannot modify the store."""
        with self.reader() as con:
            return con.sql(sql, params=params).pl() if params else con.sql(sql).pl()

    def table(self, table: str) -> pl.DataFrame:
        self._check_table(table)
        return self.query(f"SELECT * FROM {table} ORDER BY patient_id")

    @staticmethod
    def _check_table(table: str) -> None:
        if table not in TABLES:
            raise FeatureStoreError(f"unknown feature-store table {table!r}; known: {sorted(TABLES)}")
