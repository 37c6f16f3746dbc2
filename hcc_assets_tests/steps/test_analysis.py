"""The pure pieces of hcc_assets.steps.analysis (and the prediction summary): no feature store, no Dagster."""

from __future__ import annotations

import logging
from dataclasses import asdict

import numpy as np
import polars as pl
import pytest

from hcc_assets.featurestore.queries import FeatureMatrix
from hcc_assets.steps import analysis
from hcc_assets.steps.prediction import ModelPrediction, PatientPrediction, prediction_table
from hcc_assets.steps.tables import markdown_table


def _matrix(pids, values, hcc=None, split=None, names=None, version="v1") -> FeatureMatrix:
    values = np.asarray(values, dtype=np.float64)
    return FeatureMatrix(
        list(pids),
        names or [f"f{i}" for i in range(values.shape[1])],
        values,
        np.asarray(hcc if hcc is not None else [0] * len(pids)),
        np.asarray(split if split is not None else ["train"] * len(pids)),
        version,
    )


def test_markdown_table_formats_cells():
    text = markdown_table(
        [{"a": 0.123456, "b": None, "c": "x|y"}, {"a": 3, "b": [1.0, "z"], "c": True}], ["a", "b", "c"]
    )
    assert text.splitlines() == ["| a | b | c |", "|---|---|---|", "| 0.1235 |  | x/y |", "| 3 | 1, z | True |"]


def test_analysis_error_reads_what_then_problem():
    error = analysis.AnalysisError("model_metrics", "nothing to do")
    assert str(error) == "model_metrics: nothing to do"
    assert (error.what, error.problem) == ("model_metrics", "nothing to do")


def test_matrix_digest_changes_with_any_value_label_split_or_name():
    base = _matrix(["p1", "p2"], [[1.0, 2.0], [3.0, 4.0]], hcc=[0, 1])
    digest = analysis.matrix_digest(base)
    assert digest == analysis.matrix_digest(_matrix(["p1", "p2"], [[1.0, 2.0], [3.0, 4.0]], hcc=[0, 1]))
    assert len(digest) == 12
    changed = [
        _matrix(["p1", "p2"], [[1.0, 2.0], [3.0, 4.5]], hcc=[0, 1]),
        _matrix(["p1", "p2"], [[1.0, 2.0], [3.0, 4.0]], hcc=[1, 1]),
        _matrix(["p1", "p2"], [[1.0, 2.0], [3.0, 4.0]], hcc=[0, 1], split=["train", "validation"]),
        _matrix(["p1", "p2"], [[1.0, 2.0], [3.0, 4.0]], hcc=[0, 1], names=["a", "b"]),
        _matrix(["p1", "p3"], [[1.0, 2.0], [3.0, 4.0]], hcc=[0, 1]),
    ]
    assert len({digest, *(analysis.matrix_digest(m) for m in changed)}) == 6


def test_digest_ignores_dict_order_but_not_values():
    assert analysis.digest({"a": 1, "b": 2}) == analysis.digest({"b": 2, "a": 1})
    assert analysis.digest({"a": 1, "b": 2}) != analysis.digest({"a": 1, "b": 3})


def test_settings_hash_like_the_dagster_configs_they_replace():
    # the model version hashes these dicts: the fields, their order and defaults are the configs'
    assert asdict(analysis.LassoSettings()) == {
        "seed": 0,
        "cv_folds": 3,
        "n_lambdas": 7,
        "lambda_min": 1e-3,
        "lambda_max": 1e3,
        "study_features_only": True,
    }
    assert asdict(analysis.SelectionSettings()) == {"threshold": 0.5, "measure": "pearson", "study_features_only": True}
    np.testing.assert_allclose(
        analysis.LassoSettings(n_lambdas=3, lambda_min=0.1, lambda_max=10).lambdas(), [0.1, 1, 10]
    )


def test_with_both_keeps_the_common_patients_and_their_rows():
    # both matrices come from the store sorted by patient id
    dl = _matrix(["p1", "p2", "p3"], [[1.0], [2.0], [3.0]])
    hc = _matrix(["p0", "p1", "p2", "p4"], [[0.0], [10.0], [20.0], [40.0]])
    dl_both, hc_both = analysis.with_both(dl, hc)
    assert dl_both.patient_ids == hc_both.patient_ids == ["p1", "p2"]
    assert dl_both.values[:, 0].tolist() == [1.0, 2.0]
    assert hc_both.values[:, 0].tolist() == [10.0, 20.0]


