"""The study's report, rendered from feature-store tables: self-contained HTML (figures as data URIs,
so it opens in a browser with no server) and Markdown (figures as PNG files beside it).

Sections: cohort summary, Table 1 (holdout metrics with bootstrap CIs; repeated CV beside them),
the paired comparison of the models on the same validation patients (AUC difference with a paired
bootstrap CI and DeLong's test), confusion matrices, Figure 1 (slice with mask overlay), Figure 2
(training curves), ROC curves, the calibration plot, coefficients and the explainability sweep.
Only pseudonymous patient keys ever appear.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, cast

import polars as pl

from hcc_assets.core.figures import figure_png, plot_history, thumbnail_data_uri

if TYPE_CHECKING:
    import nibabel as nib

MODEL_LABELS = {"radiomic": "Radiomic", "deep": "DL", "explainable": "Explainable DL"}
TABLE_1_METRICS = (
    ("accuracy", "Accuracy"),
    ("precision", "Precision"),
    ("recall", "Recall"),
    ("f1", "F1"),
    ("roc_auc", "ROC AUC"),
    ("specificity", "Specificity"),
    ("npv", "NPV"),
)


@dataclass
class ReportInputs:
    cohort: pl.DataFrame  # patient_id, hcc, split, source
    exclusions: pl.DataFrame  # patient_id, stage, reason
    masks: pl.DataFrame  # patient_id, liver_ml, dice_liver
    metrics: pl.DataFrame  # model_metrics
    history: pl.DataFrame  # training_history of the classifier
    predictions: pl.DataFrame  # predictions (validation rows)
    coefficients: pl.DataFrame
    sweep: pl.DataFrame
    models: pl.DataFrame  # model_name, version, init, kind; params (JSON) where known
    comparison: pl.DataFrame | None = None  # model, metric, current_version, current, previous_version, previous
    model_comparisons: pl.DataFrame | None = None  # current_model_comparisons (paired AUC comparisons)
    confusion_matrices: pl.DataFrame | None = None  # current_confusion_matrices
    calibration: pl.DataFrame | None = None  # current_calibration (one row per non-empty bin)
    figure_1: bytes | None = None
    figure_1_caption: str = ""


@dataclass
class RenderedReport:
    html: str
    markdown: str  # figures referenced as PNG files in the same folder
    markdown_inline: str  # for asset metadata: figures as thumbnails (data URIs of <= 16 KB each), not full PNGs
    figures: dict[str, bytes] = field(default_factory=dict)


# The coefficient table's columns, in the report and in the coefficients asset's metadata.
COEFFICIENT_COLUMNS = [
    "model",
    "feature",
    "beta",
    "std_error",
    "z",
    "p_value",
    "odds_change_pct",
    "status",
    "related_handcrafted",
]


def gather_report_inputs(
    tables: dict[str, pl.DataFrame],
    figure_1_case: Callable[[str], tuple[nib.Nifti1Image, nib.Nifti1Image]] | None = None,
    overlay: Callable[[nib.Nifti1Image, nib.Nifti1Image], bytes] | None = None,
) -> ReportInputs:
    """The report's inputs from the feature-store tables (`featurestore.reads.report_tables`).
    `figure_1_case(patient_id)` returns (image, mask) NIfTI for Figure 1, drawn with `overlay`; the
    patient is the first validation HCC patient with a mask (else any patient with one)."""
    masks, cohort = tables["masks"], tables["cohort"]
    inputs = ReportInputs(
        cohort=tables["cohort"],
        exclusions=tables["exclusions"],
        masks=tables["masks"],
        metrics=tables["metrics"],
        history=tables["history"],
        predictions=tables["predictions"],
        coefficients=tables["coefficients"],
        sweep=tables["sweep"],
        models=tables["models"],
        comparison=tables.get("comparison"),
        model_comparisons=tables.get("model_comparisons"),
        confusion_matrices=tables.get("confusion_matrices"),
        calibration=tables.get("calibration"),
    )
    if figure_1_case is not None and overlay is not None and masks.height:
        with_mask = set(masks["patient_id"].to_list())
        preferred = cohort.filter(pl.col("hcc") & (pl.col("split") == "validation"))["patient_id"].to_list()
        candidates = [p for p in preferred if p in with_mask] or sorted(with_mask)
        image, mask = figure_1_case(candidates[0])
        inputs.figure_1 = overlay(image, mask)
        inputs.figure_1_caption = (
            f"Figure 1: T2-weighted slice of patient {candidates[0]} with its nnU-Net mask (liver red, spleen blue)."
        )
    return inputs


# -- figures -------------------------------------------------------------------------------------


def roc_figure(predictions: pl.DataFrame) -> bytes | None:
    """ROC curves of every model on its validation patients."""
    import matplotlib.style
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    curves = []
    for model, label in MODEL_LABELS.items():
        rows = predictions.filter(pl.col("model") == model)
        y = rows["label"].cast(pl.Int8).to_numpy()
        if rows.height == 0 or len(set(y.tolist())) < 2:
            continue
        p = rows["probability"].to_numpy()
        fpr, tpr, _ = roc_curve(y, p)
        curves.append((fpr, tpr, f"{label} (AUC {roc_auc_score(y, p):.2f}, n={rows.height})"))
    if not curves:
        return None
    # matplotlib's own style: nnU-Net's import sets a global seaborn style with 2.5x fonts
    with matplotlib.style.context("default"):
        figure = Figure(figsize=(5.5, 5), dpi=100, layout="constrained")
        axes = figure.subplots()
        for fpr, tpr, label in curves:
            axes.plot(fpr, tpr, label=label)
        axes.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
        axes.set(
            xlabel="1 - specificity",
            ylabel="sensitivity",
            title="ROC, validation patients",
            xlim=(-0.01, 1.01),
            ylim=(-0.01, 1.01),
        )
        axes.legend(loc="lower right")
        return figure_png(figure)


def calibration_figure(calibration: pl.DataFrame | None) -> bytes | None:
    """Reliability diagram: each model's observed HCC rate against its mean predicted P(HCC) per
    bin (rows of `calibration`: model, bin, n, mean_predicted, observed_rate, brier_score), marker
    area following the bin's patient count, Brier score in the legend; None without rows."""
    import matplotlib.style
    from matplotlib.figure import Figure

    if calibration is None or calibration.height == 0:
        return None
    with matplotlib.style.context("default"):
        figure = Figure(figsize=(5.5, 5), dpi=100, layout="constrained")
        axes = figure.subplots()
        axes.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
        for model, label in MODEL_LABELS.items():
            rows = calibration.filter(pl.col("model") == model).sort("bin")
            if rows.height == 0:
                continue
            sizes = [20 + 180 * n / max(cast(float, rows["n"].max()), 1) for n in rows["n"].to_list()]
            line = axes.plot(
                rows["mean_predicted"].to_list(),
                rows["observed_rate"].to_list(),
                marker="",
                label=f"{label} (Brier {_fmt(rows['brier_score'][0])}, n={int(rows['n'].sum())})",
            )[0]
            axes.scatter(
                rows["mean_predicted"].to_list(),
                rows["observed_rate"].to_list(),
                s=sizes,
                color=line.get_color(),
                alpha=0.7,
            )
        axes.set(
            xlabel="mean predicted P(HCC) in bin",
            ylabel="observed fraction with HCC",
            title="Calibration, validation patients",
            xlim=(-0.02, 1.02),
            ylim=(-0.02, 1.02),
        )
        axes.legend(loc="upper left")
        return figure_png(figure)


