"""The feature store's Parquet export (hcc_assets.featurestore.parquet): a real store in the real
schema, exported to a file:// lake and to a memory:// lake (standing in for s3://), read back with
DuckDB's read_parquet in a connection that never opens the store, and compared with the store."""

import hashlib
import json
import tempfile

import dagster as dg
import duckdb
import fsspec
import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from hcc_assets.featurestore import FeatureStore, FeatureStoreError
from hcc_assets.featurestore.parquet import (EXPORT_FOLDER, MANIFEST_NAME, VIEWS, export_parquet, exportable_tables,
                                             read_manifest, schema_version)
from hcc_assets.featurestore.schema import DERIVED_TABLES, TABLES
from hcc_assets.lake import DataLake

PIDS = [f"pt-{i:02d}" for i in range(6)]
FEATURES = ["original_firstorder_Mean", "original_glcm_Idm", "original_shape_Volume"]


def _prov(rows: dict | pl.DataFrame, version: str | None = "v1", run_id: str = "run-1", **overrides) -> pl.DataFrame:
    frame = rows if isinstance(rows, pl.DataFrame) else pl.DataFrame(rows, schema_overrides=overrides or None)
    return FeatureStore.with_provenance(frame, version=version, run_id=run_id)


def _filled_store(path) -> FeatureStore:
    """A few rows in most tables, patients written in shuffled order (the export must sort them)."""
    store = FeatureStore(path)
    rng = np.random.default_rng(7)
    for pid in rng.permutation(PIDS):
        n = int(pid[3:])
        store.replace_partition("patients", pid, _prov({"patient_id": [pid], "source": ["synthetic"], "n_series": [3],
                                                        "n_files": [90 + n], "t2_series_key": [f"k{n}"],
                                                        "ingest_status": ["ok"]}))
        store.replace_partition("scans", pid, _prov({"patient_id": [pid] * 2, "series_key": [f"k{n}", f"j{n}"],
                                                     "chosen": [True, False], "checksum": ["c", "d"],
                                                     "pixel_spacing_mm": [[1.5, 1.5], [1.7, 1.7]]}))
        values = {name: float(rng.normal()) for name in FEATURES}
        if n == 3:
            values["original_glcm_Idm"] = None  # NULL survives the trip
        store.replace_partition("radiomic_features", pid, _prov(
            {"patient_id": pid, "feature_set_version": "fs1", "feature": list(values), "value": list(values.values())},
            value=pl.Float64))
        store.replace_partition("liver_masks", pid, _prov({"patient_id": [pid], "model_version": ["seg1"],
                                                           "path": [f"memory:///lake/{pid}/mask.nii.gz"],
                                                           "sha256": ["ab"], "liver_ml": [1500.0 + n],
                                                           "dice_liver": [None if n % 2 else 0.9]},
                                                          dice_liver=pl.Float64))
        embedding = rng.normal(size=(1, 128)).astype(np.float32)
        store.replace_partition("deep_embeddings", pid, _prov(pl.DataFrame({
            "patient_id": [pid], "model_version": ["clf1"],
            "embedding": pl.Series("embedding", embedding, dtype=pl.Array(pl.Float32, 128))})))
    store.replace_partition("exclusions", "pt-05", _prov({"patient_id": ["pt-05"], "stage": ["radiomics"],
                                                          "reason": ["empty mask"]}))
    store.replace_table("cohort_split", _prov({"patient_id": PIDS, "hcc": [i % 2 == 0 for i in range(6)],
                                               "source": ["synthetic"] * 6, "split": ["train"] * 4 + ["validation"] * 2,
                                               "seed": [0] * 6}, version="cohort@1"))
    store.register_model(_prov({"model_name": ["hcc_classifier"], "kind": ["resnet3d"], "path": ["m/clf1"],
                                "training_patients": [PIDS[:4]], "params": ["{}"]}, version="clf1"))
    store.register_model(_prov({"model_name": ["radiomic_model"], "kind": ["lasso"], "path": ["m/r1"],
                                "training_patients": [PIDS[:4]]}, version="r1"))
    store.replace_table("predictions", _prov({"model": ["radiomic"] * 6, "patient_id": PIDS[::-1],
                                              "split": ["validation"] * 2 + ["train"] * 4,
                                              "probability": np.linspace(0.1, 0.9, 6).tolist(),
                                              "label": [i % 2 == 1 for i in range(6)]}, version="r1"))
    store.replace_table("training_history", _prov({"model_name": ["hcc_classifier"] * 3, "epoch": [2, 0, 1],
                                                   "train_loss": [0.5, 0.7, 0.6]}, version="clf1"))
    metrics = [{"model": m, "scheme": "holdout_bootstrap", "metric": k, "estimate": 0.7, "mean": 0.69, "ci_low": 0.5,
                "ci_high": 0.9, "n": 6, "n_resamples": 1000, "n_degenerate": 0, "version": "r1"}
               for m in ("radiomic", "deep") for k in ("accuracy", "roc_auc")]
    store.replace_table("model_metrics", _prov(pl.DataFrame(metrics), version=None))
    store.replace_table("coefficients", _prov({
        "model": ["radiomic", "radiomic"], "feature": ["original_shape_Volume", "original_glcm_Idm"],
        "beta": [0.4, float("nan")], "p_value": [0.03, None], "status": ["ok", "separation"],
        "version": ["r1", "r1"]}, version=None, p_value=pl.Float64))
    return store


