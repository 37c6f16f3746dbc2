"""The per-patient chain on a real distributed executor: dagster-dask's dask_executor on a
distributed LocalCluster (2 worker processes, 1 thread each), against the multiprocess executor
on the same patients. Feature-store rows (without run_id/materialized_at) and the bytes of every
output file must be identical, and the Dask runs' steps must have run in the cluster's workers.
"""

import hashlib
import os
import shutil
import time

import dagster as dg
import pytest

from hcc_assets.defs.resources import LakeResource
from hcc_assets.featurestore import FeatureStore
from hcc_assets.instance import ensure_dagster_home

distributed = pytest.importorskip("distributed")

TABLES = ("patients", "scans", "volumes")
N_PATIENTS = 2


def _snapshot(lake_root, store_file) -> tuple[dict, dict]:
    """(table -> rows without run_id/materialized_at, sorted; relative path -> sha256 of its bytes)."""
    store = FeatureStore(store_file)
    tables = {}
    for table in TABLES:
        frame = store.query(f"SELECT * EXCLUDE (run_id, materialized_at) FROM {table}")
        tables[table] = frame.sort(frame.columns)
    files = {
        path.relative_to(lake_root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted((lake_root / "patients").rglob("*"))
        if path.is_file()
    }
    return tables, files


def _run_ids(instance, job_name: str) -> list[str]:
    return [run.run_id for run in instance.get_runs(filters=dg.RunsFilter(job_name=job_name))]


def test_dask_executor_matches_multiprocess(small_cohort, tmp_path, monkeypatch):
    from hcc_assets import runner

    source, _ = small_cohort
    lake_root, incoming = tmp_path / "lake", tmp_path / "incoming"
    shutil.copytree(source, incoming)
    store_file = lake_root / "feature_store.sqlite"
    # what the Definitions in every spawned process (runner workers, Dask workers) read
    monkeypatch.setenv("HCC_ASSETS_LAKE", str(lake_root))
    monkeypatch.setenv("HCC_ASSETS_INCOMING", str(incoming))
    monkeypatch.delenv("HCC_ASSETS_FEATURE_STORE", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    for name, value in runner.THREAD_ENV.items():
        monkeypatch.setenv(name, value)
    ensure_dagster_home(lake_root)

    lake = LakeResource(root=str(lake_root), incoming=str(incoming), quiet_seconds=3600)
    pids = sorted(lake.ready_patients())[:N_PATIENTS]
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions("patients", pids)

    # both rounds' runs start in the same two worker processes, as the CLI's stages do (each imports
    # Dagster and the definitions once); the feature store they write is wiped in between
    with runner.worker_pool(2) as pool:
        # 1. the multiprocess executor (each step its own process), two runs at once
        started = time.perf_counter()
        results = runner.materialize_patients(pids, workers=2, executor="multiprocess", pool=pool)
        multiprocess_s = time.perf_counter() - started
        assert all(ok for _, ok, _ in results), results
        multiprocess_tables, multiprocess_files = _snapshot(lake_root, store_file)
        assert multiprocess_tables["volumes"].height == 2 * N_PATIENTS and len(multiprocess_files) >= 3 * N_PATIENTS
        first_runs = set(_run_ids(instance, "patient_ingest"))

        # 2. wipe the outputs (keep the pseudonym key), then the same runs on a Dask cluster
        shutil.rmtree(lake_root / "patients")
        for path in lake_root.glob("feature_store.sqlite*"):
            path.unlink()
        shutil.rmtree(lake_root / "feature_store")
        with (
            distributed.LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", worker_dashboard_address=None
            ) as cluster,
            distributed.Client(cluster) as client,
        ):
            worker_pids = set(client.run(os.getpid).values())
            assert len(worker_pids) == 2
            started = time.perf_counter()
            results = runner.materialize_patients(
                pids, workers=2, executor="dask", dask_address=cluster.scheduler_address, pool=pool
            )
            dask_s = time.perf_counter() - started
            assert all(ok for _, ok, _ in results), results
    dask_tables, dask_files = _snapshot(lake_root, store_file)

    # every step of both (concurrent) Dask runs ran, each in a worker of the cluster: upstream
    # dagster-dask keys tasks by job and step only, so the second run would have run nothing
    dask_runs = [run_id for run_id in _run_ids(instance, "patient_ingest") if run_id not in first_runs]
    assert len(dask_runs) == N_PATIENTS
    step_pids = {}
    for run_id in dask_runs:
        for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_SUCCESS):
            step_pids[(run_id, record.dagster_event.step_key)] = record.dagster_event.pid
    assert len(step_pids) == 3 * N_PATIENTS and set(step_pids.values()) <= worker_pids, (step_pids, worker_pids)
    print(
        f"\n{N_PATIENTS} patients: multiprocess {multiprocess_s:.1f} s, dask {dask_s:.1f} s "
        f"({len(set(step_pids.values()))} of {len(worker_pids)} workers ran steps)"
    )
    rows_run_ids = set(FeatureStore(store_file).query("SELECT DISTINCT run_id FROM volumes")["run_id"])
    assert rows_run_ids == set(dask_runs)

    assert dask_files == multiprocess_files
    for table in TABLES:
        assert dask_tables[table].equals(multiprocess_tables[table]), table
    assert sorted(dask_tables["patients"]["patient_id"]) == pids
