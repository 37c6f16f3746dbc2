"""nnU-Net raw dataset from per-patient volumes and reference masks.

Which image the model learns from: the native-resolution T2 volume (`nifti_volume.nii.gz`), with
the reference mask that lives on exactly that grid. The 128x128x64 preprocessed volume would need
its mask resampled (blurring the liver border) and throws away the in-plane resolution nnU-Net
plans for; nnU-Net does its own resampling and intensity normalization anyway. So inference runs
on the native volume too, and the mask it returns is on the native grid.

Orientation: native volumes may be stored in any voxel order (RAS, LPS, oblique). dataset.json
asks nnU-Net to read with `NibabelIOWithReorient`, which permutes/flips every volume to the
closest RAS voxel order without resampling; `LiverSegmenter` does the same in memory and maps the
prediction back. The network therefore always sees the same anatomical axis order.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np

from .config import LABELS
from .nnunet_env import dataset_folder_name

FILE_ENDING = ".nii.gz"
READER_WRITER = "NibabelIOWithReorient"
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_AFFINE_TOLERANCE_MM = 1e-3


class SegmentationDataError(ValueError):
    """A training case cannot be used; the message names the case and the reason."""


def build_raw_dataset(
    cases: Iterable[tuple[str, Path | str, Path | str]], raw_dir: Path | str, dataset_id: int, name: str
) -> Path:
    """Write `<raw_dir>/DatasetXXX_<name>/` in nnU-Net's raw layout and return that folder.

    `cases` are (case_id, image_path, mask_path); the mask must be on the image's grid and hold
    only background 0, liver 1, spleen 2. An existing folder of the same name is replaced.
    """
    folder = Path(raw_dir) / dataset_folder_name(dataset_id, name)
    if folder.exists():
        shutil.rmtree(folder)
    images, labels = folder / "imagesTr", folder / "labelsTr"
    images.mkdir(parents=True)
    labels.mkdir()
    seen: set[str] = set()
    for case_id, image_path, mask_path in cases:
        if not _CASE_ID.match(case_id) or case_id in seen:
            raise SegmentationDataError(f"case id {case_id!r} is not a unique [A-Za-z0-9_-] name")
        seen.add(case_id)
        _write_case(case_id, Path(image_path), Path(mask_path), images, labels)
    if len(seen) < 2:
        raise SegmentationDataError(f"nnU-Net needs at least 2 training cases, got {len(seen)}")
    dataset_json = {
        "channel_names": {"0": "T2"},  # not "CT": nnU-Net z-scores each MR volume on its own
        "labels": LABELS,
        "numTraining": len(seen),
        "file_ending": FILE_ENDING,
        "overwrite_image_reader_writer": READER_WRITER,
        "name": name,
        "description": "T2-weighted liver MRI, native resolution; labels liver and spleen",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder


def _write_case(case_id: str, image_path: Path, mask_path: Path, images: Path, labels: Path) -> None:
    # nib.load is typed as returning the base FileBasedImage; these are NIfTI files.
    image = cast(nib.Nifti1Image, nib.load(image_path))
    mask = cast(nib.Nifti1Image, nib.load(mask_path))
    if image.ndim != 3 or image.shape != mask.shape:
        raise SegmentationDataError(
            f"case {case_id}: image shape {image.shape} and mask shape {mask.shape} differ (or are not 3-D)"
        )
    if not np.allclose(image.affine, mask.affine, atol=_AFFINE_TOLERANCE_MM):
        raise SegmentationDataError(f"case {case_id}: mask is not on the image's grid (affines differ)")
    values = np.asarray(mask.dataobj)
    unknown = np.setdiff1d(np.unique(values), list(LABELS.values()))
    if unknown.size:
        raise SegmentationDataError(f"case {case_id}: mask has labels {unknown.tolist()} besides 0, 1, 2")
    if not np.any(values == LABELS["liver"]):
        raise SegmentationDataError(f"case {case_id}: mask has no liver voxels")

    target = images / f"{case_id}_0000{FILE_ENDING}"
    if image_path.name.endswith(FILE_ENDING):
        shutil.copyfile(image_path, target)  # already what nnU-Net reads: no decode/encode
    else:
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32), image.affine), target)
    # The image's affine on the mask too: nnU-Net compares them exactly.
    nib.save(nib.Nifti1Image(values.astype(np.uint8, copy=False), image.affine), labels / f"{case_id}{FILE_ENDING}")
