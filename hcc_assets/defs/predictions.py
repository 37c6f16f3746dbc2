"""hcc_prediction: every ingested patient's P(HCC) from each current model (group `predictions`).

Thin wiring around hcc_assets.steps.prediction; the models are loaded once per process and
version. Rows go to `hcc_predictions` beside those of earlier model versions; the view
`current_hcc_predictions` holds each patient's newest.
"""

from typing import TYPE_CHECKING

import dagster as dg

from hcc_assets.defs.analysis import explainable_model, radiomic_model
from hcc_assets.defs.automation import refresh_prediction
from hcc_assets.defs.deep import cached_classifier, deep_embedding, hcc_classifier
from hcc_assets.defs.deployment import deployed
from hcc_assets.defs.ingest import preprocessed_volume
from hcc_assets.defs.partitions import patients_partitions
from hcc_assets.defs.patient_errors import patient_failure
from hcc_assets.defs.resources import ComputeResource, LakeResource
from hcc_assets.defs.segmentation import radiomic_features
from hcc_assets.featurestore import registry
from hcc_assets.steps.analysis import load_lasso_of
from hcc_assets.steps.prediction import MODEL_NAMES, predict_patient, record_prediction

if TYPE_CHECKING:
    from hcc_assets.stats.lasso import LassoFit

HCC_PREDICTION_VERSION = "1"
GROUP = "predictions"

# registry name -> (version, (LassoFit, registry row)): the current fit of each LASSO, reloaded when it changes
_LASSO_FITS: dict[str, tuple[str, tuple["LassoFit", dict]]] = {}


class HccPredictionConfig(dg.Config):
    threshold: float = 0.5  # P(HCC) above which the patient is called HCC (the study's threshold, as in the metrics)


def _lasso_loader(lake: LakeResource):
    def load(name: str) -> tuple["LassoFit", dict]:
        row = registry.current_model(lake.store, name)  # the registry row travels with the fit
        if row is None:  # predict_patient asks only for models that current_versions lists
            raise dg.Failure(description=f"no {name} is registered", allow_retries=False)
        cached = _LASSO_FITS.get(name)
        if cached is None or cached[0] != row["version"]:
            _LASSO_FITS[name] = (row["version"], (load_lasso_of(lake.lake, row), row))
        return _LASSO_FITS[name][1]

    return load


def _classifier_loader(lake: LakeResource, device: str):
    def load(version: str):
        row = registry.find_model(lake.store, version, MODEL_NAMES["deep"])
        return cached_classifier(lake.lake, row["path"], version, device)  # deep_embedding's cache

    return load


@dg.asset(
    partitions_def=patients_partitions,
    deps=[preprocessed_volume, deep_embedding, radiomic_features, hcc_classifier, radiomic_model, explainable_model],
    code_version=HCC_PREDICTION_VERSION,
    group_name=GROUP,
    kinds={"duckdb"},
    automation_condition=refresh_prediction(preprocessed_volume.key),
    description="The patient's P(HCC) from each current model: the deep classifier (its output layer on the "
    "patient's embedding), the radiomic LASSO and the explainable LASSO, with the decision at the threshold, "
    "the model versions and the input versions; a model that cannot predict this patient gives a row with the "
    "reason. Labelled or not: never used for training or evaluation. Table `hcc_predictions` (every version "
    "kept), view `current_hcc_predictions`.",
)
def hcc_prediction(
    context: dg.AssetExecutionContext,
    config: deployed(HccPredictionConfig, "hcc_prediction"),
    lake: LakeResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    patient_id = context.partition_key
    with patient_failure(patient_id, "hcc_prediction"):
        compute.configure_threads()
        prediction = predict_patient(
            lake.store,
            patient_id,
            config.threshold,
            _classifier_loader(lake, compute.torch_device()),
            _lasso_loader(lake),
        )
    record = record_prediction(lake.store, prediction, f"hcc_prediction@{HCC_PREDICTION_VERSION}", context.run.run_id)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(record.data_version),
        metadata={
            "predictions": dg.MetadataValue.md(record.table),
            **record.probabilities,
            "threshold": config.threshold,
            "n_predicted": record.n_predicted,
            "unavailable": dg.MetadataValue.json(record.unavailable),
            "model_versions": dg.MetadataValue.json(record.model_versions),
        },
    )
