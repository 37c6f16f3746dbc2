"""radiomic_vectors (one DOUBLE[] per patient and feature set) must always say what the long
table `radiomic_features` says: the training-set query reads the vectors, SQL users the long rows."""

import numpy as np
import polars as pl
import pytest

from hcc_assets.featurestore import FeatureStore, FeatureStoreError
from hcc_assets.featurestore.queries import feature_names, latest_feature_set_version, radiomics_matrix

NAMES = ["original_firstorder_Mean", "original_glcm_Idm", "original_shape_Elongation", "original_shape_Volume"]


def _long(patient_id: str, values: dict[str, float | None], version: str = "fs1") -> pl.DataFrame:
    rows = pl.DataFrame(
        {
            "patient_id": patient_id,
            "feature_set_version": version,
            "feature": list(values),
            "value": list(values.values()),
        },
        schema_overrides={"value": pl.Float64},
    )
    return FeatureStore.with_provenance(rows, version="radiomic_features@test", run_id=f"run-{patient_id}")


def _pivot_of_long_rows(store: FeatureStore, version: str, prefixes: tuple[str, ...]) -> tuple:
    """radiomics_matrix as it was before vectors existed: the long rows pivoted."""
    long = store.query(
        "SELECT r.patient_id, r.feature, r.value, c.hcc, c.split FROM radiomic_features r "
        "JOIN cohort_split c USING (patient_id) WHERE r.feature_set_version = ?",
        [version],
    )
    if prefixes:
        long = long.filter(pl.any_horizontal([pl.col("feature").str.starts_with(p) for p in prefixes]))
    wide = long.pivot(on="feature", index=["patient_id", "hcc", "split"], values="value").sort("patient_id")
    names = sorted(c for c in wide.columns if c not in ("patient_id", "hcc", "split"))
    wide = wide.drop_nulls(names)
    return wide["patient_id"].to_list(), names, wide.select(names).to_numpy(), wide["hcc"].cast(pl.Int8).to_list()


def _mixed_store(path) -> FeatureStore:
    """Patients written in random order, some incomplete, one NULL, one NaN, two feature-set
    versions, one patient with an extra feature, one patient outside the cohort."""
    store = FeatureStore(path)
    rng = np.random.default_rng(3)
    pids = [f"pt-{i:02d}" for i in range(24)]
    for pid in rng.permutation(pids):
        values = {name: float(rng.normal()) for name in NAMES}
        number = int(pid[3:])
        if number == 5:
            del values["original_glcm_Idm"]  # incomplete
        if number == 6:
            values["original_shape_Volume"] = None  # NULL
        if number == 7:
            values["original_firstorder_Mean"] = float("nan")  # NaN is a value, kept
        store.replace_partition("radiomic_features", pid, _long(pid, values))
        if number % 4 == 0:  # a second feature set for some patients
            store.replace_partition(
                "radiomic_features",
                pid,
                _long(pid, {"original_shape_Volume": 1.0}, "fs2"),
                match={"feature_set_version": "fs2"},
            )
    store.replace_partition(
        "radiomic_features", "pt-09", _long("pt-09", {**dict.fromkeys(NAMES, 2.0), "original_glszm_ZoneEntropy": 3.0})
    )
    cohort = pl.DataFrame(
        {
            "patient_id": pids[:-1],
            "hcc": [i % 2 == 0 for i in range(23)],
            "split": ["train" if i % 5 else "validation" for i in range(23)],
            "seed": 0,
        }
    )
    store.replace_table("cohort_split", FeatureStore.with_provenance(cohort, version="c", run_id="r"))
    return store


@pytest.fixture(scope="module")
def mixed_store(tmp_path_factory) -> FeatureStore:
    """Read-only tests share one."""
    return _mixed_store(tmp_path_factory.mktemp("mixed") / "fs.sqlite")


