import math

import numpy as np
import polars as pl

from hcc_assets.stats.sweep import explainability_sweep


def small_cohort(seed: int = 0, n_train: int = 32, n_validation: int = 8):
    """Study-sized: 32 training patients, DL features partly driven by a label-linked radiomic feature."""
    rng = np.random.default_rng(seed)
    n = n_train + n_validation
    y = np.r_[np.tile([0, 1], n_train // 2), np.tile([0, 1], n_validation // 2)]
    handcrafted = rng.standard_normal((n, 10))
    handcrafted[:, 0] += 1.5 * y
    deep = rng.standard_normal((n, 16))
    deep[:, :4] += handcrafted[:, :1]
    return handcrafted[:n_train], deep[:n_train], y[:n_train], deep[n_train:], y[n_train:]


def test_one_row_per_measure_and_threshold():
    hc_train, dl_train, y_train, dl_val, y_val = small_cohort()
    table = explainability_sweep(
        dl_train, hc_train, [f"hc{i}" for i in range(10)], y_train, dl_val, y_val, thresholds=(0.3, 0.5, 0.99)
    )
    assert table.columns == [
        "measure",
        "threshold",
        "n_kept",
        "n_selected",
        "cv_accuracy",
        "val_accuracy",
        "val_roc_auc",
    ]
    assert table.height == 9
    assert sorted(table.select("measure", "threshold").rows()) == sorted(
        (m, t) for m in ("pearson", "spearman", "distance") for t in (0.3, 0.5, 0.99)
    )
    # a higher threshold never keeps more features
    for measure in ("pearson", "spearman", "distance"):
        kept = table.filter(pl.col("measure") == measure).sort("threshold")["n_kept"].to_list()
        assert kept == sorted(kept, reverse=True)
    pearson_half = table.filter((pl.col("measure") == "pearson") & (pl.col("threshold") == 0.5)).row(0, named=True)
    assert pearson_half["n_kept"] >= 4 and 0 <= pearson_half["val_accuracy"] <= 1
    assert 0 <= pearson_half["cv_accuracy"] <= 1


def test_nothing_kept_gives_nan_without_crashing():
    hc_train, dl_train, y_train, dl_val, y_val = small_cohort(seed=1)
    table = explainability_sweep(
        dl_train,
        hc_train,
        [f"hc{i}" for i in range(10)],
        y_train,
        dl_val,
        y_val,
        thresholds=(0.999,),
        measures=("pearson", "distance"),
    )
    assert table["n_kept"].to_list() == [0, 0] and table["n_selected"].to_list() == [0, 0]
    assert all(math.isnan(v) for v in table["val_accuracy"].to_list() + table["cv_accuracy"].to_list())


def test_kept_features_all_constant_gives_nan_row():
    rng = np.random.default_rng(2)
    hc_train = rng.standard_normal((12, 2))
    dl_train = np.full((12, 1), 1.0)
    y_train = np.tile([0, 1], 6)
    # threshold 0 keeps the constant DL column (association 0 >= 0); the variance filter then drops it
    table = explainability_sweep(
        dl_train,
        hc_train,
        ["a", "b"],
        y_train,
        np.ones((4, 1)),
        np.array([0, 1, 0, 1]),
        thresholds=(0.0,),
        measures=("pearson",),
    )
    row = table.row(0, named=True)
    assert row["n_kept"] == 1 and row["n_selected"] == 0 and math.isnan(row["val_accuracy"])
