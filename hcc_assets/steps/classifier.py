"""hcc_classifier without Dagster: the training set, the model version, training (or reusing the
saved model), P(HCC) of the cohort, the beats-chance rule and the rows in `training_history`,
`predictions` and `models`; and the per-process cache of loaded classifiers (deep_embedding and the
predictions use it).

The model version is a content hash of what determines the weights: the training configuration,
the initialization (seeded, or the sha256 of the MedicalNet file), the device type and mixed
precision, the input grid, the train and validation patients with the sha256 of their volumes,
and the code version. Training again with nothing changed reuses the saved model unless
`force_retrain`.

A model whose training accuracy is not above the majority-class rate of its training labels fails
`beats_chance_on_training`: it is registered with current = false (refused), and the previous
current version stays in use, unless `accept_below_chance`.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from hcc_assets.core.figures import plot_history
from hcc_assets.core.versioning import SHORT, content_version
from hcc_assets.featurestore import FeatureStore, reads, registry
from hcc_assets.lake import PREPROCESSED_FILE, DataLake, nifti_from_bytes, sha256_bytes

if TYPE_CHECKING:  # torch loads only when a model is trained or used
    from hcc_assets.deep import ClassifierConfig, HCCResNet, TrainingResult

CLASSIFIER_VERSION = "1"  # hcc_classifier's code version: part of the model version
MODEL_NAME = "hcc_classifier"
MODEL_KIND = "resnet3d"
PREDICTION_MODEL = "deep"
MODELS_DIR = ("models", "classifier")
CHECKPOINT_FILES = ("classifier.pt", "classifier.json")  # what hcc_assets.deep.save_model writes
EMBEDDING_DIM = 128  # fixed by the feature store: deep_embeddings.embedding FLOAT[128]
# Embeddings are bit-identical only for the same batch size: one volume at a time, always.
EMBED_BATCH_SIZE = 1
BEATS_CHANCE = "beats_chance_on_training"
# settings outside the hashed configuration: the device's type is hashed on its own, the
# MedicalNet file as its sha256 (the init)
UNHASHED = frozenset({"device", "medicalnet_checkpoint"})
HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")
FIGURE = "figure_2"

_LOG = logging.getLogger(__name__)


class ClassifierError(Exception):
    """No classifier can come of this cohort or these settings, and retrying does not help; the
    message is the whole explanation."""


@dataclass(frozen=True)
class ClassifierSettings:
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

    def to_domain(self, device: str, amp: bool) -> ClassifierConfig:
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


# -- volumes and saved models ----------------------------------------------------------------


def read_volume(data_lake: DataLake, patient_id: str) -> tuple[np.ndarray, str]:
    """The preprocessed volume as float32 (X, Y, Z) and the sha256 of its file."""
    data = data_lake.read_bytes(data_lake.patient_file(patient_id, PREPROCESSED_FILE))
    image = nifti_from_bytes(data)
    return np.asarray(image.dataobj, dtype=np.float32), sha256_bytes(data)


def init_identity(checkpoint: str) -> str:
    """What the weights start from, known before training: seeded, or the MedicalNet file's hash."""
    from hcc_assets.deep import SEEDED_RANDOM_INIT

    if not checkpoint:
        return SEEDED_RANDOM_INIT
    path = Path(checkpoint)
    if not path.is_file():
        raise ClassifierError(f"hcc_classifier: medicalnet_checkpoint {checkpoint} is not a file")
    with path.open("rb") as file:
        return f"medicalnet:{hashlib.file_digest(file, 'sha256').hexdigest()}"


def save_classifier(result: TrainingResult, data_lake: DataLake, version: str) -> str:
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


def load_classifier(data_lake: DataLake, folder: str, device: str) -> TrainingResult:
    """The model saved in `folder` of the lake (local or remote)."""
    from hcc_assets.deep import load_model

    if data_lake.is_local:
        return load_model(folder, device=device)
    with tempfile.TemporaryDirectory() as staging:
        for name in CHECKPOINT_FILES:
            (Path(staging) / name).write_bytes(data_lake.read_bytes(f"{folder}/{name}"))
        return load_model(staging, device=device)