@pytest.mark.parametrize(
    "version, prefixes",
    [
        ("fs1", ()),  # pt-09's extra feature is a column, so everyone else lacks one and drops out
        ("fs1", ("original_shape", "original_firstorder", "original_glcm")),
        ("fs1", ("original_shape",)),
        ("fs2", ()),
        ("fs3", ()),
    ],
)
def test_radiomics_matrix_equals_the_pivot_of_the_long_rows(mixed_store, version, prefixes):
    matrix = radiomics_matrix(mixed_store, version, prefixes)
    pids, names, values, hcc = _pivot_of_long_rows(mixed_store, version, prefixes)
    assert matrix.patient_ids == pids and matrix.feature_names == names
    assert np.array_equal(matrix.values, values.reshape(len(pids), len(names)), equal_nan=True)
    assert matrix.hcc.tolist() == hcc and matrix.values.dtype == np.float64
    if version == "fs1" and not prefixes:
        assert pids == ["pt-09"]
    if version == "fs1" and "original_glcm" in prefixes:  # 23 in the cohort; pt-05 and pt-06 incomplete
        assert {"pt-05", "pt-06", "pt-23"}.isdisjoint(pids) and "pt-07" in pids and len(pids) == 21


def test_vectors_follow_rewrites_deletes_and_bulk_writes(tmp_path):
    store = _mixed_store(tmp_path / "fs.sqlite")
    store.replace_partition("radiomic_features", "pt-01", _long("pt-01", dict.fromkeys(NAMES, 7.0)))
    store.delete_partition("radiomic_features", "pt-02")
    bulk = pl.concat([_long(pid, {name: float(i) for name in NAMES}) for i, pid in enumerate(["pt-03", "pt-30"])])
    assert store.replace_partitions("radiomic_features", bulk) == 8
    store.replace_partitions("radiomic_features", bulk)  # again: replaced, not duplicated

    counts = dict(
        store.query(
            "SELECT patient_id, count(*) FROM radiomic_features WHERE feature_set_version = 'fs1' GROUP BY ALL"
        ).iter_rows()
    )
    assert "pt-02" not in counts and counts["pt-03"] == counts["pt-30"] == 4 and counts["pt-09"] == 5
    pairs = store.query("SELECT patient_id, feature_set_version FROM radiomic_vectors ORDER BY ALL").rows()
    long_pairs = store.query(
        "SELECT DISTINCT patient_id, feature_set_version FROM radiomic_features ORDER BY ALL"
    ).rows()
    assert pairs == long_pairs
    # pt-03 had fs2 rows: the bulk write replaced all of pt-03's rows, fs2 included
    assert ("pt-03", "fs2") not in pairs and ("pt-04", "fs2") in pairs
    wide = store.query("SELECT * FROM radiomics WHERE feature_set_version = 'fs1' ORDER BY patient_id")
    long = store.query("SELECT patient_id, feature, value FROM radiomic_features WHERE feature_set_version = 'fs1'")
    expected = long.pivot(on="feature", index="patient_id", values="value").sort("patient_id")
    assert wide.drop("feature_set_version").select(expected.columns).equals(expected, null_equal=True)
    assert store.query("SELECT run_id FROM radiomic_vectors WHERE patient_id = 'pt-01'").item() == "run-pt-01"
    # name lists no patient uses any more are dropped (pt-09's list stays while pt-09 has it)
    lists = store.query("SELECT n_features FROM radiomic_feature_names ORDER BY 1")["n_features"].to_list()
    assert lists == [1, 3, 4, 5]
    store.delete_partition("radiomic_features", "pt-09")
    assert "original_glszm_ZoneEntropy" not in store.query("SELECT * FROM radiomics LIMIT 0").columns


def test_helpers_read_versions_and_names_from_the_vectors(mixed_store):
    assert feature_names(mixed_store, "fs1") == sorted([*NAMES, "original_glszm_ZoneEntropy"])
    assert feature_names(mixed_store, "fs2") == ["original_shape_Volume"]
    assert latest_feature_set_version(mixed_store) == "fs1"  # pt-09 was written last, in fs1


def test_derived_tables_cannot_be_written_directly(tmp_path):
    store = FeatureStore(tmp_path / "fs.sqlite")
    with pytest.raises(FeatureStoreError, match="unknown"):
        store.replace_where("radiomic_vectors", {}, pl.DataFrame())