# -- tables --------------------------------------------------------------------------------------


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}f}" if abs(value) >= 10**-digits or value == 0 else f"{value:.2e}"
    return str(value)


def table_1(metrics: pl.DataFrame, scheme: str) -> tuple[list[str], list[list[str]]]:
    """The study's Table 1: one row per model, 'estimate (95% CI low-high)' per metric."""
    header = ["Model"] + [label for _, label in TABLE_1_METRICS] + ["n"]
    rows = []
    for model, label in MODEL_LABELS.items():
        part = metrics.filter((pl.col("scheme") == scheme) & (pl.col("model") == model))
        if part.height == 0:
            continue
        cells = [label]
        for metric, _ in TABLE_1_METRICS:
            row = part.filter(pl.col("metric") == metric)
            if row.height == 0:
                cells.append("")
                continue
            r = row.row(0, named=True)
            cells.append(f"{_fmt(r['estimate'])} ({_fmt(r['ci_low'])}-{_fmt(r['ci_high'])})")
        cells.append(str(part["n"].max()))
        rows.append(cells)
    return header, rows


def _interval(low, high) -> str:
    return f"{_fmt(low)} to {_fmt(high)}"


def paired_comparison_table(comparisons: pl.DataFrame | None) -> tuple[list[str], list[list[str]]]:
    """One row per pair of models: AUCs on the patients both scored, the difference A - B with its
    paired-bootstrap and DeLong 95% intervals, and DeLong's z and two-sided p."""
    header = [
        "Model A",
        "Model B",
        "n (HCC)",
        "AUC A",
        "AUC B",
        "AUC A - B",
        "Bootstrap 95% CI",
        "DeLong 95% CI",
        "DeLong z",
        "DeLong p",
        "Resamples (skipped)",
    ]
    rows = []
    for r in comparisons.iter_rows(named=True) if comparisons is not None else ():
        rows.append(
            [
                MODEL_LABELS.get(r["model_a"], r["model_a"]),
                MODEL_LABELS.get(r["model_b"], r["model_b"]),
                f"{r['n']} ({r['n_positive']})",
                _fmt(r["auc_a"]),
                _fmt(r["auc_b"]),
                _fmt(r["auc_difference"]),
                _interval(r["ci_low"], r["ci_high"]),
                _interval(r["delong_ci_low"], r["delong_ci_high"]),
                _fmt(r["delong_z"]),
                _fmt(r["delong_p"]),
                f"{_fmt(r['n_resamples'])} ({_fmt(r['n_degenerate'])})",
            ]
        )
    return header, rows


