"""Where the DuckLake feature store lives, and how a DuckDB connection attaches it.

A DuckLake is a catalog database plus Parquet data files. Two settings name them:

- the catalog (`HCC_ASSETS_FEATURE_STORE`): a local file path, which makes a SQLite catalog (one
  machine; the default is `<lake>/feature_store.sqlite`), or `postgres:<libpq settings>` such as
  `postgres:dbname=hcc host=db.example.org user=hcc` (many machines);
- the data path (`HCC_ASSETS_FEATURE_STORE_DATA`): a folder or object-store URL for the Parquet
  files (default `<lake>/feature_store/` beside a local SQLite catalog; required with Postgres).

DuckDB 1.4.4 is pinned because its `ducklake`, `sqlite_scanner` and `postgres_scanner`
extensions come from PyPI (duckdb-ext-*) and load from site-packages: nothing is downloaded at
run time. The SQLite catalog runs in WAL mode so that readers never block a committing writer.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

CATALOG_SETTING = "HCC_ASSETS_FEATURE_STORE"
DATA_PATH_SETTING = "HCC_ASSETS_FEATURE_STORE_DATA"
ALIAS = "fs"  # the name the store is attached under; every connection runs `USE fs`
POSTGRES_PREFIXES = ("postgres:", "postgresql:")
DUCKDB_MAGIC = b"DUCK"  # bytes 8..12 of a DuckDB database file
OBJECT_STORE_PREFIXES = ("s3://", "s3a://", "r2://", "gcs://", "gs://")


# One re-entrant lock per catalog in this process; its holder takes the OS-level lock (see
# StoreLocation.exclusive_writes). Depth counts are only touched by the thread holding the lock.
_WRITE_LOCKS: dict[str, threading.RLock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()
_WRITE_DEPTH: dict[str, int] = {}


class CatalogError(Exception):
    """The catalog cannot be reached or is not a DuckLake catalog; says which setting to fix."""


def extension_directory() -> str:
    """site-packages/duckdb_ext/extensions, where the duckdb-ext-* wheels put their binaries."""
    import duckdb_ext

    return str(Path(next(iter(duckdb_ext.__path__))) / "extensions")


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class StoreLocation:
    """The catalog and the data path of one DuckLake feature store."""

    catalog: str  # "sqlite:<absolute path>" or "postgres:<libpq settings>"
    data_path: str | None  # None: the one recorded in the catalog when it was created

    @classmethod
    def parse(cls, catalog: str | os.PathLike[str], data_path: str | os.PathLike[str] | None = None) -> StoreLocation:
        text = str(catalog).strip()
        if text.startswith("ducklake:"):
            text = text[len("ducklake:") :]
        if text.startswith(POSTGRES_PREFIXES):
            return cls("postgres:" + text.split(":", 1)[1].strip(), str(data_path) if data_path else None)
        if text.startswith("sqlite:"):
            text = text[len("sqlite:") :]
        if "://" in text and not text.startswith("file://"):
            raise CatalogError(
                f"{CATALOG_SETTING}={redact(text)!r}: the catalog is a local SQLite file path or "
                "postgres:<libpq settings>; object storage holds the data files "
                f"({DATA_PATH_SETTING}), not the catalog"
            )
        path = Path(text.removeprefix("file://")).absolute()
        data = str(data_path) if data_path else str(path.parent / (path.stem + "/"))
        return cls(f"sqlite:{path}", data)

    @property
    def is_postgres(self) -> bool:
        return self.catalog.startswith("postgres:")

    @property
    def on_object_store(self) -> bool:
        """Data files on S3 (or an S3-compatible server): DuckDB writes them through httpfs."""
        return self.data_path is not None and self.data_path.startswith(OBJECT_STORE_PREFIXES)

    @property
    def sqlite_path(self) -> Path | None:
        return None if self.is_postgres else Path(self.catalog[len("sqlite:") :])

    def describe(self) -> str:
        """The catalog without secrets, for messages."""
        return redact(self.catalog)

    @contextmanager
    def exclusive_writes(self) -> Iterator[None]:
        """Hold this catalog's write lock for the block: one write transaction at a time, across
        threads, processes and (with Postgres) machines; re-entrant within a thread.

        Why: DuckLake 1.4.4's commit-time conflict check can meet a NULL in its own statistics when
        two writers commit at once (duckdb/ducklake#1198, #1370). That is an INTERNAL error which
        invalidates the process's DuckDB, and closing a connection that still holds the transaction
        then aborts the process. Serialising the writers (the workaround the DuckLake issue gives)
        means no commit ever races another; the optimistic retry in FeatureStore.transaction stays
        for writers outside this platform. A SQLite catalog takes an flock on `<catalog>.writelock`;
        a Postgres catalog a session advisory lock keyed by the catalog.
        """
        key = self.catalog
        with _WRITE_LOCKS_GUARD:
            lock = _WRITE_LOCKS.setdefault(key, threading.RLock())
        with lock:
            depth = _WRITE_DEPTH.get(key, 0)
            _WRITE_DEPTH[key] = depth + 1
            try:
                if depth:
                    yield
                else:
                    with self._os_write_lock():
                        yield
            finally:
                _WRITE_DEPTH[key] = depth

    @contextmanager
    def _os_write_lock(self) -> Iterator[None]:
        if self.is_postgres:
            import psycopg2

            digest = hashlib.sha256(self.catalog.encode()).digest()
            lock_id = int.from_bytes(digest[:8], "big", signed=True)
            try:
                connection = psycopg2.connect(self.catalog.split(":", 1)[1])
            except psycopg2.Error as error:
                raise CatalogError(self._unreachable(error)) from None
            try:
                connection.autocommit = True
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_lock(%s)", [lock_id])
                yield  # the lock ends with the session, also if this process dies
            finally:
                connection.close()
            return
        path = self.sqlite_path
        assert path is not None
        with open(f"{path}.writelock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            yield

    def attach_sql(
        self,
        *,
        read_only: bool = False,
        snapshot_version: int | None = None,
        snapshot_time: str | None = None,
        alias: str = ALIAS,
    ) -> str:
        options = []
        if self.data_path:
            data = self.data_path if self.data_path.endswith("/") else self.data_path + "/"
            # the data path given by the settings wins over the one recorded at creation, so a lake
            # folder copied or mounted elsewhere still finds its files
            options += [f"DATA_PATH {_quote(data)}", "OVERRIDE_DATA_PATH true"]
        if read_only or snapshot_version is not None or snapshot_time is not None:
            options.append("READ_ONLY")
        if snapshot_version is not None:
            options.append(f"SNAPSHOT_VERSION {int(snapshot_version)}")
        if snapshot_time is not None:
            options.append(f"SNAPSHOT_TIME {_quote(snapshot_time)}")
        return f"ATTACH {_quote('ducklake:' + self.catalog)} AS {alias} ({', '.join(options)})"

    def prepare(self) -> None:
        """Make a local catalog's folders, refuse an old single-file DuckDB store in its place, and
        keep an existing SQLite catalog in WAL mode (a persistent setting of the file)."""
        path = self.sqlite_path
        if path is None:
            return
        if path.exists() and _is_duckdb_file(path):
            raise CatalogError(
                f"{path.name} is a single-file DuckDB feature store, not a DuckLake catalog; "
                f"migrate it with `hcc-assets migrate-store --from {path.name}`"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.data_path and "://" not in self.data_path:
            Path(self.data_path).mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size:
            set_wal_mode(path)

    def connect(
        self,
        *,
        read_only: bool = False,
        snapshot_version: int | None = None,
        snapshot_time: str | None = None,
        alias: str | None = None,
    ) -> duckdb.DuckDBPyConnection:
        """A connection with the store attached and in use (`USE <alias>`).

        Without `alias`: a cursor on this process's shared DuckDB instance, where the store is
        attached once (loading the extensions costs 0.15 s, attaching 0.01 s). With `alias`: a new
        DuckDB instance of its own (the `sql` command: the store is attached READ_ONLY as `fs`)."""
        if alias is None:
            return _engine().cursor(self, read_only, snapshot_version, snapshot_time)
        con = _new_database()
        try:
            _load_for(con, self)
            self._attach(con, alias, read_only, snapshot_version, snapshot_time)
            con.execute(f"USE {alias}")
        except BaseException:
            con.close()
            raise
        return con

    def _attach(
        self,
        con: duckdb.DuckDBPyConnection,
        alias: str,
        read_only: bool,
        snapshot_version: int | None,
        snapshot_time: str | None,
    ) -> None:
        self.prepare()  # once per attachment, not per connection: it opens the catalog file
        path = self.sqlite_path  # None for a Postgres catalog
        created = path is not None and not (path.exists() and path.stat().st_size)
        try:
            con.execute(
                self.attach_sql(
                    read_only=read_only, snapshot_version=snapshot_version, snapshot_time=snapshot_time, alias=alias
                )
            )
        except duckdb.Error as error:
            raise CatalogError(self._unreachable(error)) from None
        if created and path is not None:
            set_wal_mode(path)

    def _unreachable(self, error: Exception) -> str:
        lines = [line.strip() for line in str(error).splitlines() if line.strip() and line.strip() != "^"]
        detail = redact(" ".join(lines)[:600] if lines else type(error).__name__)
        return (
            f"feature store catalog {self.describe()} cannot be opened (setting {CATALOG_SETTING}"
            f"{'' if self.data_path is None else f', data path {DATA_PATH_SETTING}={redact(self.data_path)}'}): "
            f"{detail}"
        )


def redact(text: str) -> str:
    """`text` with any password=... value hidden."""
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", text, flags=re.IGNORECASE)


def set_wal_mode(path: Path) -> None:
    """WAL journal for a SQLite catalog: readers keep reading while a writer commits. Only for
    local disks (WAL needs shared memory between the processes); past one machine use Postgres."""
    con = sqlite3.connect(str(path), timeout=30)
    try:
        if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            con.execute("PRAGMA journal_mode=WAL")
    except sqlite3.OperationalError:
        pass  # another process holds it right now; the next connection sets it
    finally:
        con.close()


def _is_duckdb_file(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(12)[8:12] == DUCKDB_MAGIC
    except OSError:
        return False


def _new_database() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the DuckLake extensions loaded from site-packages (never downloaded).

    `allow_unsigned_extensions`: DuckDB's signature check hashes each 50 MB extension file on every
    LOAD, 0.27 s per new database for DuckLake and SQLite (measured), which every store opened
    paid. It adds nothing here: the only extensions loaded are the duckdb-ext-* wheels in this
    environment's site-packages, installed sha256-checked from requirements.lock like DuckDB's own
    native library, which nothing signs at load time either; nothing is ever installed or
    autoloaded (both switched off)."""
    con = duckdb.connect(
        config={
            "extension_directory": extension_directory(),
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "allow_unsigned_extensions": True,
        }
    )
    con.execute("SET enable_progress_bar = false")
    con.execute("LOAD ducklake")
    con.execute("LOAD sqlite_scanner")
    return con


def _load_for(con: duckdb.DuckDBPyConnection, location: StoreLocation) -> None:
    """What `location` needs beyond DuckLake and SQLite: the Postgres scanner for a Postgres catalog,
    httpfs and an S3 secret for data files on object storage (LOAD is a no-op when loaded)."""
    if location.is_postgres:
        con.execute("LOAD postgres_scanner")
    if location.on_object_store:
        con.execute("LOAD httpfs")
        secret = s3_secret_sql()
        if secret:
            con.execute(secret)


def s3_secret_sql() -> str | None:
    """A DuckDB S3 secret from the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_SESSION_TOKEN, AWS_REGION or AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL for an S3-compatible
    server); None without a key (DuckDB then tries anonymous access)."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        return None
    options = [
        f"KEY_ID {_quote(key)}",
        f"SECRET {_quote(secret)}",
        f"REGION {_quote(os.environ.get('AWS_REGION') or os.environ.get('AWS_DEFAULT_REGION') or 'us-east-1')}",
    ]
    if os.environ.get("AWS_SESSION_TOKEN"):
        options.append(f"SESSION_TOKEN {_quote(os.environ['AWS_SESSION_TOKEN'])}")
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "").strip()
    if endpoint:
        scheme, _, host = endpoint.rstrip("/").rpartition("://")
        options += [
            f"ENDPOINT {_quote(host)}",
            "URL_STYLE 'path'",
            f"USE_SSL {'false' if scheme == 'http' else 'true'}",
        ]
    return f"CREATE OR REPLACE SECRET hcc_assets_s3 (TYPE s3, {', '.join(options)})"


class _Engine:
    """This process's DuckDB instance: extensions loaded once, the store in use attached once per
    mode (read-write, read-only, each past snapshot) under an alias of its own (`fs_<digest>`),
    the least recently used detached beyond MAX_ATTACHED."""

    MAX_ATTACHED = 8

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.database = _new_database()
        self.attached: OrderedDict[str, tuple[StoreLocation, tuple | None]] = OrderedDict()
        self.lock = threading.Lock()

    def cursor(
        self, location: StoreLocation, read_only: bool, snapshot_version: int | None, snapshot_time: str | None
    ) -> duckdb.DuckDBPyConnection:
        key = repr((location, read_only, snapshot_version, snapshot_time))
        alias = "fs_" + hashlib.sha1(key.encode()).hexdigest()[:12]
        with self.lock:
            if alias in self.attached and self.attached[alias][1] != catalog_identity(location):
                self._detach(alias)  # its catalog file was removed or replaced since it was attached
            if alias not in self.attached:
                self._detach_others(location)
                _load_for(self.database, location)
                location._attach(self.database, alias, read_only, snapshot_version, snapshot_time)
                self.attached[alias] = (location, catalog_identity(location))
                while len(self.attached) > self.MAX_ATTACHED:
                    self._detach(next(iter(self.attached)))
            self.attached.move_to_end(alias)
            cursor = self.database.cursor()
        cursor.execute(f"USE {alias}")
        return cursor

    def _detach(self, alias: str) -> None:
        self.attached.pop(alias, None)
        try:
            self.database.execute(f"DETACH {alias}")
        except duckdb.Error:
            pass  # still in use by an open transaction: it goes with the process

    def _detach_others(self, location: StoreLocation) -> None:
        """Detach every other store (and this one's stale attachments): DuckDB's catalog functions
        visit every attached database, so one whose file is gone or whose server is down would
        fail the statements of all the others. A process works with one store at a time."""
        for alias, (attached, identity) in list(self.attached.items()):
            if attached != location or catalog_identity(attached) != identity:
                self._detach(alias)


def catalog_identity(location: StoreLocation) -> tuple | None:
    """(device, inode) of a SQLite catalog file, None when absent or for Postgres."""
    path = location.sqlite_path
    if path is None:
        return None
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino)


_ENGINE: _Engine | None = None
_ENGINE_LOCK = threading.Lock()


def _engine() -> _Engine:
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None or _ENGINE.pid != os.getpid():  # a forked child needs a DuckDB of its own
            _ENGINE = _Engine()
        return _ENGINE


def reset_engine() -> None:
    """Drop this process's DuckDB instance: after an INTERNAL error DuckDB refuses every further
    statement on it, so the next connection starts a new one."""
    global _ENGINE
    with _ENGINE_LOCK:
        engine, _ENGINE = _ENGINE, None
    if engine is not None:
        try:
            engine.database.close()
        except duckdb.Error:
            pass


def current_alias(con: duckdb.DuckDBPyConnection) -> str:
    """The alias a connection from StoreLocation.connect has in use."""
    return fetch_value(con, "SELECT current_database()")


def fetch_value(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> Any:
    """The first value of the first row of a query that always returns a row (an aggregate, a setting)."""
    row = con.execute(sql, params).fetchone()
    if row is None:
        raise RuntimeError(f"no row from {sql!r}")
    return row[0]
