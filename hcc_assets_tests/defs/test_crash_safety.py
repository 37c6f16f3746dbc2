"""Crash safety of per-patient runs, with real Dagster runs and the real DuckDB store.

A run killed with SIGKILL while it writes must leave no half file under an output name and no
half transaction in the feature store, and its re-run must give exactly the rows and files of a
clean run. The fault is injected only in the child process that gets killed, around a call of
ours: `file_rename` stops inside fsspec's rename of nifti_volume's temp file into place (the new
file fully written under its temp name); `store_transaction` stops inside the feature-store
transaction that replaces the patient's `volumes` row (after DELETE and INSERT, before COMMIT
of the DuckLake transaction). The parent waits until the child is there, then kills it.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import dagster as dg
import nibabel as nib
import numpy as np
import polars as pl
import pytest

from hcc_assets.lake import NIFTI_FILE, PATIENTS, STALE_TEMP_SECONDS, DataLake
from hcc_assets_tests.defs.helpers import PATIENT_ASSETS, in_memory_instance, ingest_patient, make_lake, register_all

INGEST_TABLES = ("patients", "scans", "volumes")


def _run_until_killed(lake_root: str, incoming: str, patient_id: str, kill_point: str, marker: str) -> None:
    """Child process: materialize the patient's ingest assets and hang at `kill_point`."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    def hang_here() -> None:
        Path(marker).touch()
        time.sleep(600)

    if kill_point == "file_rename":
        from fsspec.implementations.local import LocalFileSystem

        rename = LocalFileSystem.mv

        def rename_or_hang(self, path1, path2, *args, **kwargs):
            if str(path2).endswith(NIFTI_FILE):
                hang_here()
            return rename(self, path1, path2, *args, **kwargs)

        LocalFileSystem.mv = rename_or_hang
    else:
        from hcc_assets.featurestore.store import FeatureStore

        refresh_views = FeatureStore._refresh_views

        def views_or_hang(table, con):
            if table == "volumes":
                hang_here()
            return refresh_views(table, con)

        FeatureStore._refresh_views = staticmethod(views_or_hang)

    from hcc_assets.defs.resources import LakeResource

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("patients", [patient_id])
    dg.materialize(
        PATIENT_ASSETS,
        partition_key=patient_id,
        instance=instance,
        resources={"lake": LakeResource(root=lake_root, incoming=incoming, quiet_seconds=3600)},
    )


def _rows(store, patient_id: str) -> dict[str, pl.DataFrame]:
    """The patient's ingest rows, without what legitimately differs between runs."""
    return {
        table: store.query(
            f"SELECT * EXCLUDE (run_id, materialized_at) FROM {table} WHERE patient_id = ? ORDER BY ALL", [patient_id]
        )
        for table in INGEST_TABLES
    }


def _same_rows(left: dict[str, pl.DataFrame], right: dict[str, pl.DataFrame]) -> bool:
    return all(left[table].equals(right[table]) for table in INGEST_TABLES)


def _files(lake_root: Path, patient_id: str) -> dict[str, bytes]:
    """The patient's files under their output names (temp files are not outputs)."""
    folder = lake_root / PATIENTS / patient_id
    return {
        path.name: path.read_bytes()
        for path in sorted(folder.iterdir())
        if path.is_file() and not path.name.startswith(".tmp-")
    }


def _assert_outputs_whole(lake_root: Path) -> None:
    """Every NIfTI under an output name loads completely."""
    volumes = sorted(path for path in lake_root.rglob("*.nii.gz") if not path.name.startswith(".tmp-"))
    assert volumes
    for path in volumes:
        assert np.isfinite(np.asarray(nib.load(path).dataobj, dtype=np.float32)).all(), path


def _assert_counts_exact(store, patient_ids: list[str], n_scans: int) -> None:
    """One patients row, n_scans scans rows and one volumes row per kind, per patient; no more."""
    counts = {
        table: dict(store.query(f"SELECT patient_id, count(*) FROM {table} GROUP BY 1").iter_rows())
        for table in INGEST_TABLES
    }
    assert counts["patients"] == dict.fromkeys(patient_ids, 1)
    assert counts["scans"] == dict.fromkeys(patient_ids, n_scans)
    assert counts["volumes"] == dict.fromkeys(patient_ids, 2)
    assert store.query("SELECT count(DISTINCT (patient_id, kind)) FROM volumes").item() == 2 * len(patient_ids)
    assert store.query("SELECT count(DISTINCT (patient_id, series_key)) FROM scans").item() == n_scans * len(
        patient_ids
    )


