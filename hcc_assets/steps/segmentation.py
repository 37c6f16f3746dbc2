"""liver_segmentation_model -> liver_mask -> radiomic_features without Dagster: training or
registering the nnU-Net v2 model, one patient's liver mask with its quality and the rules that
exclude it from radiomics, one patient's radiomic features.

The assets in hcc_assets.defs.segmentation read their config and resources, call these and turn
the results into materializations, check results and failures. Errors: PatientInputError for a
patient's input (as every step), SegmentationModelError when no model can be made or registered,
radiomics.RadiomicsError when the features cannot be extracted (after the exclusion is recorded).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from hcc_assets import radiomics
from hcc_assets.core.errors import PatientInputError
from hcc_assets.core.files import publish_folder
from hcc_assets.core.versioning import SHORT, content_version
from hcc_assets.featurestore import FeatureStore, reads, registry
from hcc_assets.lake import LIVER_MASK_FILE, NIFTI_FILE, REFERENCE_MASK_FILE, DataLake, is_local_url
from hcc_assets.segmentation import (
    TRAINING_SUMMARY,
    LiverSegmenter,
    MaskQualityConfig,
    ModelFolderError,
    ModelInfo,
    SegmentationTrainingConfig,
    build_raw_dataset,
    keep_largest_components,
    mask_quality,
    overlay_png,
    plan_and_preprocess,
    train,
    validate_model_folder,
)
from hcc_assets.segmentation.config import LABEL_LIVER, uses_cpu_bf16

if TYPE_CHECKING:
    import nibabel as nib

SEGMENTATION_MODEL_VERSION = "2"  # 2: HccCpuTrainer augments in one anatomical frame
# 2: a model trained in bfloat16 on a CPU predicts in bfloat16 where the CPU has it (inference.py)
# 3: the model's input in one memory layout, so another stored voxel order gives the same mask
# 4: only the largest connected liver and spleen are kept (segmentation.keep_largest_components)
LIVER_MASK_VERSION = "4"
# 2: image and mask read in the voxel order of a standard axial series (radiomics.standard_axial_order)
# 3: ITK single-threaded during extraction, so the features are bit-identical on every run
RADIOMIC_FEATURES_VERSION = "3"

MODEL_NAME = "liver_segmentation"
MODELS_DIR = ("models", "segmentation")
RADIOMICS_STAGE = "radiomics"
MASK_FIGURE = "figure_1"
GRID_TOLERANCE_MM = 1e-4


@dataclass(frozen=True)
class CheckOutcome:
    """One asset check's result as plain values; `warn`: a warning, else an error (blocking where
    the check is)."""

    name: str
    passed: bool
    metadata: dict[str, Any]
    warn: bool = False


# -- liver_segmentation_model ----------------------------------------------------------------


class SegmentationModelError(Exception):
    """No segmentation model can be made or registered; the message says why. `final`: running
    again with the same input and config gives the same error."""

    def __init__(self, message: str, final: bool = False):
        super().__init__(message)
        self.final = final


def select_training_cases(candidates: list[str], held_out: set[str], max_cases: int) -> list[str]:
    """Sorted patients with reference masks, minus held-out ones, the first `max_cases` (0: all)."""
    chosen = sorted(set(candidates) - held_out)
    return chosen[:max_cases] if max_cases > 0 else chosen


@dataclass(frozen=True)
class UserModel:
    model_version: str
    info: ModelInfo


def register_user_model(store: FeatureStore, model_folder: str, run_id: str) -> UserModel:
    """Mode (a): validate a user-supplied nnU-Net v2 model folder and register it as current."""
    try:
        info = validate_model_folder(model_folder)
    except ModelFolderError as error:
        raise SegmentationModelError(str(error), final=True) from None
    model_version = f"user-{info.checkpoint_sha256[:12]}"
    params = {"mode": "user-supplied", **info.model_dump(mode="json", exclude={"path"})}
    _register(store, model_version, str(info.path), "user-supplied", params, [], {}, run_id)
    return UserModel(model_version, info)


@dataclass(frozen=True)
class TrainedModel:
    model_version: str
    path: str  # the model folder: a local path, or its URL in a remote lake
    reused: bool  # an existing, valid folder of this version was used instead of training
    settings: SegmentationTrainingConfig
    training_cases: int
    held_out_patients: int
    seconds: float
    summary: dict  # the training summary (TRAINING_SUMMARY) in the model folder

    @property
    def per_epoch(self) -> list[dict]:
        s = self.summary
        return [
            {"epoch": i, "train_loss": t, "val_loss": v, "pseudo_dice": d, "seconds": sec}
            for i, (t, v, d, sec) in enumerate(
                zip(s["train_loss"], s["val_loss"], s["pseudo_dice_per_label"], s["seconds_per_epoch"])
            )
        ]


def train_model(
    store: FeatureStore,
    data_lake: DataLake,
    settings: SegmentationTrainingConfig,
    *,
    hold_out_validation_split: bool,
    max_training_cases: int,
    force_retrain: bool,
    run_id: str,
    log: Callable[[str], None],
) -> TrainedModel:
    """Mode (b): train `settings` on the patients with reference masks (the validation split held out
    if asked) into the lake's models/segmentation/<version>/, or reuse a valid folder of that version
    (unless `force_retrain`), and register it as current."""
    snapshot = store.current_snapshot()
    at_snapshot = store.at(snapshot=snapshot)  # every read from one snapshot, recorded with the model
    volumes = reads.reference_mask_volumes(at_snapshot)
    held_out: set[str] = reads.validation_patients(at_snapshot) if hold_out_validation_split else set()
    cases = select_training_cases(volumes["patient_id"].to_list(), held_out, max_training_cases)
    if len(cases) < 2:
        raise SegmentationModelError(
            f"{len(cases)} patient(s) with a reference mask "
            "to train on; at least 2 needed (ingest patients whose drop has reference/ masks, or "
            "supply a trained model via `model_folder`)",
            final=True,
        )
    digests = dict(zip(volumes["patient_id"], volumes["sha256"]))
    # cpu_bf16 as it will run, and only when on: models trained before it existed keep their versions
    training = settings.model_dump(mode="json", exclude={"device", "num_threads", "cpu_bf16"})
    training |= {"cpu_bf16": True} if uses_cpu_bf16(settings) else {}
    identity: dict[str, Any] = {
        "code_version": SEGMENTATION_MODEL_VERSION,
        "nnunetv2": package_version("nnunetv2"),
        "training": training,
        "cases": [[pid, digests[pid]] for pid in cases],
    }
    model_version = content_version(identity, length=SHORT)
    lake_dir = data_lake.path(*MODELS_DIR, model_version)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hcc-nnunet-") as staging:
        # nnU-Net needs a local folder: the version folder itself in a local lake; with a remote lake a
        # staged copy (downloaded when the lake has this version), uploaded after training.
        if data_lake.is_local:
            version_dir = data_lake.local_path(*MODELS_DIR, model_version)
        else:
            version_dir = Path(staging) / model_version
            if not force_retrain and data_lake.exists(lake_dir):
                data_lake.download_tree(lake_dir, version_dir)
        reused = version_dir.is_dir() and not force_retrain and valid_model_in(version_dir) is not None
        if not reused:
            train_into(version_dir, settings, cases, data_lake, identity, log)
        model_folder = valid_model_in(version_dir)
        if model_folder is None:
            raise SegmentationModelError(f"no valid model folder in {lake_dir}")
        info = validate_model_folder(model_folder)
        summary = json.loads((model_folder / TRAINING_SUMMARY).read_text())
        if data_lake.is_local:
            model_path = str(model_folder)
        else:
            model_path = f"{lake_dir}/{model_folder.name}"
            if not reused:  # checkpoints last: a folder without one is not a valid model
                data_lake.upload_tree(model_folder, model_path, last=(".pth",))
    seconds = time.perf_counter() - started

    metrics = {
        "training_seconds": summary["training_seconds"],
        "final_train_loss": summary["train_loss"][-1] if summary["train_loss"] else None,
        "final_val_loss": summary["val_loss"][-1] if summary["val_loss"] else None,
        "final_pseudo_dice_per_label": summary["pseudo_dice_per_label"][-1]
        if summary["pseudo_dice_per_label"]
        else None,
    }
    params = {
        "mode": "trained",
        **identity["training"],
        "trainer": info.trainer_name,
        "checkpoint_sha256": info.checkpoint_sha256,
        "held_out_patients": sorted(held_out),
    }
    _register(
        store,
        model_version,
        model_path,
        f"trained in platform (reduced CPU configuration {settings.configuration})",
        params,
        cases,
        metrics,
        run_id,
        training_set=registry.reference_masks_spec(cases),
        data_snapshot=snapshot,
    )
    return TrainedModel(model_version, model_path, reused, settings, len(cases), len(held_out), seconds, summary)


def valid_model_in(version_dir: Path) -> Path | None:
    """The nnU-Net model folder `<trainer>__<plans>__<configuration>` inside a version folder."""
    for candidate in sorted(version_dir.glob("*__*__*")) if version_dir.is_dir() else ():
        try:
            validate_model_folder(candidate)
            return candidate
        except ModelFolderError:
            continue
    return None


def train_into(
    version_dir: Path,
    settings: SegmentationTrainingConfig,
    cases: list[str],
    data_lake: DataLake,
    identity: dict,
    log: Callable[[str], None],
) -> None:
    """Raw dataset -> plans -> training in a temporary folder beside `version_dir`, then rename the
    model folder into place: a crash never leaves a half-trained model under a real version."""
    version_dir.parent.mkdir(parents=True, exist_ok=True)
    work = version_dir.parent / f".tmp-{version_dir.name}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        sources = []
        for pid in cases:
            image, mask = (
                _local_file(data_lake, pid, name, work / "inputs") for name in (NIFTI_FILE, REFERENCE_MASK_FILE)
            )
            sources.append((pid, image, mask))
        raw, preprocessed, results = work / "raw", work / "preprocessed", work / "results"
        log(f"nnU-Net dataset of {len(cases)} patients; planning {settings.configuration}")
        build_raw_dataset(sources, raw, settings.dataset_id, settings.dataset_name)
        plan_and_preprocess(settings, raw, preprocessed)
        log(
            f"training {settings.configuration}: {settings.epochs} x {settings.iterations_per_epoch} "
            f"iterations on {settings.device}"
        )
        trained = train(settings, preprocessed, results, progress=log)
        # force_retrain: an existing folder is swapped out, then deleted
        with publish_folder(version_dir, marker=None, staging=work / "model") as staged:
            trained.rename(staged / trained.name)
            (staged / "hcc_model.json").write_text(json.dumps(identity, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _local_file(data_lake: DataLake, pid: str, name: str, staging: Path) -> Path:
    path = data_lake.patient_file(pid, name)
    if data_lake.is_local:
        return Path(path)
    target = staging / pid / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data_lake.read_bytes(path))
    return target


def _register(
    store: FeatureStore,
    model_version: str,
    path: str,
    init: str,
    params: dict,
    patients: list[str],
    metrics: dict,
    run_id: str,
    training_set: dict | None = None,
    data_snapshot: int | None = None,
) -> None:
    store.register_model(
        registry.model_row(
            MODEL_NAME,
            "nnunet",
            path,
            init=init,
            params=params,
            metrics=metrics,
            training_patients=patients,
            training_set=training_set,
            version=model_version,
            run_id=run_id,
        ),
        data_snapshot=data_snapshot,
    )


def current_model(store: FeatureStore) -> dict | None:
    """The registry row of the current liver segmentation model, or None."""
    return registry.current_model(store, MODEL_NAME)


# -- liver_mask ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskThresholds:
    liver_volume_ml_min: float
    liver_volume_ml_max: float
    min_largest_component_fraction: float
    min_dice_liver: float
    max_liver_at_edge_fraction: float = 0.05

    @property
    def volume_range(self) -> list[float]:
        return [self.liver_volume_ml_min, self.liver_volume_ml_max]


# One predictor per (model folder, version, device) per process: partitions run in one worker
# (in-process executor, or several partitions per step process) load the network once. A model
# folder in a remote lake is staged in a temporary folder that lives as long as its predictor.
_SEGMENTERS: dict[tuple[str, str, str], tuple[LiverSegmenter, tempfile.TemporaryDirectory | None]] = {}


def segmenter(path: str, model_version: str, device: str) -> LiverSegmenter:
    """The cached predictor of this model folder, loading it (and dropping the previous one) if new."""
    key = (path, model_version, device)
    if key not in _SEGMENTERS:
        for _, old_staging in _SEGMENTERS.values():  # a new model replaces the old one
            if old_staging is not None:
                old_staging.cleanup()
        _SEGMENTERS.clear()
        staging = None
        folder = path
        if not is_local_url(path):  # nnU-Net loads a local folder: copy the lake's down
            staging = tempfile.TemporaryDirectory(prefix="hcc-nnunet-")
            folder = str(DataLake(path).download_tree(path, Path(staging.name) / path.rstrip("/").rsplit("/", 1)[-1]))
        try:
            _SEGMENTERS[key] = (LiverSegmenter(folder, device=device), staging)
        except BaseException:
            if staging is not None:
                staging.cleanup()
            raise
    return _SEGMENTERS[key][0]


def check_same_grid(stored: nib.Nifti1Image, image: nib.Nifti1Image) -> None:
    """Raise unless the stored mask lies on the volume's grid (shape, and affine within 1e-4 mm)."""
    if stored.shape != image.shape or not np.allclose(stored.affine, image.affine, atol=GRID_TOLERANCE_MM):
        raise RuntimeError(f"stored mask grid {stored.shape} does not match the volume's {image.shape}")