def _as_read_back(frame: pl.DataFrame) -> pl.DataFrame:
    """Parquet has no fixed-size arrays: FLOAT[128] comes back as FLOAT[] (the manifest keeps the type)."""
    return frame.with_columns(pl.col(name).cast(pl.List(dtype.inner))
                              for name, dtype in frame.schema.items() if isinstance(dtype, pl.Array))


def _assert_same_as_store(store: FeatureStore, reader: duckdb.DuckDBPyConnection, exported: dict) -> None:
    for name, info in exported.items():
        order = ", ".join(f'"{c}"' for c in info["order_by"])
        expected = _as_read_back(store.query(f'SELECT * FROM "{name}" ORDER BY {order}'))
        got = reader.sql(f"SELECT * FROM read_parquet('{info['path']}')").pl()
        try:
            assert_frame_equal(got, expected, check_exact=True)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None
        assert info["rows"] == expected.height, name
        assert [c["name"] for c in info["columns"]] == expected.columns, name


def _no_temps(fs, folder: str) -> list[str]:
    return [p for p in fs.find(folder) if "/.tmp-" in p or p.endswith(".tmp")]


@pytest.fixture
def store(tmp_path) -> FeatureStore:
    return _filled_store(tmp_path / "store" / "feature_store.duckdb")


def test_export_to_a_file_lake_is_the_store_sorted_with_a_manifest(store, tmp_path):
    lake = DataLake(str(tmp_path / "lake"))
    exported = export_parquet(store, lake)
    assert list(exported) == exportable_tables() == [*TABLES, *DERIVED_TABLES, *VIEWS]
    folder = tmp_path / "lake" / EXPORT_FOLDER
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{t}.parquet" for t in exported] + [MANIFEST_NAME])
    assert exported["patients"]["path"] == str(folder / "patients.parquet")

    reader = duckdb.connect()  # never opens the DuckDB store: what another machine does
    _assert_same_as_store(store, reader, exported)
    counts = {name: info["rows"] for name, info in exported.items()}
    assert counts["patients"] == counts["cohort_split"] == counts["deep_embeddings"] == counts["radiomics"] == 6
    assert counts["radiomic_features"] == 18 and counts["scans"] == 12 and counts["exclusions"] == 1
    assert counts["models"] == 2 and counts["model_metrics"] == 4 and counts["table_1"] == 2
    # sorted by the key columns, not by insertion order
    patients = reader.sql(f"SELECT patient_id FROM read_parquet('{folder}/patients.parquet')").pl()
    assert patients["patient_id"].to_list() == PIDS
    epochs = reader.sql(f"SELECT epoch FROM read_parquet('{folder}/training_history.parquet')").fetchall()
    assert [e for (e,) in epochs] == [0, 1, 2]
    # the wide views are there as columns
    deep = reader.sql(f"SELECT * FROM read_parquet('{folder}/deep_features.parquet')").pl()
    assert deep.columns[:3] == ["patient_id", "model_version", "dl_000"] and deep.width == 130

    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest == read_manifest(lake)
    assert manifest["schema_version"] == schema_version() and manifest["tables"].keys() == exported.keys()
    for name, info in manifest["tables"].items():
        data = (folder / info["file"]).read_bytes()
        assert info["sha256"] == hashlib.sha256(data).hexdigest() and info["bytes"] == len(data)
        assert info["rows"] == store.query(f'SELECT count(*) FROM "{name}"').item()
        assert info["exported_at"] == manifest["exported_at"]
    assert {c["name"]: c["type"] for c in manifest["tables"]["deep_embeddings"]["columns"]}["embedding"] == "FLOAT[128]"
    assert _no_temps(lake.fs, str(folder)) == []


def test_re_export_gives_identical_files_and_follows_the_store(store, tmp_path):
    lake = DataLake(str(tmp_path / "lake"))
    first = export_parquet(store, lake)
    second = export_parquet(store, lake)
    # byte-identical: same DuckDB, same store -> same sha256 for every file
    assert {n: i["sha256"] for n, i in first.items()} == {n: i["sha256"] for n, i in second.items()}
    assert {n: i["rows"] for n, i in first.items()} == {n: i["rows"] for n, i in second.items()}

    store.replace_partition("exclusions", "pt-04", _prov({"patient_id": ["pt-04"], "stage": ["radiomics"],
                                                          "reason": ["tiny mask"]}))
    third = export_parquet(store, lake)
    assert third["exclusions"]["rows"] == 2 and third["exclusions"]["sha256"] != first["exclusions"]["sha256"]
    assert third["patients"]["sha256"] == first["patients"]["sha256"]
    _assert_same_as_store(store, duckdb.connect(), third)
    assert read_manifest(lake)["tables"]["exclusions"]["rows"] == 2
    assert _no_temps(lake.fs, lake.path(EXPORT_FOLDER)) == []