def saved_classifier(
    data_lake: DataLake, folder: str, device: str, config: ClassifierConfig, log: logging.Logger = _LOG
) -> TrainingResult | None:
    """The model saved under this version, or None when absent, unreadable or of other settings."""
    if not data_lake.exists(f"{folder}/{CHECKPOINT_FILES[0]}"):
        return None
    try:
        result = load_classifier(data_lake, folder, device)
    except Exception as error:  # a damaged folder is retrained, not trusted
        log.warning(f"hcc_classifier: saved model in {folder} unreadable ({type(error).__name__}); retraining")
        return None
    if result.config.model_dump(exclude=set(UNHASHED)) != config.model_dump(exclude=set(UNHASHED)):
        return None
    return result


# One loaded classifier per (folder, version, device) per process: the partitions one worker
# runs (in-process executor, several partitions per step process) load the network once.
_CLASSIFIERS: dict[tuple[str, str, str], HCCResNet] = {}


def cached_classifier(data_lake: DataLake, folder: str, version: str, device: str) -> HCCResNet:
    key = (folder, version, device)
    if key not in _CLASSIFIERS:
        _CLASSIFIERS.clear()  # a new model replaces the old one; don't hold both in memory
        _CLASSIFIERS[key] = load_classifier(data_lake, folder, device).model
    return _CLASSIFIERS[key]


# -- the training set and the model version --------------------------------------------------


@dataclass(frozen=True)
class TrainingSet:
    """The cohort as of `snapshot`, restricted to its patients with a preprocessed volume."""

    snapshot: int
    rows: list[dict]  # cohort_split rows (patient_id, split, hcc) of the patients with a volume
    volumes: dict[str, np.ndarray]
    digests: dict[str, str]  # sha256 of each volume file
    missing: list[str]  # cohort patients without a volume (skipped)

    @property
    def train(self) -> list[dict]:
        return [r for r in self.rows if r["split"] == "train"]

    @property
    def validation(self) -> list[dict]:
        return [r for r in self.rows if r["split"] == "validation"]

    @property
    def input_shape(self) -> list[int]:
        return list(next(iter(self.volumes.values())).shape)


def training_set(store: FeatureStore, data_lake: DataLake, log: logging.Logger = _LOG) -> TrainingSet:
    """The current cohort and its volumes; ClassifierError when it cannot train a classifier."""
    snapshot = store.current_snapshot()  # the cohort as of this snapshot, recorded with the model
    split = reads.cohort_split(store.at(snapshot=snapshot))
    if split.height == 0:
        raise ClassifierError("hcc_classifier: cohort_split is empty; materialize cohort first")
    volumes: dict[str, np.ndarray] = {}
    digests: dict[str, str] = {}
    missing: list[str] = []
    for pid in split["patient_id"]:
        if not data_lake.exists(data_lake.patient_file(pid, PREPROCESSED_FILE)):
            missing.append(pid)
            continue
        volumes[pid], digests[pid] = read_volume(data_lake, pid)
    if missing:
        log.warning(
            f"hcc_classifier: {len(missing)} cohort patient(s) without a preprocessed volume "
            f"skipped: {', '.join(missing)}"
        )
    shapes = sorted({tuple(v.shape) for v in volumes.values()})
    if len(shapes) > 1:
        raise ClassifierError(
            f"hcc_classifier: preprocessed volumes on different grids {shapes}; "
            "re-materialize preprocessed_volume with one target_shape for every patient"
        )
    rows = [r for r in split.iter_rows(named=True) if r["patient_id"] in volumes]
    data = TrainingSet(snapshot, rows, volumes, digests, missing)
    if len(data.train) < 2 or not data.validation:
        raise ClassifierError(
            f"hcc_classifier: {len(data.train)} training and {len(data.validation)} validation "
            "patients with volumes; at least 2 and 1 needed"
        )
    return data


def classifier_identity(config: ClassifierConfig, device: str, init: str, data: TrainingSet) -> dict:
    """What determines the weights (the model version hashes it)."""
    return {
        "code_version": CLASSIFIER_VERSION,
        "config": config.model_dump(mode="json", exclude=set(UNHASHED)),
        "device_type": device.split(":")[0],
        "init": init,
        "input_shape": data.input_shape,
        "train": [[r["patient_id"], data.digests[r["patient_id"]], r["hcc"]] for r in data.train],
        "validation": [[r["patient_id"], data.digests[r["patient_id"]], r["hcc"]] for r in data.validation],
    }


