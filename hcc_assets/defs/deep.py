"""Deep-model assets: hcc_classifier (cohort level, `gpu` pool) -> deep_embedding (per patient).

Thin wiring around `hcc_assets.deep` (MedicalNet-layout 3D ResNet, frozen-trunk training,
embeddings); these assets add versions, lineage, checks, lake files and feature-store rows.

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

import hashlib
import json
import tempfile
import time
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

from hcc_assets.core.errors import PatientInputError
from hcc_assets.core.figures import plot_history
from hcc_assets.core.versioning import SHORT, content_version
from hcc_assets.defs.automation import on_refresh_cron, refresh_patient_feature
from hcc_assets.defs.cohort import cohort
from hcc_assets.defs.deployment import deployed
from hcc_assets.defs.ingest import preprocessed_volume
from hcc_assets.defs.metadata import figure_metadata, markdown_table
from hcc_assets.defs.partitions import patients_partitions
from hcc_assets.defs.patient_errors import patient_failure
from hcc_assets.defs.resources import ComputeResource, LakeResource
from hcc_assets.featurestore import FeatureStore, reads, registry
from hcc_assets.lake import PREPROCESSED_FILE, DataLake, nifti_from_bytes, sha256_bytes

CLASSIFIER_VERSION = "1"
DEEP_EMBEDDING_VERSION = "1"

MODEL_NAME = "hcc_classifier"
MODEL_KIND = "resnet3d"
PREDICTION_MODEL = "deep"
MODELS_DIR = ("models", "classifier")
CHECKPOINT_FILES = ("classifier.pt", "classifier.json")  # what hcc_assets.deep.save_model writes
EMBEDDING_DIM = 128  # fixed by the feature store: deep_embeddings.embedding FLOAT[128]
# Embeddings are bit-identical only for the same batch size: one volume at a time, always.
EMBED_BATCH_SIZE = 1
BEATS_CHANCE = "beats_chance_on_training"


class HccClassifierConfig(dg.Config):
    """The study's deep arm (defaults are the study's values); see hcc_assets.deep.ClassifierConfig."""

    depth: int = 50  # 10, 18, 34 or 50
    lr: float = 0.001
    momentum: float = 0.9
    batch_size: int = 8
    min_epochs: int = 50
    max_epochs: int = 100
    patience: int = 10
    seed: int = 0
    head_activation: str = "relu"
    trunk_layout: str = "monai"
    # Local MedicalNet file (e.g. resnet_50_23dataset.pth); empty = seeded-random initialization.
    medicalnet_checkpoint: str = ""
    use_trunk_cache: bool = True
    force_retrain: bool = False  # train even when a saved model of this version exists
    # Register a model that fails beats_chance_on_training as the current one anyway (experiments,
    # tiny test cohorts); by default such a retrain is refused and the previous version stays current.
    accept_below_chance: bool = False

    def to_domain(self, device: str, amp: bool):
        from hcc_assets.deep import ClassifierConfig

        return ClassifierConfig(
            depth=self.depth,
            embedding_dim=EMBEDDING_DIM,
            head_activation=self.head_activation,
            trunk_layout=self.trunk_layout,
            lr=self.lr,
            momentum=self.momentum,
            batch_size=self.batch_size,
            min_epochs=self.min_epochs,
            max_epochs=self.max_epochs,
            patience=self.patience,
            seed=self.seed,
            medicalnet_checkpoint=self.medicalnet_checkpoint or None,
            use_trunk_cache=self.use_trunk_cache,
            device=device,
            amp=amp,
        )


# -- helpers ---------------------------------------------------------------------------------


def _read_volume(data_lake: DataLake, patient_id: str) -> tuple[np.ndarray, str]:
    """The preprocessed volume as float32 (X, Y, Z) and the sha256 of its file."""
    data = data_lake.read_bytes(data_lake.patient_file(patient_id, PREPROCESSED_FILE))
    image = nifti_from_bytes(data)
    return np.asarray(image.dataobj, dtype=np.float32), sha256_bytes(data)


def _init_identity(checkpoint: str) -> str:
    """What the weights start from, known before training: seeded, or the MedicalNet file's hash."""
    from hcc_assets.deep import SEEDED_RANDOM_INIT

    if not checkpoint:
        return SEEDED_RANDOM_INIT
    path = Path(checkpoint)
    if not path.is_file():
        raise dg.Failure(
            description=f"hcc_classifier: medicalnet_checkpoint {checkpoint} is not a file", allow_retries=False
        )
    with path.open("rb") as file:
        return f"medicalnet:{hashlib.file_digest(file, 'sha256').hexdigest()}"


