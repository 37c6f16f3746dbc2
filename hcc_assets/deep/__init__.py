"""Deep arm of the study: MedicalNet-layout 3D ResNet, frozen-trunk training, deep embeddings.

Rule: plain PyTorch/MONAI on arrays and volumes; never imports dagster, the feature store or the
lake: callable from a notebook as well as from the assets.
"""

from hcc_assets.deep.network import (
    SEEDED_RANDOM_INIT,
    CheckpointMismatchError,
    HCCResNet,
    build_classifier,
    build_trunk,
    load_medicalnet_checkpoint,
)
from hcc_assets.deep.train import (
    ClassifierConfig,
    EpochRecord,
    TrainingResult,
    as_volume_batch,
    cpu_bf16_active,
    embed,
    load_model,
    predict_proba,
    probability_from_embedding,
    save_model,
    train_classifier,
)

__all__ = [
    "SEEDED_RANDOM_INIT",
    "CheckpointMismatchError",
    "ClassifierConfig",
    "EpochRecord",
    "HCCResNet",
    "TrainingResult",
    "as_volume_batch",
    "build_classifier",
    "build_trunk",
    "cpu_bf16_active",
    "embed",
    "load_medicalnet_checkpoint",
    "load_model",
    "predict_proba",
    "probability_from_embedding",
    "save_model",
    "train_classifier",
]
