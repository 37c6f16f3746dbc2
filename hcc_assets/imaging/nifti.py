"""One DICOM series -> a NIfTI volume on the geometry.py convention.

`volume[:, :, k] == pixel_array_of_slice_k.T`, slices sorted by ascending position along the
normal, affine = geometry.affine_ras(...). The header carries no PHI: it is built from scratch,
with an empty description.
"""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset

from hcc_assets.core.errors import PatientInputError
from hcc_assets.imaging.dicom_series import (
    SeriesInfo,
    SliceGeometry,
    incompleteness,
    is_image_object,
    read_dicom_bytes,
    series_key_of,
    stack_slices,
)
from hcc_assets.imaging.geometry import affine_ras


def series_to_nifti(series: SeriesInfo, *, max_gap_ratio: float = 1.5) -> nib.Nifti1Image:
    """float32 volume with RescaleSlope/Intercept applied and a RAS affine (qform = sform, code 1).

    Raises PatientInputError when the files changed since the inventory, a file is cut short, or the
    slices do not form one regular stack (gap > `max_gap_ratio` x the median spacing, duplicates,
    inconsistent orientation/size/spacing, missing position).
    """
    label = series.label
    count = len(series.files)
    datasets: list[Dataset] = []
    digests = []
    for index, path in enumerate(series.files):
        where = f"file {index + 1} of {count} in {label}"
        try:
            data = path.read_bytes()
        except OSError as error:
            raise PatientInputError(f"cannot read {where} ({error.strerror or type(error).__name__})") from None
        digests.append(hashlib.sha256(data).hexdigest())
        dataset, _ = read_dicom_bytes(data)
        if dataset is None or not is_image_object(dataset):
            raise PatientInputError(f"{where} is no longer a readable DICOM image")
        if problem := incompleteness(dataset):
            raise PatientInputError(f"truncated DICOM file: {where}: {problem}")
        if series_key_of(str(dataset.SeriesInstanceUID)) != series.series_key:
            raise PatientInputError(f"{where} now belongs to another series; re-run the inventory")
        datasets.append(dataset)
    if hashlib.sha256("".join(sorted(digests)).encode()).hexdigest() != series.checksum:
        raise PatientInputError(f"the files of {label} changed since the inventory; re-run it")
    if count < 2:
        raise PatientInputError(f"{label} has {count} slice{'s' if count != 1 else ''}; a volume needs at least 2")

    stack = stack_slices(label, [SliceGeometry.of(d) for d in datasets], max_gap_ratio)
    rows, columns = datasets[0].Rows, datasets[0].Columns
    pending: list[Dataset | None] = list(datasets)  # each entry is released once in the volume
    del datasets
    volume = np.empty((columns, rows, count), dtype=np.float32)
    for k, index in enumerate(stack.order):
        dataset = pending[index]
        assert dataset is not None  # stack.order visits each index once
        try:
            pixels = dataset.pixel_array
        except Exception as error:  # no decoder for this transfer syntax, corrupt fragments
            syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
            raise PatientInputError(
                f"cannot decode the pixels of file {index + 1} of {count} in {label} "
                f"(transfer syntax {getattr(syntax, 'name', syntax)}: {type(error).__name__})"
            ) from None
        if pixels.ndim != 2:
            raise PatientInputError(f"file {index + 1} of {count} in {label} is not a single grey-scale frame")
        # rescale may differ per slice (Philips): apply it slice by slice
        slope = float(dataset.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(dataset.get("RescaleIntercept", 0.0) or 0.0)
        if not (np.isfinite(slope) and np.isfinite(intercept)):
            raise PatientInputError(
                f"file {index + 1} of {count} in {label} has a non-finite RescaleSlope/Intercept "
                f"({slope}, {intercept}): its intensities would be NaN/Inf"
            )
        slab = volume[:, :, k]
        slab[...] = pixels.T
        if slope != 1.0 or intercept != 0.0:
            slab *= np.float32(slope)
            slab += np.float32(intercept)
        pending[index] = None  # release the pixel data as we go

    require_finite(volume, label)
    affine = affine_ras(stack.orientation, stack.first_position, stack.pixel_spacing, stack.slice_spacing)
    return make_nifti(volume, affine)


def require_finite(volume: np.ndarray, what: str) -> None:
    """Refuse a volume with NaN/Inf voxels (float pixel data, overflowing rescale): every model
    downstream would silently propagate them."""
    finite = np.isfinite(volume)
    if not finite.all():
        bad = int(volume.size - np.count_nonzero(finite))
        raise PatientInputError(
            f"{what} has {bad} non-finite (NaN/Inf) voxel{'s' if bad != 1 else ''} of {volume.size}"
        )


def make_nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI image with a fresh, PHI-free header: qform = sform = affine (code 1, scanner)."""
    image = nib.Nifti1Image(data, affine)
    header = image.header
    header.set_data_dtype(data.dtype)
    header.set_xyzt_units("mm", "sec")
    header["descrip"] = b""
    header["aux_file"] = b""
    header["db_name"] = b""
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return image