def classifier_version(identity: dict) -> str:
    return content_version(identity, length=SHORT)


# -- the beats-chance rule -------------------------------------------------------------------


def majority_rate(labels: list[bool]) -> float:
    positives = sum(labels) / len(labels)
    return max(positives, 1.0 - positives)


@dataclass(frozen=True)
class ChanceRule:
    """`beats_chance_on_training`: training accuracy strictly above the majority-class rate."""

    train_acc: float
    majority_rate: float
    accept_below_chance: bool = False

    @property
    def passed(self) -> bool:
        return self.train_acc > self.majority_rate

    @property
    def accepted(self) -> bool:
        """Registered as the current model: it passed, or it is accepted below chance on purpose."""
        return self.passed or self.accept_below_chance

    def _shortfall(self) -> str:
        return f"training accuracy {self.train_acc:.3f} is not above the majority-class rate {self.majority_rate:.3f}; "

    def description(self, in_use: str | None) -> str | None:
        """The check's description (None when it passed); `in_use`: the current version after it."""
        if self.passed:
            return None
        if self.accepted:
            return self._shortfall() + "registered as current anyway (accept_below_chance)"
        return self._shortfall() + f"retrain refused, current version: {in_use or 'none'}"

    def refusal(self, version: str, in_use: str | None) -> str:
        """The warning for a refused retrain of `version`."""
        return (
            f"hcc_classifier {version} refused: "
            + self._shortfall()
            + (
                f"version {in_use} stays current"
                if in_use
                else "no usable classifier: no deep embeddings or deep predictions until a retrain passes"
            )
        )


# -- the use case ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    description: str | None
    metadata: dict[str, Any]


@dataclass(frozen=True)
class ClassifierOutcome:
    version: str  # the model version, also the data version
    folder: str  # the model's folder in the lake
    # the materialization's plain values, in order; `path`, `input_shape` and `timings_s` are a
    # path and JSON values for the caller to mark as such
    metadata: dict[str, Any]
    history: list[dict]  # one row per epoch, HISTORY_COLUMNS
    params: dict
    figure_path: str  # Figure 2 (accuracy and loss over epochs): where it goes in the lake
    figure_png: bytes
    check: CheckOutcome  # beats_chance_on_training


