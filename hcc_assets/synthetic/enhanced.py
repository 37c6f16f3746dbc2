"""Writing a synthetic series as one Enhanced MR file (`synth --enhanced`).

Scanners of the last twenty years can send a series as one multi-frame Enhanced MR Image Storage
object instead of one MR Image Storage file per slice: the per-slice tags move into functional
groups, shared by every frame (SharedFunctionalGroupsSequence) or per frame
(PerFrameFunctionalGroupsSequence). Here the classic files the cohort writer made are converted, so
both forms carry the same pixels, geometry and rescale.

Written with pydicom: highdicom's converter (`LegacyConvertedEnhancedMRImage`) makes the Legacy
Converted SOP class, not the Enhanced MR one a scanner sends (the tests use highdicom as the
independent reader of these files).
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, EnhancedMRImageStorage, ExplicitVRLittleEndian

# Functional group -> (classic keyword, keyword inside the group's item). A group whose items are
# equal in every frame is shared, else it is per frame.
_GROUPS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("PlanePositionSequence", (("ImagePositionPatient", "ImagePositionPatient"),)),
    ("PlaneOrientationSequence", (("ImageOrientationPatient", "ImageOrientationPatient"),)),
    (
        "PixelMeasuresSequence",
        (
            ("PixelSpacing", "PixelSpacing"),
            ("SliceThickness", "SliceThickness"),
            ("SpacingBetweenSlices", "SpacingBetweenSlices"),
        ),
    ),
    (
        "PixelValueTransformationSequence",
        (("RescaleIntercept", "RescaleIntercept"), ("RescaleSlope", "RescaleSlope"), ("RescaleType", "RescaleType")),
    ),
    ("FrameVOILUTSequence", (("WindowCenter", "WindowCenter"), ("WindowWidth", "WindowWidth"))),
    ("MREchoSequence", (("EchoTime", "EffectiveEchoTime"),)),
    (
        "MRTimingAndRelatedParametersSequence",
        (("RepetitionTime", "RepetitionTime"), ("FlipAngle", "FlipAngle"), ("EchoTrainLength", "EchoTrainLength")),
    ),
    ("MRDiffusionSequence", (("DiffusionBValue", "DiffusionBValue"),)),
)
# Classic per-slice or per-instance tags that Enhanced MR keeps elsewhere or not at all.
_DROPPED = {
    "SOPInstanceUID",
    "InstanceNumber",
    "SliceLocation",
    "PixelData",
    "ScanningSequence",
    "SequenceVariant",
    "SequenceName",
    *(classic for _, pairs in _GROUPS for classic, _ in pairs),
}
_ECHO_PULSE = {"SE": "SPIN", "GR": "GRADIENT", "EP": "SPIN"}  # synthetic EPI is spin-echo EPI
_CONTRAST = {"SE": "T2", "GR": "T1"}


def enhanced_mr_file(classic: list[bytes], sop_instance_uid: UID, dimension_uid: UID) -> bytes:
    """One Enhanced MR Part-10 file (Explicit VR Little Endian) holding the frames of the classic
    files `classic` (one series, one stack), frame i = file i."""
    slices = [dcmread(BytesIO(data)) for data in classic]
    first = slices[0]
    enhanced = Dataset()
    for element in first:
        if element.keyword not in _DROPPED:
            enhanced.add(element)
    scanning = str(first.get("ScanningSequence", "")).split("\\")[0]
    image_type = list(first.ImageType)
    enhanced.ImageType = [*image_type[:2], image_type[2] if len(image_type) > 2 else "OTHER", "NONE"]
    enhanced.SOPClassUID = EnhancedMRImageStorage
    enhanced.SOPInstanceUID = sop_instance_uid
    enhanced.InstanceNumber = 1
    enhanced.NumberOfFrames = len(slices)
    enhanced.PulseSequenceName = first.get("SequenceName", "")
    enhanced.EchoPulseSequence = _ECHO_PULSE.get(scanning, "SPIN")
    enhanced.EchoPlanarPulseSequence = "YES" if "EP" in str(first.get("ScanningSequence", "")) else "NO"
    enhanced.ContentQualification = "PRODUCT"
    enhanced.ResonantNucleus = "1H"
    dimension = Dataset()
    dimension.DimensionOrganizationUID = dimension_uid
    enhanced.DimensionOrganizationSequence = Sequence([dimension])
    enhanced.DimensionIndexSequence = Sequence(
        [_dimension(dimension_uid, 0x00209056, "Stack ID"), _dimension(dimension_uid, 0x00209057, "In-Stack Position")]
    )

    frame_type = Dataset()
    frame_type.FrameType = enhanced.ImageType
    frame_type.PixelPresentation = "MONOCHROME"
    frame_type.VolumetricProperties = "VOLUME"
    frame_type.VolumeBasedCalculationTechnique = "NONE"
    frame_type.ComplexImageComponent = "MAGNITUDE"
    frame_type.AcquisitionContrast = "DIFFUSION" if "DiffusionBValue" in first else _CONTRAST.get(scanning, "UNKNOWN")
    shared = Dataset()
    shared.MRImageFrameTypeSequence = Sequence([frame_type])
    per_frame = [Dataset() for _ in slices]
    for group, pairs in _GROUPS:
        items = [_group_item(dataset, pairs) for dataset in slices]
        if not any(len(item) for item in items):
            continue
        if all(item == items[0] for item in items[1:]):
            setattr(shared, group, Sequence([items[0]]))
        else:
            for frame, item in zip(per_frame, items):
                if len(item):
                    setattr(frame, group, Sequence([item]))
    # in-stack positions follow the slices along the normal (DICOM: 1 at one end, N at the other)
    normal = np.cross(*np.reshape([float(v) for v in first.ImageOrientationPatient], (2, 3)))
    along = [float(np.dot([float(v) for v in dataset.ImagePositionPatient], normal)) for dataset in slices]
    rank = {index: position for position, index in enumerate(np.argsort(along, kind="stable"), start=1)}
    for index, frame in enumerate(per_frame):
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = rank[index]
        content.DimensionIndexValues = [1, rank[index]]
        frame.FrameContentSequence = Sequence([content])
    enhanced.SharedFunctionalGroupsSequence = Sequence([shared])
    enhanced.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    enhanced.add_new(0x7FE00010, "OW", b"".join(dataset.PixelData for dataset in slices))

    enhanced.file_meta = FileMetaDataset()
    enhanced.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    enhanced.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    enhanced.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = BytesIO()
    enhanced.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _dimension(organization: UID, pointer: int, label: str) -> Dataset:
    item = Dataset()
    item.DimensionOrganizationUID = organization
    item.DimensionIndexPointer = pointer
    item.FunctionalGroupPointer = 0x00209111  # FrameContentSequence
    item.DimensionDescriptionLabel = label
    return item


def _group_item(dataset: Dataset, pairs: tuple[tuple[str, str], ...]) -> Dataset:
    item = Dataset()
    for classic, inside in pairs:
        if classic in dataset:
            value = dataset[classic].value
            setattr(item, inside, float(value) if inside == "EffectiveEchoTime" else value)
    return item
