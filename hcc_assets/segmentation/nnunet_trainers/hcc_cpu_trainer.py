"""nnU-Net trainer with a short, configurable schedule for CPU training.

nnU-Net imports this file as a top-level module when it looks a trainer up by name (training
CLI and every predictor), so it may import nnunetv2 and torch only, never hcc_assets.

`hcc_assets.segmentation.train` sets the schedule on the instance. For the nnU-Net CLI
(`nnUNet_extTrainer=<this folder> nnUNetv2_train ... -tr HccCpuTrainer`) the environment
variables HCC_NNUNET_EPOCHS / HCC_NNUNET_ITERATIONS / HCC_NNUNET_VAL_ITERATIONS do the same.
"""

import os
from collections.abc import Callable

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


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

    # Set by the caller (hcc_assets.segmentation.train): called with one line per epoch.
    progress_callback: Callable[[str], None] | None = None

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
