"""Deep-model assets: hcc_classifier (cohort level, `gpu` pool) -> deep_embedding (per patient).

Thin wiring around the use cases `hcc_assets.steps.classifier` and `hcc_assets.steps.embedding`
(over `hcc_assets.deep`: MedicalNet-layout 3D ResNet, frozen-trunk training, embeddings), which add
versions, lineage, lake files and feature-store rows; these assets add config, checks and metadata.

What the feature store holds (one current model, its outputs, and per-patient embeddings):

- `models`: one row per hcc_classifier version (`version` is the model version); the newest
  registered one has current = true. Older rows and their folders under
  data_lake/models/classifier/<version>/ stay, so an old embedding's model_version can still be loaded.
- `training_history`: every epoch of the current model (replaced with the model).
- `predictions`: model 'deep', P(HCC) of the current model for every patient in `cohort_split`
  (train and validation), replaced with the model; `version` is the model version.
- `deep_embeddings`: one row per patient (replaced per partition), from the model that was current
  when the partition was materialized; `model_version` says which. After a retrain the partitions
  are stale in Dagster until re-materialized; SQL can spot them with
  `model_version <> (SELECT version FROM models WHERE model_name = 'hcc_classifier' AND current)`.

The model version is a content hash of what determines the weights: the training configuration,
the initialization (seeded, or the sha256 of the MedicalNet file), the device type and mixed
precision, the input grid, the train and validation patients with the sha256 of their volumes,
and this asset's code version. Materializing again with nothing changed reuses the saved model
(`force_retrain` trains anew), so the data version stays and nothing downstream goes stale.

The blocking check `beats_chance_on_training` stops downstream assets of the same run when the
model's training accuracy is not above the majority-class rate. Such a retrain is refused: it is
registered with current = false (to be inspected), and the previous current version, if any, stays
in use for embeddings and predictions (`accept_below_chance` registers it as current anyway, for
experiments; `deep_embedding` then still refuses it unless `allow_model_below_chance`).
"""

import dagster as dg

from hcc_assets.defs.automation import on_refresh_cron, refresh_patient_feature
from hcc_assets.defs.cohort import cohort
from hcc_assets.defs.deployment import deployed
from hcc_assets.defs.ingest import preprocessed_volume
from hcc_assets.defs.metadata import figure_metadata, markdown_table
from hcc_assets.defs.partitions import patients_partitions
from hcc_assets.defs.patient_errors import patient_failure
from hcc_assets.defs.resources import ComputeResource, LakeResource
from hcc_assets.defs.settings_config import config_from_settings
from hcc_assets.steps import classifier, embedding
from hcc_assets.steps.classifier import (  # names other modules import from here
    _CLASSIFIERS,
    BEATS_CHANCE,
    CLASSIFIER_VERSION,
    EMBEDDING_DIM,
    MODEL_NAME,
    PREDICTION_MODEL,
    cached_classifier,
)
from hcc_assets.steps.embedding import DEEP_EMBEDDING_VERSION

__all__ = [
    "BEATS_CHANCE",
    "CLASSIFIER_VERSION",
    "DEEP_EMBEDDING_VERSION",
    "EMBEDDING_DIM",
    "MODEL_NAME",
    "PREDICTION_MODEL",
    "_CLASSIFIERS",
    "DeepEmbeddingConfig",
    "HccClassifierConfig",
    "cached_classifier",
    "deep_embedding",
    "hcc_classifier",
]


HccClassifierConfig = config_from_settings(classifier.ClassifierSettings, "HccClassifierConfig")


# -- hcc_classifier --------------------------------------------------------------------------