def mask_problem(quality: dict, range_ml: list[float]) -> str | None:
    """Why a mask must not feed radiomics (what the blocking checks say), or None."""
    if quality["liver_voxels"] <= 0:
        return "the mask has no liver voxels"
    if not quality["liver_volume_plausible"]:
        return f"liver volume {quality['liver_volume_ml']:.0f} mL outside {range_ml[0]:.0f}-{range_ml[1]:.0f} mL"
    return None


def mask_checks(quality: dict, has_reference: bool, thresholds: MaskThresholds) -> list[CheckOutcome]:
    """mask_not_empty, liver_volume_plausible (blocking errors); single_main_component,
    liver_within_field_of_view and, where a reference mask exists, dice_vs_reference (warnings)."""
    fraction = quality["liver_largest_component_fraction"]
    if not has_reference:
        dice = CheckOutcome("dice_vs_reference", True, {"reference": "no reference"})
    else:
        dice = CheckOutcome(
            "dice_vs_reference",
            quality["dice_liver"] >= thresholds.min_dice_liver,
            {
                "dice_liver": quality["dice_liver"],
                "dice_spleen": quality["dice_spleen"],
                "threshold": thresholds.min_dice_liver,
            },
            warn=True,
        )
    return [
        CheckOutcome("mask_not_empty", quality["liver_voxels"] > 0, {"liver_voxels": quality["liver_voxels"]}),
        CheckOutcome(
            "liver_volume_plausible",
            bool(quality["liver_volume_plausible"]),
            {"liver_ml": quality["liver_volume_ml"], "range_ml": thresholds.volume_range},
        ),
        CheckOutcome(
            "single_main_component",
            fraction >= thresholds.min_largest_component_fraction,
            {
                "largest_component_fraction": fraction,
                "components": quality["liver_components"],
                "threshold": thresholds.min_largest_component_fraction,
            },
            warn=True,
        ),
        CheckOutcome(
            "liver_within_field_of_view",
            quality["liver_at_edge_fraction"] <= thresholds.max_liver_at_edge_fraction,
            {
                "liver_at_edge_fraction": quality["liver_at_edge_fraction"],
                "edge": quality["liver_at_edge"] or "none",
                "threshold": thresholds.max_liver_at_edge_fraction,
            },
            warn=True,
        ),
        dice,
    ]


