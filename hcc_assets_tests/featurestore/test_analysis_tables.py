"""The tables beside model_metrics: a paired comparison is current only while both its models are,
and a store made before specificity/NPV gets the new table_1 view and tables when opened."""

from __future__ import annotations

import polars as pl

from hcc_assets.featurestore import FeatureStore
from hcc_assets.featurestore.reads import report_tables
from hcc_assets.featurestore.registry import model_row


def _register(store: FeatureStore, name: str, version: str) -> None:
    store.register_model(
        model_row(
            name,
            "test",
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


def _comparison(version_a: str, version_b: str, difference: float) -> pl.DataFrame:
    return FeatureStore.with_provenance(
        pl.DataFrame(
            {
                "model_a": "radiomic",
                "model_b": "deep",
                "version_a": version_a,
                "version_b": version_b,
                "n": 10,
                "n_positive": 4,
                "auc_a": 0.9,
                "auc_b": 0.9 - difference,
                "auc_difference": difference,
                "delong_p": 0.5,
            }
        ),
        version=f"{version_a}|{version_b}",
        run_id="r",
    )


def test_comparisons_keep_history_and_are_current_while_both_models_are(tmp_path):
    store = FeatureStore(tmp_path / "fs.sqlite")
    _register(store, "radiomic_model", "r1")
    _register(store, "hcc_classifier", "d1")
    store.replace_versions("model_comparisons", _comparison("r1", "d1", 0.1))
    store.replace_versions("model_comparisons", _comparison("r1", "d1", 0.2))  # same pair again: replaced
    assert store.query("SELECT auc_difference FROM current_model_comparisons").rows() == [(0.2,)]
    _register(store, "hcc_classifier", "d2")  # a retrain: the r1|d1 comparison is history
    assert store.query("SELECT count(*) FROM current_model_comparisons").item() == 0
    store.replace_versions("model_comparisons", _comparison("r1", "d2", 0.05))
    assert store.query("SELECT version, auc_difference FROM model_comparisons ORDER BY version").rows() == [
        ("r1|d1", 0.2),
        ("r1|d2", 0.05),
    ]
    assert report_tables(store)["model_comparisons"]["version"].to_list() == ["r1|d2"]


def test_an_older_store_gets_the_new_table_1_and_tables(tmp_path):
    store = FeatureStore(tmp_path / "fs.sqlite")
    store.ensure_schema()

    def make_it_old(con):
        con.execute(
            "CREATE OR REPLACE VIEW table_1 AS SELECT model, scheme, max(n) AS n FROM current_model_metrics "
            "GROUP BY model, scheme"
        )
        con.execute("DROP VIEW current_calibration")
        con.execute("DROP TABLE calibration")

    store.transaction(make_it_old)
    assert store.query("SELECT * FROM table_1").columns == ["model", "scheme", "n"]
    FeatureStore._ready.clear()  # a new process opens it
    reopened = FeatureStore(tmp_path / "fs.sqlite")
    assert reopened.query("SELECT * FROM table_1").columns[-2:] == ["specificity", "npv"]
    assert "brier_score" in reopened.query("SELECT * FROM current_calibration").columns
