"""Housekeeping of the DuckLake feature store: compaction, snapshot expiry, file clean-up.

Per-patient writes make one small Parquet file (plus a delete file on a rewrite) per table and
partition. Compaction (`ducklake_merge_adjacent_files`) merges them into a few large files and
keeps time travel: the merged file remembers each row's snapshot.

The retention policy (docs/feature_store.md, "Retention"): a snapshot is expired only when it is
older than `keep_days` AND no registered model (any version, current or not) points to it as its
training snapshot (`models.data_snapshot`) AND it is not the newest. Expired snapshots can no
longer be time-travelled to; files that no kept snapshot needs are then deleted once older than
`file_grace_hours` (a reader that started before the expiry may still read them).
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass

from hcc_assets.featurestore.catalog import current_alias, fetch_value
from hcc_assets.featurestore.store import FeatureStore


@dataclass(frozen=True)
class RetentionPolicy:
    keep_days: float | None = 90.0  # None: never expire a snapshot
    keep_model_snapshots: bool = True  # never expire a snapshot a registered model was trained on
    file_grace_hours: float = 1.0


@dataclass(frozen=True)
class MaintenanceReport:
    data_files_before: int
    data_files_after: int
    snapshots_before: int
    snapshots_expired: int
    files_deleted: int
    kept_for_models: list[int]
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def data_file_count(store: FeatureStore) -> int:
    """Parquet data files the current snapshot reads."""
    with store.reader() as con:
        alias = current_alias(con)
        tables = [
            row[0]
            for row in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = ?", [alias]).fetchall()
        ]
        return sum(
            int(fetch_value(con, f"SELECT count(*) FROM ducklake_list_files('{alias}', ?)", [t])) for t in tables
        )


def snapshots_to_expire(
    store: FeatureStore, policy: RetentionPolicy, now: dt.datetime | None = None
) -> tuple[list[int], list[int]]:
    """(snapshot ids the policy expires, snapshot ids kept because a model points to them)."""
    if policy.keep_days is None:
        return [], []
    now = now or dt.datetime.now(dt.UTC)
    cutoff = now - dt.timedelta(days=policy.keep_days)
    with store.reader() as con:
        alias = current_alias(con)
        old = [
            int(r[0])
            for r in con.execute(
                f"SELECT snapshot_id FROM ducklake_snapshots('{alias}') WHERE snapshot_time < ? "
                f"AND snapshot_id < (SELECT id FROM ducklake_current_snapshot('{alias}')) ORDER BY 1",
                [cutoff],
            ).fetchall()
        ]
        pinned = {
            int(r[0])
            for r in con.execute("SELECT DISTINCT data_snapshot FROM models WHERE data_snapshot IS NOT NULL").fetchall()
        }
    if not policy.keep_model_snapshots:
        pinned = set()
    return [s for s in old if s not in pinned], sorted(pinned & set(old))


def maintain(
    store: FeatureStore, policy: RetentionPolicy = RetentionPolicy(), now: dt.datetime | None = None
) -> MaintenanceReport:
    """Expire snapshots by `policy`, merge small files, delete files no kept snapshot reads."""
    started = time.perf_counter()
    before = data_file_count(store)
    n_snapshots = store.snapshots().height
    expire, kept = snapshots_to_expire(store, policy, now)

    def expire_and_merge(con) -> None:
        alias = current_alias(con)
        if expire:
            con.execute(f"CALL ducklake_expire_snapshots('{alias}', versions => ?)", [expire])
        con.execute(f"CALL ducklake_merge_adjacent_files('{alias}')")

    store.transaction(expire_and_merge, what="compact")
    grace = dt.datetime.now(dt.UTC) - dt.timedelta(hours=policy.file_grace_hours)

    def cleanup(con) -> int:
        alias = current_alias(con)
        old = con.execute(f"CALL ducklake_cleanup_old_files('{alias}', older_than => ?)", [grace]).fetchall()
        # files of transactions that never committed (a writer killed mid-write): no snapshot reads them
        orphans = con.execute(f"CALL ducklake_delete_orphaned_files('{alias}', older_than => ?)", [grace]).fetchall()
        return len(old) + len(orphans)

    deleted = store.transaction(cleanup, what="clean up old files")
    return MaintenanceReport(
        before, data_file_count(store), n_snapshots, len(expire), deleted, kept, round(time.perf_counter() - started, 3)
    )