def history_rows(result: TrainingResult) -> list[dict]:
    return [
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


def write_history(store: FeatureStore, history: list[dict], version: str, run_id: str) -> None:
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


def write_predictions(
    store: FeatureStore, rows: list[dict], probabilities: np.ndarray, version: str, run_id: str
) -> None:
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


def cohort_probabilities(result: TrainingResult, data: TrainingSet) -> np.ndarray | None:
    """P(HCC) of `data.rows` in their order from the final evaluation of the model trained on
    `data` (result.train_probabilities / val_probabilities); None where it has none for them."""
    if result.train_probabilities is None or result.val_probabilities is None:
        return None
    if len(result.train_probabilities) != len(data.train) or len(result.val_probabilities) != len(data.validation):
        return None
    by_patient = {
        **dict(zip([r["patient_id"] for r in data.train], result.train_probabilities, strict=True)),
        **dict(zip([r["patient_id"] for r in data.validation], result.val_probabilities, strict=True)),
    }
    if any(r["patient_id"] not in by_patient for r in data.rows):
        return None
    return np.array([by_patient[r["patient_id"]] for r in data.rows], np.float32)


def train_or_reuse(
    store: FeatureStore,
    data_lake: DataLake,
    settings: ClassifierSettings,
    device: str,
    amp: bool,
    run_id: str,
    log: logging.Logger = _LOG,
) -> ClassifierOutcome:
    """hcc_classifier: train (or reuse) the model of the current cohort, predict the cohort, write
    its rows and register it (current only if accepted). ClassifierError when it cannot."""
    from hcc_assets.deep import CheckpointMismatchError, predict_proba, train_classifier

    started = time.perf_counter()
    data = training_set(store, data_lake, log)
    train, validation, volumes = data.train, data.validation, data.volumes
    config = settings.to_domain(device, amp)
    init = init_identity(settings.medicalnet_checkpoint)
    version = classifier_version(classifier_identity(config, device, init, data))
    folder = data_lake.path(*MODELS_DIR, version)

    result = None if settings.force_retrain else saved_classifier(data_lake, folder, device, config, log)
    reused = result is not None
    if result is None:
        log.info(
            f"hcc_classifier {version}: training depth {config.depth} on {device} "
            f"({len(train)} train / {len(validation)} validation patients, {init})"
        )
        try:
            result = train_classifier(
                [volumes[r["patient_id"]] for r in train],
                [r["hcc"] for r in train],
                [volumes[r["patient_id"]] for r in validation],
                [r["hcc"] for r in validation],
                config,
                device=device,
                progress=lambda line: log.info(f"hcc_classifier {version}: {line}"),
            )
        except CheckpointMismatchError as error:
            raise ClassifierError(f"hcc_classifier: {error}") from None
        save_classifier(result, data_lake, version)

    # P(HCC) of every cohort patient with a volume: those the training's final evaluation computed
    # (saved with the model, so a reused model gives the same), else one volume at a time
    predict_started = time.perf_counter()
    probabilities = cohort_probabilities(result, data)
    if probabilities is None:
        probabilities = predict_proba(
            result.model, [volumes[r["patient_id"]] for r in data.rows], batch_size=EMBED_BATCH_SIZE, device=device
        )
    predict_seconds = time.perf_counter() - predict_started

    final = result.final_metrics
    rule = ChanceRule(float(final["train_acc"]), majority_rate([r["hcc"] for r in train]), settings.accept_below_chance)
    history = history_rows(result)
    timings = {**result.timings, "predict_seconds": predict_seconds, "asset_seconds": time.perf_counter() - started}
    metrics = {
        **final,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "majority_rate": rule.majority_rate,
        BEATS_CHANCE: rule.passed,
        "timings": result.timings,
    }
    params = {
        **config.model_dump(mode="json", exclude=set(UNHASHED)),
        "device": result.device,
        "medicalnet_checkpoint": settings.medicalnet_checkpoint or None,
        "input_shape": data.input_shape,
        "validation_patients": [r["patient_id"] for r in validation],
        "code_version": CLASSIFIER_VERSION,
    }

    write_history(store, history, version, run_id)
    write_predictions(store, data.rows, probabilities, version, run_id)
    # the registry row last: deep_embedding follows it, so it flips only once the rest is written
    train_ids = [r["patient_id"] for r in train]
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
        data_snapshot=data.snapshot,
        current=rule.accepted,
    )
    in_use = version if rule.accepted else registry.current_version(store, MODEL_NAME)
    if not rule.accepted:
        log.warning(rule.refusal(version, in_use))

    return ClassifierOutcome(
        version=version,
        folder=folder,
        metadata={
            "model_version": version,
            "accepted": rule.accepted,
            "current_version": in_use or "none (no usable classifier)",
            "reused_saved_model": reused,
            "path": folder,
            "device": device,
            "mixed_precision": amp,
            "init": result.init,
            "depth": config.depth,
            "n_train": len(train),
            "n_validation": len(validation),
            "skipped_without_volume": len(data.missing),
            "input_shape": data.input_shape,
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "stopped_early": result.stopped_early,
            "train_accuracy": float(final["train_acc"]),
            "validation_accuracy": float(final["val_acc"]),
            "train_loss": float(final["train_loss"]),
            "validation_loss": float(final["val_loss"]),
            "majority_rate": rule.majority_rate,
            "timings_s": {k: round(float(v), 3) for k, v in timings.items()},
        },
        history=history,
        params=params,
        figure_path=data_lake.cohort_figure(MODEL_NAME, version, FIGURE),
        figure_png=plot_history(result.history, result.best_epoch),
        check=CheckOutcome(
            passed=rule.passed,
            description=rule.description(in_use),
            metadata={
                "train_acc": rule.train_acc,
                "majority_rate": rule.majority_rate,
                "n_train": len(train),
                "model_version": version,
                "current_version": in_use or "none",
            },
        ),
    )
