"""Train the reduced nnU-Net configuration with `HccCpuTrainer`, from Python.

Calling the trainer class directly (rather than `nnUNetv2_train`) lets us set the schedule from
the config and skip nnU-Net's final validation, which predicts every validation case with test-
time mirroring (minutes on CPU and not needed to produce a model).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hcc_assets.core.files import atomic_write_text

from .config import SegmentationTrainingConfig, uses_cpu_bf16
from .nnunet_env import PLANS_NAME, TRAINER_NAME, dataset_folder_name, nnunet_environment

TRAINING_SUMMARY = "hcc_training_summary.json"


def train(
    config: SegmentationTrainingConfig,
    preprocessed_dir: Path | str,
    results_dir: Path | str,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Train `config.configuration` on the preprocessed dataset; return the model folder.

    The folder is nnU-Net's: `<results>/DatasetXXX_<name>/HccCpuTrainer__nnUNetPlans__<configuration>/`
    with plans.json, dataset.json and `fold_<fold>/checkpoint_final.pth`, plus our
    `hcc_training_summary.json` (schedule, seconds per epoch, last losses and pseudo Dice).
    `progress` receives one line per epoch (losses, pseudo Dice, seconds, ETA).
    """
    cpu_bf16 = uses_cpu_bf16(config)
    config = config.model_copy(update={"cpu_bf16": cpu_bf16})  # the summary records what ran
    with nnunet_environment(
        preprocessed=preprocessed_dir, results=results_dir, nnUNet_n_proc_DA=str(config.data_augmentation_workers)
    ):
        import torch

        from .nnunet_trainers.hcc_cpu_trainer import HccCpuTrainer

        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        _seed_everything(config.seed)
        dataset_dir = Path(preprocessed_dir) / dataset_folder_name(config.dataset_id, config.dataset_name)
        plans = trainer_plans(dataset_dir / f"{PLANS_NAME}.json")
        dataset_json = json.loads((dataset_dir / "dataset.json").read_text())
        trainer = HccCpuTrainer(
            plans=plans,
            configuration=config.configuration,
            fold=config.fold,
            dataset_json=dataset_json,
            device=torch.device(config.device),
        )
        trainer.num_epochs = config.epochs
        trainer.num_iterations_per_epoch = config.iterations_per_epoch
        trainer.num_val_iterations_per_epoch = config.val_iterations_per_epoch
        trainer.initial_lr = config.initial_lr
        trainer.cpu_bf16 = cpu_bf16
        trainer.progress_callback = progress

        started = time.perf_counter()
        trainer.run_training()
        seconds = time.perf_counter() - started
        final_validation = (
            config.final_validation if config.final_validation is not None else trainer.device.type != "cpu"
        )
        if final_validation:
            trainer.perform_actual_validation(save_probabilities=False)

    model_folder = Path(trainer.output_folder_base)
    assert model_folder.name == f"{TRAINER_NAME}__{PLANS_NAME}__{config.configuration}"
    _write_summary(model_folder / TRAINING_SUMMARY, config, trainer, seconds)
    return model_folder


def trainer_plans(plans_file: Path | str) -> dict:
    """A plans file as nnU-Net's trainer takes it: nnU-Net 2.8's trainer pops "continue_training"."""
    return {**json.loads(Path(plans_file).read_text()), "continue_training": False}


def _seed_everything(seed: int) -> None:
    """nnU-Net draws patches and augmentations from numpy's, Python's and torch's global RNGs;
    with in-process data augmentation (nnUNet_n_proc_DA=0) seeding them makes a CPU run repeatable."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _write_summary(path: Path, config: SegmentationTrainingConfig, trainer, seconds: float) -> None:
    log = trainer.logger.local_logger.my_fantastic_logging
    starts, ends = log["epoch_start_timestamps"], log["epoch_end_timestamps"]
    summary = {
        "config": config.model_dump(mode="json"),
        "trainer": TRAINER_NAME,
        "training_seconds": round(seconds, 2),
        "seconds_per_epoch": [round(end - start, 2) for start, end in zip(starts, ends)],
        "train_loss": [float(v) for v in log["train_losses"]],
        "val_loss": [float(v) for v in log["val_losses"]],
        "pseudo_dice_per_label": [[float(d) for d in dice] for dice in log["dice_per_class_or_region"]],
    }
    atomic_write_text(path, json.dumps(summary, indent=2))


def trained_in_cpu_bf16(model_folder: Path | str) -> bool:
    """Whether the training summary (`_write_summary`) in a model folder records bfloat16 forward
    passes on a CPU; False for folders without one (user-supplied models)."""
    summary = Path(model_folder) / TRAINING_SUMMARY
    if not summary.is_file():
        return False
    config = json.loads(summary.read_text()).get("config", {})
    return bool(config.get("cpu_bf16")) and config.get("device", "cpu") == "cpu"
