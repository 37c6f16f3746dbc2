"""Segmentation and radiomics: liver_segmentation_model -> liver_mask -> radiomic_features.

Thin wiring around the use cases in `hcc_assets.steps.segmentation` (over `hcc_assets.segmentation`,
nnU-Net v2, and `hcc_assets.radiomics`, pyradiomics): the steps write the files and feature-store
rows; these assets add partitions, lineage, data versions, check results and failures.

Which image radiomics sees: the **native-resolution** T2 NIfTI (`nifti_volume.nii.gz`) with the
liver mask nnU-Net predicts on that same grid. The study extracted features from "raw images and
their corresponding segmentation masks"; the 128x128x64 preprocessed volume is resampled and
z-scored for the deep model, which would change first-order intensities and texture. pyradiomics
applies its own, documented resampling and discretization (see `radiomics/params.yaml`).

The default segmentation model is trained in the platform with a **reduced CPU configuration**
(`2d_cpu`: nnU-Net's 2d plans with batch 8, 16..256 features, 3.2x3.2 mm in-plane spacing, 12
epochs x 40 iterations at lr 0.02, augmented in one anatomical frame). It is a few-minute
stand-in for a full nnU-Net, not one: for the full model train `3d_fullres` with the standard
`nnUNetTrainer` on a GPU (`nnUNetv2_train <dataset> 3d_fullres all`) and point `model_folder` at
the result (mode a).
"""

import time

import dagster as dg

from hcc_assets import radiomics
from hcc_assets.defs.automation import refresh_patient_feature, segmentation_retrain
from hcc_assets.defs.cohort import cohort
from hcc_assets.defs.deployment import deployed
from hcc_assets.defs.ingest import nifti_volume
from hcc_assets.defs.metadata import figure_metadata, markdown_table
from hcc_assets.defs.partitions import patients_partitions
from hcc_assets.defs.patient_errors import patient_failure
from hcc_assets.defs.resources import ComputeResource, LakeResource
from hcc_assets.featurestore import FeatureStore
from hcc_assets.segmentation import SegmentationTrainingConfig
from hcc_assets.steps import segmentation as steps
from hcc_assets.steps.segmentation import (
    LIVER_MASK_VERSION,
    MASK_FIGURE,
    RADIOMIC_FEATURES_VERSION,
    RADIOMICS_STAGE,
    SEGMENTATION_MODEL_VERSION,
)