def _save(result, data_lake: DataLake, version: str) -> str:
    """Save into data_lake/models/classifier/<version>/ (files written atomically); returns the folder."""
    from hcc_assets.deep import save_model

    folder = data_lake.path(*MODELS_DIR, version)
    if data_lake.is_local:
        save_model(result, data_lake.local_path(*MODELS_DIR, version))
        return folder
    with tempfile.TemporaryDirectory() as staging:  # torch writes local files; copy them up
        save_model(result, staging)
        for name in CHECKPOINT_FILES:
            data_lake.write_bytes(f"{folder}/{name}", (Path(staging) / name).read_bytes())
    return folder


def _load(data_lake: DataLake, folder: str, device: str):
    from hcc_assets.deep import load_model

    if data_lake.is_local:
        return load_model(folder, device=device)
    with tempfile.TemporaryDirectory() as staging:
        for name in CHECKPOINT_FILES:
            (Path(staging) / name).write_bytes(data_lake.read_bytes(f"{folder}/{name}"))
        return load_model(staging, device=device)


def _saved_model(data_lake: DataLake, folder: str, device: str, settings, log):
    """The model saved under this version, or None when absent, unreadable or of other settings."""
    if not data_lake.exists(f"{folder}/{CHECKPOINT_FILES[0]}"):
        return None
    try:
        result = _load(data_lake, folder, device)
    except Exception as error:  # a damaged folder is retrained, not trusted
        log.warning(f"hcc_classifier: saved model in {folder} unreadable ({type(error).__name__}); retraining")
        return None
    ignore = {"device", "medicalnet_checkpoint"}
    if result.config.model_dump(exclude=ignore) != settings.model_dump(exclude=ignore):
        return None
    return result


