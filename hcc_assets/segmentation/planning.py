"""nnU-Net planning and preprocessing, plus the reduced CPU configurations.

`2d_cpu` inherits nnU-Net's `2d` configuration (same spacing, same preprocessed data) with batch 8
and half the features (16..256 instead of 32..512); `3d_cpu` inherits `3d_fullres` with a
32x64x64 patch, the network topology nnU-Net's planner derives for that patch, and 16..256
features. Either may get its own spacing, and then its own preprocessed data.

Seconds per training iteration on 2 CPU cores, 256x256 native slices at 1.6 mm: nnU-Net's 2d 9,
3d_fullres 41; 2d_cpu 2.4 at native spacing, 0.5 with spacing (3.2, 3.2) (128x128 slices).
"""

from __future__ import annotations

import functools
import json
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

import numpy as np

from .config import SegmentationTrainingConfig
from .nnunet_env import PLANS_NAME, dataset_folder_name, nnunet_environment

CPU_CONFIGURATIONS = {"2d_cpu": "2d", "3d_cpu": "3d_fullres"}
DEFAULT_3D_CPU_PATCH = (32, 64, 64)
_MIN_FEATURE_MAP_EDGE = 4  # nnU-Net's default: the bottleneck is at least 4 voxels wide


def plan_and_preprocess(config: SegmentationTrainingConfig, raw_dir: Path | str, preprocessed_dir: Path | str) -> Path:
    """Fingerprint, plan, add `config.configuration` to the plans and preprocess only that.

    Returns the plans file. The raw dataset must already exist (see `build_raw_dataset`).
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )

    workers = config.preprocessing_workers
    # The planner sets torch's thread count to nnUNet_n_proc_DA while it sizes networks; 0 (our
    # in-process augmentation) would crash it.
    with (
        nnunet_environment(raw=raw_dir, preprocessed=preprocessed_dir, nnUNet_n_proc_DA=str(workers)),
        _in_process_pools(workers == 1),
    ):
        extract_fingerprint_dataset(
            config.dataset_id,
            _fingerprint_extractor_class(),
            num_processes=workers,
            check_dataset_integrity=False,
            clean=True,
            verbose=False,
            show_progress_bar=False,
        )
        plan_experiment_dataset(config.dataset_id)
        plans_file = (
            Path(preprocessed_dir) / dataset_folder_name(config.dataset_id, config.dataset_name) / f"{PLANS_NAME}.json"
        )
        add_cpu_configuration(plans_file, config)
        preprocess_dataset(
            config.dataset_id, PLANS_NAME, [config.configuration], [workers], verbose=False, show_progress_bar=False
        )
    return plans_file


@functools.cache
def _fingerprint_extractor_class():
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    class FewSamplesFingerprintExtractor(DatasetFingerprintExtractor):
        """nnU-Net draws 1e8 foreground intensities (400 MB; 10 s for six 48x48x16 cases here)
        for statistics that only CT normalization uses; our T2 channel is z-scored per case."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.num_foreground_voxels_for_intensitystats = 1e6

    return FewSamplesFingerprintExtractor


class _InProcessPool:
    """Stands in for nnU-Net's spawn pool when one worker is asked for: the work runs here, so no
    child re-imports torch (seconds on 2 cores) or the caller's `__main__` (spawn's trap for
    unguarded scripts), and a failing case raises its own error instead of "worker is 6 feet under"."""

    _pool: list = []  # nnU-Net polls these workers for liveness

    def __init__(self, processes: int | None = None):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def starmap_async(self, function, arguments):
        results = [function(*args) for args in arguments]
        return types.SimpleNamespace(ready=lambda: True, get=lambda timeout=None: results)

    def starmap(self, function, arguments):
        return [function(*args) for args in arguments]


