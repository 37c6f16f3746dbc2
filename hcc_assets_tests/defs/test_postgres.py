"""Past one machine: the feature store's DuckLake catalog and Dagster's own instance storage on a
real PostgreSQL server (started on 127.0.0.1 in a temporary folder), configured by settings only.
Four per-patient runs write at once from four worker processes; a reader on another connection
then sees every row, one set per patient, and Dagster's runs are in Postgres."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from hcc_assets.featurestore import FeatureStore
from hcc_assets.instance import TEMPLATE


def _dagster_home_on_postgres(home: Path, server) -> None:
    """The project's dagster.yaml with run, event and schedule storage on Postgres (dagster-postgres)."""
    config = yaml.safe_load(TEMPLATE.read_text())
    config["storage"] = {
        "postgres": {
            "postgres_db": {
                "hostname": "127.0.0.1",
                "port": server.port,
                "username": server.user,
                "password": "unused-trust-auth",
                "db_name": "dagster",
            }
        }
    }
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))


def test_four_workers_write_one_postgres_catalog_with_dagster_on_postgres(incoming_copy, tmp_path, postgres):
    incoming, _ = incoming_copy
    postgres.create_database("dagster")
    postgres.create_database("featurestore")
    lake_root, home, data = tmp_path / "lake", tmp_path / "dagster_home", tmp_path / "shared" / "feature_store"
    _dagster_home_on_postgres(home, postgres)
    catalog = f"postgres:{postgres.libpq('featurestore')}"
    env = {
        **os.environ,
        "HCC_ASSETS_LAKE": str(lake_root),
        "HCC_ASSETS_INCOMING": str(incoming),
        "HCC_ASSETS_FEATURE_STORE": catalog,
        "HCC_ASSETS_FEATURE_STORE_DATA": str(data),
        "DAGSTER_HOME": str(home),
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    script = textwrap.dedent("""
        import json, sys
        import dagster as dg
        from hcc_assets import runner
        instance = dg.DagsterInstance.get()
        pids = runner.register_ready_patients(instance)[:4]
        results = runner.materialize_patients(pids, workers=4, executor="in_process")
        print(json.dumps({"storage": type(instance.run_storage).__name__, "results": results}))
        sys.exit(0 if all(ok for _, ok, _ in results) else 1)
        """)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("{")))
    assert report["storage"] == "PostgresRunStorage"
    pids = sorted(pid for pid, ok, _ in report["results"] if ok)
    assert len(pids) == 4

    # a reader on another connection (this process) sees every row, one set per patient
    store = FeatureStore(catalog, data)
    counts = {
        t: dict(store.query(f"SELECT patient_id, count(*) FROM {t} GROUP BY 1").iter_rows())
        for t in ("patients", "scans", "volumes")
    }
    assert counts == {
        "patients": dict.fromkeys(pids, 1),
        "scans": dict.fromkeys(pids, 3),
        "volumes": dict.fromkeys(pids, 2),
    }
    assert store.query("SELECT count(DISTINCT run_id) FROM volumes").item() == 4
    # Parquet files on the shared data path, catalog rows in Postgres, one snapshot per commit
    assert list(data.rglob("*.parquet"))
    assert int(postgres.sql("featurestore", "SELECT count(*) FROM ducklake_data_file")) > 0
    assert store.snapshots().height == int(postgres.sql("featurestore", "SELECT count(*) FROM ducklake_snapshot"))
    # Dagster's runs and their events are in Postgres too
    assert int(postgres.sql("dagster", "SELECT count(*) FROM runs WHERE status = 'SUCCESS'")) == 4
    assert not list(home.rglob("*.db"))  # no SQLite run or event storage beside it
    # the sql command reads the same catalog by settings alone
    out = subprocess.run(
        [sys.executable, "-m", "hcc_assets.cli", "sql", "SELECT count(*) AS n FROM patients", "--format", "csv"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.splitlines() == ["n", "4"]

    # Postgres down: a write fails naming the setting, and nothing is written
    postgres.stop()
    down = subprocess.run(
        [
            sys.executable,
            "-c",
            "from hcc_assets.defs.resources import default_lake_resource as d; d().store.query('SELECT 1')",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert down.returncode != 0 and "HCC_ASSETS_FEATURE_STORE" in down.stderr