CPU_NOTE = (
    "The default model is a REDUCED CPU configuration of nnU-Net v2 (`2d_cpu`: the 2d plans with batch 8, "
    "16..256 features per stage, in-plane spacing 3.2x3.2 mm, 12 epochs x 40 iterations at lr 0.02, "
    "rotations up to 15 degrees and no mirroring, no final validation): minutes on 2 CPU cores, not nnU-Net's "
    "full 1000-epoch schedule. For the full model, on a GPU: "
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
    # Demo cohort (lung bases), held-out liver Dice min / mean: 8 -> 0.874 / 0.928, 12 -> 0.906 / 0.951
    # (every validation patient >= 0.90; without lungs 8 -> 0.869 / 0.914, 12 -> 0.840 / 0.938); see
    # benchmarks/segmentation_config.py
    epochs: int = 12
    iterations_per_epoch: int = 40
    val_iterations_per_epoch: int = 5
    batch_size: int = 8
    initial_lr: float = 2e-2
    # Target spacing in mm, nnU-Net's axis order (2 values for 2d_cpu, 3 for 3d_cpu); [] keeps the
    # planner's (native) spacing. 3.2x3.2 halves a 256x256 ~1.5 mm slice: ~4x faster, Dice ~0.92.
    spacing: list[float] = [3.2, 3.2]
    # Patch in voxels, same axis order; [] keeps the planner's (the median image at that spacing).
    # A patch that covers every slice of the cohort makes inference one window per slice.
    patch_size: list[int] = []
    seed: int = 12345
    max_training_cases: int = 0  # 0: every eligible patient
    # Leave the cohort's validation patients out of segmentation training (when `cohort_split`
    # exists), so their Dice in `liver_masks` is measured on unseen patients.
    hold_out_validation_split: bool = True
    force_retrain: bool = False  # same version folder present: reuse it unless this is set
    # the network's forward pass in bfloat16 on a CPU; unset: where the CPU has bfloat16 instructions
    # (AVX512-BF16 or AMX): 245 s instead of 433 s of training at equal Dice (SegmentationTrainingConfig)
    cpu_bf16: bool | None = None

    def training_config(self, device: str, threads: int | None) -> SegmentationTrainingConfig:
        return SegmentationTrainingConfig(
            configuration=self.configuration,
            epochs=self.epochs,
            iterations_per_epoch=self.iterations_per_epoch,
            val_iterations_per_epoch=self.val_iterations_per_epoch,
            batch_size=self.batch_size,
            initial_lr=self.initial_lr,
            spacing=tuple(self.spacing) or None,
            patch_size=tuple(self.patch_size) or None,
            seed=self.seed,
            device=device,
            num_threads=threads,
            cpu_bf16=self.cpu_bf16,
        )


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
    try:
        if config.model_folder:
            return _user_model_result(steps.register_user_model(lake.store, config.model_folder, context.run.run_id))
        device = compute.torch_device()
        compute.configure_threads()
        trained = steps.train_model(
            lake.store,
            lake.lake,
            config.training_config(device, compute.cpu_threads if device == "cpu" else None),
            hold_out_validation_split=config.hold_out_validation_split,
            max_training_cases=config.max_training_cases,
            force_retrain=config.force_retrain,
            run_id=context.run.run_id,
            log=context.log.info,
        )
    except steps.SegmentationModelError as error:
        raise dg.Failure(
            description=f"liver_segmentation_model: {error}", allow_retries=False if error.final else None
        ) from None
    return _trained_model_result(trained, device)


def _user_model_result(model: steps.UserModel) -> dg.MaterializeResult:
    info = model.info
    return dg.MaterializeResult(
        data_version=dg.DataVersion(model.model_version),
        metadata={
            "mode": "a: user-supplied model folder",
            "model_version": model.model_version,
            "path": dg.MetadataValue.path(str(info.path)),
            "configuration": info.configuration,
            "trainer": info.trainer_name,
            "folds": dg.MetadataValue.json(list(info.folds)),
            "labels": dg.MetadataValue.json(info.labels),
            "checkpoint_sha256": info.checkpoint_sha256,
        },
    )


def _trained_model_result(trained: steps.TrainedModel, device: str) -> dg.MaterializeResult:
    settings, summary = trained.settings, trained.summary
    return dg.MaterializeResult(
        data_version=dg.DataVersion(trained.model_version),
        metadata={
            "mode": "b: trained in platform" + (" (existing folder of this version reused)" if trained.reused else ""),
            "model_version": trained.model_version,
            "path": dg.MetadataValue.path(trained.path),
            "configuration": settings.configuration,
            "device": device,
            "training_cases": trained.training_cases,
            "held_out_patients": trained.held_out_patients,
            "epochs": settings.epochs,
            "iterations_per_epoch": settings.iterations_per_epoch,
            "spacing_mm": dg.MetadataValue.json(list(settings.spacing) if settings.spacing else "planner's"),
            "seconds": round(trained.seconds, 1),
            "training_seconds": summary["training_seconds"],
            "per_epoch": markdown_table(
                trained.per_epoch, ["epoch", "train_loss", "val_loss", "pseudo_dice", "seconds"]
            ),
            "train_loss": dg.MetadataValue.json(summary["train_loss"]),
            "val_loss": dg.MetadataValue.json(summary["val_loss"]),
            "note": dg.MetadataValue.md(CPU_NOTE),
        },
    )


# -- liver_mask ------------------------------------------------------------------------------


class LiverMaskConfig(dg.Config):
    # Plausible adult liver volume (see segmentation.MaskQualityConfig for the reasoning).
    liver_volume_ml_min: float = 500.0
    liver_volume_ml_max: float = 4000.0
    min_largest_component_fraction: float = 0.9
    min_dice_liver: float = 0.9
    # a liver cut by the field of view: its largest share on a face of the volume (warning only)
    max_liver_at_edge_fraction: float = 0.05

    def thresholds(self) -> steps.MaskThresholds:
        return steps.MaskThresholds(
            liver_volume_ml_min=self.liver_volume_ml_min,
            liver_volume_ml_max=self.liver_volume_ml_max,
            min_largest_component_fraction=self.min_largest_component_fraction,
            min_dice_liver=self.min_dice_liver,
            max_liver_at_edge_fraction=self.max_liver_at_edge_fraction,
        )


def current_model(store: FeatureStore) -> dict:
    row = steps.current_model(store)
    if row is None:
        raise dg.Failure(
            description="no liver segmentation model is registered; materialize liver_segmentation_model first",
            allow_retries=False,
        )
    return row


def check_result(outcome: steps.CheckOutcome) -> dg.AssetCheckResult:
    severity = dg.AssetCheckSeverity.WARN if outcome.warn else dg.AssetCheckSeverity.ERROR
    return dg.AssetCheckResult(
        check_name=outcome.name, passed=outcome.passed, metadata=outcome.metadata, severity=severity
    )


LIVER_MASK_CHECKS = [
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
    # Warning only: a scan that ends mid-liver still shows the liver it covers; its shape features
    # describe that part, which the reader should know.
    dg.AssetCheckSpec(
        "liver_within_field_of_view",
        asset="liver_mask",
        description="at most 5% of the liver's largest cross-section lies on a face of the scanned volume "
        "(a liver cut off by the field of view, warning)",
    ),
    dg.AssetCheckSpec(
        "dice_vs_reference",
        asset="liver_mask",
        description="liver Dice >= 0.9 against the reference mask, where one exists (warning)",
    ),
]


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
    check_specs=LIVER_MASK_CHECKS,
)
def liver_mask(
    context: dg.AssetExecutionContext,
    config: deployed(LiverMaskConfig, "liver_mask"),
    lake: LakeResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    patient_id, data_lake, thresholds = context.partition_key, lake.lake, config.thresholds()
    started = time.perf_counter()
    with patient_failure(
        patient_id, "liver_mask", cleanup=lambda: steps.forget_mask(lake.store, data_lake, patient_id)
    ):
        model = current_model(lake.store)
        compute.configure_threads()
        made = steps.segment_liver(data_lake, patient_id, model, compute.torch_device(), thresholds)
    seconds = time.perf_counter() - started
    problem = steps.record_liver_mask(lake.store, made, thresholds, context.run.run_id)
    if problem:  # radiomics of this mask must not exist, nor older ones that no longer match it
        context.log.warning(f"patient {patient_id}: liver mask implausible ({problem}); radiomics excluded")
    figure_path = data_lake.patient_figure(patient_id, "liver_mask", MASK_FIGURE)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(made.data_version),
        metadata={
            **made.metadata(),
            "path": dg.MetadataValue.path(made.path),
            "seconds": round(seconds, 2),
            **figure_metadata(
                data_lake, MASK_FIGURE, figure_path, made.overlay_png(), "mid-liver slice, liver red, spleen blue"
            ),
        },
        check_results=[check_result(c) for c in steps.mask_checks(made.quality, made.has_reference, thresholds)],
    )


