"""Test-size model settings, in one place, and the one liver model the suite shares.

The settings are cheap versions of the study's: tests check what the platform does with a model,
not how good the model is (the demo and benchmarks/ measure that). `shared_liver_model` trains
nnU-Net once per pytest session, through the real asset, and hands the folder to every test that
only needs *a* trained liver model: they register it the way a user plugs in a trained nnU-Net
(`liver_segmentation_model`'s `model_folder`, mode a). test_segmentation_assets, whose subject
is that very training, trains it in its own lake and publishes it when it comes first, so the
suite trains it once (nnU-Net's CPU training is deterministic: the same model either way);
segmentation/test_training_inference trains its own, at other settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Native-spacing 2d_cpu (the 64-matrix phantom has ~6-7 mm pixels: the default 3.2 mm would upsample
# it). With pixels coarser than the slice gap nnU-Net slices the 2d network sagittally (16x64), a
# harder problem than axial 256x256: 6 x 20 iterations gave liver Dice ~0.6 even on training
# patients; 12 x 25 at lr 0.02 (~25 s on 1 thread) gave 0.82-0.86 on the held-out patients (with
# nnU-Net's generic augmentation, before HccCpuTrainer kept one anatomical frame).
# The planner's patch is the median slice (14x64): a 15-16 slice volume then takes two overlapping
# windows per slice at inference; 16x64 covers every volume of the small cohorts in one.
SEGMENTATION_TRAINING = {
    "epochs": 12,
    "iterations_per_epoch": 25,
    "val_iterations_per_epoch": 2,
    "initial_lr": 0.02,
    "spacing": [],
    "patch_size": [16, 64],
    "seed": 7,
    # float32 on every CPU: the suite's masks, and the radiomic claims on them, then do not depend on
    # whether the CPU has bfloat16 instructions (the default, None, uses them where it does); the
    # bfloat16 step has its own test (segmentation/test_training_inference)
    "cpu_bf16": False,
}
# A depth-10 classifier for a few epochs: enough for the flows that need *a* classifier; it may
# stay below chance (accept_below_chance), the gate has its own tests (test_deep_assets).
CLASSIFIER_TRAINING = {
    "depth": 10,
    "lr": 0.05,
    "min_epochs": 5,
    "max_epochs": 5,
    "patience": 5,
    "batch_size": 4,
    "seed": 0,
    "accept_below_chance": True,
}
# The study-sized classifier (test_analysis_assets): long enough to separate a clear lesion signal.
STUDY_CLASSIFIER_TRAINING = {
    "depth": 10,
    "lr": 0.05,
    "min_epochs": 20,
    "max_epochs": 40,
    "patience": 10,
    "batch_size": 8,
    "seed": 0,
}
# A classifier that does not learn (learning rate ~0, one epoch): its embeddings are a fixed random
# projection of the images, so they carry no label information; below chance on purpose.
UNTRAINED_CLASSIFIER = {
    "depth": 10,
    "lr": 1e-12,
    "momentum": 0.0,
    "min_epochs": 1,
    "max_epochs": 1,
    "patience": 1,
    "batch_size": 4,
    "seed": 0,
}
# torch threads of every in-process materialization in the tests: one core per xdist worker
# (`make test` runs `-n 2` on 2 cores), so two workers never oversubscribe the machine.
TEST_CPU_THREADS = 1


def suite_compute(threads: int = TEST_CPU_THREADS):
    """The suite's `compute` resource: the CPU, `threads` torch threads, and float32 on every CPU
    (mixed_precision off: no bfloat16 trunk where the CPU has it), so the suite's classifiers, like
    its nnU-Net trainings (cpu_bf16 off), do not depend on the CPU's instructions."""
    from hcc_assets.defs.resources import ComputeResource

    return ComputeResource(device="cpu", cpu_threads=threads, mixed_precision=False)


# The grid of the tests' preprocessed volumes (the classifier's input): layer4 of a ResNet still
# sees one voxel.
TEST_GRID = [32, 32, 16]


