import json
import multiprocessing

import duckdb
import polars as pl
import pytest

from hcc_assets.featurestore import FeatureStore, FeatureStoreError


def _rows(patient_id: str, n: int, tag: str = "a") -> pl.DataFrame:
    return pl.DataFrame(
        {
            "patient_id": [patient_id] * n,
            "series_key": [f"{tag}{i}" for i in range(n)],
            "chosen": [i == 0 for i in range(n)],
            "checksum": ["x"] * n,
            "pixel_spacing_mm": [[1.5, 1.5]] * n,
        }
    )


def test_replace_partition_replaces_rows_never_duplicates(tmp_path):
    store = FeatureStore(tmp_path / "fs.sqlite")
    for _ in range(3):
        store.replace_partition(
            "scans", "pt-a", FeatureStore.with_provenance(_rows("pt-a", 3), version="v1", run_id="r1")
        )
    store.replace_partition("scans", "pt-b", FeatureStore.with_provenance(_rows("pt-b", 2), version="v1", run_id="r2"))
    store.replace_partition(
        "scans", "pt-a", FeatureStore.with_provenance(_rows("pt-a", 1, "z"), version="v2", run_id="r3")
    )
    counts = dict(store.query("SELECT patient_id, count(*) FROM scans GROUP BY ALL").iter_rows())
    assert counts == {"pt-a": 1, "pt-b": 2}
    row = store.query("SELECT * FROM scans WHERE patient_id = 'pt-a'").row(0, named=True)
    assert (row["series_key"], row["version"], row["run_id"]) == ("z0", "v2", "r3")
    assert row["materialized_at"] is not None


def test_rows_of_another_patient_are_refused(tmp_path):
    store = FeatureStore(tmp_path / "fs.sqlite")
    with pytest.raises(FeatureStoreError, match="pt-a"):
        store.replace_partition(
            "scans", "pt-a", FeatureStore.with_provenance(_rows("pt-b", 1), version="v", run_id="r")
        )
    with pytest.raises(FeatureStoreError, match="unknown"):
        store.table("no_such_table")


def _exclusion(patient_id: str, stage: str) -> pl.DataFrame:
    row = pl.DataFrame([{"patient_id": patient_id, "stage": stage, "reason": "no liver"}])
    return FeatureStore.with_provenance(row, version="v", run_id="r0")


def test_rows_and_the_deletes_that_go_with_them_commit_together_or_not_at_all(tmp_path):
    store = FeatureStore(tmp_path / "fs.sqlite")
    for pid in ("pt-a", "pt-b"):
        for stage in ("radiomics", "segmentation"):
            store.replace_partition("exclusions", pid, _exclusion(pid, stage), match={"stage": stage})
    scans = FeatureStore.with_provenance(_rows("pt-a", 2), version="v1", run_id="r1")
    # a write that fails (a column the table lacks) deletes nothing either
    with pytest.raises(FeatureStoreError, match="scans"):
        store.replace_partition(
            "scans", "pt-a", scans.with_columns(pl.lit(1).alias("no_such_column")), also_delete={"exclusions": {}}
        )
    assert store.query("SELECT count(*) FROM exclusions").item() == 4
    assert store.query("SELECT count(*) FROM scans").item() == 0
    # a write that succeeds deletes only the patient's rows that match
    store.replace_partition("scans", "pt-a", scans, also_delete={"exclusions": {"stage": "radiomics"}})
    left = store.query("SELECT patient_id, stage FROM exclusions ORDER BY ALL").rows()
    assert left == [("pt-a", "segmentation"), ("pt-b", "radiomics"), ("pt-b", "segmentation")]
    assert store.query("SELECT count(*) FROM scans").item() == 2
    with pytest.raises(FeatureStoreError, match="unknown"):
        store.replace_partition("scans", "pt-a", scans, also_delete={"no_such_table": {}})


def test_queries_are_read_only(tmp_path):
    store = FeatureStore(tmp_path / "fs.sqlite")
    assert store.query("SELECT count(*) AS n FROM patients")["n"][0] == 0
    with pytest.raises(duckdb.Error):
        store.query("DELETE FROM patients")


def _hammer(path: str, patient_id: str, rounds: int) -> None:
    store = FeatureStore(path)
    for i in range(rounds):
        store.replace_partition(
            "scans", patient_id, FeatureStore.with_provenance(_rows(patient_id, 3, str(i)), version="v", run_id=str(i))
        )
        store.query("SELECT count(*) FROM scans")


def test_parallel_writer_processes_never_hit_the_duckdb_lock(tmp_path):
    path = str(tmp_path / "fs.sqlite")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_hammer, args=(path, f"pt-{i}", 15)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    counts = FeatureStore(path).query("SELECT patient_id, count(*) AS n FROM scans GROUP BY ALL ORDER BY 1")
    assert counts["n"].to_list() == [3, 3, 3, 3]


def test_sql_command_formats(tmp_path, hcc_command):
    path = tmp_path / "fs.sqlite"
    store = FeatureStore(path)
    store.replace_partition("scans", "pt-a", FeatureStore.with_provenance(_rows("pt-a", 2), version="v1", run_id="r1"))
    query = "SELECT patient_id, series_key, pixel_spacing_mm FROM scans ORDER BY series_key"

    def run(*extra: str) -> str:
        code, out, err = hcc_command("sql", query, "--db", str(path), *extra)
        assert code == 0, err
        return out

    csv_out = run("--format", "csv").splitlines()
    assert csv_out[0] == "patient_id,series_key,pixel_spacing_mm"
    assert csv_out[1] == "pt-a,a0,1.5;1.5"
    records = json.loads(run("--format", "json"))
    assert [r["series_key"] for r in records] == ["a0", "a1"]
    assert "pt-a" in run()
    code, _, err = hcc_command("sql", "SELEKT 1", "--db", str(path))
    assert code == 2 and "error" in err and "Traceback" not in err


