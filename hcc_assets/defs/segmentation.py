"""Segmentation and radiomics: liver_segmentation_model -> liver_mask -> radiomic_features.

Thin wiring around `hcc_assets.segmentation` (nnU-Net v2) and `hcc_assets.radiomics`
(pyradiomics); these assets add partitions, lineage, data versions, checks and feature-store rows.

Which image radiomics sees: the **native-resolution** T2 NIfTI (`nifti_volume.nii.gz`) with the
liver mask nnU-Net predicts on that same grid. The study extracted features from "raw images and
their corresponding segmentation masks"; the 128x128x64 preprocessed volume is resampled and
z-scored for the deep model, which would change first-order intensities and texture. pyradiomics
applies its own, documented resampling and discretization (see `radiomics/params.yaml`).

The default segmentation model is trained in the platform with a **reduced CPU configuration**
(`2d_cpu`: nnU-Net's 2d plans with batch 8, 16..256 features, 3.2x3.2 mm in-plane spacing, 12
epochs x 40 iterations at lr 0.02). It is a few-minute stand-in for a full nnU-Net, not one: for the full
model train `3d_fullres` with the standard `nnUNetTrainer` on a GPU (`nnUNetv2_train <dataset>
3d_fullres all`) and point `model_folder` at the result (mode a).
"""

import hashlib
import importlib
import json
import shutil
import tempfile
import time
import uuid
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import polars as pl

from hcc_assets import radiomics
from hcc_assets.core.errors import PatientInputError
from hcc_assets.core.files import publish_folder
from hcc_assets.core.versioning import SHORT, content_version
from hcc_assets.defs.automation import refresh_patient_feature, segmentation_retrain
from hcc_assets.defs.cohort import cohort
from hcc_assets.defs.deployment import deployed
from hcc_assets.defs.ingest import nifti_volume
from hcc_assets.defs.metadata import figure_metadata, markdown_table
from hcc_assets.defs.partitions import patients_partitions
from hcc_assets.defs.patient_errors import patient_failure
from hcc_assets.defs.resources import ComputeResource, LakeResource
from hcc_assets.featurestore import FeatureStore, reads, registry
from hcc_assets.lake import LIVER_MASK_FILE, NIFTI_FILE, REFERENCE_MASK_FILE, DataLake, is_local_url
from hcc_assets.segmentation import (
    TRAINING_SUMMARY,
    LiverSegmenter,
    MaskQualityConfig,
    ModelFolderError,
    SegmentationTrainingConfig,
    build_raw_dataset,
    mask_quality,
    overlay_png,
    plan_and_preprocess,
    train,
    validate_model_folder,
)
from hcc_assets.segmentation.config import LABEL_LIVER

SEGMENTATION_MODEL_VERSION = "1"
LIVER_MASK_VERSION = "1"
RADIOMIC_FEATURES_VERSION = "1"

MODEL_NAME = "liver_segmentation"
MODELS_DIR = ("models", "segmentation")
RADIOMICS_STAGE = "radiomics"
_GRID_TOLERANCE_MM = 1e-4

CPU_NOTE = (
    "The default model is a REDUCED CPU configuration of nnU-Net v2 (`2d_cpu`: the 2d plans with batch 8, "
    "16..256 features per stage, in-plane spacing 3.2x3.2 mm, 12 epochs x 40 iterations at lr 0.02, no final mirrored "
    "validation): minutes on 2 CPU cores, not nnU-Net's full 1000-epoch schedule. For the full model, on a GPU: "
    "build the same raw dataset, `nnUNetv2_plan_and_preprocess -d 501 --verify_dataset_integrity`, "
    "`nnUNetv2_train 501 3d_fullres all` (standard nnUNetTrainer), then materialize this asset with "
    "`model_folder` = `<nnUNet_results>/Dataset501_HccLiver/nnUNetTrainer__nnUNetPlans__3d_fullres` (mode a)."
)


# -- liver_segmentation_model ----------------------------------------------------------------