def _count_ratio(numerator: int, denominator: int) -> str:
    return f"{_fmt(numerator / denominator) if denominator else 'n/a'} ({numerator}/{denominator})"


def confusion_table(
    confusion: pl.DataFrame | None, calibration: pl.DataFrame | None = None
) -> tuple[list[str], list[list[str]]]:
    """One row per model: the confusion matrix at its threshold, sensitivity, specificity, PPV and
    NPV as fractions of the counts, and the Brier score (from `calibration`)."""
    header = ["Model", "Threshold", "n", "TP", "FP", "TN", "FN", "Sensitivity", "Specificity", "PPV", "NPV", "Brier"]
    brier = {}
    if calibration is not None and calibration.height:
        brier = dict(calibration.group_by("model").agg(pl.col("brier_score").first()).iter_rows())
    rows = []
    for r in confusion.iter_rows(named=True) if confusion is not None else ():
        tp, fp, tn, fn = r["tp"], r["fp"], r["tn"], r["fn"]
        rows.append(
            [
                MODEL_LABELS.get(r["model"], r["model"]),
                _fmt(r["threshold"], 2),
                str(r["n"]),
                str(tp),
                str(fp),
                str(tn),
                str(fn),
                _count_ratio(tp, tp + fn),
                _count_ratio(tn, tn + fp),
                _count_ratio(tp, tp + fp),
                _count_ratio(tn, tn + fn),
                _fmt(brier.get(r["model"])),
            ]
        )
    return header, rows


def _frame_table(frame: pl.DataFrame, columns: list[str]) -> tuple[list[str], list[list[str]]]:
    present = [c for c in columns if c in frame.columns]
    return present, [[_fmt(r[c]) for c in present] for r in frame.iter_rows(named=True)]