def test_wide_views_follow_their_long_tables(tmp_path):
    store = FeatureStore(tmp_path / "fs.sqlite")
    assert store.query("SELECT count(*) FROM deep_features").item() == 0
    for pid, base in (("pt-a", 1.0), ("pt-b", 2.0)):
        long = pl.DataFrame(
            {
                "patient_id": pid,
                "feature_set_version": "fs1",
                "feature": ["original_shape_Volume", "original_glcm_Idm"],
                "value": [base, base * 10],
            }
        )
        store.replace_partition("radiomic_features", pid, FeatureStore.with_provenance(long, version="v", run_id="r"))
    wide = store.query("SELECT * FROM radiomics ORDER BY patient_id")
    assert wide.columns == ["patient_id", "feature_set_version", "original_glcm_Idm", "original_shape_Volume"]
    assert wide["original_glcm_Idm"].to_list() == [10.0, 20.0]
    embedding = pl.DataFrame(
        {"patient_id": ["pt-a"], "model_version": ["m1"], "embedding": [[float(i) for i in range(128)]]},
        schema_overrides={"embedding": pl.Array(pl.Float32, 128)},
    )
    store.replace_partition("deep_embeddings", "pt-a", FeatureStore.with_provenance(embedding, version="v", run_id="r"))
    deep = store.query("SELECT * FROM deep_features")
    assert deep.width == 130 and deep["dl_127"].item() == 127.0


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM scans",
        "CREATE TABLE x (a INT)",
        "COPY (SELECT * FROM scans) TO '{out}'",
        "EXPORT DATABASE '{dir}'",
        "SELECT 1; DROP TABLE scans",
    ],
)
def test_sql_command_refuses_writes_with_a_clear_message(tmp_path, hcc_command, statement):
    path = tmp_path / "fs.sqlite"
    FeatureStore(path).replace_partition(
        "scans", "pt-a", FeatureStore.with_provenance(_rows("pt-a", 2), version="v", run_id="r")
    )
    out, export = tmp_path / "leak.csv", tmp_path / "export"
    code, _, err = hcc_command("sql", statement.format(out=out, dir=export), "--db", str(path))
    assert code == 2
    assert "read-only" in err and "Traceback" not in err
    assert not out.exists() and not export.exists()
    assert FeatureStore(path).query("SELECT count(*) AS n FROM scans")["n"][0] == 2


def _model_row(name: str, version: str) -> pl.DataFrame:
    return FeatureStore.with_provenance(
        pl.DataFrame(
            [
                {
                    "model_name": name,
                    "kind": "k",
                    "path": f"/models/{version}",
                    "init": None,
                    "params": "{}",
                    "training_patients": ["pt-a"],
                    "metrics": "{}",
                }
            ],
            schema={
                "model_name": pl.String,
                "kind": pl.String,
                "path": pl.String,
                "init": pl.String,
                "params": pl.String,
                "training_patients": pl.List(pl.String),
                "metrics": pl.String,
            },
        ),
        version=version,
        run_id="r",
    )


def test_model_versions_stay_queryable_and_one_is_current(tmp_path):
    store = FeatureStore(tmp_path / "fs.sqlite")
    store.register_model(_model_row("hcc_classifier", "v1"))
    store.register_model(_model_row("radiomic_model", "r1"))
    store.register_model(_model_row("hcc_classifier", "v2"))
    store.register_model(_model_row("hcc_classifier", "v2"))  # again: replaced, not duplicated
    rows = store.query("SELECT model_name, version, current FROM models ORDER BY ALL").rows()
    assert rows == [("hcc_classifier", "v1", False), ("hcc_classifier", "v2", True), ("radiomic_model", "r1", True)]
    store.register_model(_model_row("hcc_classifier", "v1"))  # back to an old version: it becomes current
    assert store.query("SELECT version FROM models WHERE model_name = 'hcc_classifier' AND current").item() == "v1"


def test_a_store_made_before_new_columns_gains_them_and_old_rows_read_null(tmp_path):
    store = FeatureStore(tmp_path / "fs.sqlite")
    store.replace_partition("scans", "pt-a", FeatureStore.with_provenance(_rows("pt-a", 2), version="v1", run_id="r1"))
    new_columns = ("transfer_syntax", "lossy", "lossy_ratio")
    with store.writer() as con:  # the scans table as an older version made it
        for column in new_columns:
            con.execute(f"ALTER TABLE scans DROP COLUMN {column}")
    assert not set(new_columns) & set(store.query("SELECT * FROM scans").columns)
    FeatureStore._ready.clear()  # a new process opens the old store
    reopened = FeatureStore(tmp_path / "fs.sqlite")
    rows = reopened.query("SELECT * FROM scans ORDER BY series_key")
    assert set(new_columns) <= set(rows.columns)
    assert rows.height == 2 and rows.select(new_columns).null_count().row(0) == (2, 2, 2)
    new_row = _rows("pt-b", 1).with_columns(
        pl.lit("1.2.840.10008.1.2.4.91").alias("transfer_syntax"),
        pl.lit(True).alias("lossy"),
        pl.lit(8.5).alias("lossy_ratio"),
    )
    reopened.replace_partition("scans", "pt-b", FeatureStore.with_provenance(new_row, version="v2", run_id="r2"))
    assert reopened.query("SELECT lossy, lossy_ratio FROM scans WHERE patient_id = 'pt-b'").row(0) == (True, 8.5)
