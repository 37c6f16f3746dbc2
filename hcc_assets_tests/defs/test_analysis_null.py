"""The leakage guard: on a null cohort (lesion contrast 0: the labels carry no image signal) no
model may look better than chance. Fitting the filters, the scaler or the explainable-feature
correlations on all patients instead of the training patients would show up here."""

import polars as pl
import pytest

from hcc_assets_tests.defs.study import run_study
from hcc_assets_tests.scratch import module_scratch

NULL_SEED = 8


@pytest.fixture(scope="module")
def null_study(tmp_path_factory):
    with module_scratch(tmp_path_factory, "study_null") as root:
        yield run_study(root, NULL_SEED, 0.0, null_cohort=True)


def test_every_model_accuracy_ci_contains_chance(null_study):
    accuracy = null_study.store.query(
        "SELECT model, scheme, estimate, ci_low, ci_high FROM current_model_metrics WHERE metric = 'accuracy'"
    )
    holdout = accuracy.filter(pl.col("scheme") == "holdout_bootstrap")
    assert set(holdout["model"]) == {"radiomic", "deep", "explainable"}
    for row in accuracy.iter_rows(named=True):
        assert row["ci_low"] <= 0.5 <= row["ci_high"], row