def _cohort_lines(inputs: ReportInputs) -> list[str]:
    cohort = inputs.cohort
    lines = []
    n_hcc = int(cohort["hcc"].sum()) if cohort.height else 0
    lines.append(f"{cohort.height} patients: {n_hcc} HCC, {cohort.height - n_hcc} healthy.")
    for split in ("train", "validation"):
        part = cohort.filter(pl.col("split") == split)
        lines.append(f"{split}: {part.height} patients ({int(part['hcc'].sum()) if part.height else 0} HCC).")
    sources = cohort.group_by("source").len().sort("source").iter_rows()
    lines.append("Sources: " + ", ".join(f"{s or 'unknown'} {n}" for s, n in sources) + ".")
    if inputs.masks.height:
        dice = inputs.masks["dice_liver"].drop_nulls()
        volume = inputs.masks["liver_ml"].drop_nulls()
        text = f"Liver masks: {inputs.masks.height} patients, liver volume median {cast(float, volume.median()):.0f} mL"
        if dice.len():
            mean, low = cast(float, dice.mean()), cast(float, dice.min())
            text += f"; Dice against reference masks mean {mean:.3f} (min {low:.3f}, n={dice.len()})"
        lines.append(text + ".")
    if inputs.exclusions.height:
        reasons = inputs.exclusions.group_by("stage", "reason").len().sort("stage", "reason")
        lines.append(
            "Exclusions: " + "; ".join(f"{n} x {stage}: {reason}" for stage, reason, n in reasons.iter_rows()) + "."
        )
    else:
        lines.append("Exclusions: none.")
    for row in inputs.models.iter_rows(named=True):
        init = f", init {row['init']}" if row["init"] else ""
        settings = training_settings(json.loads(row.get("params") or "{}"))
        settings = f"; {settings}" if settings else ""
        lines.append(f"Model {row['model_name']}: version {row['version']} ({row['kind']}{init}{settings}).")
    return lines


def training_settings(params: dict) -> str:
    """The training settings a reader needs to tell the study's models from reduced ones (a
    deployment's, such as the demo's 4 mm nnU-Net and 20-epoch classifier), from a model's params."""
    parts = []
    if params.get("configuration"):
        parts.append(str(params["configuration"]))
    if params.get("spacing"):
        parts.append("in-plane spacing " + " x ".join(f"{float(v):g}" for v in params["spacing"]) + " mm")
    if params.get("epochs") and params.get("iterations_per_epoch"):
        parts.append(f"{params['epochs']} x {params['iterations_per_epoch']} iterations")
    if params.get("depth"):
        parts.append(f"depth {params['depth']}")
    low, high = params.get("min_epochs"), params.get("max_epochs")
    if low is not None and high is not None:
        parts.append(f"{low} epochs" if low == high else f"{low}-{high} epochs (patience {params.get('patience')})")
    return ", ".join(parts)


# -- rendering -----------------------------------------------------------------------------------

