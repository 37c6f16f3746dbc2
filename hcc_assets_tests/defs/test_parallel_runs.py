"""Four patients materialized at once, each in its own run with the multiprocess executor,
all writing the same DuckDB file: none may fail on DuckDB's lock."""

import os
import subprocess
import sys
import textwrap


def test_parallel_multiprocess_runs_share_the_feature_store(incoming_copy, tmp_path):
    incoming, patients = incoming_copy
    lake_root = tmp_path / "lake"
    env = {
        **os.environ,
        "HCC_ASSETS_LAKE": str(lake_root),
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    script = textwrap.dedent(
        f"""
        import shutil, sys
        from pathlib import Path
        from hcc_assets.instance import ensure_dagster_home
        ensure_dagster_home({str(lake_root)!r})
        shutil.copytree({str(incoming)!r}, Path({str(lake_root)!r}) / "incoming")
        import dagster as dg
        from hcc_assets import runner
        instance = dg.DagsterInstance.get()
        pids = runner.register_ready_patients(instance)[:4]
        results = runner.materialize_patients(pids, workers=4, executor="multiprocess")
        for pid, ok, error in results:
            print(pid, ok, error)
        sys.exit(0 if all(ok for _, ok, _ in results) else 1)
        """
    )
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "lock" not in run.stdout.lower()
    from hcc_assets.featurestore import FeatureStore

    store = FeatureStore(lake_root / "feature_store.duckdb")
    assert store.query("SELECT count(DISTINCT patient_id) FROM volumes WHERE kind = 'preprocessed'").item() == 4
    assert store.query("SELECT count(*) FROM scans").item() == 12
