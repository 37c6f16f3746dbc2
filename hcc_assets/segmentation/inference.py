"""Liver segmentation with one nnU-Net predictor, on in-memory NIfTI images."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import io_orientation

from .config import LABEL_LIVER, LABEL_SPLEEN, cpu_has_native_bf16
from .model_folder import ModelInfo, validate_model_folder
from .nnunet_env import nnunet_environment
from .training import trained_in_cpu_bf16

_AFFINE_TOLERANCE_MM = 1e-4


class LiverSegmenter:
    """Build once per process from a model folder, then `predict` volume after volume.

    On CPU the predictor runs without test-time mirroring (it would multiply the work by up to 8
    for a few hundredths of Dice) and keeps everything in host memory. Small windows go through
    the network several at a time (batched_windows).
    """

    def __init__(
        self,
        model_folder: Path | str,
        device: str = "cpu",
        num_threads: int | None = None,
        tile_step_size: float = 0.5,
        use_mirroring: bool | None = None,
    ):
        import torch

        from .batched_windows import BatchedWindowPredictor

        self.info: ModelInfo = validate_model_folder(model_folder)
        self.device = torch.device(device)
        if num_threads:
            torch.set_num_threads(num_threads)  # process-wide, like torch itself
        on_cpu = self.device.type == "cpu"
        self._predictor = BatchedWindowPredictor(
            tile_step_size=tile_step_size,
            use_gaussian=True,
            use_mirroring=(not on_cpu) if use_mirroring is None else use_mirroring,
            perform_everything_on_device=not on_cpu,
            device=self.device,
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        with nnunet_environment():  # makes HccCpuTrainer findable by name
            self._predictor.initialize_from_trained_model_folder(
                str(self.info.path), use_folds=self.info.folds, checkpoint_name=self.info.checkpoint_name
            )
        # A model trained with bfloat16 forward passes on a CPU (our training summary says so)
        # predicts the same way where this CPU has bfloat16 instructions: 2d_cpu masks of the demo
        # in about half the time; other models, and other CPUs, stay in float32.
        self._predictor.cpu_bf16 = on_cpu and trained_in_cpu_bf16(self.info.path) and cpu_has_native_bf16()
        # The model's label values -> ours (liver 1, spleen 2, anything else background).
        self._to_our_labels = np.zeros(max(self.info.labels.values()) + 1, np.uint8)
        for name, value in self.info.labels.items():
            self._to_our_labels[value] = {"liver": LABEL_LIVER, "spleen": LABEL_SPLEEN}.get(name.lower(), 0)

    @property
    def cpu_bf16(self) -> bool:
        """Whether the forward passes run in bfloat16 (see __init__)."""
        return self._predictor.cpu_bf16

    def predict(self, image: nib.Nifti1Image) -> nib.Nifti1Image:
        """uint8 mask (0 background, 1 liver, 2 spleen) on exactly `image`'s grid, whatever its
        stored orientation; a native-resolution volume like those the model was trained on."""
        if len(image.shape) == 4 and image.shape[3] == 1:
            image = image.slicer[..., 0]
        if len(image.shape) != 3:
            raise ValueError(f"expected a 3-D volume, got shape {image.shape}")
        # Same voxel order as the reader the model was trained with (see dataset.py).
        ornt = io_orientation(image.affine) if self.info.reorient_to_ras else np.array([[0, 1], [1, 1], [2, 1]])
        model_view = image.as_reoriented(ornt)
        # c, z, y, x, in one memory layout whatever the stored order: nnU-Net's normalisation sums
        # in memory order, and a transposed storage of a demo study changed 17 mask voxels otherwise
        data = np.ascontiguousarray(np.asarray(model_view.dataobj, dtype=np.float32).transpose(2, 1, 0)[None])
        spacing = [float(z) for z in model_view.header.get_zooms()[:3][::-1]]

        labels = self._predictor.predict_single_npy_array(data, {"spacing": spacing})
        labels = self._to_our_labels[np.asarray(labels).transpose(2, 1, 0)]
        # Back through nibabel's own transform, then check it lands on the input grid.
        restored = nib.Nifti1Image(labels, model_view.affine).as_reoriented(_inverse(ornt))
        if restored.shape != image.shape or not np.allclose(restored.affine, image.affine, atol=_AFFINE_TOLERANCE_MM):
            raise RuntimeError(
                f"predicted mask grid {restored.shape} {restored.affine.tolist()} does not "
                f"match the image's {image.shape} {image.affine.tolist()}"
            )
        mask = nib.Nifti1Image(np.ascontiguousarray(restored.dataobj, dtype=np.uint8), image.affine)
        mask.set_qform(image.affine, code=1)
        mask.set_sform(image.affine, code=1)
        return mask


def keep_largest_components(mask: nib.Nifti1Image) -> nib.Nifti1Image:
    """The mask with only the largest connected component of the liver and of the spleen (each one
    organ), on the same grid; the network's stray islands elsewhere in the abdomen become background.
    nnU-Net's own "remove all but the largest component" post-processing (which its cross-validation
    picks for such labels; a model trained on every case has none to pick it with), with its
    connectivity: voxels touching at a corner count as joined."""
    from nnunetv2.postprocessing.remove_connected_components import (
        remove_all_but_largest_component_from_segmentation,
    )

    labels = np.asarray(mask.dataobj)
    for organ in (LABEL_LIVER, LABEL_SPLEEN):
        if np.any(labels == organ):
            labels = remove_all_but_largest_component_from_segmentation(labels, organ)
    return nib.Nifti1Image(np.ascontiguousarray(labels, dtype=np.uint8), mask.affine, mask.header)


def _inverse(ornt: np.ndarray) -> np.ndarray:
    """Orientation transform that undoes `apply_orientation(..., ornt)`."""
    inverse = np.empty_like(ornt)
    inverse[ornt[:, 0].astype(int), 0] = np.arange(len(ornt))
    inverse[ornt[:, 0].astype(int), 1] = ornt[:, 1]
    return inverse
