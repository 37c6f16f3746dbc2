"""The report's paired-comparison, confusion-matrix and calibration sections, rendered from frames
shaped like the feature-store tables (no store, no Dagster)."""

import numpy as np
import polars as pl

from hcc_assets.stats.calibration import brier_score, calibration_bins
from hcc_assets.stats.comparison import delong_test, paired_bootstrap_auc_difference
from hcc_assets.stats.metrics import bootstrap_metrics, confusion_matrix
from hcc_assets.stats.report import ReportInputs, build_report, calibration_figure

MODELS = ("radiomic", "deep", "explainable")


def _inputs() -> ReportInputs:
    rng = np.random.default_rng(0)
    pids = [f"pt-{i:02d}" for i in range(30)]
    y = np.r_[np.ones(12), np.zeros(18)].astype(int)
    scores = {m: np.clip(0.5 * y + rng.random(30) * (0.5 + 0.2 * k), 0, 1) for k, m in enumerate(MODELS)}
    predictions = pl.DataFrame(
        [
            {"model": m, "patient_id": pid, "probability": float(scores[m][i]), "label": bool(y[i])}
            for m in MODELS
            for i, pid in enumerate(pids)
        ]
    )
    metrics, confusion, calibration = [], [], []
    for m in MODELS:
        for e in bootstrap_metrics(y, scores[m], n_resamples=100, seed=0):
            metrics.append(
                {
                    "model": m,
                    "scheme": "holdout_bootstrap",
                    "metric": e.metric,
                    "estimate": e.estimate,
                    "mean": e.mean,
                    "ci_low": e.ci_low,
                    "ci_high": e.ci_high,
                    "n": e.n,
                    "n_resamples": e.n_resamples_used,
                    "n_degenerate": e.n_degenerate,
                }
            )
        c = confusion_matrix(y, scores[m])
        confusion.append(
            {"model": m, "threshold": c.threshold, "n": c.n, "tp": c.tp, "fp": c.fp, "tn": c.tn, "fn": c.fn}
        )
        calibration += [
            {
                "model": m,
                "n_bins": 10,
                "bin": b.bin,
                "bin_low": b.low,
                "bin_high": b.high,
                "n": b.n,
                "mean_predicted": b.mean_predicted,
                "observed_rate": b.observed_rate,
                "brier_score": brier_score(y, scores[m]),
            }
            for b in calibration_bins(y, scores[m])
        ]
    comparisons = []
    for a, b in (("radiomic", "deep"), ("radiomic", "explainable"), ("deep", "explainable")):
        d = delong_test(y, scores[a], scores[b])
        boot = paired_bootstrap_auc_difference(y, scores[a], scores[b], n_resamples=100, seed=0)
        comparisons.append(
            {
                "model_a": a,
                "model_b": b,
                "n": d.n,
                "n_positive": d.n_positive,
                "auc_a": d.auc_a,
                "auc_b": d.auc_b,
                "auc_difference": d.difference,
                "ci_low": boot.ci_low,
                "ci_high": boot.ci_high,
                "n_resamples": boot.n_resamples_used,
                "n_degenerate": boot.n_degenerate,
                "delong_z": d.z,
                "delong_p": d.p_value,
                "delong_ci_low": d.ci_low,
                "delong_ci_high": d.ci_high,
            }
        )
    empty = pl.DataFrame()
    return ReportInputs(
        cohort=pl.DataFrame(
            {"patient_id": pids, "hcc": y.astype(bool), "split": ["validation"] * 30, "source": ["synthetic"] * 30}
        ),
        exclusions=pl.DataFrame(schema={"patient_id": pl.String, "stage": pl.String, "reason": pl.String}),
        masks=pl.DataFrame(schema={"patient_id": pl.String, "liver_ml": pl.Float64, "dice_liver": pl.Float64}),
        metrics=pl.DataFrame(metrics),
        history=empty,
        predictions=predictions,
        coefficients=empty,
        sweep=empty,
        models=pl.DataFrame(
            schema={"model_name": pl.String, "version": pl.String, "kind": pl.String, "init": pl.String}
        ),
        model_comparisons=pl.DataFrame(comparisons),
        confusion_matrices=pl.DataFrame(confusion),
        calibration=pl.DataFrame(calibration),
    )


def test_report_shows_comparisons_confusion_matrices_and_calibration():
    inputs = _inputs()
    rendered = build_report(inputs)
    markdown = rendered.markdown
    assert "## Paired comparison of the models on the same validation patients" in markdown
    assert "| Radiomic | DL | 30 (12) |" in markdown  # model A, model B, n (HCC)
    first = inputs.model_comparisons.row(0, named=True)
    assert f"{first['auc_difference']:.3f}" in markdown and f"{first['delong_ci_low']:.3f} to" in markdown
    assert "## Confusion matrices" in markdown
    c = inputs.confusion_matrices.row(0, named=True)
    specificity = f"{c['tn'] / (c['tn'] + c['fp']):.3f} ({c['tn']}/{c['tn'] + c['fp']})"
    npv = f"{c['tn'] / (c['tn'] + c['fn']):.3f} ({c['tn']}/{c['tn'] + c['fn']})"
    assert f"| Radiomic | 0.50 | 30 | {c['tp']} | {c['fp']} | {c['tn']} | {c['fn']} |" in markdown
    assert specificity in markdown and npv in markdown
    assert "| Specificity | NPV | n |" in markdown  # Table 1's new columns
    assert set(rendered.figures) == {"roc.png", "calibration.png"}
    assert "](calibration.png)" in markdown and rendered.html.count("data:image/png;base64,") == 2
    assert rendered.figures["calibration.png"].startswith(b"\x89PNG")


def test_the_report_names_each_models_training_settings():
    """The demo trains nnU-Net at 4 mm and the classifier for 20 epochs: the report says so, beside
    the version, so its Table 1 is not read as the study's settings."""
    import json

    from hcc_assets.stats.report import training_settings

    segmentation = {"configuration": "2d_cpu", "spacing": [4.0, 4.0], "epochs": 12, "iterations_per_epoch": 40}
    classifier = {"depth": 50, "min_epochs": 20, "max_epochs": 20, "patience": 10}
    assert training_settings(segmentation) == "2d_cpu, in-plane spacing 4 x 4 mm, 12 x 40 iterations"
    assert training_settings(classifier) == "depth 50, 20 epochs"
    assert training_settings({**classifier, "max_epochs": 100}) == "depth 50, 20-100 epochs (patience 10)"
    assert training_settings({"alpha": 0.1}) == ""
    inputs = _inputs()
    inputs.models = pl.DataFrame(
        {
            "model_name": ["hcc_classifier", "radiomic_model"],
            "version": ["abc", "def"],
            "kind": ["resnet3d", "lasso_logistic"],
            "init": ["seeded-random", None],
            "params": [json.dumps(classifier), json.dumps({"alpha": 0.1})],
        }
    )
    markdown = build_report(inputs).markdown
    assert "Model hcc_classifier: version abc (resnet3d, init seeded-random; depth 50, 20 epochs)." in markdown
    assert "Model radiomic_model: version def (lasso_logistic)." in markdown


def test_calibration_figure_is_deterministic_and_absent_without_rows():
    calibration = _inputs().calibration
    assert calibration_figure(calibration) == calibration_figure(calibration)
    assert calibration_figure(calibration.head(0)) is None and calibration_figure(None) is None
    without = build_report(
        ReportInputs(
            **{**_inputs().__dict__, "calibration": None, "model_comparisons": None, "confusion_matrices": None}
        )
    )
    assert "Paired comparison" not in without.markdown and "calibration.png" not in without.figures
