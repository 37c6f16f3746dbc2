"""Configuration objects and the label convention of the liver segmentation."""

from __future__ import annotations

from typing import Literal

import pydantic

LABEL_BACKGROUND, LABEL_LIVER, LABEL_SPLEEN = 0, 1, 2
LABELS = {"background": LABEL_BACKGROUND, "liver": LABEL_LIVER, "spleen": LABEL_SPLEEN}


class SegmentationTrainingConfig(pydantic.BaseModel):
    """How to train the liver model: which reduced nnU-Net configuration, for how long, where.

    nnU-Net's default plans take 9 s (2d) and 41 s (3d_fullres) per iteration on 2 CPU cores;
    the reduced `2d_cpu` (and `3d_cpu`) configurations added to the plans keep training to minutes.
    """

    model_config = pydantic.ConfigDict(extra="forbid")

    dataset_id: int = pydantic.Field(501, ge=1, le=999)
    dataset_name: str = pydantic.Field("HccLiver", pattern=r"^[A-Za-z0-9]+$")
    configuration: Literal["2d_cpu", "3d_cpu"] = "2d_cpu"
    epochs: int = pydantic.Field(5, ge=1)
    iterations_per_epoch: int = pydantic.Field(40, ge=1)
    val_iterations_per_epoch: int = pydantic.Field(5, ge=1)
    batch_size: int = pydantic.Field(8, ge=1)
    base_features: int = pydantic.Field(16, ge=4)  # features of the first stage, doubled per stage
    max_features: int = pydantic.Field(256, ge=4)
    # Axes in nnU-Net's transposed order (slice axis first; 2 values for 2d_cpu, 3 for 3d_cpu).
    # patch_size None: the planner's for 2d_cpu (the whole slice), 32x64x64 for 3d_cpu.
    patch_size: tuple[int, ...] | None = None
    # Target spacing in mm; None keeps the planner's (the native in-plane ~1.6 mm). (3.2, 3.2) for
    # 2d_cpu quarters the pixels: ~4x faster training and inference, ample for a liver.
    spacing: tuple[float, ...] | None = None
    initial_lr: float = pydantic.Field(1e-2, gt=0)
    fold: Literal["all", 0, 1, 2, 3, 4] = "all"  # "all": train on every case (no held-out split)
    seed: int = 12345
    device: str = "cpu"
    num_threads: int | None = pydantic.Field(None, ge=1)  # torch threads; None leaves torch's default
    # The network's forward pass in bfloat16 on a CPU (torch.autocast; the loss, weights, gradients
    # and the SGD update stay float32). nnU-Net autocasts on CUDA only: on CPUs without bfloat16
    # instructions it is slower. With them (AVX512-BF16 or AMX) a 2d_cpu training took 245 s instead
    # of 433 s at equal held-out Dice (README, liver_segmentation_model). None: on where the CPU has
    # them (uses_cpu_bf16).
    cpu_bf16: bool | None = None
    data_augmentation_workers: int = pydantic.Field(0, ge=0)  # nnUNet_n_proc_DA; 0 = in-process
    preprocessing_workers: int = pydantic.Field(1, ge=1)
    # The final validation predicts every validation case with mirroring: minutes on CPU.
    # None = only on a GPU.
    final_validation: bool | None = None


class MaskQualityConfig(pydantic.BaseModel):
    """Plausibility limits for a predicted liver.

    Adult livers measure roughly 1000-2500 mL (about 2% of body weight), HCC and fatty livers up
    to ~4000 mL; anything under 500 mL or over 4000 mL is more likely a segmentation failure than
    anatomy. The synthetic phantom's livers are adult-sized and fall inside these limits.
    """

    model_config = pydantic.ConfigDict(extra="forbid")

    liver_volume_ml_min: float = 500.0
    liver_volume_ml_max: float = 4000.0


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX tiles), as torch reports it.
    torch offers only private queries for this; a torch without them counts as no."""
    import torch

    queries = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(query() for query in queries if query is not None)


def uses_cpu_bf16(config: SegmentationTrainingConfig) -> bool:
    """`config.cpu_bf16` resolved: never off the CPU; None means where the CPU has bfloat16 instructions."""
    if config.device != "cpu":
        return False
    return cpu_has_native_bf16() if config.cpu_bf16 is None else config.cpu_bf16
