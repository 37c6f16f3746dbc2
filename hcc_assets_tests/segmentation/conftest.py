from dataclasses import dataclass
from pathlib import Path

import pytest

from hcc_assets.segmentation import SegmentationTrainingConfig, build_raw_dataset, plan_and_preprocess, train
from hcc_assets_tests.model_configs import built_once, shared_run_folder
from hcc_assets_tests.segmentation.synthetic import write_cases

# Six 48x48x16 cases and 6 x 20 iterations of 2d_cpu: held-out Dice 0.90-0.95 (liver) and
# 0.86-0.93 (spleen) over training seeds 1, 2, 3, 7; ~15 s of training on one thread.
# float32 on every CPU (cpu_bf16 off), as the suite's other nnU-Net trainings: see model_configs.
TRAINING = dict(epochs=6, iterations_per_epoch=20, val_iterations_per_epoch=2, seed=7, cpu_bf16=False)
TRAINING_CASES = 6


@dataclass
class PlannedDataset:
    raw_dir: Path
    preprocessed_dir: Path
    plans_file: Path


@dataclass
class TrainedModel(PlannedDataset):
    folder: Path  # nnU-Net's model folder


def _shared_once(tmp_path_factory, name: str, make) -> dict[str, Path]:
    """`make(folder)`'s paths, made once for the whole run (model_configs.built_once)."""
    record = built_once(shared_run_folder(tmp_path_factory) / name, make)
    return {field: Path(path) for field, path in record.items()}


@pytest.fixture(scope="session")
def planned_dataset(tmp_path_factory) -> PlannedDataset:
    """The tiny cases as an nnU-Net raw dataset, planned and preprocessed once for the whole run:
    the planning tests need no training."""
    return PlannedDataset(**_shared_once(tmp_path_factory, "segmentation_dataset", _plan))


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, planned_dataset) -> TrainedModel:
    """One short nnU-Net training on `planned_dataset` for the whole run (training reads the plans
    and the preprocessed data, it never changes them)."""

    def make(root: Path) -> dict:
        folder = train(SegmentationTrainingConfig(**TRAINING), planned_dataset.preprocessed_dir, root / "results")
        return {"folder": str(folder)}

    return TrainedModel(**vars(planned_dataset), **_shared_once(tmp_path_factory, "segmentation_model", make))


def _plan(root: Path) -> dict:
    config = SegmentationTrainingConfig(**TRAINING)
    cases = write_cases(root / "cases", TRAINING_CASES)
    raw, preprocessed = root / "raw", root / "preprocessed"
    build_raw_dataset(cases, raw, config.dataset_id, config.dataset_name)
    plans_file = plan_and_preprocess(config, raw, preprocessed)
    return {"raw_dir": str(raw), "preprocessed_dir": str(preprocessed), "plans_file": str(plans_file)}