def test_export_to_a_memory_lake_reads_back_through_fsspec(store, memory_root, tmp_path, monkeypatch):
    lake = DataLake(memory_root)
    staging = tmp_path / "staging"  # the store's copy and the local Parquet files; gone afterwards
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    exported = export_parquet(store, lake)
    assert list(staging.iterdir()) == []
    fs = fsspec.filesystem("memory")
    folder = lake.path(EXPORT_FOLDER)
    assert folder.startswith("memory://") and exported["radiomic_features"]["path"].startswith(folder + "/")
    reader = duckdb.connect()
    reader.register_filesystem(fs)  # as httpfs serves s3:// on another machine
    _assert_same_as_store(store, reader, exported)
    joined = reader.sql(f"""
        SELECT c.split, count(*) AS n FROM read_parquet('{folder}/radiomics.parquet') r
        JOIN read_parquet('{folder}/cohort_split.parquet') c USING (patient_id) GROUP BY ALL ORDER BY 1""").fetchall()
    assert joined == [("train", 4), ("validation", 2)]
    manifest = json.loads(fs.cat_file(lake.path(EXPORT_FOLDER, MANIFEST_NAME)))
    for info in manifest["tables"].values():
        assert hashlib.sha256(fs.cat_file(info["path"])).hexdigest() == info["sha256"]
    assert _no_temps(fs, folder) == []
    # the same store exported to a local lake gives the same bytes
    local = export_parquet(store, DataLake(str(tmp_path / "lake")))
    assert {n: i["sha256"] for n, i in local.items()} == {n: i["sha256"] for n, i in exported.items()}
    assert not list(tmp_path.glob("memory*"))  # nothing named after the URL on disk


def test_partial_export_keeps_the_other_entries_and_unknown_tables_are_refused(store, tmp_path):
    lake = DataLake(str(tmp_path / "lake"))
    full = export_parquet(store, lake)
    store.replace_partition("exclusions", "pt-04", _prov({"patient_id": ["pt-04"], "stage": ["radiomics"],
                                                          "reason": ["tiny mask"]}))
    partial = export_parquet(store, lake, tables=["exclusions", "patients"])
    assert list(partial) == ["exclusions", "patients"] and partial["exclusions"]["rows"] == 2
    manifest = read_manifest(lake)
    assert manifest["tables"].keys() == full.keys()
    assert manifest["tables"]["exclusions"]["rows"] == 2
    assert manifest["tables"]["scans"] == full["scans"]
    with pytest.raises(FeatureStoreError, match="no_such_table"):
        export_parquet(store, lake, tables=["patients", "no_such_table"])
    assert read_manifest(lake) == manifest  # a refused export changes nothing


def test_asset_and_cli_export(store, tmp_path, monkeypatch, capsys):
    from hcc_assets import cli
    from hcc_assets.defs.export import feature_store_parquet
    from hcc_assets.defs.resources import LakeResource

    lake = LakeResource(root=str(tmp_path / "lake"), feature_store=str(store.path))
    with dg.instance_for_test() as instance:
        result = dg.materialize([feature_store_parquet], instance=instance, resources={"lake": lake})
        assert result.success
        metadata = result.asset_materializations_for_node("feature_store_parquet")[0].metadata
    assert metadata["rows"].data["patients"] == 6 and metadata["n_tables"].value == len(exportable_tables())
    assert metadata["path"].value == str(tmp_path / "lake" / EXPORT_FOLDER)
    assert read_manifest(lake.lake)["tables"]["radiomic_features"]["rows"] == 18

    cli_lake = tmp_path / "cli_lake"
    monkeypatch.setenv("HCC_ASSETS_LAKE", str(cli_lake))
    monkeypatch.setenv("HCC_ASSETS_FEATURE_STORE", str(store.path))
    assert cli.main(["--lake", str(cli_lake), "export-parquet", "--tables", "patients,table_1"]) == 0
    out = capsys.readouterr().out
    assert "exported 2 tables (8 rows)" in out and "patients" in out
    assert sorted(read_manifest(DataLake(str(cli_lake)))["tables"]) == ["patients", "table_1"]
    assert cli.main(["--lake", str(cli_lake), "export-parquet", "--tables", "nope"]) == 2
    assert "cannot export 'nope'" in capsys.readouterr().err
