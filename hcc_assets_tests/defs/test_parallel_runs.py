"""Four patients materialized at once, each in its own run process, all writing the same DuckLake
feature store, twice in a row (the second round, in the same four worker processes, replaces rows
while the other runs write): no run may fail (commits are serialized by the store's write lock),
and each round leaves exactly one set of rows per patient. Concurrent runs of the multiprocess
executor (every step its own process) are test_dask_executor's first half."""

import json
import os
import subprocess
import sys
import textwrap


def test_parallel_multiprocess_runs_share_the_feature_store(incoming_copy, tmp_path):
    incoming, _patients = incoming_copy
    lake_root = tmp_path / "lake"
    env = {
        **os.environ,
        "HCC_ASSETS_LAKE": str(lake_root),
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    # steps in-process: the four runs' writes overlap tightly, at a quarter of the multiprocess start-up cost
    script = textwrap.dedent(
        f"""
        import json, shutil, sys
        from pathlib import Path
        from hcc_assets.instance import ensure_dagster_home
        ensure_dagster_home({str(lake_root)!r})
        shutil.copytree({str(incoming)!r}, Path({str(lake_root)!r}) / "incoming")
        import dagster as dg
        from hcc_assets import runner
        from hcc_assets.featurestore import FeatureStore
        instance = dg.DagsterInstance.get()
        pids = runner.register_ready_patients(instance)[:4]
        store = FeatureStore(Path({str(lake_root)!r}) / "feature_store.sqlite")
        ok = True
        with runner.worker_pool(4) as pool:  # both rounds in the same 4 processes, as the CLI's stages are
            for round_ in ("first", "again"):
                results = runner.materialize_patients(pids, workers=4, executor="in_process", pool=pool)
                counts = {{table: store.query(f"SELECT count(*) FROM {{table}}").item()
                          for table in ("patients", "scans", "volumes")}}
                runs = store.query("SELECT count(DISTINCT run_id) FROM scans").item()
                print(json.dumps({{"round": round_, "results": results, "counts": counts, "runs": runs}}))
                ok = ok and all(success for _, success, _ in results)
        sys.exit(0 if ok else 1)
        """
    )
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    rounds = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [r["round"] for r in rounds] == ["first", "again"]
    for round_ in rounds:
        assert all(success and not error for _, success, error in round_["results"]), round_["results"]
        assert round_["counts"] == {"patients": 4, "scans": 12, "volumes": 8}, round_
        assert round_["runs"] == 4  # every patient's rows come from that round's run
    assert "lock" not in run.stdout.lower()
    from hcc_assets.featurestore import FeatureStore

    store = FeatureStore(lake_root / "feature_store.sqlite")
    assert store.query("SELECT count(DISTINCT patient_id) FROM volumes WHERE kind = 'preprocessed'").item() == 4
    assert store.query("SELECT count(DISTINCT (patient_id, series_key)) FROM scans").item() == 12