@dataclass(frozen=True)
class LiverMask:
    patient_id: str
    model: dict  # the registry row of the model that predicted it
    path: str
    sha256: str
    image: nib.Nifti1Image  # the native-resolution volume
    mask: nib.Nifti1Image  # the mask as read back from the lake
    quality: dict  # segmentation.mask_quality
    has_reference: bool

    @property
    def data_version(self) -> str:
        return self.sha256[:16]

    def row(self) -> dict:
        q = self.quality
        return {
            "patient_id": self.patient_id,
            "model_version": self.model["version"],
            "path": self.path,
            "sha256": self.sha256,
            "liver_voxels": q["liver_voxels"],
            "liver_ml": q["liver_volume_ml"],
            "spleen_ml": q["spleen_volume_ml"],
            "liver_components": q["liver_components"],
            "largest_component_fraction": q["liver_largest_component_fraction"],
            "dice_liver": q["dice_liver"],
            "dice_spleen": q["dice_spleen"],
            # the field of view's cut through the liver (liver_within_field_of_view); NULL in rows
            # written before it was measured
            "liver_at_edge_fraction": q["liver_at_edge_fraction"],
            "liver_at_edge": q["liver_at_edge"] or None,
        }

    def metadata(self) -> dict[str, Any]:
        """Plain metadata values (lists become JSON); the asset adds the path, timing and figure."""
        q = self.quality
        return {
            "model_version": self.model["version"],
            "model_init": self.model["init"],
            "liver_ml": q["liver_volume_ml"],
            "spleen_ml": q["spleen_volume_ml"],
            "liver_components": q["liver_components"],
            "largest_component_fraction": q["liver_largest_component_fraction"],
            "dice_liver": q["dice_liver"] if q["dice_liver"] is not None else "no reference",
            "dice_spleen": q["dice_spleen"] if q["dice_spleen"] is not None else "no reference",
            "shape": list(self.image.shape),
        }

    def overlay_png(self) -> bytes:
        """Figure 1: mid-liver slice, liver red, spleen blue."""
        return overlay_png(self.image, self.mask)


