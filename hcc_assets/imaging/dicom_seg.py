"""A reference liver (and spleen) mask from a DICOM Segmentation object drawn on the T2 series.

Hospitals annotate in viewers that save DICOM SEG (3D Slicer, OHIF, ...), not NIfTI. A SEG beside
the study's images that references the chosen T2 series and has a liver segment becomes the
patient's reference mask, on exactly the T2 volume's grid: highdicom reads the SEG and gives its
pixels per source image (`get_pixels_by_source_instance` / `get_pixels_by_source_frame`), which are
placed slice by slice in the volume's order (`nifti.series_to_volume`'s sources); a SEG whose frames
do not name their source images is placed by its own geometry (`get_volume`). Nothing of the
SEG but its pixels and segment codes is kept; messages name segments by number only (their labels
are free text).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from pydicom.sr.codedict import codes

from hcc_assets.core.errors import PatientInputError
from hcc_assets.imaging.dicom_series import (
    LABEL_LIVER,
    LABEL_SPLEEN,
    REFERENCE_ORGANS,
    AnnotationFile,
    SeriesInfo,
    liver_annotation,
)
from hcc_assets.imaging.geometry import LPS_TO_RAS, onto_grid

# SNOMED CT codes of the segmented property type; the segment label (REFERENCE_ORGANS) as a fallback
_CODES = {LABEL_LIVER: codes.SCT.Liver.value, LABEL_SPLEEN: codes.SCT.Spleen.value}


def reference_mask_from_seg(
    annotations: tuple[AnnotationFile, ...],
    series: SeriesInfo,
    image: nib.Nifti1Image,
    sources: list[tuple[str, int]],
) -> np.ndarray | None:
    """The label volume (uint8, liver 1, spleen 2, on the grid of `image`, the series' volume) of
    the one SEG that references `series` and has a liver segment; None when there is none.
    `sources`: per slice of the volume, (SOPInstanceUID, frame number) of its image.

    PatientInputError when several SEGs label the series' liver, or a SEG's organs overlap, or its
    frames cannot be placed on the series' images."""
    import highdicom

    found = liver_annotation(
        annotations, "seg", series, highdicom.seg.segread, _organ_segments, ("DICOM SEG", "DICOM SEG objects label")
    )
    if found is None:
        return None
    seg, organs = found
    label_of = sorted(organs)  # labels in segment order below
    numbers = [organs[label] for label in label_of]
    try:
        pixels = _pixels_by_source(seg, sources, numbers)
    except Exception:  # a SEG without per-frame source references: place it by position
        try:
            pixels = _pixels_by_position(seg, numbers, image)
        except Exception as error:  # highdicom's reasons vary (geometry, frames): name it, per patient
            raise PatientInputError(
                f"the DICOM SEG of {series.label} cannot be placed on its images ({type(error).__name__}: "
                f"{str(error)[:120]})"
            ) from None
    present = pixels > (0.5 if pixels.dtype.kind == "f" else 0)
    if (present.sum(axis=-1) > 1).any():
        raise PatientInputError(
            f"the DICOM SEG of {series.label} has overlapping segments {', '.join(map(str, numbers))} (liver, spleen)"
        )
    labels = np.zeros(present.shape[:3], dtype=np.uint8)
    for channel, label in enumerate(label_of):
        labels[present[..., channel]] = label
    return labels


def _organ_segments(seg) -> dict[int, int]:
    """label -> segment number, by the segment's property type code, else its label."""
    found: dict[int, int] = {}
    for description in seg.SegmentSequence:
        codes_of = {str(item.CodeValue) for item in description.get("SegmentedPropertyTypeCodeSequence", [])}
        text = str(description.get("SegmentLabel", "")).strip().lower()
        for label, name in REFERENCE_ORGANS.items():
            if label not in found and (_CODES[label] in codes_of or text == name):
                found[label] = int(description.SegmentNumber)
    return found


def _pixels_by_source(seg, sources: list[tuple[str, int]], numbers: list[int]) -> np.ndarray:
    """The SEG's pixels of `numbers` on the volume's grid, (columns, rows, slices, segments), from
    each frame's reference to its source image (DerivationImageSequence); slices the SEG leaves out
    (it omits empty frames) are zero."""
    instances = [uid for uid, _ in sources]
    common = {"segment_numbers": numbers, "combine_segments": False, "assert_missing_frames_are_empty": True}
    if len(set(instances)) == len(instances):  # classic images: one slice per instance
        pixels = seg.get_pixels_by_source_instance(instances, **common)
    elif len(set(instances)) == 1:  # one multi-frame (Enhanced MR) image
        pixels = seg.get_pixels_by_source_frame(instances[0], [frame for _, frame in sources], **common)
    else:
        raise ValueError("the slices come from several multi-frame images")
    return pixels.transpose(2, 1, 0, 3)  # (slices, rows, columns) -> the volume's axes


def _pixels_by_position(seg, numbers: list[int], image: nib.Nifti1Image) -> np.ndarray:
    """The same from the SEG's own geometry (highdicom's `get_volume`: its frames' plane positions),
    for SEGs whose frames do not reference their source images. Its voxels must be the T2 volume's
    voxels, in any axis order or direction: nothing is resampled (geometry.onto_grid)."""
    volume = seg.get_volume(segment_numbers=numbers, combine_segments=False)
    array = volume.array.reshape(*volume.array.shape[:3], len(numbers))  # (slice, row, column, segment)
    return onto_grid(array, LPS_TO_RAS @ volume.affine, image.shape[:3], image.affine)