# A block of a report section: ("lines", bullet lines), ("table", (header, rows)) or ("figure", file name).
_Block = (
    tuple[Literal["lines"], list[str]]
    | tuple[Literal["table"], tuple[list[str], list[list[str]]]]
    | tuple[Literal["figure"], str]
)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "_none_\n"
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def build_report(inputs: ReportInputs) -> RenderedReport:
    figures: dict[str, tuple[bytes, str]] = {}
    if inputs.figure_1:
        figures["figure_1.png"] = (inputs.figure_1, inputs.figure_1_caption)
    if inputs.history.height:
        figures["figure_2.png"] = (
            plot_history(inputs.history.to_dicts()),
            "Figure 2: accuracy and loss of the 3D ResNet classifier over epochs.",
        )
    roc = roc_figure(inputs.predictions)
    if roc:
        figures["roc.png"] = (roc, "ROC curves of the three models on the validation patients.")
    calibration = calibration_figure(inputs.calibration)
    if calibration and inputs.calibration is not None:
        width = _fmt(1 / inputs.calibration["n_bins"][0], 2)
        figures["calibration.png"] = (
            calibration,
            "Calibration of the three models on the validation patients: "
            f"observed HCC fraction against mean predicted P(HCC) per bin of width {width} "
            "(marker area: patients in the bin).",
        )

    cv_schemes = (
        sorted(s for s in inputs.metrics["scheme"].unique().to_list() if s != "holdout_bootstrap")
        if inputs.metrics.height
        else []
    )
    sections: list[tuple[str, list[_Block]]] = [
        ("Cohort", [("lines", _cohort_lines(inputs))]),
        (
            "Table 1: validation metrics (80:20 split, 95% CI from bootstrap resamples of the validation patients)",
            [("table", table_1(inputs.metrics, "holdout_bootstrap"))],
        ),
    ]
    for scheme in cv_schemes:
        sections.append(
            (
                f"Repeated stratified cross-validation of the whole fit ({scheme}; mean and 2.5-97.5 "
                "percentiles over folds)",
                [("table", table_1(inputs.metrics, scheme))],
            )
        )
    if (
        inputs.comparison is not None
        and inputs.comparison.height
        and inputs.comparison["previous_version"].drop_nulls().len()
    ):
        sections.append(
            (
                "Current models beside their previous versions (validation estimates)",
                [
                    (
                        "table",
                        _frame_table(
                            inputs.comparison,
                            ["model", "metric", "current_version", "current", "previous_version", "previous"],
                        ),
                    )
                ],
            )
        )
    if inputs.model_comparisons is not None and inputs.model_comparisons.height:
        sections.append(
            (
                "Paired comparison of the models on the same validation patients (AUC difference A - B; "
                "95% CI from paired bootstrap resamples and from DeLong's test)",
                [("table", paired_comparison_table(inputs.model_comparisons))],
            )
        )
    if inputs.confusion_matrices is not None and inputs.confusion_matrices.height:
        sections.append(
            (
                "Confusion matrices on the validation patients (HCC when P(HCC) is above the threshold)",
                [("table", confusion_table(inputs.confusion_matrices, inputs.calibration))],
            )
        )
    sections.append(("Figures", [("figure", name) for name in figures]))
    sections.append(
        (
            "Coefficients (unpenalized Logit refit on the selected standardized features)",
            [
                (
                    "table",
                    _frame_table(inputs.coefficients, COEFFICIENT_COLUMNS),
                )
            ],
        )
    )
    sections.append(
        (
            "Explainability sweep (threshold x association measure)",
            [("table", _frame_table(inputs.sweep, list(inputs.sweep.columns)))],
        )
    )

    title = "hcc-assets: radiomics vs deep learning for HCC detection"
    md_files, md_inline, html_parts = [f"# {title}\n"], [f"# {title}\n"], []
    for heading, blocks in sections:
        md_files.append(f"\n## {heading}\n")
        md_inline.append(f"\n## {heading}\n")
        html_parts.append(f"<h2>{html.escape(heading)}</h2>")
        for block in blocks:
            if block[0] == "lines":
                lines = block[1]
                md = "\n".join(f"- {line}" for line in lines) + "\n"
                md_files.append(md)
                md_inline.append(md)
                html_parts.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>")
            elif block[0] == "table":
                header, rows = block[1]
                md_files.append(_md_table(header, rows))
                md_inline.append(_md_table(header, rows))
                html_parts.append(_html_table(header, rows))
            else:
                name = block[1]
                png, caption = figures[name]
                uri = "data:image/png;base64," + base64.b64encode(png).decode()
                md_files.append(f"![{caption}]({name})\n\n_{caption}_\n")
                md_inline.append(f"![{caption}]({thumbnail_data_uri(png)})\n\n_{caption}_\n")
                html_parts.append(
                    f'<figure><img src="{uri}" alt="{html.escape(caption)}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;"
        "text-align:left;font-size:14px}th{background:#eee}img{max-width:100%}figure{margin:1em 0}"
    )
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(html_parts)}</body></html>\n"
    )
    return RenderedReport(
        html=page,
        markdown="".join(md_files),
        markdown_inline="".join(md_inline),
        figures={name: png for name, (png, _) in figures.items()},
    )