class LiverSegmentationModelConfig(dg.Config):
    """Mode (a): `model_folder` set -> validate and register that nnU-Net v2 folder.
    Mode (b): empty -> train the reduced configuration on the patients with reference masks."""

    model_folder: str = ""
    configuration: str = "2d_cpu"  # or "3d_cpu"
    epochs: int = 12  # 5 gave held-out liver Dice 0.74 on the synthetic cohort, 12 gave 0.90
    iterations_per_epoch: int = 40
    val_iterations_per_epoch: int = 5
    batch_size: int = 8
    initial_lr: float = 2e-2
    # Target spacing in mm, nnU-Net's axis order (2 values for 2d_cpu, 3 for 3d_cpu); [] keeps the
    # planner's (native) spacing. 3.2x3.2 halves a 256x256 ~1.5 mm slice: ~4x faster, Dice ~0.92.
    spacing: list[float] = [3.2, 3.2]
    seed: int = 12345
    max_training_cases: int = 0  # 0: every eligible patient
    # Leave the cohort's validation patients out of segmentation training (when `cohort_split`
    # exists), so their Dice in `liver_masks` is measured on unseen patients.
    hold_out_validation_split: bool = True
    force_retrain: bool = False  # same version folder present: reuse it unless this is set

    def training_config(self, device: str, threads: int | None) -> SegmentationTrainingConfig:
        return SegmentationTrainingConfig(
            configuration=self.configuration,
            epochs=self.epochs,
            iterations_per_epoch=self.iterations_per_epoch,
            val_iterations_per_epoch=self.val_iterations_per_epoch,
            batch_size=self.batch_size,
            initial_lr=self.initial_lr,
            spacing=tuple(self.spacing) or None,
            seed=self.seed,
            device=device,
            num_threads=threads,
        )


def select_training_cases(candidates: list[str], held_out: set[str], max_cases: int) -> list[str]:
    """Sorted patients with reference masks, minus held-out ones, the first `max_cases` (0: all)."""
    chosen = sorted(set(candidates) - held_out)
    return chosen[:max_cases] if max_cases > 0 else chosen


