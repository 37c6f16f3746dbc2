"""nnU-Net trainer with a short, configurable schedule for CPU training.

nnU-Net imports this file as a top-level module when it looks a trainer up by name (training
CLI and every predictor), so it may import nnunetv2 and torch only, never hcc_assets.

`hcc_assets.segmentation.train` sets the schedule on the instance. For the nnU-Net CLI
(`nnUNet_extTrainer=<this folder> nnUNetv2_train ... -tr HccCpuTrainer`) the environment
variables HCC_NNUNET_EPOCHS / HCC_NNUNET_ITERATIONS / HCC_NNUNET_VAL_ITERATIONS do the same.
"""

import os
from collections.abc import Callable

import numpy as np
import torch
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

# nnU-Net's own range for 2-D patches that are not square; also covers scanner obliquity
MAX_ROTATION_DEG = 15.0
# the scaling range nnU-Net's trainer sizes its initial (pre-rotation) patch for
_SCALE_RANGE = (0.85, 1.25)


class HccCpuTrainer(nnUNetTrainer):
    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int | str,  # nnU-Net annotates int, but takes "all" too
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 (nnU-Net's own signature)
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("HCC_NNUNET_EPOCHS", 5))
        self.num_iterations_per_epoch = int(os.environ.get("HCC_NNUNET_ITERATIONS", 40))
        self.num_val_iterations_per_epoch = int(os.environ.get("HCC_NNUNET_VAL_ITERATIONS", 5))

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """Augmentation for anatomy seen in one frame: rotations up to MAX_ROTATION_DEG, no mirroring.

        nnU-Net's generic defaults rotate square 2-D patches by up to 180 degrees and mirror every
        axis, to suit any data. Ours reach the network in one anatomical frame (the raw dataset
        asks for NibabelIOWithReorient, which reorients every volume to RAS), where the liver is
        always on the patient's right and the spine behind: upside-down and mirrored slices teach
        the network nothing it will meet, and on a short CPU schedule they slow learning down (demo cohort, 12 x 40 iterations: validation liver Dice
        mean 0.906 -> 0.938; training loss at epoch 6 as low as it was at epoch 12). No mirroring
        is nnU-Net's own nnUNetTrainerNoMirroring; it also turns test-time mirroring off, which
        would only average in views the network never learned.
        """
        _, dummy_2d, _, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        limit = np.deg2rad(MAX_ROTATION_DEG)
        rotation = (-limit, limit)
        patch_size = self.configuration_manager.patch_size
        initial_patch_size = get_patch_size(patch_size, rotation, rotation, rotation, _SCALE_RANGE)
        if dummy_2d:
            initial_patch_size[0] = patch_size[0]
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None

    # Set by the caller (hcc_assets.segmentation.train): called with one line per epoch.
    progress_callback: Callable[[str], None] | None = None
    # Set by the caller (SegmentationTrainingConfig.cpu_bf16): the forward pass in bfloat16 on a CPU.
    cpu_bf16: bool = False

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's own step; with `cpu_bf16` on a CPU, its network's forward pass in bfloat16.

        nnU-Net autocasts on CUDA only (on CPUs without bfloat16 instructions autocast is slower).
        The network is wrapped for this one step only (checkpoints save the unwrapped one); the loss,
        gradients, clipping and the SGD update stay nnU-Net's, in float32, as with AMP on a GPU."""
        if not (self.cpu_bf16 and self.device.type == "cpu"):
            return super().train_step(batch)
        network = self.network  # type: ignore[has-type]  # set by nnU-Net's initialize(), unannotated
        self.network = _Bfloat16Forward(network)
        try:
            return super().train_step(batch)
        finally:
            self.network = network

    def on_epoch_end(self):
        # The progress plot costs a matplotlib figure per epoch; draw it after the last one only.
        epoch = self.current_epoch
        if epoch < self.num_epochs - 1:
            self.logger.plot_progress_png = lambda output_folder: None  # shadows the method
        try:
            super().on_epoch_end()
        finally:
            self.logger.__dict__.pop("plot_progress_png", None)
        if self.progress_callback is not None:
            self.progress_callback(self._progress_line(epoch))

    def _progress_line(self, epoch: int) -> str:
        # nnU-Net 2.8 wraps its LocalLogger in a MetaLogger (`local_logger`); older versions did not
        logger = self.logger.local_logger if hasattr(self.logger, "local_logger") else self.logger
        log = logger.my_fantastic_logging
        seconds = log["epoch_end_timestamps"][-1] - log["epoch_start_timestamps"][-1]
        remaining = (self.num_epochs - epoch - 1) * seconds
        dice = ", ".join(f"{d:.3f}" for d in log["dice_per_class_or_region"][-1])
        return (
            f"nnU-Net epoch {epoch + 1}/{self.num_epochs} ({self.num_iterations_per_epoch} iterations): "
            f"train loss {log['train_losses'][-1]:.4f}, val loss {log['val_losses'][-1]:.4f}, "
            f"pseudo Dice [{dice}], {seconds:.1f} s, ETA {remaining:.0f} s"
        )


class _Bfloat16Forward(torch.nn.Module):
    """`network`'s forward pass under CPU bfloat16 autocast, its outputs back in float32 for the loss."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, data: torch.Tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = self.network(data)
        return [o.float() for o in output] if isinstance(output, (list, tuple)) else output.float()