def _majority_rate(labels: list[bool]) -> float:
    positives = sum(labels) / len(labels)
    return max(positives, 1.0 - positives)


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
    from hcc_assets.deep import CheckpointMismatchError, predict_proba, train_classifier

    started = time.perf_counter()
    store, data_lake = lake.store, lake.lake
    compute.configure_threads()
    device, amp = compute.torch_device(), compute.use_amp()

    snapshot = store.current_snapshot()  # the cohort as of this snapshot, recorded with the model
    split = reads.cohort_split(store.at(snapshot=snapshot))
    if split.height == 0:
        raise dg.Failure(
            description="hcc_classifier: cohort_split is empty; materialize cohort first", allow_retries=False
        )
    volumes: dict[str, np.ndarray] = {}
    digests: dict[str, str] = {}
    missing: list[str] = []
    for pid in split["patient_id"]:
        if not data_lake.exists(data_lake.patient_file(pid, PREPROCESSED_FILE)):
            missing.append(pid)
            continue
        volumes[pid], digests[pid] = _read_volume(data_lake, pid)
    if missing:
        context.log.warning(
            f"hcc_classifier: {len(missing)} cohort patient(s) without a preprocessed volume "
            f"skipped: {', '.join(missing)}"
        )
    shapes = sorted({tuple(v.shape) for v in volumes.values()})
    if len(shapes) > 1:
        raise dg.Failure(
            description=f"hcc_classifier: preprocessed volumes on different grids {shapes}; "
            "re-materialize preprocessed_volume with one target_shape for every patient",
            allow_retries=False,
        )
    rows = [r for r in split.iter_rows(named=True) if r["patient_id"] in volumes]
    train = [r for r in rows if r["split"] == "train"]
    validation = [r for r in rows if r["split"] == "validation"]
    if len(train) < 2 or not validation:
        raise dg.Failure(
            description=f"hcc_classifier: {len(train)} training and {len(validation)} validation "
            "patients with volumes; at least 2 and 1 needed",
            allow_retries=False,
        )

    settings = config.to_domain(device, amp)
    init = _init_identity(config.medicalnet_checkpoint)
    identity = {
        "code_version": CLASSIFIER_VERSION,
        "config": settings.model_dump(mode="json", exclude={"device", "medicalnet_checkpoint"}),
        "device_type": device.split(":")[0],
        "init": init,
        "input_shape": list(shapes[0]),
        "train": [[r["patient_id"], digests[r["patient_id"]], r["hcc"]] for r in train],
        "validation": [[r["patient_id"], digests[r["patient_id"]], r["hcc"]] for r in validation],
    }
    version = content_version(identity, length=SHORT)
    folder = data_lake.path(*MODELS_DIR, version)

    result = None if config.force_retrain else _saved_model(data_lake, folder, device, settings, context.log)
    reused = result is not None
    if result is None:
        context.log.info(
            f"hcc_classifier {version}: training depth {settings.depth} on {device} "
            f"({len(train)} train / {len(validation)} validation patients, {init})"
        )
        try:
            result = train_classifier(
                [volumes[r["patient_id"]] for r in train],
                [r["hcc"] for r in train],
                [volumes[r["patient_id"]] for r in validation],
                [r["hcc"] for r in validation],
                settings,
                device=device,
                progress=lambda line: context.log.info(f"hcc_classifier {version}: {line}"),
            )
        except CheckpointMismatchError as error:
            raise dg.Failure(description=f"hcc_classifier: {error}", allow_retries=False) from None
        _save(result, data_lake, version)

    # P(HCC) of every cohort patient with a volume, one volume at a time (as the embeddings)
    predict_started = time.perf_counter()
    probabilities = predict_proba(
        result.model, [volumes[r["patient_id"]] for r in rows], batch_size=EMBED_BATCH_SIZE, device=device
    )
    predict_seconds = time.perf_counter() - predict_started

    majority = _majority_rate([r["hcc"] for r in train])
    train_acc = float(result.final_metrics["train_acc"])
    beats_chance = train_acc > majority
    history = [
        {
            "epoch": h.epoch,
            "train_loss": h.train_loss,
            "train_acc": h.train_acc,
            "val_loss": h.val_loss,
            "val_acc": h.val_acc,
            "seconds": h.train_seconds + h.val_seconds,
        }
        for h in result.history
    ]
    timings = {**result.timings, "predict_seconds": predict_seconds, "asset_seconds": time.perf_counter() - started}
    metrics = {
        **result.final_metrics,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "majority_rate": majority,
        BEATS_CHANCE: beats_chance,
        "timings": result.timings,
    }
    params = {
        **settings.model_dump(mode="json", exclude={"device", "medicalnet_checkpoint"}),
        "device": result.device,
        "medicalnet_checkpoint": config.medicalnet_checkpoint or None,
        "input_shape": identity["input_shape"],
        "validation_patients": [r["patient_id"] for r in validation],
        "code_version": CLASSIFIER_VERSION,
    }

    run_id = context.run.run_id
    store.replace_versions(
        "training_history",
        FeatureStore.with_provenance(
            pl.DataFrame(
                [{k: v for k, v in h.items() if k != "seconds"} | {"model_name": MODEL_NAME} for h in history],
                schema={
                    "epoch": pl.Int32,
                    "train_loss": pl.Float64,
                    "train_acc": pl.Float64,
                    "val_loss": pl.Float64,
                    "val_acc": pl.Float64,
                    "model_name": pl.String,
                },
            ),
            version=version,
            run_id=run_id,
        ),
    )
    store.replace_versions(
        "predictions",
        FeatureStore.with_provenance(
            pl.DataFrame(
                {
                    "model": [PREDICTION_MODEL] * len(rows),
                    "patient_id": [r["patient_id"] for r in rows],
                    "split": [r["split"] for r in rows],
                    "probability": probabilities.astype(np.float64),
                    "label": [r["hcc"] for r in rows],
                }
            ),
            version=version,
            run_id=run_id,
        ),
    )
    # the registry row last: deep_embedding follows it, so it flips only once the rest is written
    train_ids = [r["patient_id"] for r in train]
    accepted = bool(beats_chance) or config.accept_below_chance
    store.register_model(
        registry.model_row(
            MODEL_NAME,
            MODEL_KIND,
            folder,
            init=result.init,
            params=params,
            metrics=metrics,
            training_patients=train_ids,
            training_set=registry.volumes_spec(train_ids),
            version=version,
            run_id=run_id,
        ),
        data_snapshot=snapshot,
        current=accepted,
    )
    in_use = version if accepted else registry.current_version(store, MODEL_NAME)
    if not accepted:
        context.log.warning(
            f"hcc_classifier {version} refused: training accuracy {train_acc:.3f} is not above the majority-class "
            f"rate {majority:.3f}; "
            + (
                f"version {in_use} stays current"
                if in_use
                else "no usable classifier: no deep embeddings or deep predictions until a retrain passes"
            )
        )

    final = result.final_metrics
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "model_version": version,
            "accepted": accepted,
            "current_version": in_use or "none (no usable classifier)",
            "reused_saved_model": reused,
            "path": dg.MetadataValue.path(folder),
            "device": device,
            "mixed_precision": amp,
            "init": result.init,
            "depth": settings.depth,
            "n_train": len(train),
            "n_validation": len(validation),
            "skipped_without_volume": len(missing),
            "input_shape": dg.MetadataValue.json(identity["input_shape"]),
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "stopped_early": result.stopped_early,
            "train_accuracy": float(final["train_acc"]),
            "validation_accuracy": float(final["val_acc"]),
            "train_loss": float(final["train_loss"]),
            "validation_loss": float(final["val_loss"]),
            "majority_rate": majority,
            "timings_s": dg.MetadataValue.json({k: round(float(v), 3) for k, v in timings.items()}),
            "history": markdown_table(history, ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"]),
            **figure_metadata(
                data_lake,
                "figure_2",
                data_lake.cohort_figure("hcc_classifier", version, "figure_2"),
                plot_history(result.history, result.best_epoch),
                "Figure 2: accuracy and loss over epochs",
            ),
            "params": dg.MetadataValue.json(params),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=BEATS_CHANCE,
                passed=bool(beats_chance),
                severity=dg.AssetCheckSeverity.ERROR,
                description=None
                if beats_chance
                else f"training accuracy {train_acc:.3f} is not above the majority-class rate {majority:.3f}; "
                + (
                    "registered as current anyway (accept_below_chance)"
                    if accepted
                    else f"retrain refused, current version: {in_use or 'none'}"
                ),
                metadata={
                    "train_acc": train_acc,
                    "majority_rate": majority,
                    "n_train": len(train),
                    "model_version": version,
                    "current_version": in_use or "none",
                },
            )
        ],
    )


