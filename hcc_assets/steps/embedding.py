"""deep_embedding without Dagster: one patient's 128 activations of the current hcc_classifier's new
layer (one volume at a time, so bit-identical on re-runs), and its `deep_embeddings` row.

Three parts, so a caller can treat them differently: `usable_classifier` (which model; refusing a
missing one or one that failed beats_chance_on_training), `embed_patient` (the patient's input:
PatientInputError for a missing volume, a volume on another grid or an unreadable checkpoint) and
`store_embedding`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from hcc_assets.core.errors import PatientInputError
from hcc_assets.featurestore import FeatureStore, registry
from hcc_assets.lake import PREPROCESSED_FILE, DataLake, sha256_bytes
from hcc_assets.steps.classifier import (
    BEATS_CHANCE,
    EMBED_BATCH_SIZE,
    EMBEDDING_DIM,
    MODEL_NAME,
    cached_classifier,
    read_volume,
)

DEEP_EMBEDDING_VERSION = "1"


class UnusableClassifierError(Exception):
    """No usable hcc_classifier to embed with; the message is the whole explanation."""

    def __init__(self, description: str, metadata: dict[str, Any]):
        super().__init__(description)
        self.metadata = metadata


@dataclass(frozen=True)
class UsableClassifier:
    version: str
    path: str  # its folder in the lake
    input_shape: list[int] | None  # the grid it was trained on


def usable_classifier(store: FeatureStore, patient_id: str, allow_model_below_chance: bool) -> UsableClassifier:
    """The current hcc_classifier; UnusableClassifierError when there is none, or when it failed
    beats_chance_on_training and `allow_model_below_chance` is not set."""
    model = registry.current_model(store, MODEL_NAME)
    if model is None:
        raise UnusableClassifierError(
            f"patient {patient_id}: deep_embedding needs a usable hcc_classifier, and none is "
            "current (never trained, or every retrain was refused by beats_chance_on_training); materialize "
            "hcc_classifier (job cohort_refresh)",
            {"patient_id": patient_id},
        )
    version = model["version"]
    metrics = json.loads(model["metrics"] or "{}")
    if metrics.get(BEATS_CHANCE) is False and not allow_model_below_chance:
        raise UnusableClassifierError(
            f"patient {patient_id}: the current hcc_classifier {version} failed its "
            f"{BEATS_CHANCE} check; retrain it (or set allow_model_below_chance)",
            {"patient_id": patient_id, "model_version": version},
        )
    input_shape = json.loads(model["params"] or "{}").get("input_shape")
    return UsableClassifier(version, model["path"], input_shape)


@dataclass(frozen=True)
class PatientEmbedding:
    patient_id: str
    model_version: str
    device: str
    vector: np.ndarray  # float32, EMBEDDING_DIM values
    volume_sha256: str

    @property
    def data_version(self) -> str:
        return sha256_bytes(self.vector.astype("<f4").tobytes())[:16]

    @property
    def nonzero(self) -> int:
        return int(np.count_nonzero(self.vector))

    @property
    def l2_norm(self) -> float:
        return float(np.linalg.norm(self.vector))

    @property
    def first_values(self) -> list[float]:
        return [round(float(v), 5) for v in self.vector[:8]]

    @property
    def finite(self) -> bool:
        return bool(np.isfinite(self.vector).all())

    def rows(self) -> pl.DataFrame:
        """The `deep_embeddings` row (without provenance)."""
        return pl.DataFrame(
            {
                "patient_id": [self.patient_id],
                "model_version": [self.model_version],
                "embedding": pl.Series("embedding", self.vector[None, :], dtype=pl.Array(pl.Float32, EMBEDDING_DIM)),
            }
        )


def embed_patient(
    data_lake: DataLake, patient_id: str, classifier: UsableClassifier, device: str | Callable[[], str]
) -> PatientEmbedding:
    """The patient's embedding by `classifier`. `device`: the torch device, or a function that
    prepares and names it (called once the volume is known to fit)."""
    from hcc_assets.deep import embed

    if not data_lake.exists(data_lake.patient_file(patient_id, PREPROCESSED_FILE)):
        raise PatientInputError("no preprocessed volume; materialize preprocessed_volume first")
    volume, volume_sha = read_volume(data_lake, patient_id)
    version, input_shape = classifier.version, classifier.input_shape
    if input_shape and list(volume.shape) != list(input_shape):
        raise PatientInputError(
            f"preprocessed volume {list(volume.shape)} is not on the grid the classifier "
            f"{version} was trained on ({input_shape}); re-materialize preprocessed_volume"
        )
    device = device if isinstance(device, str) else device()
    try:
        network = cached_classifier(data_lake, classifier.path, version, device)
    except Exception as error:  # corrupt, truncated or incompatible file: say which model, not a traceback
        raise PatientInputError(
            f"the checkpoint of the current hcc_classifier {version} is unreadable or "
            f"incompatible ({type(error).__name__}: {str(error)[:200]}); re-materialize "
            "hcc_classifier with force_retrain"
        ) from None
    vector = embed(network, volume[None], batch_size=EMBED_BATCH_SIZE, device=device)[0].astype(np.float32)
    if vector.shape != (EMBEDDING_DIM,):
        raise ValueError(f"embedding has shape {vector.shape}; the feature store holds {EMBEDDING_DIM} values")
    return PatientEmbedding(patient_id, version, device, vector, volume_sha)


def store_embedding(store: FeatureStore, embedding: PatientEmbedding, run_id: str) -> None:
    """Replace the patient's `deep_embeddings` row."""
    store.replace_partition(
        "deep_embeddings",
        embedding.patient_id,
        FeatureStore.with_provenance(
            embedding.rows(), version=f"deep_embedding@{DEEP_EMBEDDING_VERSION}", run_id=run_id
        ),
    )
