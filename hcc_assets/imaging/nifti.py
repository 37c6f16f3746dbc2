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
    frame_views,
    incompleteness,
    is_frame_of,
    is_image_object,
    is_multiframe,
    multiframe_problem,
    read_dicom_bytes,
    series_key_of,
    stack_slices,
    tag_text,
)
from hcc_assets.imaging.geometry import affine_ras


def series_to_nifti(series: SeriesInfo, *, max_gap_ratio: float = 1.5) -> nib.Nifti1Image:
    """float32 volume with RescaleSlope/Intercept applied and a RAS affine (qform = sform, code 1).

    Raises PatientInputError when the files changed since the inventory, a file is cut short, or the
    slices do not form one regular stack (gap > `max_gap_ratio` x the median spacing, duplicates,
    inconsistent orientation/size/spacing, missing position).
    """
    return series_to_volume(series, max_gap_ratio=max_gap_ratio)[0]


def series_to_volume(
    series: SeriesInfo, *, max_gap_ratio: float = 1.5
) -> tuple[nib.Nifti1Image, list[tuple[str, int]]]:
    """`series_to_nifti`'s volume and, for each of its slices k, where it came from: (SOPInstanceUID,
    frame number from 1); what a DICOM SEG drawn on the series refers to (imaging/dicom_seg.py)."""
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
        if series_key_of(str(dataset.SeriesInstanceUID)) not in series.uid_keys:
            raise PatientInputError(f"{where} now belongs to another series; re-run the inventory")
        datasets.append(dataset)
    if hashlib.sha256("".join(sorted(digests)).encode()).hexdigest() != series.checksum:
        raise PatientInputError(f"the files of {label} changed since the inventory; re-run it")

    # one entry per frame: (file index, frame index, its classic-looking header); a classic file is one frame
    # a series split by echo or image type (see dicom_series._series_infos) takes its own frames only
    echo, kind = series.echo_of_files_ms, series.image_type_of_frames
    frames: list[tuple[int, int, Dataset]] = []
    for index, dataset in enumerate(datasets):
        views = frame_views(dataset)
        if is_multiframe(dataset) and (problem := multiframe_problem(dataset, views, echo, kind)):
            raise PatientInputError(f"{label}: file {index + 1} of {count} (multi-frame) {problem}")
        frames.extend((index, frame, view) for frame, view in enumerate(views) if is_frame_of(view, echo, kind))
    n = len(frames)
    if n < 2:
        raise PatientInputError(f"{label} has {n} slice{'s' if n != 1 else ''}; a volume needs at least 2")
    multiframe = any(is_multiframe(d) for d in datasets)
    stack = stack_slices(
        label, [SliceGeometry.of(view) for _, _, view in frames], max_gap_ratio, "frame" if multiframe else "file"
    )
    rows, columns = datasets[0].Rows, datasets[0].Columns
    pending: list[Dataset | None] = list(datasets)  # each file is released once its frames are in the volume
    del datasets
    frames_left = [0] * count
    for index, _, _ in frames:
        frames_left[index] += 1
    decoded: dict[int, np.ndarray] = {}  # the pixels of the files being placed, (frames, rows, columns)
    volume = np.empty((columns, rows, n), dtype=np.float32)
    sources: list[tuple[str, int]] = []
    for k, slot in enumerate(stack.order):
        index, frame, view = frames[slot]
        sources.append((str(view.get("SOPInstanceUID", "")), frame + 1))
        where = f"file {index + 1} of {count} in {label}"
        if index not in decoded:
            dataset = pending[index]
            assert dataset is not None  # released only after its last frame
            decoded[index] = _pixels(dataset, where)
        pixels = decoded[index][frame]
        # rescale may differ per slice (Philips) or per frame: apply it slice by slice
        slope = float(view.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(view.get("RescaleIntercept", 0.0) or 0.0)
        if not (np.isfinite(slope) and np.isfinite(intercept)):
            raise PatientInputError(
                f"{where} has a non-finite RescaleSlope/Intercept "
                f"({slope}, {intercept}): its intensities would be NaN/Inf"
            )
        slab = volume[:, :, k]
        slab[...] = pixels.T
        if (mirrored := grey_scale_mirror(view)) is not None:  # MONOCHROME1: bright signal stored low
            np.subtract(np.float32(mirrored), slab, out=slab)
        if slope != 1.0 or intercept != 0.0:
            slab *= np.float32(slope)
            slab += np.float32(intercept)
        frames_left[index] -= 1
        if not frames_left[index]:  # release the pixel data as we go
            pending[index] = None
            del decoded[index]

    require_finite(volume, label)
    affine = affine_ras(stack.orientation, stack.first_position, stack.pixel_spacing, stack.slice_spacing)
    return make_nifti(volume, affine), sources


def grey_scale_mirror(view: Dataset) -> int | None:
    """For a slice whose stored values run from white to black (MONOCHROME1, or a Presentation LUT
    Shape INVERSE), the sum of the lowest and highest storable value: `sum - stored` puts them in
    MONOCHROME2 order, bright signal high, before the rescale, so the rest of the pipeline (z-scores,
    radiomics, the networks) sees the signal the way every other scan carries it. None for the usual
    MONOCHROME2 (or a Presentation LUT Shape IDENTITY).

    highdicom converts MONOCHROME1 frames the same way (mirrored within the stored range, then
    rescaled) and the tests compare with it; pydicom's apply_presentation_lut leaves MONOCHROME1 alone.
    """
    shape = tag_text(view, "PresentationLUTShape").upper()
    inverted = shape == "INVERSE" if shape else tag_text(view, "PhotometricInterpretation").upper() == "MONOCHROME1"
    if not inverted:
        return None
    bits = int(view.get("BitsStored", view.get("BitsAllocated", 16)) or 16)
    if int(view.get("PixelRepresentation", 0) or 0):  # signed: -2^(bits-1) .. 2^(bits-1) - 1
        return -1
    return (1 << bits) - 1


def _pixels(dataset: Dataset, where: str) -> np.ndarray:
    """The stored pixels of a file as (frames, rows, columns)."""
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # no decoder for this transfer syntax, corrupt fragments
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        raise PatientInputError(
            f"cannot decode the pixels of {where} (transfer syntax {getattr(syntax, 'name', syntax)}: "
            f"{type(error).__name__})"
        ) from None
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if pixels.ndim == 2 and frames == 1:
        return pixels[np.newaxis]
    if pixels.ndim != 3 or pixels.shape[0] != frames:
        shape = "a single grey-scale frame" if frames == 1 else f"{frames} grey-scale frames"
        raise PatientInputError(f"{where} is not {shape}")
    return pixels


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