def shared_run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This pytest run's folder common to all xdist workers."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(folder: Path, build: Callable[[Path], dict]) -> dict:
    """`build(folder)` run once per pytest run, whichever xdist worker takes the file lock beside
    `folder` first; the others wait, and every caller gets the record it returned (JSON, kept in
    `folder`/done.json). A folder without that record is a build that did not finish: built again."""
    from filelock import FileLock  # torch's own dependency

    done = folder / "done.json"
    with FileLock(str(folder) + ".lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            record = build(folder)
            done.write_text(json.dumps(record))
        return json.loads(done.read_text())


class LiverModelSlot:
    """The run's shared liver model, while its lock is held: `folder` is the trained model folder,
    or None until someone publishes one."""

    def __init__(self, shared: Path):
        self.shared = shared
        self.done = shared / "done.json"

    @property
    def folder(self) -> Path | None:
        return Path(json.loads(self.done.read_text())["folder"]) if self.done.exists() else None

    def publish(self, model_folder: Path) -> Path:
        """Copy a trained nnU-Net folder in, under nnU-Net's own folder name (<trainer>__<plans>__<configuration>)."""
        shutil.rmtree(self.shared, ignore_errors=True)
        folder = self.shared / "model" / Path(model_folder).name
        shutil.copytree(model_folder, folder)
        self.done.write_text(json.dumps({"folder": str(folder), "settings": SEGMENTATION_TRAINING}))
        return folder


@contextmanager
def liver_model_slot(tmp_path_factory: pytest.TempPathFactory, cohort_settings: dict) -> Iterator[LiverModelSlot]:
    """The slot of the model trained with SEGMENTATION_TRAINING on the cohort `cohort_settings`
    describes, keyed by the hash of both, under a file lock shared by the xdist workers: whoever
    holds it trains and publishes, the others wait for the folder. test_segmentation_assets, whose
    subject is that training, publishes the model it trains when it comes first. Not `built_once`:
    that test trains while holding the slot whether or not the model is already there."""
    from filelock import FileLock  # torch's own dependency

    key = hashlib.sha256(json.dumps([SEGMENTATION_TRAINING, cohort_settings], sort_keys=True).encode()).hexdigest()
    shared = shared_run_folder(tmp_path_factory) / f"liver_model_{key[:12]}"
    with FileLock(str(shared) + ".lock"):
        yield LiverModelSlot(shared)


def shared_liver_model(tmp_path_factory: pytest.TempPathFactory, cohort_source: Path, cohort_settings: dict) -> Path:
    """The nnU-Net model folder trained with SEGMENTATION_TRAINING on `cohort_source` (ingested,
    split and trained through the real assets in a scratch lake), once per run (liver_model_slot;
    each xdist worker synthesizes its own copy of the same cohort)."""
    with liver_model_slot(tmp_path_factory, cohort_settings) as slot:
        if slot.folder is None:
            scratch = slot.shared.with_name(slot.shared.name + "_scratch")
            shutil.rmtree(scratch, ignore_errors=True)
            slot.publish(_train_liver_model(scratch, cohort_source))
            shutil.rmtree(scratch, ignore_errors=True)
        folder = slot.folder
        assert folder is not None
        return folder


def _train_liver_model(scratch: Path, cohort_source: Path) -> Path:
    """Train in a scratch lake; the model folder in that lake."""
    import dagster as dg

    from hcc_assets.defs.cohort import cohort
    from hcc_assets.defs.segmentation import liver_segmentation_model
    from hcc_assets.featurestore.registry import current_model
    from hcc_assets_tests.defs import helpers

    incoming = scratch / "incoming"
    shutil.copytree(cohort_source, incoming)
    lake = helpers.make_lake(scratch, incoming)
    with helpers.in_memory_instance() as instance:
        for pid in helpers.register_all(instance, lake):
            helpers.ingest_patient(instance, lake, pid)
        result = dg.materialize(
            [cohort, liver_segmentation_model, *helpers.PATIENT_ASSETS],
            selection=[cohort, liver_segmentation_model],
            instance=instance,
            resources={"lake": lake, "compute": suite_compute()},
            run_config={"ops": {"liver_segmentation_model": {"config": SEGMENTATION_TRAINING}}},
            raise_on_error=False,
        )
        assert result.success, helpers.failure_message(result)
    model = current_model(lake.store, "liver_segmentation")
    assert model is not None
    return Path(model["path"])