@dg.asset(
    deps=[preprocessed_volume, cohort],
    code_version=CLASSIFIER_VERSION,
    group_name="models",
    automation_condition=on_refresh_cron(),
    kinds={"pytorch"},
    pool="gpu",
    description="The study's deep arm: a 3D ResNet (MedicalNet layout, depth 50 by default) with a new "
    "2048->128 layer and one output; layer4 and the head fine-tuned on the cohort's training split with "
    "SGD, early stopping on validation loss (best weights kept). Saved under "
    "data_lake/models/classifier/<version>/; rows in `models`, `training_history` and `predictions`.",
    check_specs=[
        dg.AssetCheckSpec(
            BEATS_CHANCE,
            asset="hcc_classifier",
            blocking=True,
            description="Training accuracy of the kept (best-validation-loss) model is above the "
            "majority-class rate of the training labels.",
        )
    ],
)
def hcc_classifier(
    context: dg.AssetExecutionContext,
    config: deployed(HccClassifierConfig, "hcc_classifier"),
    lake: LakeResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    store, data_lake = lake.store, lake.lake
    compute.configure_threads()
    device, amp, run_id = compute.torch_device(), compute.use_amp(), context.run.run_id
    try:
        out = classifier.train_or_reuse(store, data_lake, config.settings(), device, amp, run_id, context.log)
    except classifier.ClassifierError as error:
        raise dg.Failure(description=str(error), allow_retries=False) from None
    figure = figure_metadata(
        data_lake, "figure_2", out.figure_path, out.figure_png, "Figure 2: accuracy and loss over epochs"
    )
    return dg.MaterializeResult(
        data_version=dg.DataVersion(out.version),
        metadata={
            **out.metadata,  # plain values; the ones below in their places, marked
            "path": dg.MetadataValue.path(out.folder),
            "input_shape": dg.MetadataValue.json(out.metadata["input_shape"]),
            "timings_s": dg.MetadataValue.json(out.metadata["timings_s"]),
            "history": markdown_table(out.history, list(classifier.HISTORY_COLUMNS)),
            **figure,
            "params": dg.MetadataValue.json(out.params),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=BEATS_CHANCE,
                passed=out.check.passed,
                severity=dg.AssetCheckSeverity.ERROR,
                description=out.check.description,
                metadata=out.check.metadata,
            )
        ],
    )


# -- deep_embedding --------------------------------------------------------------------------


class DeepEmbeddingConfig(dg.Config):
    # Embed even with a classifier whose `beats_chance_on_training` check failed.
    allow_model_below_chance: bool = False


def _prepared_device(compute: ComputeResource) -> str:
    compute.configure_threads()
    return compute.torch_device()


@dg.asset(
    partitions_def=patients_partitions,
    deps=[preprocessed_volume, hcc_classifier],
    code_version=DEEP_EMBEDDING_VERSION,
    group_name="features",
    automation_condition=refresh_patient_feature(),
    kinds={"pytorch", "duckdb"},
    description="The patient's deep embedding: the 128 activations of the classifier's new layer, from "
    "the current hcc_classifier version (no retraining for new patients). Row in `deep_embeddings` "
    "(wide view `deep_features`, dl_000..dl_127).",
    check_specs=[dg.AssetCheckSpec("embedding_finite", asset="deep_embedding")],
)
def deep_embedding(
    context: dg.AssetExecutionContext,
    config: deployed(DeepEmbeddingConfig, "deep_embedding"),
    lake: LakeResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    patient_id, store = context.partition_key, lake.store
    try:
        model = embedding.usable_classifier(store, patient_id, config.allow_model_below_chance)
    except embedding.UnusableClassifierError as error:
        raise dg.Failure(description=str(error), metadata=error.metadata, allow_retries=False) from None
    with patient_failure(
        patient_id, "deep_embedding", cleanup=lambda: store.delete_partition("deep_embeddings", patient_id)
    ):
        result = embedding.embed_patient(lake.lake, patient_id, model, lambda: _prepared_device(compute))
    embedding.store_embedding(store, result, context.run.run_id)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(result.data_version),
        metadata={
            "model_version": result.model_version,
            "device": result.device,
            "dimensions": EMBEDDING_DIM,
            "nonzero": result.nonzero,
            "l2_norm": result.l2_norm,
            "first_values": dg.MetadataValue.json(result.first_values),
            "volume_sha256": result.volume_sha256[:16],
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="embedding_finite", passed=result.finite, metadata={"nonzero": result.nonzero}
            )
        ],
    )