@dg.asset(
    deps=[nifti_volume, cohort],
    code_version=SEGMENTATION_MODEL_VERSION,
    group_name="models",
    automation_condition=segmentation_retrain(),
    kinds={"pytorch", "nnunet"},
    pool="gpu",
    description="The nnU-Net v2 liver/spleen segmentation model. Mode (a): a user-supplied trained "
    "model folder (`model_folder`), validated and registered. Mode (b, default): trained in the platform "
    "on the patients with reference masks (cohort validation patients held out) with the reduced CPU "
    "configuration `2d_cpu`, into data_lake/models/segmentation/<version>/. Row in `models`.",
)
def liver_segmentation_model(
    context: dg.AssetExecutionContext,
    config: deployed(LiverSegmentationModelConfig, "liver_segmentation_model"),
    lake: LakeResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    if config.model_folder:
        return _register_user_model(context, config, lake)
    return _train_model(context, config, lake, compute)


def _register_user_model(context, config: LiverSegmentationModelConfig, lake: LakeResource) -> dg.MaterializeResult:
    try:
        info = validate_model_folder(config.model_folder)
    except ModelFolderError as error:
        raise dg.Failure(description=f"liver_segmentation_model: {error}", allow_retries=False) from None
    model_version = f"user-{info.checkpoint_sha256[:12]}"
    params = {"mode": "user-supplied", **info.model_dump(mode="json", exclude={"path"})}
    _register(lake, context, model_version, str(info.path), "user-supplied", params, [], {})
    return dg.MaterializeResult(
        data_version=dg.DataVersion(model_version),
        metadata={
            "mode": "a: user-supplied model folder",
            "model_version": model_version,
            "path": dg.MetadataValue.path(str(info.path)),
            "configuration": info.configuration,
            "trainer": info.trainer_name,
            "folds": dg.MetadataValue.json(list(info.folds)),
            "labels": dg.MetadataValue.json(info.labels),
            "checkpoint_sha256": info.checkpoint_sha256,
        },
    )


def _train_model(
    context, config: LiverSegmentationModelConfig, lake: LakeResource, compute: ComputeResource
) -> dg.MaterializeResult:
    data_lake, snapshot = lake.lake, lake.store.current_snapshot()
    store = lake.store.at(snapshot=snapshot)  # every read from one snapshot, recorded with the model
    device = compute.torch_device()
    compute.configure_threads()
    settings = config.training_config(device, compute.cpu_threads if device == "cpu" else None)

    volumes = reads.reference_mask_volumes(store)
    held_out: set[str] = set()
    if config.hold_out_validation_split:
        held_out = reads.validation_patients(store)
    cases = select_training_cases(volumes["patient_id"].to_list(), held_out, config.max_training_cases)
    if len(cases) < 2:
        raise dg.Failure(
            description=f"liver_segmentation_model: {len(cases)} patient(s) with a reference mask "
            "to train on; at least 2 needed (ingest patients whose drop has reference/ masks, or "
            "supply a trained model via `model_folder`)",
            allow_retries=False,
        )
    digests = dict(zip(volumes["patient_id"], volumes["sha256"]))
    identity: dict[str, Any] = {
        "code_version": SEGMENTATION_MODEL_VERSION,
        "nnunetv2": package_version("nnunetv2"),
        "training": settings.model_dump(mode="json", exclude={"device", "num_threads"}),
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
            if not config.force_retrain and data_lake.exists(lake_dir):
                data_lake.download_tree(lake_dir, version_dir)
        reused = version_dir.is_dir() and not config.force_retrain and _valid_model_in(version_dir) is not None
        if not reused:
            _train_into(version_dir, settings, cases, data_lake, identity, context)
        model_folder = _valid_model_in(version_dir)
        if model_folder is None:
            raise dg.Failure(description=f"liver_segmentation_model: no valid model folder in {lake_dir}")
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
        lake,
        context,
        model_version,
        model_path,
        f"trained in platform (reduced CPU configuration {settings.configuration})",
        params,
        cases,
        metrics,
        training_set=registry.reference_masks_spec(cases),
        data_snapshot=snapshot,
    )
    epochs = [
        {"epoch": i, "train_loss": t, "val_loss": v, "pseudo_dice": d, "seconds": s}
        for i, (t, v, d, s) in enumerate(
            zip(
                summary["train_loss"],
                summary["val_loss"],
                summary["pseudo_dice_per_label"],
                summary["seconds_per_epoch"],
            )
        )
    ]
    return dg.MaterializeResult(
        data_version=dg.DataVersion(model_version),
        metadata={
            "mode": "b: trained in platform" + (" (existing folder of this version reused)" if reused else ""),
            "model_version": model_version,
            "path": dg.MetadataValue.path(model_path),
            "configuration": settings.configuration,
            "device": device,
            "training_cases": len(cases),
            "held_out_patients": len(held_out),
            "epochs": settings.epochs,
            "iterations_per_epoch": settings.iterations_per_epoch,
            "spacing_mm": dg.MetadataValue.json(list(settings.spacing) if settings.spacing else "planner's"),
            "seconds": round(seconds, 1),
            "training_seconds": summary["training_seconds"],
            "per_epoch": markdown_table(epochs, ["epoch", "train_loss", "val_loss", "pseudo_dice", "seconds"]),
            "train_loss": dg.MetadataValue.json(summary["train_loss"]),
            "val_loss": dg.MetadataValue.json(summary["val_loss"]),
            "note": dg.MetadataValue.md(CPU_NOTE),
        },
    )


def _valid_model_in(version_dir: Path) -> Path | None:
    """The nnU-Net model folder `<trainer>__<plans>__<configuration>` inside a version folder."""
    for candidate in sorted(version_dir.glob("*__*__*")) if version_dir.is_dir() else ():
        try:
            validate_model_folder(candidate)
            return candidate
        except ModelFolderError:
            continue
    return None


def _train_into(
    version_dir: Path, settings: SegmentationTrainingConfig, cases: list[str], data_lake, identity: dict, context
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
        context.log.info(f"nnU-Net dataset of {len(cases)} patients; planning {settings.configuration}")
        build_raw_dataset(sources, raw, settings.dataset_id, settings.dataset_name)
        plan_and_preprocess(settings, raw, preprocessed)
        context.log.info(
            f"training {settings.configuration}: {settings.epochs} x {settings.iterations_per_epoch} "
            f"iterations on {settings.device}"
        )
        trained = train(settings, preprocessed, results, progress=context.log.info)
        # force_retrain: an existing folder is swapped out, then deleted
        with publish_folder(version_dir, marker=None, staging=work / "model") as staged:
            trained.rename(staged / trained.name)
            (staged / "hcc_model.json").write_text(json.dumps(identity, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _local_file(data_lake, pid: str, name: str, staging: Path) -> Path:
    path = data_lake.patient_file(pid, name)
    if data_lake.is_local:
        return Path(path)
    target = staging / pid / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data_lake.read_bytes(path))
    return target


def _register(
    lake: LakeResource,
    context,
    model_version: str,
    path: str,
    init: str,
    params: dict,
    patients: list[str],
    metrics: dict,
    training_set: dict | None = None,
    data_snapshot: int | None = None,
) -> None:
    lake.store.register_model(
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
            run_id=context.run.run_id,
        ),
        data_snapshot=data_snapshot,
    )


# -- liver_mask ------------------------------------------------------------------------------


class LiverMaskConfig(dg.Config):
    # Plausible adult liver volume (see segmentation.MaskQualityConfig for the reasoning).
    liver_volume_ml_min: float = 500.0
    liver_volume_ml_max: float = 4000.0
    min_largest_component_fraction: float = 0.9
    min_dice_liver: float = 0.9


# One predictor per (model folder, version, device) per process: partitions run in one worker
# (in-process executor, or several partitions per step process) load the network once. A model
# folder in a remote lake is staged in a temporary folder that lives as long as its predictor.
_SEGMENTERS: dict[tuple[str, str, str], tuple[LiverSegmenter, tempfile.TemporaryDirectory | None]] = {}


def _segmenter(path: str, model_version: str, device: str) -> LiverSegmenter:
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


def current_model(store: FeatureStore) -> dict:
    row = registry.current_model(store, MODEL_NAME)
    if row is None:
        raise dg.Failure(
            description="no liver segmentation model is registered; materialize liver_segmentation_model first",
            allow_retries=False,
        )
    return row


def _forget_mask(lake: LakeResource, patient_id: str) -> None:
    lake.store.delete_partition("liver_masks", patient_id)
    lake.lake.remove(lake.lake.patient_file(patient_id, LIVER_MASK_FILE))
    lake.lake.remove(lake.lake.patient_figure(patient_id, "liver_mask", "figure_1"))


@dg.asset(
    partitions_def=patients_partitions,
    deps=[nifti_volume, liver_segmentation_model],
    code_version=LIVER_MASK_VERSION,
    group_name="features",
    automation_condition=refresh_patient_feature(),
    kinds={"nifti", "nnunet"},
    description="Liver (1) and spleen (2) mask predicted by the current liver_segmentation_model on the "
    "native-resolution T2 volume, saved on exactly its grid (affine and shape verified); quality numbers and "
    "Dice against the reference mask in `liver_masks`; Figure 1 (mid-liver slice with overlay) in metadata.",
    check_specs=[
        # Blocking: an empty or implausibly sized liver would give radiomic features (and a radiomic
        # prediction) of something that is not a liver. The patient's radiomics are dropped and the
        # reason recorded in `exclusions`; its deep prediction does not use the mask and still comes.
        dg.AssetCheckSpec("mask_not_empty", asset="liver_mask", blocking=True, description="the mask has liver voxels"),
        dg.AssetCheckSpec(
            "liver_volume_plausible",
            asset="liver_mask",
            blocking=True,
            description="liver volume within the configured mL range (default 500-4000 mL)",
        ),
        # Warnings only: a fragmented mask still measures the liver, and a good model can disagree
        # with a poor reference mask, so neither may stop the patient's radiomics.
        dg.AssetCheckSpec(
            "single_main_component",
            asset="liver_mask",
            description="the largest connected liver component holds >= 90% of liver voxels",
        ),
        dg.AssetCheckSpec(
            "dice_vs_reference",
            asset="liver_mask",
            description="liver Dice >= 0.9 against the reference mask, where one exists (warning)",
        ),
    ],
)
def liver_mask(
    context: dg.AssetExecutionContext,
    config: deployed(LiverMaskConfig, "liver_mask"),
    lake: LakeResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    patient_id = context.partition_key
    data_lake, store = lake.lake, lake.store
    started = time.perf_counter()
    with patient_failure(patient_id, "liver_mask", cleanup=lambda: _forget_mask(lake, patient_id)):
        model = current_model(store)
        compute.configure_threads()
        try:
            segmenter = _segmenter(model["path"], model["version"], compute.torch_device())
        except Exception as error:  # corrupt or incompatible model folder: say which model, not a traceback
            raise PatientInputError(
                f"the current liver segmentation model {model['version']} cannot be loaded "
                f"({type(error).__name__}: {str(error)[:200]}); re-materialize "
                "liver_segmentation_model (force_retrain) or fix its model_folder"
            ) from None
        image = data_lake.read_nifti(data_lake.patient_file(patient_id, NIFTI_FILE))
        mask = segmenter.predict(image)
        path = data_lake.patient_file(patient_id, LIVER_MASK_FILE)
        digest = data_lake.write_nifti(path, mask)
        stored = data_lake.read_nifti(path)  # verify what landed in the lake, not what we meant to write
        if stored.shape != image.shape or not np.allclose(stored.affine, image.affine, atol=_GRID_TOLERANCE_MM):
            raise RuntimeError(f"stored mask grid {stored.shape} does not match the volume's {image.shape}")
        reference_path = data_lake.patient_file(patient_id, REFERENCE_MASK_FILE)
        reference = data_lake.read_nifti(reference_path) if data_lake.exists(reference_path) else None
        limits = MaskQualityConfig(
            liver_volume_ml_min=config.liver_volume_ml_min, liver_volume_ml_max=config.liver_volume_ml_max
        )
        quality = mask_quality(stored, reference, limits)
    seconds = time.perf_counter() - started

    row = {
        "patient_id": patient_id,
        "model_version": model["version"],
        "path": path,
        "sha256": digest,
        "liver_voxels": quality["liver_voxels"],
        "liver_ml": quality["liver_volume_ml"],
        "spleen_ml": quality["spleen_volume_ml"],
        "liver_components": quality["liver_components"],
        "largest_component_fraction": quality["liver_largest_component_fraction"],
        "dice_liver": quality["dice_liver"],
        "dice_spleen": quality["dice_spleen"],
    }
    rows = pl.DataFrame([row], schema_overrides={"dice_liver": pl.Float64, "dice_spleen": pl.Float64})
    store.replace_partition(
        "liver_masks",
        patient_id,
        FeatureStore.with_provenance(rows, version=f"liver_mask@{LIVER_MASK_VERSION}", run_id=context.run.run_id),
    )

    volume_range = [config.liver_volume_ml_min, config.liver_volume_ml_max]
    implausible = _mask_problem(quality, volume_range)
    if implausible:  # radiomics of this mask must not exist, nor older ones that no longer match it
        context.log.warning(f"patient {patient_id}: liver mask implausible ({implausible}); radiomics excluded")
        _forget_features(lake, patient_id)
        _exclude(lake, patient_id, f"liver mask implausible: {implausible}", context.run.run_id)
    fraction = quality["liver_largest_component_fraction"]
    if reference is None:
        dice_check = dg.AssetCheckResult(
            check_name="dice_vs_reference", passed=True, metadata={"reference": "no reference"}
        )
    else:
        dice_check = dg.AssetCheckResult(
            check_name="dice_vs_reference",
            passed=quality["dice_liver"] >= config.min_dice_liver,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "dice_liver": quality["dice_liver"],
                "dice_spleen": quality["dice_spleen"],
                "threshold": config.min_dice_liver,
            },
        )
    return dg.MaterializeResult(
        data_version=dg.DataVersion(digest[:16]),
        metadata={
            "model_version": model["version"],
            "model_init": model["init"],
            "liver_ml": quality["liver_volume_ml"],
            "spleen_ml": quality["spleen_volume_ml"],
            "liver_components": quality["liver_components"],
            "largest_component_fraction": fraction,
            "dice_liver": quality["dice_liver"] if quality["dice_liver"] is not None else "no reference",
            "dice_spleen": quality["dice_spleen"] if quality["dice_spleen"] is not None else "no reference",
            "shape": dg.MetadataValue.json(list(image.shape)),
            "path": dg.MetadataValue.path(path),
            "seconds": round(seconds, 2),
            **figure_metadata(
                data_lake,
                "figure_1",
                data_lake.patient_figure(patient_id, "liver_mask", "figure_1"),
                overlay_png(image, stored),
                "mid-liver slice, liver red, spleen blue",
            ),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="mask_not_empty",
                passed=quality["liver_voxels"] > 0,
                metadata={"liver_voxels": quality["liver_voxels"]},
            ),
            dg.AssetCheckResult(
                check_name="liver_volume_plausible",
                passed=bool(quality["liver_volume_plausible"]),
                metadata={"liver_ml": quality["liver_volume_ml"], "range_ml": dg.MetadataValue.json(volume_range)},
            ),
            dg.AssetCheckResult(
                check_name="single_main_component",
                passed=fraction >= config.min_largest_component_fraction,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={
                    "largest_component_fraction": fraction,
                    "components": quality["liver_components"],
                    "threshold": config.min_largest_component_fraction,
                },
            ),
            dice_check,
        ],
    )


def _mask_problem(quality: dict, range_ml: list[float]) -> str | None:
    """Why a mask must not feed radiomics (what the blocking checks say), or None."""
    if quality["liver_voxels"] <= 0:
        return "the mask has no liver voxels"
    if not quality["liver_volume_plausible"]:
        return f"liver volume {quality['liver_volume_ml']:.0f} mL outside {range_ml[0]:.0f}-{range_ml[1]:.0f} mL"
    return None


# -- radiomic_features -----------------------------------------------------------------------


def _forget_features(lake: LakeResource, patient_id: str) -> None:
    lake.store.delete_partition("radiomic_features", patient_id)


def _exclude(lake: LakeResource, patient_id: str, reason: str, run_id: str) -> None:
    row = pl.DataFrame([{"patient_id": patient_id, "stage": RADIOMICS_STAGE, "reason": reason}])
    lake.store.replace_partition(
        "exclusions",
        patient_id,
        FeatureStore.with_provenance(row, version=f"radiomic_features@{RADIOMIC_FEATURES_VERSION}", run_id=run_id),
        match={"stage": RADIOMICS_STAGE},
    )


@dg.asset(
    partitions_def=patients_partitions,
    deps=[liver_mask, nifti_volume],
    code_version=RADIOMIC_FEATURES_VERSION,
    group_name="features",
    automation_condition=refresh_patient_feature(),
    kinds={"pyradiomics", "duckdb"},
    description="pyradiomics features (shape, firstorder, glcm, glrlm, glszm, gldm, ngtdm; shipped params.yaml) "
    "of the liver label of `liver_mask` on the native-resolution T2 NIfTI, as the study used raw images "
    "and their segmentation masks (not the resampled, z-scored 128x128x64 volume). Long table "
    "`radiomic_features`, wide view `radiomics`. An extraction failure (empty/tiny mask, NaN image) is "
    "recorded in `exclusions` (stage radiomics) and fails the partition.",
    check_specs=[
        dg.AssetCheckSpec(
            "features_finite", asset="radiomic_features", description="every feature value is finite (no NaN/inf)"
        )
    ],
)
def radiomic_features(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
    patient_id = context.partition_key
    data_lake = lake.lake
    run_id = context.run.run_id
    feature_set = radiomics.feature_set_version()
    started = time.perf_counter()
    with patient_failure(patient_id, "radiomic_features", cleanup=lambda: _forget_features(lake, patient_id)):
        image = data_lake.read_nifti(data_lake.patient_file(patient_id, NIFTI_FILE))
        mask = data_lake.read_nifti(data_lake.patient_file(patient_id, LIVER_MASK_FILE))
        try:
            features = radiomics.extract(image, mask, label=LABEL_LIVER)
        except radiomics.RadiomicsError as error:
            _exclude(lake, patient_id, error.reason, run_id)  # before raising: the row outlives the failure
            raise dg.Failure(
                description=f"patient {patient_id}: radiomic_features failed: {error.reason}; excluded from the "
                "radiomic model (row in `exclusions`, stage radiomics)",
                metadata={"patient_id": patient_id, "reason": error.reason, "stage": RADIOMICS_STAGE},
                allow_retries=False,
            ) from None
    seconds = time.perf_counter() - started

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
    lake.store.replace_partition(
        "radiomic_features",
        patient_id,
        FeatureStore.with_provenance(rows, version=f"radiomic_features@{RADIOMIC_FEATURES_VERSION}", run_id=run_id),
    )
    lake.store.replace_where("exclusions", {"patient_id": patient_id, "stage": RADIOMICS_STAGE}, pl.DataFrame())

    counts: dict[str, int] = {}
    for name in names:
        feature_class = name.split("_")[1]
        counts[feature_class] = counts.get(feature_class, 0) + 1
    content = content_version([feature_set, [[n, repr(features[n])] for n in names]])
    return dg.MaterializeResult(
        data_version=dg.DataVersion(content),
        metadata={
            "feature_set_version": feature_set,
            "pyradiomics_version": importlib.import_module("radiomics").__version__.lstrip("v"),
            "params_sha256": hashlib.sha256(radiomics.PARAMS_PATH.read_bytes()).hexdigest(),
            "n_features": len(names),
            "n_study_features": len(radiomics.study_features(features)),
            "features_per_class": dg.MetadataValue.json(counts),
            "input": "native-resolution nifti_volume + liver label of liver_mask (same grid)",
            "seconds": round(seconds, 2),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="features_finite",
                passed=all(np.isfinite(v) for v in features.values()),
                metadata={"n_features": len(names)},
            )
        ],
    )
