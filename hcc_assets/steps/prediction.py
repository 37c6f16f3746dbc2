"""P(HCC) for one patient from every current model: the deep classifier, the radiomic LASSO and
the explainable LASSO. Labelled or not: nothing here reads `cohort_split`, so a patient outside the
cohort is predicted exactly like one inside it, and never trained on or evaluated on.

A model that cannot predict the patient gives a row with status 'unavailable' and the reason
(no usable model, radiomics excluded, the embedding is from another classifier version, ...),
so every patient has one row per model after every run and a reader can tell "not yet" from "no".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from hcc_assets.core.versioning import content_version
from hcc_assets.featurestore import FeatureStore, reads, registry
from hcc_assets.steps.tables import markdown_table

if TYPE_CHECKING:  # torch and sklearn load only when a model is used
    from hcc_assets.deep.network import HCCResNet
    from hcc_assets.stats.lasso import LassoFit

DEEP, RADIOMIC, EXPLAINABLE = "deep", "radiomic", "explainable"
# prediction model -> registry name of the model that makes it
MODEL_NAMES = {DEEP: "hcc_classifier", RADIOMIC: "radiomic_model", EXPLAINABLE: "explainable_model"}
INPUT_KINDS = {DEEP: "deep_embedding", RADIOMIC: "radiomic_features", EXPLAINABLE: "deep_embedding"}
PREDICTED, UNAVAILABLE = "predicted", "unavailable"
RADIOMICS_STAGE = "radiomics"
ROW_SCHEMA = {
    "patient_id": pl.String,
    "model": pl.String,
    "model_name": pl.String,
    "model_version": pl.String,
    "status": pl.String,
    "probability": pl.Float64,
    "threshold": pl.Float64,
    "decision": pl.Boolean,
    "input_kind": pl.String,
    "input_version": pl.String,
    "reason": pl.String,
}


@dataclass(frozen=True)
class ModelPrediction:
    model: str
    model_version: str | None
    probability: float | None
    input_version: str | None
    reason: str | None  # why unavailable; or a note on a prediction (e.g. a refresh pending)

    @property
    def status(self) -> str:
        return PREDICTED if self.probability is not None else UNAVAILABLE


@dataclass(frozen=True)
class PatientPrediction:
    patient_id: str
    threshold: float
    models: list[ModelPrediction]

    def rows(self) -> pl.DataFrame:
        """The `hcc_predictions` rows (without provenance)."""
        return pl.DataFrame(
            [
                {
                    "patient_id": self.patient_id,
                    "model": m.model,
                    "model_name": MODEL_NAMES[m.model],
                    "model_version": m.model_version,
                    "status": m.status,
                    "probability": m.probability,
                    "threshold": self.threshold,
                    # strictly above, as the metrics count it (hcc_assets.stats.metrics)
                    "decision": None if m.probability is None else bool(m.probability > self.threshold),
                    "input_kind": INPUT_KINDS[m.model],
                    "input_version": m.input_version,
                    "reason": m.reason,
                }
                for m in self.models
            ],
            schema=ROW_SCHEMA,
        )

    def by_model(self) -> dict[str, ModelPrediction]:
        return {m.model: m for m in self.models}


# loaders, injected so the orchestration layer can cache loaded models per process:
#   classifier(version) -> a network with `output` (hcc_assets.deep.HCCResNet)
#   lasso(registry name) -> (LassoFit, registry row) of the current model
ClassifierLoader = Callable[[str], "HCCResNet"]
LassoLoader = Callable[[str], tuple["LassoFit", dict]]


def predict_patient(
    store: FeatureStore, patient_id: str, threshold: float, load_classifier: ClassifierLoader, load_lasso: LassoLoader
) -> PatientPrediction:
    """One PatientPrediction with a row per model, from the models current in `store`."""
    current = reads.current_versions(store)  # one query for all models: this is on a new scan's path
    embedding = reads.patient_embedding(store, patient_id)
    return PatientPrediction(
        patient_id,
        threshold,
        [
            _deep(store, current, embedding, load_classifier),
            _radiomic(store, patient_id, current, load_lasso),
            _explainable(current, embedding, load_lasso),
        ],
    )


def _unavailable(model: str, reason: str, version: str | None = None, input_version: str | None = None):
    return ModelPrediction(model, version, None, input_version, reason)


def _no_usable_classifier(store: FeatureStore) -> str:
    refused = registry.refused_retrain(store, MODEL_NAMES[DEEP])
    if refused:
        return (
            f"no usable hcc_classifier: the retrain {refused['version']} was refused "
            "(beats_chance_on_training failed) and no earlier version passed"
        )
    return "no usable hcc_classifier: none is registered yet"


def _deep(
    store: FeatureStore, versions: dict[str, str], embedding, load_classifier: ClassifierLoader
) -> ModelPrediction:
    from hcc_assets.deep import probability_from_embedding

    current = versions.get(MODEL_NAMES[DEEP])
    if current is None:
        return _unavailable(DEEP, _no_usable_classifier(store))
    if embedding is None:
        return _unavailable(DEEP, "no deep embedding (deep_embedding failed or has not run)")
    version, values = embedding
    # the classifier that made the embedding: the same forward pass, even while a refresh is pending
    probability = float(probability_from_embedding(load_classifier(version), np.asarray(values))[0])
    note = None if version == current else f"made by {version}; hcc_classifier {current} is current (refresh pending)"
    return ModelPrediction(DEEP, version, probability, version, note)


def _lasso_on(versions: dict[str, str], model: str, load_lasso: LassoLoader) -> tuple[LassoFit, dict, dict] | str:
    """(fit, registry row, training-set spec) of the current LASSO `model`, or why there is none."""
    name = MODEL_NAMES[model]
    if versions.get(name) is None:
        return f"no {name} is registered yet (materialize the analysis)"
    fit, row = load_lasso(name)
    return fit, row, json.loads(row["training_set"] or "{}")


def _radiomic(
    store: FeatureStore, patient_id: str, versions: dict[str, str], load_lasso: LassoLoader
) -> ModelPrediction:
    found = _lasso_on(versions, RADIOMIC, load_lasso)
    if isinstance(found, str):
        return _unavailable(RADIOMIC, found)
    fit, row, spec = found
    feature_set, names = spec.get("version"), spec.get("features") or []
    values = reads.patient_radiomics(store, patient_id, feature_set)
    if not values:
        excluded = reads.exclusion_reason(store, patient_id, RADIOMICS_STAGE)
        reason = (
            f"radiomics excluded: {excluded}"
            if excluded
            else f"no radiomic features of feature set {feature_set} (liver_mask or radiomic_features missing)"
        )
        return _unavailable(RADIOMIC, reason, row["version"], feature_set)
    missing = [n for n in names if (value := values.get(n)) is None or not np.isfinite(value)]
    if missing:
        return _unavailable(
            RADIOMIC,
            f"{len(missing)} of the model's {len(names)} features missing or not finite (first: {missing[0]})",
            row["version"],
            feature_set,
        )
    from hcc_assets.stats.lasso import predict_proba

    probability = float(predict_proba(fit, np.array([[values[n] for n in names]]))[0])
    return ModelPrediction(RADIOMIC, row["version"], probability, feature_set, None)


def _explainable(versions: dict[str, str], embedding, load_lasso: LassoLoader) -> ModelPrediction:
    from hcc_assets.featurestore.queries import DL_FEATURE_NAMES

    if versions.get(MODEL_NAMES[DEEP]) is None and versions.get(MODEL_NAMES[EXPLAINABLE]) is None:
        return _unavailable(
            EXPLAINABLE, "no usable hcc_classifier, so no deep features to select explainable ones from"
        )
    found = _lasso_on(versions, EXPLAINABLE, load_lasso)
    if isinstance(found, str):
        return _unavailable(EXPLAINABLE, found)
    fit, row, spec = found
    fitted_on, names = spec.get("version"), spec.get("features") or []
    if embedding is None:
        return _unavailable(
            EXPLAINABLE, "no deep embedding (deep_embedding failed or has not run)", row["version"], fitted_on
        )
    version, values = embedding
    if version != fitted_on:
        return _unavailable(
            EXPLAINABLE,
            f"explainable_model {row['version']} was fitted on embeddings of "
            f"hcc_classifier {fitted_on}; this patient's embedding is from {version} "
            "(the analysis refits it)",
            row["version"],
            version,
        )
    index = {name: i for i, name in enumerate(DL_FEATURE_NAMES)}
    from hcc_assets.stats.lasso import predict_proba

    probability = float(predict_proba(fit, np.array([[values[index[n]] for n in names]]))[0])
    return ModelPrediction(EXPLAINABLE, row["version"], probability, version, None)


@dataclass(frozen=True)
class RecordedPrediction:
    """What hcc_prediction's materialization shows of a stored PatientPrediction."""

    data_version: str  # of each model's version, probability and reason
    table: str  # Markdown: model, version, P(HCC), HCC at threshold, note
    probabilities: dict[str, float | str]  # p_hcc_<model> -> P(HCC), or 'unavailable'
    n_predicted: int
    unavailable: dict[str, str | None]  # model -> why
    model_versions: dict[str, str | None]