@pytest.mark.parametrize("kill_point", ["file_rename", "store_transaction"])
def test_a_run_killed_while_writing_leaves_whole_outputs_and_its_rerun_is_exact(incoming_copy, tmp_path, kill_point):
    incoming, _ = incoming_copy
    lake = make_lake(tmp_path, incoming)
    lake_root = Path(lake.root)
    store = lake.store
    with dg.instance_for_test() as instance:
        pid = register_all(instance, lake)[0]
        first = ingest_patient(instance, lake, pid)
        clean_rows, clean_files = _rows(store, pid), _files(lake_root, pid)
        n_scans = clean_rows["scans"].height

        marker = tmp_path / "kill_point_reached"
        child = multiprocessing.get_context("spawn").Process(
            target=_run_until_killed, args=(lake.root, str(incoming), pid, kill_point, str(marker))
        )
        child.start()
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert child.is_alive(), f"the run ended (exit {child.exitcode}) before reaching {kill_point}"
            assert time.monotonic() < deadline, f"the run did not reach {kill_point}"
            time.sleep(0.05)
        temps = sorted((lake_root / PATIENTS / pid).glob(".tmp-*"))
        os.kill(child.pid, signal.SIGKILL)
        child.join(60)
        assert child.exitcode == -signal.SIGKILL

        # what the crash left: the new volume fully written under a temp name, never under its own
        # (file_rename); an uncommitted DuckLake transaction: its Parquet file may exist, but no
        # snapshot refers to it, so no reader sees its rows (store_transaction)
        assert [t.name.endswith(NIFTI_FILE) for t in temps] == ([True] if kill_point == "file_rename" else [])
        _assert_outputs_whole(lake_root)
        assert _same_rows(_rows(store, pid), clean_rows)
        assert _files(lake_root, pid) == clean_files
        _assert_counts_exact(store, [pid], n_scans)

        # a temp file this young may be a write in progress; make it as old as a crash noticed later
        aged = time.time() - 2 * STALE_TEMP_SECONDS
        for temp in temps:
            os.utime(temp, (aged, aged))
        again = ingest_patient(instance, lake, pid)

    assert again.success
    assert sorted(p.name for p in lake_root.rglob(".tmp-*")) == []
    _assert_outputs_whole(lake_root)
    _assert_counts_exact(store, [pid], n_scans)
    assert _same_rows(_rows(store, pid), clean_rows)
    assert _files(lake_root, pid) == clean_files
    assert store.query("SELECT DISTINCT run_id FROM volumes").item() == again.run_id
    for asset in ("raw_scan", "nifti_volume", "preprocessed_volume"):
        assert (
            again.asset_materializations_for_node(asset)[0].tags["dagster/data_version"]
            == first.asset_materializations_for_node(asset)[0].tags["dagster/data_version"]
        ), asset


def test_rematerializing_a_partition_twice_gives_identical_rows_and_files(incoming_copy, tmp_path):
    incoming, _ = incoming_copy
    lake = make_lake(tmp_path, incoming)
    lake_root, store = Path(lake.root), lake.store
    with in_memory_instance() as instance:
        pid, bystander = register_all(instance, lake)[:2]
        for patient in (pid, bystander):
            assert ingest_patient(instance, lake, patient).success
        rows = {patient: _rows(store, patient) for patient in (pid, bystander)}
        files = _files(lake_root, pid)
        bystander_runs = store.query("SELECT DISTINCT run_id FROM scans WHERE patient_id = ?", [bystander]).rows()
        for _ in range(2):
            again = ingest_patient(instance, lake, pid)
            assert again.success
            assert _same_rows(_rows(store, pid), rows[pid])
            assert _files(lake_root, pid) == files
            assert store.query("SELECT DISTINCT run_id FROM scans WHERE patient_id = ?", [pid]).item() == again.run_id
    assert _same_rows(_rows(store, bystander), rows[bystander])
    assert store.query("SELECT DISTINCT run_id FROM scans WHERE patient_id = ?", [bystander]).rows() == bystander_runs
    _assert_counts_exact(store, sorted([pid, bystander]), rows[pid]["scans"].height)


def test_stale_temp_files_are_removed_and_a_write_in_progress_is_kept(tmp_path):
    lake = DataLake(tmp_path / "lake")
    lake.write_bytes(lake.patient_file("pt-x", "a.json"), b"{}")
    folder = tmp_path / "lake" / PATIENTS / "pt-x"
    stale = folder / f".tmp-{'a' * 32}-nifti_volume.nii.gz"
    in_progress = folder / f".tmp-{'b' * 32}-nifti_volume.nii.gz"
    not_ours = folder / ".tmp-model-1234"  # a staging folder of another writer
    for path in (stale, in_progress):
        path.write_bytes(b"half")
    not_ours.mkdir()
    aged = time.time() - 2 * STALE_TEMP_SECONDS
    os.utime(stale, (aged, aged))
    os.utime(not_ours, (aged, aged))

    lake.write_bytes(lake.patient_file("pt-x", "b.json"), b"[]")
    assert sorted(p.name for p in folder.iterdir()) == sorted([in_progress.name, not_ours.name, "a.json", "b.json"])