def test_kept_rows_name_the_strongest_related_feature():
    from hcc_assets.stats.association import ExplainableSelection

    selection = ExplainableSelection(
        threshold=0.5,
        measure="pearson",
        kept=[0, 2],
        related={0: [("hc_b", -0.9), ("hc_a", 0.6)], 1: [], 2: [("hc_a", 0.55)]},
        matrix=np.zeros((3, 2)),
    )
    assert analysis.kept_rows(selection, ["dl_0", "dl_1", "dl_2"]) == [
        {"dl_feature": "dl_0", "n_related": 2, "strongest": "hc_b", "value": -0.9},
        {"dl_feature": "dl_2", "n_related": 1, "strongest": "hc_a", "value": 0.55},
    ]


def test_exclusion_reasons_count_each_reason_and_the_missing():
    assert analysis.exclusion_reasons(["empty mask", "too small", "empty mask"], 2) == {
        "empty mask": 2,
        "too small": 1,
        "no radiomic features of the current feature set": 2,
    }
    assert analysis.exclusion_reasons([], 0) == {}


def test_lasso_settings_from_registry_params():
    settings = analysis.lasso_settings_from_params({"seed": 4, "cv_folds": 2, "lambdas": [10.0, 0.01, 1.0]})
    assert (settings.seed, settings.cv_folds, settings.n_lambdas) == (4, 2, 3)
    assert (settings.lambda_min, settings.lambda_max) == (0.01, 10.0)
    assert analysis.lasso_settings_from_params({}) == analysis.LassoSettings()


def _validation(model_rows: list[tuple[str, int, float]], version: str) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "patient_id": [r[0] for r in model_rows],
            "label": [bool(r[1]) for r in model_rows],
            "probability": [r[2] for r in model_rows],
            "version": [version] * len(model_rows),
        }
    )


def test_paired_comparisons_refuse_disagreeing_labels():
    a = _validation([("p1", 1, 0.9), ("p2", 0, 0.1)], "va")
    b = _validation([("p1", 0, 0.8), ("p2", 0, 0.2)], "vb")
    with pytest.raises(analysis.AnalysisError, match="disagree on the label of 1 validation patient"):
        analysis.paired_comparisons({"radiomic": a, "deep": b}, analysis.MetricsSettings(n_bootstrap=10))


def test_paired_comparisons_skip_pairs_without_two_of_each_class():
    a = _validation([("p1", 1, 0.9), ("p2", 0, 0.1), ("p3", 0, 0.3)], "va")
    b = _validation([("p1", 1, 0.8), ("p2", 0, 0.2), ("p3", 0, 0.4)], "vb")
    rows, skipped = analysis.paired_comparisons({"radiomic": a, "deep": b}, analysis.MetricsSettings(n_bootstrap=10))
    assert rows == []
    assert skipped == [
        "radiomic vs deep: 3 common validation patients, 1 HCC (a paired AUC comparison needs at least 2 of each class)"
    ]


def test_paired_comparisons_use_the_common_patients():
    rng = np.random.default_rng(0)
    labels = [1, 0] * 6
    a = _validation([(f"p{i:02d}", y, float(rng.uniform())) for i, y in enumerate(labels)], "va")
    b = _validation([(f"p{i:02d}", y, float(rng.uniform())) for i, y in enumerate(labels)][2:], "vb")
    rows, skipped = analysis.paired_comparisons({"radiomic": a, "deep": b}, analysis.MetricsSettings(n_bootstrap=50))
    assert skipped == []
    (row,) = rows
    assert (row["model_a"], row["model_b"], row["n"], row["n_positive"]) == ("radiomic", "deep", 10, 5)
    assert row["version"] == "va|vb"
    assert row["auc_difference"] == pytest.approx(row["auc_a"] - row["auc_b"])