# -- radiomic_features -----------------------------------------------------------------------


RADIOMIC_FEATURES_CHECKS = [
    dg.AssetCheckSpec(
        "features_finite", asset="radiomic_features", description="every feature value is finite (no NaN/inf)"
    )
]


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
    check_specs=RADIOMIC_FEATURES_CHECKS,
)
def radiomic_features(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
    patient_id, run_id = context.partition_key, context.run.run_id
    feature_set = radiomics.feature_set_version()
    started = time.perf_counter()
    with patient_failure(
        patient_id, "radiomic_features", cleanup=lambda: steps.forget_features(lake.store, patient_id)
    ):
        try:
            features = steps.extract_radiomics(lake.store, lake.lake, patient_id, run_id)
        except radiomics.RadiomicsError as error:  # its exclusion is recorded
            raise dg.Failure(
                description=f"patient {patient_id}: radiomic_features failed: {error.reason}; excluded from the "
                "radiomic model (row in `exclusions`, stage radiomics)",
                metadata={"patient_id": patient_id, "reason": error.reason, "stage": RADIOMICS_STAGE},
                allow_retries=False,
            ) from None
    seconds = time.perf_counter() - started
    result = steps.record_radiomics(lake.store, patient_id, features, feature_set, run_id)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(result.data_version),
        metadata={**result.metadata(), "seconds": round(seconds, 2)},
        check_results=[check_result(c) for c in result.checks()],
    )
