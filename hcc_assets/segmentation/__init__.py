"""Liver (and spleen) segmentation with nnU-Net v2: dataset, reduced CPU plans, training,
model-folder checks, inference, and mask quality.

Typical use:

    raw = build_raw_dataset(cases, raw_dir, config.dataset_id, config.dataset_name)
    plan_and_preprocess(config, raw_dir, preprocessed_dir)
    model_folder = train(config, preprocessed_dir, results_dir)      # or a user's trained folder
    segmenter = LiverSegmenter(model_folder, device="cpu")
    mask = keep_largest_components(segmenter.predict(nib.load("nifti_volume.nii.gz")))
    mask_quality(mask, reference), overlay_png(image, mask)

torch and nnunetv2 load only when training or building a predictor, so importing this package
stays cheap for code that just checks masks.

Rule: folders, NIfTI and arrays in, model folders and masks out; never imports dagster, the feature
store or the lake.
"""

from .config import LABELS, MaskQualityConfig, SegmentationTrainingConfig
from .dataset import SegmentationDataError, build_raw_dataset
from .inference import LiverSegmenter, keep_largest_components
from .model_folder import ModelFolderError, ModelInfo, validate_model_folder
from .nnunet_env import nnunet_environment
from .planning import add_cpu_configuration, plan_and_preprocess
from .quality import dice, mask_quality, overlay_png
from .training import TRAINING_SUMMARY, train

__all__ = [
    "LABELS",
    "TRAINING_SUMMARY",
    "LiverSegmenter",
    "MaskQualityConfig",
    "ModelFolderError",
    "ModelInfo",
    "SegmentationDataError",
    "SegmentationTrainingConfig",
    "add_cpu_configuration",
    "build_raw_dataset",
    "dice",
    "keep_largest_components",
    "mask_quality",
    "nnunet_environment",
    "overlay_png",
    "plan_and_preprocess",
    "train",
    "validate_model_folder",
]