# -- deep_embedding --------------------------------------------------------------------------


class DeepEmbeddingConfig(dg.Config):
    # Embed even with a classifier whose `beats_chance_on_training` check failed.
    allow_model_below_chance: bool = False


# One loaded classifier per (folder, version, device) per process: the partitions one worker
# runs (in-process executor, several partitions per step process) load the network once.
_CLASSIFIERS: dict[tuple[str, str, str], object] = {}


def cached_classifier(data_lake: DataLake, folder: str, version: str, device: str):
    key = (folder, version, device)
    if key not in _CLASSIFIERS:
        _CLASSIFIERS.clear()  # a new model replaces the old one; don't hold both in memory
        _CLASSIFIERS[key] = _load(data_lake, folder, device).model
    return _CLASSIFIERS[key]


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
    from hcc_assets.deep import embed

    patient_id = context.partition_key
    store, data_lake = lake.store, lake.lake
    model = registry.current_model(store, MODEL_NAME)
    if model is None:
        raise dg.Failure(
            description=f"patient {patient_id}: deep_embedding needs a usable hcc_classifier, and none is "
            "current (never trained, or every retrain was refused by beats_chance_on_training); materialize "
            "hcc_classifier (job cohort_refresh)",
            metadata={"patient_id": patient_id},
            allow_retries=False,
        )
    version = model["version"]
    metrics = json.loads(model["metrics"] or "{}")
    if metrics.get(BEATS_CHANCE) is False and not config.allow_model_below_chance:
        raise dg.Failure(
            description=f"patient {patient_id}: the current hcc_classifier {version} failed its "
            f"{BEATS_CHANCE} check; retrain it (or set allow_model_below_chance)",
            metadata={"patient_id": patient_id, "model_version": version},
            allow_retries=False,
        )
    input_shape = json.loads(model["params"] or "{}").get("input_shape")

    with patient_failure(
        patient_id, "deep_embedding", cleanup=lambda: store.delete_partition("deep_embeddings", patient_id)
    ):
        if not data_lake.exists(data_lake.patient_file(patient_id, PREPROCESSED_FILE)):
            raise PatientInputError("no preprocessed volume; materialize preprocessed_volume first")
        volume, volume_sha = _read_volume(data_lake, patient_id)
        if input_shape and list(volume.shape) != list(input_shape):
            raise PatientInputError(
                f"preprocessed volume {list(volume.shape)} is not on the grid the classifier "
                f"{version} was trained on ({input_shape}); re-materialize preprocessed_volume"
            )
        compute.configure_threads()
        device = compute.torch_device()
        try:
            network = cached_classifier(data_lake, model["path"], version, device)
        except Exception as error:  # corrupt, truncated or incompatible file: say which model, not a traceback
            raise PatientInputError(
                f"the checkpoint of the current hcc_classifier {version} is unreadable or "
                f"incompatible ({type(error).__name__}: {str(error)[:200]}); re-materialize "
                "hcc_classifier with force_retrain"
            ) from None
        vector = embed(network, volume[None], batch_size=EMBED_BATCH_SIZE, device=device)[0].astype(np.float32)
        if vector.shape != (EMBEDDING_DIM,):
            raise ValueError(f"embedding has shape {vector.shape}; the feature store holds {EMBEDDING_DIM} values")

    rows = pl.DataFrame(
        {
            "patient_id": [patient_id],
            "model_version": [version],
            "embedding": pl.Series("embedding", vector[None, :], dtype=pl.Array(pl.Float32, EMBEDDING_DIM)),
        }
    )
    store.replace_partition(
        "deep_embeddings",
        patient_id,
        FeatureStore.with_provenance(
            rows, version=f"deep_embedding@{DEEP_EMBEDDING_VERSION}", run_id=context.run.run_id
        ),
    )
    finite = bool(np.isfinite(vector).all())
    return dg.MaterializeResult(
        data_version=dg.DataVersion(sha256_bytes(vector.astype("<f4").tobytes())[:16]),
        metadata={
            "model_version": version,
            "device": device,
            "dimensions": EMBEDDING_DIM,
            "nonzero": int(np.count_nonzero(vector)),
            "l2_norm": float(np.linalg.norm(vector)),
            "first_values": dg.MetadataValue.json([round(float(v), 5) for v in vector[:8]]),
            "volume_sha256": volume_sha[:16],
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="embedding_finite", passed=finite, metadata={"nonzero": int(np.count_nonzero(vector))}
            )
        ],
    )
