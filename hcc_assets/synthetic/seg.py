"""A reference mask written as a DICOM SEG drawn on the T2 series (`synth --reference seg`), the
way an annotation tool (3D Slicer, OHIF) saves one: highdicom's Segmentation, one segment per
organ, its frames referencing the T2 images they were drawn on.

The label volume is on the T2 volume's grid (geometry.py convention); each segment's frames are
placed back on the source images through `nifti.series_to_volume`'s slice sources, so a SEG read
by imaging/dicom_seg.py gives the labels it was made from. Dates and times are the study's, so the
same seed writes the same bytes.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from hcc_assets.imaging.dicom_series import inventory_study
from hcc_assets.imaging.nifti import series_to_volume

# (label value in the label volume, SegmentLabel, SNOMED CT segmented property type)
LIVER = (1, "Liver", codes.SCT.Liver)
SPLEEN = (2, "Spleen", codes.SCT.Spleen)
ORGANS = (LIVER, SPLEEN)
# type 2 attributes highdicom copies from the source images; a source may leave them out
_COPIED = ("PatientSex", "PatientBirthDate", "StudyTime", "StudyID", "ReferringPhysicianName", "AccessionNumber")


def seg_bytes(
    t2_folder: Path,
    labels: np.ndarray,
    *,
    series_uid: str,
    sop_uid: str,
    segments=ORGANS,
    masks: dict[int, np.ndarray] | None = None,
    fractional: bool = False,
    series_number: int = 99,
) -> bytes:
    """A DICOM SEG (Part 10 bytes) drawn on the one series in `t2_folder` (classic files, or one
    Enhanced MR file): the segment showing label n covers the voxels where `labels` == n, or
    `masks[n]` where given (on the series' volume grid); BINARY, or FRACTIONAL."""
    import highdicom

    (series,) = inventory_study(t2_folder).series
    _, slice_sources = series_to_volume(series)
    sources = [dcmread(path) for path in series.files]
    for dataset in sources:
        for keyword in _COPIED:
            dataset.setdefault(keyword, "")
    # the source frames in highdicom's order (source images, then their frames) -> the volume's slice
    slice_of = {source: k for k, source in enumerate(slice_sources)}
    frames = [
        (str(dataset.SOPInstanceUID), frame)
        for dataset in sources
        for frame in range(1, int(dataset.get("NumberOfFrames", 1) or 1) + 1)
    ]
    drawn = [(masks or {}).get(value, labels == value) for value, _, _ in segments]
    pixel_array = np.stack(
        [np.stack([mask[:, :, slice_of[frame]].T for frame in frames]) for mask in drawn], axis=-1
    ).astype(np.uint8)  # (frames, rows, columns, segments)
    first = sources[0]
    seg = highdicom.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array.astype(np.float32) if fractional else pixel_array,
        segmentation_type="FRACTIONAL" if fractional else "BINARY",
        segment_descriptions=[
            highdicom.seg.SegmentDescription(
                segment_number=position,  # a SEG numbers its segments from 1, whatever they show
                segment_label=label,
                segmented_property_category=codes.SCT.Organ
                if code in (LIVER[2], SPLEEN[2])
                else codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=code,
                algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.MANUAL,
            )
            for position, (_, label, code) in enumerate(segments, start=1)
        ],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="hcc-assets synthetic",
        manufacturer_model_name="synth",
        software_versions="1",
        device_serial_number="0",
        series_description="liver and spleen reference",
        content_date=str(first.get("StudyDate", "") or "20000101"),
        content_time="000000",
    )
    # highdicom stamps the time of writing and a random dimension organization UID: the study's
    # date and a UID derived from the SEG's own, so the same seed writes the same bytes
    seg.InstanceCreationDate, seg.InstanceCreationTime = seg.ContentDate, seg.ContentTime
    for keyword in ("SeriesDate", "SeriesTime"):
        if keyword in seg:
            setattr(seg, keyword, seg.ContentDate if keyword == "SeriesDate" else seg.ContentTime)
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = f"{seg.ContentDate}{seg.ContentTime}"
    organization = generate_uid(entropy_srcs=[sop_uid, "dimension organization"])
    for item in (*seg.get("DimensionOrganizationSequence", []), *seg.get("DimensionIndexSequence", [])):
        item.DimensionOrganizationUID = organization
    out = BytesIO()
    seg.save_as(out)
    return out.getvalue()
