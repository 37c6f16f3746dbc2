"""The DuckLake feature store: history and time travel, the training set a model saw, concurrent
and killed writers, housekeeping, an unreachable catalog, the old single-file store."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

from hcc_assets.featurestore import FeatureStore, FeatureStoreError
from hcc_assets.featurestore.maintenance import RetentionPolicy, data_file_count, maintain
from hcc_assets.featurestore.queries import radiomics_matrix
from hcc_assets.featurestore.registry import RADIOMICS, matrix_spec, model_row, training_set
from hcc_assets.featurestore.schema import TABLES

NAMES = ["original_firstorder_Mean", "original_glcm_Idm", "original_shape_Volume"]


def _features(pid: str, values: list[float], version: str = "fs1", run: str = "r") -> pl.DataFrame:
    return FeatureStore.with_provenance(
        pl.DataFrame({"patient_id": pid, "feature_set_version": version, "feature": NAMES, "value": values}),
        version="radiomics@test",
        run_id=run,
    )


def _cohort(store: FeatureStore, pids: list[str]) -> None:
    rows = pl.DataFrame(
        {
            "patient_id": pids,
            "hcc": [i % 2 == 0 for i in range(len(pids))],
            "split": ["train" if i % 4 else "validation" for i in range(len(pids))],
            "seed": 0,
        }
    )
    store.replace_table("cohort_split", FeatureStore.with_provenance(rows, version="c", run_id="r"))


def _scans(pid: str, n: int, run: str) -> pl.DataFrame:
    return FeatureStore.with_provenance(
        pl.DataFrame(
            {
                "patient_id": [pid] * n,
                "series_key": [f"s{i}" for i in range(n)],
                "chosen": [i == 0 for i in range(n)],
                "checksum": ["x"] * n,
            }
        ),
        version="v",
        run_id=run,
    )


def test_rematerializing_keeps_the_old_rows_readable_by_version_and_by_time(tmp_path, hcc_command):
    store = FeatureStore(tmp_path / "fs.sqlite")
    store.replace_partition("radiomic_features", "pt-a", _features("pt-a", [1.0, 2.0, 3.0], run="first"))
    first = store.current_snapshot()
    time.sleep(1.1)  # snapshot times have sub-second resolution; keep "as of" unambiguous
    between = dt.datetime.now(dt.UTC)
    time.sleep(1.1)
    store.replace_partition("radiomic_features", "pt-a", _features("pt-a", [10.0, 20.0, 30.0], run="second"))
    assert store.current_snapshot() > first

    now = store.query("SELECT feature, value, run_id FROM radiomic_features ORDER BY feature")
    assert now["value"].to_list() == [10.0, 20.0, 30.0] and set(now["run_id"]) == {"second"}
    for past in (store.at(snapshot=first), store.at(time=between)):
        then = past.query("SELECT feature, value, run_id FROM radiomic_features ORDER BY feature")
        assert then["value"].to_list() == [1.0, 2.0, 3.0] and set(then["run_id"]) == {"first"}
        assert past.query("SELECT original_shape_Volume FROM radiomics").item() == 3.0  # views travel too
        with pytest.raises(FeatureStoreError, match="read-only"):
            past.replace_partition("radiomic_features", "pt-a", _features("pt-a", [0.0] * 3))
    # the same through SQL, as documented: AT (VERSION => n) and `hcc-assets sql --as-of`
    assert store.query(f"SELECT sum(value) FROM radiomic_features AT (VERSION => {first})").item() == 6.0
    code, out, err = hcc_command(
        "sql",
        "SELECT sum(value) AS s FROM radiomic_features",
        "--catalog",
        str(tmp_path / "fs.sqlite"),
        "--as-of",
        between.isoformat(),
        "--format",
        "csv",
    )
    assert code == 0, err
    assert out.splitlines() == ["s", "6.0"]


def test_history_tables_keep_every_model_version_and_current_views_show_the_current(tmp_path):
    store = FeatureStore(tmp_path / "fs.sqlite")
    for version, probability in (("m1", 0.2), ("m2", 0.7)):
        store.replace_versions(
            "predictions",
            FeatureStore.with_provenance(
                pl.DataFrame(
                    {
                        "model": "deep",
                        "patient_id": ["pt-a", "pt-b"],
                        "split": "validation",
                        "probability": [probability, 1 - probability],
                        "label": [True, False],
                    }
                ),
                version=version,
                run_id=version,
            ),
        )
        store.replace_versions(
            "model_metrics",
            FeatureStore.with_provenance(
                pl.DataFrame(
                    {
                        "model": "deep",
                        "scheme": "holdout_bootstrap",
                        "metric": "accuracy",
                        "estimate": probability,
                        "mean": probability,
                        "ci_low": 0.0,
                        "ci_high": 1.0,
                        "n": 2,
                        "version": version,
                    }
                ),
                version=None,
                run_id="r",
            ),
        )
        store.register_model(
            model_row(
                "hcc_classifier",
                "resnet",
                f"/m/{version}",
                init=None,
                params={},
                metrics={},
                training_patients=["pt-a"],
                training_set=None,
                version=version,
                run_id="r",
            )
        )
    assert store.query("SELECT count(*) FROM predictions").item() == 4
    assert set(store.query("SELECT version FROM current_predictions")["version"]) == {"m2"}
    # two retrains compared in one query
    compared = store.query("SELECT version, estimate FROM model_metrics WHERE model = 'deep' ORDER BY version").rows()
    assert compared == [("m1", 0.2), ("m2", 0.7)]
    assert store.query("SELECT accuracy FROM table_1").item().startswith("0.700")
    from hcc_assets.featurestore.reads import model_comparison

    comparison = model_comparison(store).row(0, named=True)
    assert (
        comparison["current_version"],
        comparison["current"],
        comparison["previous_version"],
        comparison["previous"],
    ) == ("m2", 0.7, "m1", 0.2)


def test_a_model_reads_back_the_exact_training_set_it_saw(tmp_path, hcc_command):
    store = FeatureStore(tmp_path / "fs.sqlite")
    rng = np.random.default_rng(0)
    pids = [f"pt-{i:02d}" for i in range(8)]
    for pid in pids:
        store.replace_partition("radiomic_features", pid, _features(pid, rng.normal(size=3).tolist()))
    _cohort(store, pids)
    snapshot = store.current_snapshot()
    train = radiomics_matrix(store.at(snapshot=snapshot), "fs1").rows("train")
    store.register_model(
        model_row(
            "radiomic_model",
            "lasso",
            "/m/r1",
            init=None,
            params={},
            metrics={},
            training_patients=train.patient_ids,
            training_set=matrix_spec(RADIOMICS, train),
            version="r1",
            run_id="r",
        ),
        data_snapshot=snapshot,
    )
    at_training = training_set(store, "r1")
    saved = tmp_path / "at_training.csv"
    at_training.write_csv(saved)
    assert at_training["patient_id"].to_list() == train.patient_ids
    assert np.array_equal(at_training.select(NAMES).to_numpy(), train.values)

    # then features are recomputed and patients arrive
    for pid in pids[:5]:
        store.replace_partition("radiomic_features", pid, _features(pid, rng.normal(size=3).tolist(), run="again"))
    for pid in ("pt-20", "pt-21"):
        store.replace_partition("radiomic_features", pid, _features(pid, rng.normal(size=3).tolist()))
    _cohort(store, [*pids, "pt-20", "pt-21"])

    again = tmp_path / "again.csv"
    training_set(store, "r1").write_csv(again)
    assert again.read_bytes() == saved.read_bytes()
    current = radiomics_matrix(store, "fs1").rows("train")
    assert current.patient_ids != train.patient_ids or not np.array_equal(current.values, train.values)
    # the CLI writes the same matrix
    cli = tmp_path / "cli.csv"
    code, _, err = hcc_command(
        "training-set", "--model", "r1", "--out", str(cli), "--catalog", str(tmp_path / "fs.sqlite")
    )
    assert code == 0, err
    assert cli.read_bytes() == saved.read_bytes()
    code, _, err = hcc_command("training-set", "--model", "nope", "--catalog", str(tmp_path / "fs.sqlite"))
    assert code == 2 and "no model version 'nope'" in err


def _write_same_patient(catalog: str, barrier, run: str, rounds: int) -> None:
    store = FeatureStore(catalog)
    for i in range(rounds):
        barrier.wait(60)  # both writers start each round together: their transactions overlap
        store.replace_partition("scans", "pt-x", _scans("pt-x", 3, f"{run}-{i}"))


def test_two_writers_of_one_patient_never_leave_duplicates(tmp_path):
    catalog = str(tmp_path / "fs.sqlite")
    FeatureStore(catalog).ensure_schema()
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_write_same_patient, args=(catalog, barrier, run, 6)) for run in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(180)
    assert [w.exitcode for w in workers] == [0, 0]
    store = FeatureStore(catalog)
    rows = store.query("SELECT series_key, run_id FROM scans ORDER BY series_key")
    assert rows["series_key"].to_list() == ["s0", "s1", "s2"]
    assert rows["run_id"].n_unique() == 1  # one writer's complete set, never a mix
    # every snapshot along the way held exactly one set too
    for snapshot in store.snapshots()["snapshot_id"].to_list()[-6:]:
        counts = store.at(snapshot=snapshot).query("SELECT count(*) AS n, count(DISTINCT run_id) AS runs FROM scans")
        assert counts.row(0) in ((0, 0), (3, 1)), (snapshot, counts.row(0))


def _hang_in_transaction(catalog: str, marker: str) -> None:
    store = FeatureStore(catalog)

    def body(con):
        con.execute("DELETE FROM scans WHERE patient_id = 'pt-k'")
        con.register("rows", _scans("pt-k", 5, "killed").to_arrow())
        con.execute("INSERT INTO scans BY NAME SELECT * FROM rows")
        con.execute("INSERT INTO scans BY NAME SELECT * FROM rows")  # data files written, not committed
        Path(marker).touch()
        time.sleep(600)

    store.transaction(body)


def test_a_writer_killed_mid_transaction_leaves_no_rows_and_the_rerun_succeeds(tmp_path):
    catalog = str(tmp_path / "fs.sqlite")
    store = FeatureStore(catalog)
    store.replace_partition("scans", "pt-k", _scans("pt-k", 2, "before"))
    marker = tmp_path / "in_transaction"
    child = multiprocessing.get_context("spawn").Process(target=_hang_in_transaction, args=(catalog, str(marker)))
    child.start()
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    assert store.query("SELECT run_id, count(*) FROM scans GROUP BY 1").rows() == [("before", 2)]
    store.replace_partition("scans", "pt-k", _scans("pt-k", 3, "rerun"))
    assert store.query("SELECT run_id, count(*) FROM scans GROUP BY 1").rows() == [("rerun", 3)]
    # the killed writer's Parquet files belong to no snapshot; housekeeping removes them
    report = maintain(store, RetentionPolicy(keep_days=None, file_grace_hours=0))
    assert report.files_deleted >= 1
    assert store.query("SELECT run_id, count(*) FROM scans GROUP BY 1").rows() == [("rerun", 3)]


def test_housekeeping_compacts_and_keeps_what_models_point_to(tmp_path):
    store = FeatureStore(tmp_path / "fs.sqlite")
    pids = [f"pt-{i:02d}" for i in range(12)]
    for pid in pids:
        store.replace_partition("radiomic_features", pid, _features(pid, [1.0, 2.0, 3.0]))
    _cohort(store, pids)
    trained_on = store.current_snapshot()
    store.register_model(
        model_row(
            "radiomic_model",
            "lasso",
            "/m/r1",
            init=None,
            params={},
            metrics={},
            training_patients=pids,
            training_set=matrix_spec(RADIOMICS, radiomics_matrix(store, "fs1").rows("train")),
            version="r1",
            run_id="r",
        ),
        data_snapshot=trained_on,
    )
    expected = training_set(store, "r1")
    for pid in pids:  # every patient rewritten: old rows now only in the past snapshots
        store.replace_partition("radiomic_features", pid, _features(pid, [4.0, 5.0, 6.0]))
    before = data_file_count(store)
    n_snapshots = store.snapshots().height

    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)  # every snapshot is "old"
    report = maintain(store, RetentionPolicy(keep_days=0.5, file_grace_hours=0), now=future)
    assert report.data_files_before == before and report.data_files_after < before / 3, report
    assert report.snapshots_expired == n_snapshots - 2  # all but the newest and the model's
    assert report.kept_for_models == [trained_on]
    kept = store.snapshots()["snapshot_id"].to_list()  # + the compaction's own snapshot
    assert kept[0] == trained_on and len(kept) == 3 and kept[-1] == store.current_snapshot()
    assert training_set(store, "r1").equals(expected)  # the model's snapshot still reads back
    assert store.query("SELECT sum(value) FROM radiomic_features").item() == 15.0 * len(pids)


def test_an_unreachable_postgres_catalog_fails_naming_the_setting(tmp_path):
    store = FeatureStore(
        "postgres:dbname=nowhere host=127.0.0.1 port=1 user=hcc password=s3cret connect_timeout=2", tmp_path / "data"
    )
    with pytest.raises(FeatureStoreError) as error:
        store.replace_partition("scans", "pt-a", _scans("pt-a", 1, "r"))
    message = str(error.value)
    assert "HCC_ASSETS_FEATURE_STORE" in message and "s3cret" not in message and "password=***" in message
    assert not list((tmp_path / "data").rglob("*.parquet"))


def test_an_old_single_file_store_is_refused_and_migrates(tmp_path, hcc_command):
    old = tmp_path / "feature_store.duckdb"
    con = duckdb.connect(str(old))
    for table in ("scans", "radiomic_features", "models"):
        columns = TABLES[table].replace("data_snapshot BIGINT,", "").replace("training_set VARCHAR,", "")
        con.execute(f"CREATE TABLE {table} ({columns})")
    con.execute(
        "INSERT INTO scans (patient_id, series_key, chosen, checksum, version, run_id, materialized_at) "
        "VALUES ('pt-a', 's0', true, 'x', 'v', 'r', now())"
    )
    con.execute("INSERT INTO radiomic_features VALUES ('pt-a', 'fs1', 'original_shape_Volume', 5.0, 'v', 'r', now())")
    con.close()
    with pytest.raises(FeatureStoreError, match="migrate-store"):
        FeatureStore(old).query("SELECT 1")  # named as the catalog
    from hcc_assets.defs.resources import LakeResource

    lake = LakeResource(root=str(tmp_path))
    with pytest.raises(FeatureStoreError, match="migrate-store --from"):
        lake.store.query("SELECT 1")  # found in the lake beside the new default catalog
    assert not (tmp_path / "feature_store.sqlite").exists()
    code, _, err = hcc_command("--lake", str(tmp_path), "migrate-store", "--from", str(old))
    assert code == 0, err
    store = lake.store
    assert store.query("SELECT patient_id, series_key FROM scans").rows() == [("pt-a", "s0")]
    assert store.query("SELECT original_shape_Volume FROM radiomics").item() == 5.0  # derived rows rebuilt


def test_the_data_files_can_live_on_an_s3_server(tmp_path, s3_bucket):
    bucket, client = s3_bucket
    store = FeatureStore(tmp_path / "fs.sqlite", f"{bucket}/feature_store")
    for pid in ("pt-a", "pt-b"):
        store.replace_partition("radiomic_features", pid, _features(pid, [1.0, 2.0, 3.0], run="first"))
    first = store.current_snapshot()
    store.replace_partition("radiomic_features", "pt-a", _features("pt-a", [4.0, 5.0, 6.0], run="second"))
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="lake")["Contents"]]
    assert keys and all(k.startswith("feature_store/main/") and k.endswith(".parquet") for k in keys)
    assert not list(tmp_path.rglob("*.parquet"))  # nothing local but the catalog
    assert store.query("SELECT sum(value) FROM radiomic_features").item() == 21.0
    assert store.at(snapshot=first).query("SELECT sum(value) FROM radiomic_features").item() == 12.0
    report = maintain(store, RetentionPolicy(keep_days=None, file_grace_hours=0))
    assert report.data_files_after < report.data_files_before
    assert store.query("SELECT original_shape_Volume FROM radiomics ORDER BY patient_id")[
        "original_shape_Volume"
    ].to_list() == [6.0, 3.0]


def test_a_conflicting_commit_is_retried_and_the_retries_are_bounded(tmp_path):
    catalog = tmp_path / "fs.sqlite"
    store = FeatureStore(catalog)
    store.replace_partition("scans", "pt-a", _scans("pt-a", 1, "first"))
    other = FeatureStore(catalog)

    def write_meeting_another_writer(attempts: list):
        def body(con):
            attempts.append(1)
            con.execute("DELETE FROM scans WHERE patient_id = 'pt-a'")
            con.register("rows", _scans("pt-a", 2, f"mine-{len(attempts)}").to_arrow())
            con.execute("INSERT INTO scans BY NAME SELECT * FROM rows")
            if len(attempts) == 1:  # another writer commits the same rows while this transaction is open
                other.replace_partition("scans", "pt-a", _scans("pt-a", 3, "other"))

        return body

    attempts: list = []
    store.transaction(write_meeting_another_writer(attempts))
    assert len(attempts) == 2 and store.retries == 1  # the conflict was retried, on fresh data
    assert store.query("SELECT run_id, count(*) FROM scans GROUP BY 1").rows() == [("mine-2", 2)]

    bounded = FeatureStore(catalog, max_attempts=1)
    with pytest.raises(FeatureStoreError, match="conflicted with other writers after 1 attempts"):
        bounded.transaction(write_meeting_another_writer([]))
    assert store.query("SELECT run_id, count(*) FROM scans GROUP BY 1").rows() == [("other", 3)]


def _keep_writing(catalog: str, stop: str) -> None:
    store = FeatureStore(catalog)
    i = 0
    while not Path(stop).exists():
        store.replace_partition("scans", f"pt-{i % 3}", _scans(f"pt-{i % 3}", 2, f"w{i}"))
        i += 1


def test_the_sql_command_reads_while_writers_commit(tmp_path):
    catalog = str(tmp_path / "fs.sqlite")
    FeatureStore(catalog).replace_partition("scans", "pt-0", _scans("pt-0", 2, "w"))
    stop = tmp_path / "stop"
    writer = multiprocessing.get_context("spawn").Process(target=_keep_writing, args=(catalog, str(stop)))
    writer.start()
    try:
        before = FeatureStore(catalog).current_snapshot()
        for _ in range(3):
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "hcc_assets.cli",
                    "sql",
                    "SELECT count(*) % 2 AS odd FROM scans",
                    "--catalog",
                    catalog,
                    "--format",
                    "csv",
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert out.returncode == 0, out.stderr
            assert out.stdout.splitlines() == ["odd", "0"]  # whole patients only: 2 rows each
        assert FeatureStore(catalog).current_snapshot() > before  # the writer did commit meanwhile
    finally:
        stop.touch()
        writer.join(60)
    assert writer.exitcode == 0