def prediction_table(prediction: PatientPrediction) -> list[dict]:
    """One row per model, for reading: the decision at the threshold as yes / no, blanks for gaps."""
    return [
        {
            "model": m.model,
            "version": m.model_version or "",
            "P(HCC)": m.probability,
            "HCC at threshold": ""
            if m.probability is None
            else ("yes" if m.probability > prediction.threshold else "no"),
            "note": m.reason or "",
        }
        for m in prediction.models
    ]


def record_prediction(
    store: FeatureStore, prediction: PatientPrediction, version: str, run_id: str
) -> RecordedPrediction:
    """Add the patient's rows to `hcc_predictions` (beside those of earlier model versions), made by
    code `version`, and summarize them."""
    rows = prediction.rows()
    store.replace_patient_versions(
        "hcc_predictions", prediction.patient_id, FeatureStore.with_provenance(rows, version=version, run_id=run_id)
    )
    by_model = prediction.by_model()
    return RecordedPrediction(
        data_version=content_version(rows.select("model", "model_version", "probability", "reason").to_dicts()),
        table=markdown_table(prediction_table(prediction), ["model", "version", "P(HCC)", "HCC at threshold", "note"]),
        probabilities={
            f"p_hcc_{name}": (m.probability if m.probability is not None else "unavailable")
            for name, m in by_model.items()
        },
        n_predicted=sum(m.probability is not None for m in prediction.models),
        unavailable={m.model: m.reason for m in prediction.models if m.probability is None},
        model_versions={name: m.model_version for name, m in by_model.items()},
    )
