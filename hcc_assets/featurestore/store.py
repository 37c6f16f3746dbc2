"""The feature store: a DuckLake (catalog + Parquet data files) that many processes write at once.

Every write is one DuckLake transaction: delete the partition's rows, insert the new ones, refresh
what derives from them. The platform's writers take the catalog's write lock for each transaction
(StoreLocation.exclusive_writes; why: a DuckLake 1.4.4 commit race), so commits never overlap and a
write's DELETE always sees the previous writer's committed rows, first writes of a partition
included: never two sets of rows for a partition. A transaction that still collides with another
writer's commit (a writer outside the platform: DuckLake's "Transaction conflict", or SQLite's
"database is locked") is run again from a fresh connection, with a bounded, jittered back-off, and
fails with a FeatureStoreError after that. No per-partition bookkeeping rows are needed to make
two first writes conflict: the lock already orders them (docs/feature_store.md).

Nothing is forgotten: every commit is a snapshot. `at(snapshot=...)` or `at(time=...)` gives a
read-only store as it was then (DuckLake time travel), and each registered model records the
snapshot it was trained on (`models.data_snapshot`).
"""

from __future__ import annotations

import datetime as dt
import os
import random
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TypeVar

import duckdb
import polars as pl
import pyarrow as pa

from hcc_assets.featurestore.catalog import (
    CatalogError,
    StoreLocation,
    catalog_identity,
    current_alias,
    fetch_value,
    reset_engine,
)
from hcc_assets.featurestore.schema import (
    DERIVED_REFRESHERS,
    DERIVED_TABLES,
    HISTORY_KEYS,
    PATIENT_HISTORY_KEYS,
    TABLE_OPTIONS,
    TABLES,
    VIEW_BUILDERS,
    add_column_statements,
    create_statements,
    static_view_statements,
)

ALL_TABLES = (*TABLES, *DERIVED_TABLES)
LEGACY_FILE = "feature_store.duckdb"  # the single-file store of earlier versions
T = TypeVar("T")

# Messages of errors that mean "another transaction committed first: run yours again".
RETRYABLE = (
    "conflict",
    "database is locked",
    "database table is locked",
    "could not serialize",
    "deadlock detected",
    "busy",
)


class FeatureStoreError(Exception):
    pass


def _retryable(error: Exception) -> bool:
    text = str(error).lower()
    return _internal(error) or any(marker in text for marker in RETRYABLE)


def _view_body(sql: str) -> str:
    """A stored view's query without its `CREATE VIEW <name> AS` head."""
    head, _, body = sql.partition(" AS ")
    return body.strip().rstrip(";") if head.startswith("CREATE") else ""


def _internal(error: Exception) -> bool:
    """DuckDB's INTERNAL errors: DuckLake 0.3 raises one now and then when two transactions
    first write to an empty table at once; the instance is unusable afterwards, the retry is not."""
    return isinstance(error, duckdb.InternalException) or str(error).startswith("INTERNAL Error")