def segment_liver(
    data_lake: DataLake, patient_id: str, model: dict, device: str, thresholds: MaskThresholds
) -> LiverMask:
    """Predict the patient's mask with `model` (a registry row), write it to the lake, verify that
    what landed there lies on the volume's grid, and measure it (with Dice where a reference exists)."""
    try:
        predictor = segmenter(model["path"], model["version"], device)
    except Exception as error:  # corrupt or incompatible model folder: say which model, not a traceback
        raise PatientInputError(
            f"the current liver segmentation model {model['version']} cannot be loaded "
            f"({type(error).__name__}: {str(error)[:200]}); re-materialize "
            "liver_segmentation_model (force_retrain) or fix its model_folder"
        ) from None
    image = data_lake.read_nifti(data_lake.patient_file(patient_id, NIFTI_FILE))
    prediction = predictor.predict(image)
    mask = keep_largest_components(prediction)
    path = data_lake.patient_file(patient_id, LIVER_MASK_FILE)
    digest = data_lake.write_nifti(path, mask)
    stored = data_lake.read_nifti(path)  # verify what landed in the lake, not what we meant to write
    check_same_grid(stored, image)
    reference_path = data_lake.patient_file(patient_id, REFERENCE_MASK_FILE)
    reference = data_lake.read_nifti(reference_path) if data_lake.exists(reference_path) else None
    limits = MaskQualityConfig(
        liver_volume_ml_min=thresholds.liver_volume_ml_min, liver_volume_ml_max=thresholds.liver_volume_ml_max
    )
    quality = mask_quality(stored, reference, limits, prediction=prediction)
    return LiverMask(patient_id, model, path, digest, image, stored, quality, reference is not None)