@contextmanager
def _in_process_pools(enabled: bool) -> Iterator[None]:
    """Swap the `multiprocessing` that nnU-Net's fingerprint extractor and preprocessor use (both
    call `multiprocessing.get_context("spawn").Pool(n)`, nnunetv2 2.8.1) for `_InProcessPool`
    when `enabled`, and nnU-Net's file-listing fork pool always."""
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor
    from nnunetv2.preprocessing.preprocessors import default_preprocessor
    from nnunetv2.utilities import utils as nnunet_utils

    # Always: nnunetv2.utilities.utils lists the raw images with a *fork* Pool(12). Forking a
    # process that runs threads (Dagster's executor: log and event threads) can copy a held lock
    # into the children and hang the pool for good; listing files needs no processes at all.
    saved_pool = nnunet_utils.Pool
    nnunet_utils.Pool = _InProcessPool
    modules = (fingerprint_extractor, default_preprocessor) if enabled else ()
    context = types.SimpleNamespace(Pool=_InProcessPool)
    in_process = types.SimpleNamespace(get_context=lambda method=None: context)
    saved = [module.multiprocessing for module in modules]
    for module in modules:
        module.multiprocessing = in_process
    try:
        yield
    finally:
        nnunet_utils.Pool = saved_pool
        for module, original in zip(modules, saved):
            module.multiprocessing = original


def add_cpu_configuration(plans_file: Path | str, config: SegmentationTrainingConfig) -> dict:
    """Add (or replace) the reduced configuration `config.configuration` in a plans file."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_file = Path(plans_file)
    plans = json.loads(plans_file.read_text())
    parent_name = CPU_CONFIGURATIONS[config.configuration]
    if parent_name not in plans["configurations"]:
        raise ValueError(
            f"plans have no {parent_name!r} configuration to derive {config.configuration!r} from "
            f"(2-D data has no 3d_fullres)"
        )
    parent = PlansManager(plans).get_configuration(parent_name).configuration  # inheritance resolved
    reduced = {"inherits_from": parent_name, "batch_size": config.batch_size}
    architecture = deepcopy(parent["architecture"])
    kwargs = architecture["arch_kwargs"]
    spacing = parent["spacing"]
    patch: Sequence[int] | None = config.patch_size
    if config.spacing is not None:  # own spacing: own preprocessed data, patch = median image there
        if len(config.spacing) != len(spacing):
            raise ValueError(f"spacing {config.spacing} needs {len(spacing)} values for {parent_name}")
        scale = np.asarray(spacing) / np.asarray(config.spacing)
        median = [round(float(v)) for v in np.asarray(parent["median_image_size_in_voxels"]) * scale]
        spacing = list(config.spacing)
        reduced.update(
            spacing=spacing,
            median_image_size_in_voxels=median,
            data_identifier=f"{plans['plans_name']}_{config.configuration}",
        )
        patch = patch or median
    if patch is None and parent_name == "3d_fullres":
        patch = DEFAULT_3D_CPU_PATCH
    if patch is not None:  # a new patch needs the pooling and kernels nnU-Net would plan for it
        if len(patch) != len(spacing):
            raise ValueError(f"patch {patch} has {len(patch)} axes, {parent_name} has {len(spacing)}")
        _, strides, kernels, patch, _ = get_pool_and_conv_props(spacing, list(patch), _MIN_FEATURE_MAP_EDGE, 999999)
        kwargs.update(
            n_stages=len(strides),
            strides=strides,
            kernel_sizes=kernels,
            n_conv_per_stage=kwargs["n_conv_per_stage"][:1] * len(strides),
            n_conv_per_stage_decoder=kwargs["n_conv_per_stage_decoder"][:1] * (len(strides) - 1),
        )
        reduced["patch_size"] = patch
    kwargs["features_per_stage"] = [
        min(config.base_features * 2**stage, config.max_features) for stage in range(kwargs["n_stages"])
    ]
    reduced["architecture"] = architecture
    plans["configurations"][config.configuration] = reduced
    plans_file.write_text(json.dumps(plans, indent=2, default=_numpy_to_json))
    return json.loads(json.dumps(reduced, default=_numpy_to_json))


def _numpy_to_json(value):
    """nnU-Net's topology helper returns numpy integers."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