def test_threshold_rows_count_strictly_above_the_threshold():
    y = np.array([1, 1, 0, 0])
    p = np.array([0.9, 0.5, 0.5, 0.1])
    confusion, calibration = analysis.threshold_rows(
        "deep", "v1", y, p, analysis.MetricsSettings(threshold=0.5, calibration_bins=2)
    )
    assert {k: confusion[k] for k in ("tp", "fp", "tn", "fn", "n")} == {"tp": 1, "fp": 0, "tn": 2, "fn": 1, "n": 4}
    assert {r["n_bins"] for r in calibration} == {2}
    assert sum(r["n"] for r in calibration) == 4
    assert [r["brier_score"] for r in calibration] == pytest.approx(
        [(0.01 + 0.25 + 0.25 + 0.01) / 4] * len(calibration)
    )


def test_estimate_rows_carry_model_and_scheme():
    from hcc_assets.stats.metrics import bootstrap_metrics

    y = np.array([1, 0, 1, 0, 1, 0])
    p = np.array([0.8, 0.2, 0.7, 0.4, 0.6, 0.3])
    rows = analysis.estimate_rows("radiomic", analysis.HOLDOUT_SCHEME, bootstrap_metrics(y, p, n_resamples=20, seed=0))
    assert {(r["model"], r["scheme"]) for r in rows} == {("radiomic", "holdout_bootstrap")}
    accuracy = next(r for r in rows if r["metric"] == "accuracy")
    assert accuracy["estimate"] == 1.0 and accuracy["n"] == 6


def test_explainable_fit_predict_falls_back_to_the_prior_when_nothing_is_explainable():
    rng = np.random.default_rng(1)
    n = 12
    dl = rng.normal(size=(n, 2))
    hc = rng.normal(size=(n, 2))
    y = np.array([0, 1] * (n // 2))
    fit_predict = analysis.explainable_fit_predict(
        analysis.LassoSettings(cv_folds=2, n_lambdas=3), {"threshold": 0.999, "measure": "pearson"}, 2, ["h0", "h1"]
    )
    predicted = fit_predict(np.hstack([dl, hc])[:8], y[:8], np.hstack([dl, hc])[8:])
    assert predicted.tolist() == [0.5] * 4


def test_standardized_selected_are_the_lasso_inputs_of_its_selected_features():
    from hcc_assets.stats.lasso import fit_lasso

    rng = np.random.default_rng(2)
    y = np.array([0, 1] * 15)
    x = np.column_stack([y * 3.0 + rng.normal(size=30), np.ones(30), rng.normal(size=30)])
    fit = fit_lasso(x, y, ["signal", "constant", "noise"], seed=0, cv_folds=3)
    standardized, names = analysis.standardized_selected(fit, x)
    assert "constant" not in names and "signal" in names
    assert names == list(fit.selected)
    column = standardized[:, names.index("signal")]
    assert column.mean() == pytest.approx(0, abs=1e-9)
    assert column.std() == pytest.approx(1, rel=1e-6)


def test_related_summary_lists_at_most_limit_and_counts_the_rest():
    rows = pl.DataFrame(
        {
            "dl_feature": ["dl_0"] * 3 + ["dl_1"],
            "handcrafted_feature": ["a", "b", "c", "d"],
            "value": [0.91, -0.8, 0.7, 0.5],
        }
    )
    assert analysis.related_summary(rows, limit=2) == {"dl_0": "a (+0.91); b (-0.80); +1 more", "dl_1": "d (+0.50)"}


def test_progress_and_warnings_go_to_the_log(caplog):
    # compute_model_metrics takes any logger with info and warning; a plain logging.Logger does
    log: analysis.Log = logging.getLogger("steps")
    with caplog.at_level(logging.INFO, logger="steps"):
        log.warning("w")
    assert caplog.messages == ["w"]


def test_prediction_table_reads_the_decision_at_the_threshold():
    prediction = PatientPrediction(
        "p1",
        0.5,
        [
            ModelPrediction("deep", "v1", 0.5, "v1", None),
            ModelPrediction("radiomic", "r1", 0.51, "fs", None),
            ModelPrediction("explainable", None, None, None, "no model"),
        ],
    )
    assert [(r["HCC at threshold"], r["version"], r["note"]) for r in prediction_table(prediction)] == [
        ("no", "v1", ""),
        ("yes", "r1", ""),
        ("", "", "no model"),
    ]