def record_liver_mask(store: FeatureStore, made: LiverMask, thresholds: MaskThresholds, run_id: str) -> str | None:
    """The `liver_masks` row; for an implausible mask (returned: why) the patient's radiomic features
    are dropped and the exclusion recorded, so none of this mask (or of an older one) exist."""
    rows = pl.DataFrame([made.row()], schema_overrides={"dice_liver": pl.Float64, "dice_spleen": pl.Float64})
    store.replace_partition(
        "liver_masks",
        made.patient_id,
        FeatureStore.with_provenance(rows, version=f"liver_mask@{LIVER_MASK_VERSION}", run_id=run_id),
    )
    problem = mask_problem(made.quality, thresholds.volume_range)
    if problem:
        forget_features(store, made.patient_id)
        exclude_from_radiomics(store, made.patient_id, f"liver mask implausible: {problem}", run_id)
    return problem


def forget_mask(store: FeatureStore, data_lake: DataLake, patient_id: str) -> None:
    """Remove the patient's mask row, file and figure (after a failure: nothing stale remains)."""
    store.delete_partition("liver_masks", patient_id)
    data_lake.remove(data_lake.patient_file(patient_id, LIVER_MASK_FILE))
    data_lake.remove(data_lake.patient_figure(patient_id, "liver_mask", MASK_FIGURE))


