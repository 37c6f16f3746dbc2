"""nnU-Net's folders and switches, which it reads from environment variables.

nnunetv2 2.8 reads nnUNet_raw / nnUNet_preprocessed / nnUNet_results / nnUNet_extTrainer lazily
(`nnunetv2.paths._EnvPath` looks at os.environ on every use), so setting them around a call is
enough; nothing has to happen before nnunetv2 is imported. os.environ is process-wide: one
training or predictor set-up at a time per process (Dagster's multiprocess executor runs each
step in its own process).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# OpenMP busy-waiting makes 2-thread CPU torch ~10x slower here. It only counts if set before
# torch loads, and this package imports torch lazily, so this line usually comes first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# nnU-Net finds trainers by class name; the predictor needs ours too. Only this folder is
# searched: nnU-Net imports every module in it as a top-level module.
TRAINER_FOLDER = Path(__file__).parent / "nnunet_trainers"
TRAINER_NAME = "HccCpuTrainer"
PLANS_NAME = "nnUNetPlans"


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


@contextmanager
def nnunet_environment(
    raw: Path | str | None = None,
    preprocessed: Path | str | None = None,
    results: Path | str | None = None,
    **extra: str,
) -> Iterator[None]:
    """Point nnU-Net at these folders (and register our trainer) for the duration of the block."""
    trainer_paths = [str(TRAINER_FOLDER)]
    if os.environ.get("nnUNet_extTrainer"):
        trainer_paths.append(os.environ["nnUNet_extTrainer"])
    updates = {"nnUNet_extTrainer": os.pathsep.join(trainer_paths), **extra}
    for key, value in (("nnUNet_raw", raw), ("nnUNet_preprocessed", preprocessed), ("nnUNet_results", results)):
        if value is not None:
            updates[key] = str(Path(value).resolve())
    saved = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def import_trainer_modules() -> None:
    """Import what nnU-Net's search for a trainer class by name imports (every module under
    nnunetv2.training.nnUNetTrainer, about 1 s, timm included), so that a process that calls this
    ahead of time builds a predictor without that delay (see hcc_assets/defs/warm_runs.py)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    with nnunet_environment():
        recursive_find_trainer_class_by_name(TRAINER_NAME)