class FeatureStore:
    """The DuckLake feature store named by a catalog (SQLite file path or `postgres:...`) and a
    data path (defaults beside a SQLite catalog). `snapshot`/`snapshot_time` make a read-only view
    of the store as it was at that snapshot or time."""

    _ready: set[str] = set()  # catalogs (and, for SQLite, which file) whose schema this process has checked

    def __init__(
        self,
        catalog: str | os.PathLike[str],
        data_path: str | os.PathLike[str] | None = None,
        *,
        snapshot: int | None = None,
        snapshot_time: str | None = None,
        write_timeout_s: float = 120.0,
        max_attempts: int = 200,
    ):
        try:
            self.location = StoreLocation.parse(catalog, data_path)
        except CatalogError as error:
            raise FeatureStoreError(str(error)) from None
        self.snapshot = snapshot
        self.snapshot_time = snapshot_time
        self.write_timeout_s = write_timeout_s
        self.max_attempts = max_attempts
        self.retries = 0  # write attempts run again after a conflict (for benchmarks and tests)
        self.refuse_legacy = True  # refuse to start a new catalog beside an unmigrated feature_store.duckdb

    def __repr__(self) -> str:
        at = (
            f" @{self.snapshot}"
            if self.snapshot is not None
            else f" @{self.snapshot_time}"
            if self.snapshot_time
            else ""
        )
        return f"FeatureStore({self.location.describe()}{at})"

    @property
    def pinned(self) -> bool:
        return self.snapshot is not None or self.snapshot_time is not None

    def at(self, snapshot: int | None = None, time: str | dt.datetime | None = None) -> FeatureStore:
        """This store as it was at `snapshot` (an id) or `time` (the last snapshot at or before
        it): read-only."""
        if (snapshot is None) == (time is None):
            raise FeatureStoreError("give exactly one of snapshot or time")
        if isinstance(time, dt.datetime):
            time = (time if time.tzinfo else time.replace(tzinfo=dt.UTC)).isoformat()
        return FeatureStore(
            self.location.catalog,
            self.location.data_path,
            snapshot=snapshot,
            snapshot_time=time,
            write_timeout_s=self.write_timeout_s,
            max_attempts=self.max_attempts,
        )

    # -- connections -------------------------------------------------------------------
    def _connect(self, read_only: bool, alias: str | None = None) -> duckdb.DuckDBPyConnection:
        try:
            return self.location.connect(
                read_only=read_only, snapshot_version=self.snapshot, snapshot_time=self.snapshot_time, alias=alias
            )
        except CatalogError as error:
            raise FeatureStoreError(str(error)) from None
        except duckdb.Error as error:
            raise FeatureStoreError(f"feature store {self.location.describe()}: {error}") from None

    @contextmanager
    def _exclusive_writes(self) -> Iterator[None]:
        with ExitStack() as stack:
            try:
                stack.enter_context(self.location.exclusive_writes())
            except CatalogError as error:
                raise FeatureStoreError(str(error)) from None
            yield

    def ensure_schema(self) -> None:
        """Create the catalog (atomically, for SQLite) and every table and view, once per process."""
        if repr((self.location, catalog_identity(self.location))) in FeatureStore._ready:
            return
        sqlite_path = self.location.sqlite_path
        if sqlite_path is not None and not (sqlite_path.exists() and sqlite_path.stat().st_size):
            self._create_sqlite_catalog(sqlite_path)
        for attempt in range(1, 21):
            try:
                if self.transaction(self._create_missing, what="create the schema"):
                    self.transaction(self._set_table_options, what="set table options")
                break
            except FeatureStoreError as error:
                # processes that start together on a new Postgres catalog race to create DuckLake's
                # own tables: the losers see them exist and try again
                if attempt == 20 or not any(m in str(error).lower() for m in ("already exists", "duplicate key")):
                    raise
                time.sleep(0.1 * attempt * (0.5 + random.random()))
        FeatureStore._ready.add(repr((self.location, catalog_identity(self.location))))

    def _create_sqlite_catalog(self, path: Path) -> None:
        """Build a new SQLite catalog under a temporary name and link it into place, so processes
        that start together on an empty lake never see (or race on) a half-made catalog."""
        legacy = path.with_name(LEGACY_FILE)
        if self.refuse_legacy and legacy.is_file():
            raise FeatureStoreError(
                f"found {LEGACY_FILE}, a single-file feature store from before DuckLake, beside the new catalog "
                f"{path.name}: migrate it with `hcc-assets migrate-store --from {legacy}` (or move it away to "
                "start an empty store)"
            )
        temp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
        building = StoreLocation(f"sqlite:{temp}", self.location.data_path)
        try:
            con = building.connect(alias="building")
            try:
                con.execute("BEGIN TRANSACTION")
                self._create_schema(con)
                con.execute("COMMIT")
                self._set_table_options(con)
            finally:
                con.close()
            try:
                os.link(temp, path)  # fails if another process linked its catalog first: use that one
            except FileExistsError:
                pass
        finally:
            for leftover in (temp, Path(f"{temp}-wal"), Path(f"{temp}-shm"), Path(f"{temp}-journal")):
                leftover.unlink(missing_ok=True)

    @staticmethod
    def _create_missing(con: duckdb.DuckDBPyConnection) -> bool:
        """Create missing tables and views (True when it did) and add the columns that tables made
        by an older version lack."""
        created = bool(set(ALL_TABLES) - FeatureStore._tables_in(con))
        if created:
            FeatureStore._create_schema(con)
        FeatureStore._add_missing_columns(con)
        return created

    @staticmethod
    def _add_missing_columns(con: duckdb.DuckDBPyConnection) -> None:
        existing: dict[str, set[str]] = {}
        for table, column in con.execute(
            "SELECT table_name, column_name FROM duckdb_columns() WHERE database_name = ?", [current_alias(con)]
        ).fetchall():
            existing.setdefault(table, set()).add(column)
        for table in ALL_TABLES:
            for statement in add_column_statements(table, existing.get(table, set())):
                con.execute(statement)

    @staticmethod
    def _set_table_options(con: duckdb.DuckDBPyConnection) -> None:
        """DuckLake options per table; set after the tables' own commit (DuckLake refuses options
        on a table created in the same transaction)."""
        for table, option, value in TABLE_OPTIONS:
            con.execute(
                f"CALL ducklake_set_option('{current_alias(con)}', '{option}', '{value}', table_name => '{table}')"
            )

    @staticmethod
    def _create_schema(con: duckdb.DuckDBPyConnection) -> None:
        for statement in create_statements():
            con.execute(statement)
        existing = FeatureStore._views_in(con)
        for name, statement in static_view_statements():
            if name not in existing:
                con.execute(statement)
            else:  # a store made by an older version (this runs when it lacks a table): bring it up to date
                FeatureStore._replace_view_if_changed(con, existing, name, statement.split(" AS ", 1)[1])
        for table in VIEW_BUILDERS:
            FeatureStore._refresh_views(table, con)

    @staticmethod
    def _tables_in(con: duckdb.DuckDBPyConnection) -> set[str]:
        return {
            row[0]
            for row in con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = ?", [current_alias(con)]
            ).fetchall()
        }

    @staticmethod
    def _views_in(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
        return {
            row[0]: row[1]
            for row in con.execute(
                "SELECT view_name, sql FROM duckdb_views() WHERE database_name = ? AND NOT internal",
                [current_alias(con)],
            ).fetchall()
        }

    @contextmanager
    def reader(self, alias: str | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection (at the pinned snapshot, if any). Writers are never blocked.
        `alias`: a DuckDB instance of its own with the store attached under that name (the `sql`
        command's `fs`, so that `ducklake_snapshots('fs')` works there as documented)."""
        if not self.pinned:
            self.ensure_schema()
        con = self._connect(read_only=True, alias=alias)
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def writer(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One write transaction, committed when the block ends; not retried (use `transaction`
        for writes that may meet other writers)."""
        self._check_writable()
        self.ensure_schema()
        with self._exclusive_writes():
            con = self._connect(read_only=False)
            try:
                con.execute("BEGIN TRANSACTION")
                yield con
                con.execute("COMMIT")
            finally:
                con.close()

    def transaction(self, body: Callable[[duckdb.DuckDBPyConnection], T], what: str = "write") -> T:
        """Run `body(con)` in one transaction and commit; on a conflict with another writer run it
        again on a fresh connection (jittered back-off, bounded by max_attempts and write_timeout_s)."""
        self._check_writable()
        deadline = time.monotonic() + self.write_timeout_s
        attempt = 0
        while True:
            attempt += 1
            with self._exclusive_writes():  # one writer at a time: see StoreLocation.exclusive_writes
                con = self._connect(read_only=False)
                try:
                    con.execute("BEGIN TRANSACTION")
                    result = body(con)
                    con.execute("COMMIT")
                    return result
                except duckdb.Error as error:
                    failure = error
                    try:
                        con.execute("ROLLBACK")
                    except duckdb.Error:
                        pass
                    if _internal(error):
                        con.close()
                        reset_engine()
                finally:
                    con.close()
            if not _retryable(failure):
                raise FeatureStoreError(
                    f"feature store {self.location.describe()}: {what} failed: {str(failure).splitlines()[0]}"
                ) from None
            if attempt >= self.max_attempts or time.monotonic() > deadline:
                raise FeatureStoreError(
                    f"feature store {self.location.describe()}: {what} still conflicted with other writers "
                    f"after {attempt} attempts in {self.write_timeout_s:.0f} s; last: {str(failure).splitlines()[0]}"
                ) from None
            self.retries += 1
            time.sleep(min(1.0, 0.01 * 1.5 ** min(attempt, 12)) * (0.5 + random.random()))

    def _check_writable(self) -> None:
        if self.pinned:
            raise FeatureStoreError(f"{self!r} is a read-only view of a past snapshot")

    # -- writes ------------------------------------------------------------------------
    @staticmethod
    def with_provenance(rows: pl.DataFrame, *, version: str | None, run_id: str) -> pl.DataFrame:
        """Add version, run_id and materialized_at; version None keeps the rows' own `version`
        column (tables whose rows belong to different model versions)."""
        now = dt.datetime.now(dt.UTC)
        if version is None and "version" not in rows.columns:
            raise FeatureStoreError("rows without a version column need a version")
        return rows.with_columns(
            *([] if version is None else [pl.lit(version).alias("version")]),
            pl.lit(run_id).alias("run_id"),
            pl.lit(now).alias("materialized_at"),
        )

    def replace_where(
        self,
        table: str,
        match: dict[str, object],
        rows: pl.DataFrame,
        also_delete: dict[str, dict[str, object]] | None = None,
    ) -> int:
        """Delete the rows of `table` equal to `match` (all rows when empty) and insert `rows`,
        in one transaction. Every write in the store goes through here, replace_partitions or
        replace_versions. `also_delete`: rows of other tables (table -> match) deleted in the same
        transaction, e.g. an exclusion that the new rows make obsolete."""
        self._check_table(table)
        where, params = self._where(match)
        deletes = []
        for other, other_match in (also_delete or {}).items():
            self._check_table(other)
            deletes.append((other, *self._where(other_match)))
        patients = None
        if "patient_id" in match:  # derived rows to refresh: the matched patient and those written
            written = rows["patient_id"].unique().to_list() if "patient_id" in rows.columns else []
            patients = {match["patient_id"], *written}
        return self._replace(table, where, params, rows, patients, deletes)

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
        patients = rows["patient_id"].cast(pl.String).unique().sort().to_list()
        return self._replace(
            table, f"{where} AND patient_id IN (SELECT patient_id FROM written_patients)", params, rows, patients
        )

    def replace_versions(self, table: str, rows: pl.DataFrame) -> int:
        """Replace the rows of the (key, version) pairs in `rows` and keep every other version: the
        history tables (predictions, training_history, model_metrics, coefficients) hold every
        model version, so two retrains can be compared in one query."""
        self._check_table(table)
        keys = HISTORY_KEYS[table]
        pairs = rows.select(keys).unique().sort(keys)
        where = " OR ".join("(" + " AND ".join(f"{k} = ?" for k in keys) + ")" for _ in range(pairs.height)) or "FALSE"
        params = [value for row in pairs.iter_rows() for value in row]
        return self._replace(table, where, params, rows, None)

    def replace_patient_versions(self, table: str, patient_id: str, rows: pl.DataFrame) -> int:
        """Replace the patient's rows with the key values in `rows` (PATIENT_HISTORY_KEYS; NULL
        matches NULL) and keep its rows of every other key: e.g. a patient's prediction by a new
        model version goes beside the one by the previous version."""
        self._check_table(table)
        if rows.height == 0 or set(rows["patient_id"].unique().to_list()) != {patient_id}:
            raise FeatureStoreError(f"rows for {table} must be given and all belong to patient {patient_id}")
        keys = PATIENT_HISTORY_KEYS[table]
        pairs = rows.select(keys).unique().sort(keys, nulls_last=True)
        match = " OR ".join(
            "(" + " AND ".join(f"{k} IS NOT DISTINCT FROM ?" for k in keys) + ")" for _ in range(pairs.height)
        )
        params = [patient_id] + [value for row in pairs.iter_rows() for value in row]
        return self._replace(table, f"patient_id = ? AND ({match})", params, rows, {patient_id})

    def _replace(
        self,
        table: str,
        where: str,
        params: list,
        rows: pl.DataFrame,
        patients: Collection[str] | None,
        deletes: Collection[tuple[str, str, list]] = (),
    ) -> int:
        """Delete `where`, insert `rows`, refresh what derives from `table` for `patients` (None:
        all), rebuild its views, and run `deletes` ((table, where, params) of tables without derived
        tables or views); one transaction, retried on conflict."""
        self.ensure_schema()
        incoming = rows.to_arrow() if rows.height else None
        written = pa.table({"patient_id": pa.array(sorted(patients), pa.string())}) if patients is not None else None

        def body(con: duckdb.DuckDBPyConnection) -> int:
            if written is not None:
                con.register("written_patients", written)
            con.execute(f"DELETE FROM {table} WHERE {where}", params)
            if incoming is not None:
                con.register("incoming_rows", incoming)
                con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming_rows")
            scope = "TRUE" if written is None else "patient_id IN (SELECT patient_id FROM written_patients)"
            for refresh in DERIVED_REFRESHERS.get(table, ()):
                refresh(con, scope)
            self._refresh_views(table, con)
            for other, other_where, other_params in deletes:
                con.execute(f"DELETE FROM {other} WHERE {other_where}", other_params)
            return rows.height

        return self.transaction(body, what=f"write {table}")

    def register_model(self, row: pl.DataFrame, data_snapshot: int | None = None, current: bool = True) -> int:
        """Register one model version (a `models` row with provenance) as the current one of its
        name, recording `data_snapshot`, the snapshot its training data was read at (default: the
        store's snapshot now). Older versions stay, with current = false; registering a version
        again replaces its row. `current=False` records a refused version (e.g. a failed quality
        gate) for the audit trail and leaves the current one as it was. Returns the snapshot recorded."""
        if row.height != 1:
            raise FeatureStoreError("register_model takes exactly one row")
        name, version = row["model_name"][0], row["version"][0]
        snapshot = self.current_snapshot() if data_snapshot is None else int(data_snapshot)
        incoming = row.with_columns(
            pl.lit(current).alias("current"), pl.lit(snapshot, dtype=pl.Int64).alias("data_snapshot")
        ).to_arrow()
        self.ensure_schema()

        def body(con: duckdb.DuckDBPyConnection) -> None:
            if current:
                con.execute("UPDATE models SET current = false WHERE model_name = ? AND current", [name])
            con.execute("DELETE FROM models WHERE model_name = ? AND version = ?", [name, version])
            con.register("incoming_rows", incoming)
            con.execute("INSERT INTO models BY NAME SELECT * FROM incoming_rows")

        self.transaction(body, what=f"register {name} {version}")
        return snapshot

    def delete_partition(self, table: str, patient_id: str, match: dict[str, object] | None = None) -> None:
        self.replace_where(table, {"patient_id": patient_id, **(match or {})}, pl.DataFrame())

    def replace_partition(
        self,
        table: str,
        patient_id: str,
        rows: pl.DataFrame,
        match: dict[str, object] | None = None,
        also_delete: dict[str, dict[str, object]] | None = None,
    ) -> int:
        """Replace the patient's rows in `table` (only those equal to `match`, when given), and
        delete the patient's rows of other tables that `also_delete` names (table -> match) in the
        same transaction."""
        if rows.height and set(rows["patient_id"].unique().to_list()) != {patient_id}:
            raise FeatureStoreError(f"rows for {table} must all belong to patient {patient_id}")
        others = {
            other: {"patient_id": patient_id, **other_match} for other, other_match in (also_delete or {}).items()
        }
        return self.replace_where(table, {"patient_id": patient_id, **(match or {})}, rows, others)

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
    def _refresh_views(table: str, con: duckdb.DuckDBPyConnection) -> None:
        """Rebuild the views derived from `table` whose definition follows the data (wide views
        have one column per feature), only when the definition changes: replacing a view is a
        schema change that every concurrent writer would conflict with."""
        builders = VIEW_BUILDERS.get(table, ())
        if not builders:
            return
        existing = FeatureStore._views_in(con)
        for builder in builders:
            for name, select in builder(con):
                FeatureStore._replace_view_if_changed(con, existing, name, select)

    @staticmethod
    def _replace_view_if_changed(
        con: duckdb.DuckDBPyConnection, existing: dict[str, str], name: str, select: str
    ) -> None:
        # DuckDB stores a view's SQL re-rendered: render the wanted one the same way (as a
        # temporary view) to compare like with like
        con.execute(f"CREATE OR REPLACE TEMP VIEW wanted_{name} AS {select}")
        wanted = fetch_value(
            con, "SELECT sql FROM duckdb_views() WHERE database_name = 'temp' AND view_name = ?", [f"wanted_{name}"]
        )
        con.execute(f"DROP VIEW temp.wanted_{name}")
        if _view_body(existing.get(name, "")) != _view_body(wanted):
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {select}")

    # -- reads -------------------------------------------------------------------------
    def query(self, sql: str, params: list | None = None, alias: str | None = None) -> pl.DataFrame:
        """Run a read-only query; the connection cannot modify the store."""
        with self.reader(alias) as con:
            return con.sql(sql, params=params).pl() if params else con.sql(sql).pl()

    def table(self, table: str) -> pl.DataFrame:
        self._check_table(table)
        return self.query(f"SELECT * FROM {table} ORDER BY patient_id")

    def current_snapshot(self) -> int:
        """The id of the store's newest snapshot (of the pinned one, for a view of the past)."""
        if self.snapshot is not None:
            return self.snapshot
        with self.reader() as con:
            alias = current_alias(con)
            if self.snapshot_time is not None:
                return int(
                    fetch_value(
                        con,
                        f"SELECT max(snapshot_id) FROM ducklake_snapshots('{alias}') "
                        "WHERE snapshot_time <= ?::TIMESTAMPTZ",
                        [self.snapshot_time],
                    )
                )
            return int(fetch_value(con, f"SELECT id FROM ducklake_current_snapshot('{alias}')"))

    def snapshots(self) -> pl.DataFrame:
        """Every snapshot kept: id, time, what changed."""
        with self.reader() as con:
            return con.sql(
                f"SELECT snapshot_id, snapshot_time, changes FROM ducklake_snapshots('{current_alias(con)}') ORDER BY 1"
            ).pl()

    @staticmethod
    def _check_table(table: str) -> None:
        if table not in TABLES:
            raise FeatureStoreError(f"unknown feature-store table {table!r}; known: {sorted(TABLES)}")