# -- radiomic_features -----------------------------------------------------------------------


def forget_features(store: FeatureStore, patient_id: str) -> None:
    store.delete_partition("radiomic_features", patient_id)


def exclude_from_radiomics(store: FeatureStore, patient_id: str, reason: str, run_id: str) -> None:
    row = pl.DataFrame([{"patient_id": patient_id, "stage": RADIOMICS_STAGE, "reason": reason}])
    store.replace_partition(
        "exclusions",
        patient_id,
        FeatureStore.with_provenance(row, version=f"radiomic_features@{RADIOMIC_FEATURES_VERSION}", run_id=run_id),
        match={"stage": RADIOMICS_STAGE},
    )


def extract_radiomics(store: FeatureStore, data_lake: DataLake, patient_id: str, run_id: str) -> dict[str, float]:
    """pyradiomics features of the liver label of the patient's mask on the native-resolution volume.
    A radiomics.RadiomicsError is re-raised after its exclusion is recorded (the row outlives the
    failure)."""
    image = data_lake.read_nifti(data_lake.patient_file(patient_id, NIFTI_FILE))
    mask = data_lake.read_nifti(data_lake.patient_file(patient_id, LIVER_MASK_FILE))
    try:
        return radiomics.extract(image, mask, label=LABEL_LIVER)
    except radiomics.RadiomicsError as error:
        exclude_from_radiomics(store, patient_id, error.reason, run_id)
        raise


@dataclass(frozen=True)
class RadiomicFeatures:
    feature_set: str
    features: dict[str, float]

    @property
    def names(self) -> list[str]:
        return sorted(self.features)

    @property
    def data_version(self) -> str:
        return content_version([self.feature_set, [[n, repr(self.features[n])] for n in self.names]])

    def metadata(self) -> dict[str, Any]:
        """Plain metadata values (dicts become JSON); the asset adds the timing."""
        counts: dict[str, int] = {}
        for name in self.names:
            feature_class = name.split("_")[1]
            counts[feature_class] = counts.get(feature_class, 0) + 1
        return {
            "feature_set_version": self.feature_set,
            "pyradiomics_version": importlib.import_module("radiomics").__version__.lstrip("v"),
            "params_sha256": hashlib.sha256(radiomics.PARAMS_PATH.read_bytes()).hexdigest(),
            "n_features": len(self.names),
            "n_study_features": len(radiomics.study_features(self.features)),
            "features_per_class": counts,
            "input": "native-resolution nifti_volume + liver label of liver_mask (same grid)",
        }

    def checks(self) -> list[CheckOutcome]:
        return [
            CheckOutcome(
                "features_finite",
                all(np.isfinite(v) for v in self.features.values()),
                {"n_features": len(self.features)},
            )
        ]


def record_radiomics(
    store: FeatureStore, patient_id: str, features: dict[str, float], feature_set: str, run_id: str
) -> RadiomicFeatures:
    """The patient's `radiomic_features` rows (long table), and any radiomics exclusion cleared, in
    one transaction."""
    names = sorted(features)
    rows = pl.DataFrame(
        {
            "patient_id": [patient_id] * len(names),
            "feature_set_version": [feature_set] * len(names),
            "feature": names,
            "value": [features[n] for n in names],
        },
        schema={"patient_id": pl.String, "feature_set_version": pl.String, "feature": pl.String, "value": pl.Float64},
    )
    store.replace_partition(
        "radiomic_features",
        patient_id,
        FeatureStore.with_provenance(rows, version=f"radiomic_features@{RADIOMIC_FEATURES_VERSION}", run_id=run_id),
        also_delete={"exclusions": {"stage": RADIOMICS_STAGE}},
    )
    return RadiomicFeatures(feature_set, features)
