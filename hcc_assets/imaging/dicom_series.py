"""Inventory of a patient's DICOM study and the choice of its T2-weighted series.

Drop layout: `<patient>/<study>/<series>/*` (any depth works: a folder holding DICOM files is a
series folder); `<patient>/reference/` holds NIfTI reference masks and hidden files are markers.
Folder and file names, PatientName/ID, dates and institutions may be PHI: nothing here ever
puts them into a message or a record. Series are named `series #<number> "<description>"` and
files by their position in their folder.

Every file is read in full once: its bytes are hashed, and its PixelData length is checked
against Rows x Columns x BitsAllocated, because pydicom reads a cut-off file without complaint.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import io
import itertools
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, NamedTuple, TypeVar, overload

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from hcc_assets.core.errors import PatientInputError
from hcc_assets.imaging.geometry import slice_normal

REFERENCE_FOLDER = "reference"
ORIENTATION_TOLERANCE = 1e-4  # IOP direction cosines are written as decimal strings
SPACING_RELATIVE_TOLERANCE = 1e-4
DUPLICATE_POSITION_MM = 0.01
# SOP classes with no pixel data (DICOMDIR, SR, presentation states, raw data, key objects):
# skipped wherever they appear.
NON_IMAGE_SOP_CLASS_PREFIXES = (
    "1.2.840.10008.1.3.10",
    "1.2.840.10008.5.1.4.1.1.88.",
    "1.2.840.10008.5.1.4.1.1.11.",
    "1.2.840.10008.5.1.4.1.1.66",
)
# The image classes ingest reads (MR, Enhanced MR, Legacy Converted Enhanced MR): a file of one of these
# without pixel data is a truncated slice, never an object to skip.
MR_IMAGE_SOP_CLASSES = frozenset(
    {"1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4"}
)
# Transfer syntaxes that may discard information: JPEG baseline / extended, JPEG-LS near-lossless,
# JPEG 2000 (the non-"lossless only" one), HTJ2K (not the lossless-only ones), MPEG/HEVC video.
LOSSY_TRANSFER_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.93",
        "1.2.840.10008.1.2.4.203",
        *(f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)),
    }
)
# Private diffusion b-values: (group, private creator, element offset, VR). A private tag means
# something only within its creator's block, so the creator is looked up, not assumed.
PRIVATE_B_VALUES = (
    (0x0019, "SIEMENS MR HEADER", 0x0C, "IS"),
    (0x2001, "PHILIPS IMAGING DD 001", 0x03, "FL"),
    (0x0043, "GEMS_PARM_01", 0x39, "IS"),  # first value; some GE versions add 1e9
)


def series_label(number: int | None, description: str) -> str:
    return f'series #{number if number is not None else "?"} "{description}"'


def series_key_of(series_instance_uid: str) -> str:
    return hashlib.sha256(series_instance_uid.strip().encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series, described without PHI."""

    series_key: str  # sha256 of SeriesInstanceUID, first 16 hex: stable, not identifying
    series_number: int | None
    description: str
    modality: str
    echo_time_ms: float | None
    repetition_time_ms: float | None
    sequence_name: str
    scanning_sequence: str
    image_type: str
    diffusion_b_value: float | None
    contrast_agent: bool
    n_files: int
    n_slices: int  # frames: one per classic file, NumberOfFrames per multi-frame (enhanced) file
    transfer_syntax: str  # the files' TransferSyntaxUID ("\\"-joined when they differ)
    lossy: bool  # a lossy transfer syntax, or LossyImageCompression "01" in any file
    lossy_ratio: float | None  # LossyImageCompressionRatio (product of its steps), largest over the files
    rows: int
    columns: int
    pixel_spacing_mm: tuple[float, float]  # DICOM order: between rows, between columns
    slice_thickness_mm: float | None  # as written; not used for geometry
    spacing_between_slices_mm: float | None  # as written; not used for geometry
    slice_spacing_mm: float | None  # measured from the positions along the slice normal
    orientation: tuple[float, ...]  # ImageOrientationPatient
    geometry_problem: str | None  # why the slices do not form one regular stack, if they don't
    checksum: str  # sha256 over the sorted per-file sha256 digests
    files: tuple[Path, ...] = field(repr=False, compare=False)  # in name order; never serialized
    # A series whose slices (classic files or Enhanced MR frames) carry several echo times is split
    # into one series per echo (_series_infos): `series_key` then names the echo, `uid_key` (sha256 of
    # the SeriesInstanceUID; series_key itself when not split) the DICOM series, `echo_of_files_ms` the TE.
    uid_key: str = field(compare=False)
    echo_of_files_ms: float | None = field(default=None, compare=False)
    # A multi-frame series split by image type (_series_infos) takes the frames of this type only
    # (image_type_of); a classic one holds only that type's files and keeps None.
    image_type_of_frames: str | None = field(default=None, compare=False)
    # One acquisition written as several series (stations, breath-holds: _joined_acquisitions): the
    # series_key of each part, in position order; empty for every other series.
    part_keys: tuple[str, ...] = field(default=(), compare=False)

    @property
    def label(self) -> str:
        return series_label(self.series_number, self.description)

    @property
    def uid_keys(self) -> tuple[str, ...]:
        """series_key_of the SeriesInstanceUID of every DICOM series whose files this volume takes."""
        return self.part_keys or (self.uid_key,)

    def to_record(self) -> dict:
        return {
            "series_key": self.series_key,
            "series_number": self.series_number,
            "description": self.description,
            "modality": self.modality,
            "echo_time_ms": self.echo_time_ms,
            "repetition_time_ms": self.repetition_time_ms,
            "sequence_name": self.sequence_name,
            "scanning_sequence": self.scanning_sequence,
            "image_type": self.image_type,
            "diffusion_b_value": self.diffusion_b_value,
            "contrast_agent": self.contrast_agent,
            "n_files": self.n_files,
            "n_slices": self.n_slices,
            "transfer_syntax": self.transfer_syntax,
            "lossy": self.lossy,
            "lossy_ratio": self.lossy_ratio,
            "rows": self.rows,
            "columns": self.columns,
            "pixel_spacing_mm": list(self.pixel_spacing_mm),
            "slice_thickness_mm": self.slice_thickness_mm,
            "spacing_between_slices_mm": self.spacing_between_slices_mm,
            "slice_spacing_mm": self.slice_spacing_mm,
            "orientation": list(self.orientation),
            "geometry_problem": self.geometry_problem,
            "checksum": self.checksum,
            # only for a joined series, so the records (and data versions) of all others stay as they were
            **({"joined_from": list(self.part_keys)} if self.part_keys else {}),
        }


SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
_ANNOTATION_KINDS: dict[str, Literal["seg", "rtstruct"]] = {
    SEGMENTATION_STORAGE: "seg",
    RT_STRUCTURE_SET_STORAGE: "rtstruct",
}


@dataclass(frozen=True)
class AnnotationFile:
    """A DICOM SEG or RT Structure Set found beside the images: a reference mask drawn on the series
    it references (imaging/dicom_seg.py, imaging/dicom_rtstruct.py read them)."""

    path: Path = field(repr=False)  # never serialized
    kind: Literal["seg", "rtstruct"]
    referenced_series_keys: frozenset[str]  # series_key_of each series it says it was drawn on


# The reference masks' labels: segmentation.config's LABELS, which imaging, its sibling, may not
# import. An annotation's organs are told by these names (RT Structure Set ROI names, SEG labels).
LABEL_LIVER, LABEL_SPLEEN = 1, 2
REFERENCE_ORGANS = {LABEL_LIVER: "liver", LABEL_SPLEEN: "spleen"}

_A = TypeVar("_A")


def liver_annotation(
    annotations: tuple[AnnotationFile, ...],
    kind: Literal["seg", "rtstruct"],
    series: SeriesInfo,
    read: Callable[[Path], _A],
    organs_of: Callable[[_A], dict[int, int]],
    names: tuple[str, str],
) -> tuple[_A, dict[int, int]] | None:
    """The one annotation of `kind` drawn on `series` whose organs (label -> segment or ROI number,
    `organs_of`) include the liver (LABEL_LIVER), read with `read`; None when there is none.
    PatientInputError, naming no path, when one cannot be read or several have a liver. `names`:
    how messages call one such object and several ("DICOM SEG", "DICOM SEG objects label")."""
    # a joined series' annotation must reference every part: one drawn on a part covers only its stretch
    drawn_on_series = [a for a in annotations if a.kind == kind and a.referenced_series_keys >= set(series.uid_keys)]
    found = []
    for number, candidate in enumerate(drawn_on_series, start=1):
        try:
            annotation = read(candidate.path)
        except Exception as error:  # a damaged file: say so, without its path
            raise PatientInputError(
                f"{names[0]} {number} of {len(drawn_on_series)} on {series.label} cannot be read ({type(error).__name__})"
            ) from None
        if LABEL_LIVER in (organs := organs_of(annotation)):
            found.append((annotation, organs))
    if len(found) > 1:
        raise PatientInputError(f"{len(found)} {names[1]} the liver of {series.label}; keep one as the reference")
    return found[0] if found else None


@dataclass(frozen=True)
class StudyInventory:
    series: tuple[SeriesInfo, ...]  # sorted by series number, then key
    n_files: int
    # files left out: not DICOM in a folder without images (a README, an index page or a viewer
    # on exported media), and second copies of an instance already read (same SOPInstanceUID, same pixels)
    n_companion_files: int = 0
    n_duplicate_files: int = 0
    # DICOM SEG and RT Structure Set objects of the study (not image series: not in `series`, nor
    # in the record); the drop fingerprint covers their files, so a new or changed one re-runs raw_scan
    annotations: tuple[AnnotationFile, ...] = ()

    def to_record(self) -> dict:
        record = {"n_files": self.n_files, "n_series": len(self.series), "series": [s.to_record() for s in self.series]}
        # only when there are any, so the records (and data versions) of ordinary studies stay as they were
        if self.n_companion_files:
            record["n_companion_files"] = self.n_companion_files
        if self.n_duplicate_files:
            record["n_duplicate_files"] = self.n_duplicate_files
        return record


@dataclass(frozen=True)
class SeriesChoice:
    series: SeriesInfo
    t2_score: float
    reason: str
    candidates: list[dict]  # every series: key, number, description, TE, TR, accepted, score, why


# ---------------------------------------------------------------------------------------------
# Reading one file


def read_dicom_bytes(data: bytes) -> tuple[Dataset | None, bool]:
    """(parsed dataset or None, whether the bytes claim to be DICOM by their 'DICM' prefix)."""
    claims_dicom = data[128:132] == b"DICM"
    try:
        return pydicom.dcmread(io.BytesIO(data)), True
    except InvalidDicomError:
        pass  # no preamble: may still be raw DICOM, checked below
    except Exception:
        return None, claims_dicom
    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=True)
        # force=True "parses" any bytes: only trust it when the identifying UIDs came out
        if "SOPClassUID" in dataset and "SeriesInstanceUID" in dataset:
            if "TransferSyntaxUID" not in dataset.file_meta:  # the pixel decoder needs it
                implicit_vr, little_endian = dataset.original_encoding
                dataset.file_meta.TransferSyntaxUID = (
                    pydicom.uid.ImplicitVRLittleEndian
                    if implicit_vr
                    else pydicom.uid.ExplicitVRLittleEndian
                    if little_endian
                    else pydicom.uid.ExplicitVRBigEndian
                )
            return dataset, True
    except Exception:
        pass
    return None, claims_dicom


def sop_class_of(dataset: Dataset) -> str:
    meta = getattr(dataset, "file_meta", None)
    uid = (meta.get("MediaStorageSOPClassUID") if meta is not None else None) or dataset.get("SOPClassUID") or ""
    return str(uid)


class Compression(NamedTuple):
    transfer_syntax: str
    lossy: bool
    ratio: float | None


def compression_of(dataset: Dataset) -> Compression:
    """The file's transfer syntax and whether its pixels were ever lossy-compressed: a lossy syntax,
    or LossyImageCompression "01" (an earlier lossy step, e.g. before a lossless re-encoding)."""
    meta = getattr(dataset, "file_meta", None)
    syntax = str((meta.get("TransferSyntaxUID") if meta is not None else None) or "")
    flagged = tag_text(dataset, "LossyImageCompression") == "01"
    steps = [float(v) for v in _values(dataset.get("LossyImageCompressionRatio") or []) if _is_number(v)]
    ratio = float(np.prod(steps)) if steps else None
    return Compression(syntax, flagged or syntax in LOSSY_TRANSFER_SYNTAXES, ratio)


def _is_number(value) -> bool:
    try:
        return np.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def is_image_object(dataset: Dataset) -> bool:
    """False for the known non-image classes, and for an object of any class but MR's that carries no
    pixel data: the vendors' private objects that exports put beside the images (Siemens CSA
    Non-Image, Philips private series data), spectroscopy, encapsulated PDF reports. An MR image,
    or a cut file whose SOP class is missing, is an image to check (without pixels: truncated).
    Read with stop_before_pixels, every class but MR's counts as no image."""
    sop_class = sop_class_of(dataset)
    if sop_class.startswith(NON_IMAGE_SOP_CLASS_PREFIXES):
        return False
    return not sop_class or sop_class in MR_IMAGE_SOP_CLASSES or "PixelData" in dataset


def incompleteness(dataset: Dataset) -> str | None:
    """Why an image file is cut short or incomplete, or None when it is whole."""
    for keyword in ("SeriesInstanceUID", "Rows", "Columns", "BitsAllocated", "PixelData"):
        if keyword not in dataset:
            return f"lacks {keyword} (truncated or incomplete header)"
    pixel_element = dataset.get_item("PixelData")
    declared = getattr(pixel_element, "length", None)
    raw = pixel_element.value
    if declared is not None and declared != 0xFFFFFFFF and raw is not None and len(raw) < declared:
        return f"PixelData is cut short ({len(raw)} of {declared} bytes)"
    meta = getattr(dataset, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and syntax.is_encapsulated:
        return None  # compressed: the decoder checks the fragments when the pixels are read
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    expected = int(dataset.Rows) * int(dataset.Columns) * samples * frames * int(dataset.BitsAllocated) // 8
    actual = len(dataset.PixelData or b"")
    if actual < expected:
        return f"PixelData is cut short ({actual} bytes, Rows x Columns x BitsAllocated/8 needs {expected})"
    return None


def tag_text(dataset: Dataset, keyword: str) -> str:
    """A tag's value as stripped text ("" when absent), a multi-value "\\"-joined."""
    value = dataset.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def echo_time_ms(dataset: Dataset) -> float | None:
    """EchoTime as a number (None when absent or not a number): what splits a series by echo."""
    return _number(dataset, "EchoTime")


def image_type_of(dataset: Dataset) -> str:
    """ImageType, its values upper-cased and stripped, "\\"-joined: what tells water from fat or
    magnitude from phase in one series. In a flattened Enhanced MR view, the frame's own FrameType
    followed by its ComplexImageComponent (MAGNITUDE, PHASE, REAL, IMAGINARY), the tag by which
    Enhanced MR marks magnitude and phase frames."""
    enhanced = "FrameType" in dataset
    values = [part.strip().upper() for part in tag_text(dataset, "FrameType" if enhanced else "ImageType").split("\\")]
    component = tag_text(dataset, "ComplexImageComponent").upper() if enhanced else ""
    return "\\".join([*values, component] if component and component not in values else values)


# ImageType values by which vendors mark images that are not the anatomy a T2-weighted volume
# shows: Dixon fat, opposed-phase and fat-fraction images, and the phase, real and imaginary parts
# of complex data (Philips writes "P_SE", Siemens "P", Siemens Dixon "DIXON\\FAT").
_COMPONENTS = {
    "water": {"W", "WATER"},
    "in phase": {"IP", "IN_PHASE", "INPHASE"},
    "opposed phase": {"OP", "OUT_PHASE", "OPP_PHASE", "OPPOSED_PHASE", "OUT_OF_PHASE", "OPPOSED"},
    "fat": {"F", "FAT"},
    "fat fraction": {"FF", "FAT_FRACTION", "FATFRACTION"},
    "phase": {"P", "PHASE", "PHASE MAP"},
    "real": {"R", "REAL"},
    "imaginary": {"I", "IMAGINARY"},
    "magnitude": {"M", "MAGNITUDE"},
}
_NOT_ANATOMY = ("opposed phase", "fat", "fat fraction", "phase", "real", "imaginary")


def image_components(image_type: str) -> list[str]:
    """The named components an ImageType marks, in _COMPONENTS' order. Philips' "M_SE" / "P_FFE"
    count by their first letter."""
    values = {part.strip().upper() for part in image_type.split("\\")}
    values |= {value.split("_", 1)[0] for value in values if value[:2] in ("M_", "P_", "R_", "I_")}
    return [name for name, marks in _COMPONENTS.items() if values & marks]


def _number(dataset: Dataset, keyword: str) -> float | None:
    value = dataset.get(keyword)
    if value is None or value == "":
        return None
    try:
        if isinstance(value, pydicom.multival.MultiValue):
            value = value[0]
        return float(value)
    except (TypeError, ValueError):
        return None


@overload
def _numbers(dataset: Dataset, keyword: str, count: Literal[2]) -> tuple[float, float] | None: ...
@overload
def _numbers(dataset: Dataset, keyword: str, count: Literal[3]) -> tuple[float, float, float] | None: ...
@overload
def _numbers(dataset: Dataset, keyword: str, count: int) -> tuple[float, ...] | None: ...
def _numbers(dataset: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    value = dataset.get(keyword)
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(np.isfinite(numbers)) else None


def diffusion_b_value(dataset: Dataset) -> float | None:
    """DiffusionBValue (0018,9087), else a vendor's private b-value."""
    standard = _number(dataset, "DiffusionBValue")
    if standard is not None:
        return standard
    for group, creator, offset, vr in PRIVATE_B_VALUES:
        value = _private_value(dataset, group, creator, offset)
        if isinstance(value, bytes):  # unknown VR (implicit files): decode by the known VR
            if vr == "FL":
                value = struct.unpack("<f", value[:4])[0] if len(value) >= 4 else None
            else:
                value = value.split(b"\\")[0].strip(b"\x00 ").decode("ascii", "ignore") or None
        elif isinstance(value, pydicom.multival.MultiValue | list | tuple):
            value = value[0] if len(value) else None
        try:
            if value is not None:
                return float(value) % 1e9
        except (TypeError, ValueError):
            continue
    return None


def _private_value(dataset: Dataset, group: int, creator: str, offset: int):
    for block in range(0x10, 0x100):
        owner = dataset.get((group, block))
        if owner is None:
            continue
        name = owner.value.decode("ascii", "ignore") if isinstance(owner.value, bytes) else str(owner.value)
        if name.strip().upper() == creator:
            element = dataset.get((group, (block << 8) | offset))
            return None if element is None else element.value
    return None


# ---------------------------------------------------------------------------------------------
# Multi-frame (Enhanced MR) images

ENHANCED_MR_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
}
# Enhanced MR names a few classic attributes differently: (functional-group keyword, classic keyword).
_ENHANCED_RENAMES = (
    ("EffectiveEchoTime", "EchoTime"),
    ("PulseSequenceName", "SequenceName"),
)
_ECHO_PULSE_TO_SCANNING = {"SPIN": "SE", "GRADIENT": "GR", "BOTH": "SE\\GR"}
_FRAME_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")


def is_multiframe(dataset: Dataset) -> bool:
    return int(dataset.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in dataset


def frame_views(dataset: Dataset) -> list[Dataset]:
    """One classic-looking header per frame (no pixel data): the top-level attributes, overlaid by
    the shared and then the frame's own functional groups, flattened (PlanePositionSequence >
    ImagePositionPatient becomes ImagePositionPatient, ...), with EffectiveEchoTime as EchoTime.
    A single-frame file gives itself.

    Written with pydicom by hand: pydicom has no functional-group accessor, and highdicom, which
    parses the groups, reads only a whole single-stack volume (`Image.get_volume`), not the frames
    of one echo or one frame type, nor a frame's tags as a header. Flattening lets every check and
    the NIfTI writer treat a frame exactly as a classic file, so both forms of one acquisition give
    the same volume; the tests compare it with highdicom's (test_enhanced_mr).
    """
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        return [dataset]
    base = Dataset()
    for element in dataset:
        if element.keyword not in (*_FRAME_GROUPS, "PixelData", "NumberOfFrames"):
            base.add(element)
    shared = dataset.get("SharedFunctionalGroupsSequence")
    shared_items = list(shared[0]) if shared else []
    views = []
    for frame in per_frame:
        view = Dataset()
        view.update(base)
        for group in (*shared_items, *frame):
            if group.VR == "SQ" and group.value:
                for element in group.value[0]:
                    view.add(element)
        for source, target in _ENHANCED_RENAMES:
            if source in view and target not in view:
                setattr(view, target, view[source].value)
        if "ScanningSequence" not in view and "EchoPulseSequence" in view:
            kinds = [_ECHO_PULSE_TO_SCANNING.get(str(view.EchoPulseSequence).upper(), "")]
            if str(view.get("EchoPlanarPulseSequence", "")).upper() == "YES":
                kinds.append("EP")
            view.ScanningSequence = "\\".join(kind for kind in kinds if kind)
        views.append(view)
    return views


def multiframe_problem(
    dataset: Dataset, views: list[Dataset], echo: float | None = None, image_type: str | None = None
) -> str | None:
    """Why a multi-frame file is not one volume, or None: it must hold one stack of frames at one
    echo time, with one per-frame functional group item per frame, and its dimension indices (when
    given) must vary along one dimension only, without repeats. With `echo` and/or `image_type`,
    only the frames of that echo time and frame type are judged (a file of several echoes, or of
    several kinds of image at the same positions, is read as one volume per echo and kind, see
    `_series_infos`)."""
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" not in dataset:
        return f"has {frames} frames but no per-frame functional groups (not Enhanced MR), which is not supported"
    if len(views) != frames:
        return f"has {frames} frames but {len(views)} per-frame functional groups"
    if echo is not None or image_type is not None:
        views = [view for view in views if is_frame_of(view, echo, image_type)]
        frames = len(views)
    if frames < 2:
        return None
    stacks = sorted({str(view.StackID) for view in views if "StackID" in view})
    if len(stacks) > 1:
        return f"holds {len(stacks)} stacks (StackID {', '.join(stacks[:4])}); one file must hold one volume"
    echo_times = sorted({te for view in views if (te := _number(view, "EchoTime")) is not None})
    if len(echo_times) > 1:
        shown = ", ".join(f"{te:g}" for te in echo_times[:4])
        return f"mixes {len(echo_times)} echo times ({shown} ms) in one file; one file must hold one volume"
    indices = [
        tuple(int(v) for v in _values(view.DimensionIndexValues)) for view in views if "DimensionIndexValues" in view
    ]
    if indices:
        if len(indices) != frames or len({len(i) for i in indices}) != 1:
            return "gives DimensionIndexValues for some frames only"
        if len(set(indices)) != frames:
            repeated = next(i for i in indices if indices.count(i) > 1)
            return f"dimension indices do not form a volume: frames repeat DimensionIndexValues {list(repeated)}"
        varying = sum(len({i[d] for i in indices}) > 1 for d in range(len(indices[0])))
        if varying > 1:
            return f"dimension indices do not form a volume: they vary along {varying} dimensions, a volume along one"
    positions = [int(view.InStackPositionNumber) for view in views if "InStackPositionNumber" in view]
    if positions and sorted(positions) != list(range(1, frames + 1)):
        return f"dimension indices do not form a volume: InStackPositionNumber is not 1 to {frames}, once each"
    return None


def is_frame_of(view: Dataset, echo: float | None, image_type: str | None) -> bool:
    """Whether a frame belongs to the volume of echo time `echo` and image type `image_type` (None:
    any)."""
    return (echo is None or echo_time_ms(view) == echo) and (image_type is None or image_type_of(view) == image_type)


def _values(value) -> list:
    return list(value) if isinstance(value, pydicom.multival.MultiValue | list | tuple) else [value]


class SliceGeometry(NamedTuple):
    position: tuple[float, float, float] | None  # ImagePositionPatient, LPS mm
    orientation: tuple[float, ...] | None  # ImageOrientationPatient
    pixel_spacing: tuple[float, float] | None
    rows: int
    columns: int
    frames: int

    @classmethod
    def of(cls, dataset: Dataset) -> SliceGeometry:
        return cls(
            _numbers(dataset, "ImagePositionPatient", 3),
            _numbers(dataset, "ImageOrientationPatient", 6),
            _numbers(dataset, "PixelSpacing", 2),
            int(dataset.get("Rows", 0) or 0),
            int(dataset.get("Columns", 0) or 0),
            int(dataset.get("NumberOfFrames", 1) or 1),
        )


class Stack(NamedTuple):
    order: list[int]  # indices of the input slices by ascending position along the normal
    slice_spacing: float
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    first_position: tuple[float, float, float]


class GeometryProblem(ValueError):
    """The slices of one series do not form a regular stack; the message names no series."""


_T = TypeVar("_T")


def _present(value: _T | None, name: str, where: str) -> _T:
    """`value`, or a GeometryProblem saying that `where` lacks a valid `name`."""
    if value is None:
        raise GeometryProblem(f"{where} lacks a valid {name}")
    return value


class _Placed(NamedTuple):
    """The geometry tags of one slice, all present."""

    position: tuple[float, float, float]
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]


def stack_slices(label: str, slices: list[SliceGeometry], max_gap_ratio: float = 1.5, unit: str = "file") -> Stack:
    """`order_slices`, with problems raised as PatientInputError naming the series."""
    try:
        return order_slices(slices, max_gap_ratio, unit)
    except GeometryProblem as problem:
        raise PatientInputError(f"{label}: {problem}") from None


def order_slices(slices: list[SliceGeometry], max_gap_ratio: float = 1.5, unit: str = "file") -> Stack:
    """Check that the slices form one regular stack and order them by position.

    `slices` are in file-name order, so slice i is "file i+1 of n" (`unit` "frame": the frames of
    multi-frame files, file by file). Spacing comes from the positions projected on the normal,
    never from SliceThickness or SpacingBetweenSlices.
    """
    count = len(slices)

    def file_at(index: int) -> str:
        return f"{unit} {index + 1} of {count}"

    if count == 0:
        raise GeometryProblem("no image files")
    placed: list[_Placed] = []
    for index, item in enumerate(slices):
        if item.frames > 1:
            raise GeometryProblem(
                f"{file_at(index)} is a multi-frame image without per-frame functional groups, which is not supported"
            )
        placed.append(
            _Placed(
                _present(item.position, "ImagePositionPatient", file_at(index)),
                _present(item.orientation, "ImageOrientationPatient", file_at(index)),
                _present(item.pixel_spacing, "PixelSpacing", file_at(index)),
            )
        )
    first, first_placed = slices[0], placed[0]
    reference_orientation = np.asarray(first_placed.orientation)
    if abs(np.dot(reference_orientation[:3], reference_orientation[3:])) > 1e-3 or not np.allclose(
        np.linalg.norm(reference_orientation.reshape(2, 3), axis=1), 1.0, atol=1e-3
    ):
        raise GeometryProblem(f"{file_at(0)} has an ImageOrientationPatient that is not two orthonormal vectors")
    for index, item in enumerate(slices[1:], start=1):
        if (item.rows, item.columns) != (first.rows, first.columns):
            raise GeometryProblem(
                f"inconsistent Rows x Columns: {file_at(index)} is {item.rows}x{item.columns}, "
                f"{unit} 1 is {first.rows}x{first.columns}"
            )
        if not np.allclose(placed[index].orientation, reference_orientation, atol=ORIENTATION_TOLERANCE, rtol=0):
            raise GeometryProblem(f"inconsistent ImageOrientationPatient: {file_at(index)} differs from {unit} 1")
        if not np.allclose(
            placed[index].pixel_spacing, first_placed.pixel_spacing, rtol=SPACING_RELATIVE_TOLERANCE, atol=0
        ):
            raise GeometryProblem(
                f"inconsistent PixelSpacing: {file_at(index)} has {_mm(placed[index].pixel_spacing)}, "
                f"{unit} 1 has {_mm(first_placed.pixel_spacing)}"
            )
    if count < 2:
        return Stack([0], float("nan"), first_placed.orientation, first_placed.pixel_spacing, first_placed.position)

    normal = slice_normal(reference_orientation)
    positions = np.array([item.position for item in placed])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    steps = np.diff(along[order])
    for step, lower, upper in zip(steps, order[:-1], order[1:]):
        if step < DUPLICATE_POSITION_MM:
            raise GeometryProblem(
                f"duplicate slice position: {unit}s {min(lower, upper) + 1} and {max(lower, upper) + 1} of {count} "
                "lie at the same position (a repeated acquisition, several echoes or a copied file)"
            )
    median = float(np.median(steps))
    for rank, step in enumerate(steps):
        if step > max_gap_ratio * median:
            raise GeometryProblem(
                f"missing slice: a gap of {step:.2f} mm between slices {rank + 1} and {rank + 2} of {count} "
                f"(by position) exceeds {max_gap_ratio:g} x the median spacing {median:.2f} mm"
            )
        if step < median / max_gap_ratio:
            raise GeometryProblem(
                f"uneven slice spacing: {step:.2f} mm between slices {rank + 1} and {rank + 2} of {count} "
                f"(by position) against a median of {median:.2f} mm (an extra or misplaced slice)"
            )
    # all slices must lie on one line along the normal; a shifted stack would need resampling
    in_plane = (positions - positions[order[0]]) - np.outer(along - along[order[0]], normal)
    shift = float(np.linalg.norm(in_plane, axis=1).max())
    if shift > 0.1 * min(first_placed.pixel_spacing):
        raise GeometryProblem(f"slices are not stacked along the slice normal (in-plane shift up to {shift:.2f} mm)")
    spacing = float((along[order[-1]] - along[order[0]]) / (count - 1))
    return Stack(
        [int(i) for i in order],
        spacing,
        first_placed.orientation,
        first_placed.pixel_spacing,
        placed[int(order[0])].position,
    )


def _mm(values) -> str:
    return "x".join(f"{float(v):g}" for v in values) + " mm"


# ---------------------------------------------------------------------------------------------
# Inventory


@dataclass
class _SeriesFiles:
    folder_index: int
    first: Dataset  # header of the first file by name (of its first frame), pixels dropped
    files: list[Path] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    slices: list[SliceGeometry] = field(default_factory=list)  # per frame: one per classic file
    compressions: list[Compression] = field(default_factory=list)
    echo_times: list[float | None] = field(default_factory=list)  # per frame, as `slices`
    frame_files: list[int] = field(default_factory=list)  # per frame: its file's index in `files`
    multiframe: bool = False
    problem: str | None = None  # why a multi-frame file is not one volume (the first such file)
    # the same for the frames of one echo and/or image type: (echo or None, image type or None) -> why
    volume_problems: dict[tuple[float | None, str | None], str] = field(default_factory=dict)
    image_types: list[str] = field(default_factory=list)  # per frame, as `slices` (image_type_of)
    first_of_type: dict[str, Dataset] = field(default_factory=dict)  # image type -> header of its first frame


def _header_of(dataset: Dataset, views: list[Dataset]) -> Dataset:
    """The header of a file (of its first frame), without pixels: a study can have thousands of
    files. A classic file's copy shares its elements, so the file's dataset loses its pixels too."""
    if views[0] is not dataset:
        return views[0]  # built without the pixels
    header = dataset.copy()
    del header.PixelData
    return header


def _series_folders(patient_dir: Path) -> list[tuple[Path, list[Path]]]:
    """(folder, its non-hidden files sorted by name) for every folder under the patient."""
    folders = []
    for root, dirs, files in os.walk(patient_dir):
        at_root = Path(root) == patient_dir
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (at_root and d == REFERENCE_FOLDER))
        names = sorted(f for f in files if not f.startswith("."))
        if names:
            folders.append((Path(root), [Path(root) / name for name in names]))
    return folders


# Tags that name the patient. Two series that disagree on any of them (both present) belong to two
# patients. Studies of one patient may differ in StudyInstanceUID and FrameOfReferenceUID (a
# follow-up), so those are not compared; PatientName is not either (formatting varies by system).
IDENTITY_TAGS = ("PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")


def _identity_digest(dataset: Dataset, keyword: str) -> str | None:
    """sha256 of the tag's normalized value (None when absent or empty): identities are compared by
    digest, and the values themselves never reach a message, a record or a log."""
    value = tag_text(dataset, keyword).upper()
    return hashlib.sha256(value.encode()).hexdigest() if value else None


def check_one_patient(headers: list[Dataset]) -> None:
    """Raise PatientInputError when the series disagree on the patient's identity (IDENTITY_TAGS):
    a drop folder that holds two patients' studies would otherwise become one patient. The message
    names the tags and the series, never the values."""
    for keyword in IDENTITY_TAGS:
        groups: dict[str, list[Dataset]] = {}
        for header in headers:
            digest = _identity_digest(header, keyword)
            if digest is not None:
                groups.setdefault(digest, []).append(header)
        if len(groups) > 1:
            examples = " vs ".join(_describe(members[:1]) for members in sorted(groups.values(), key=len, reverse=True))
            raise PatientInputError(
                f"the folder holds studies of {len(groups)} different patients ({keyword} differs: {examples}); "
                "a drop folder must hold one patient's studies"
            )


def _describe(datasets: list[Dataset]) -> str:
    labels = sorted({series_label(_int(d.get("SeriesNumber")), tag_text(d, "SeriesDescription")) for d in datasets})
    return " and ".join(labels)


def _int(value) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Studies of one patient folder (a follow-up scan is a second study)

STUDY_TAGS = (
    "SOPClassUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "SeriesNumber",
    "SeriesDescription",
)


@dataclass(frozen=True)
class StudyRef:
    """One study of a patient folder, described without PHI: its place in time, not its date."""

    index: int  # 1 = earliest by StudyDate, StudyTime; ties by study_key
    study_key: str  # sha256 of StudyInstanceUID, first 16 hex ("" when the files have none)
    days_since_first: int | None  # StudyDate minus the first study's StudyDate; None without dates
    n_series: int  # series folders of this study
    folders: tuple[Path, ...] = field(repr=False, compare=False)  # its series folders; never serialized


def _study_header(paths: list[Path]) -> Dataset | None:
    """The header (no pixels) of the folder's first image file that names its study, or None."""
    for path in paths:
        try:
            # force: files without a preamble are DICOM too (read_dicom_bytes); the UIDs below say so
            dataset = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=[*STUDY_TAGS, *IDENTITY_TAGS], force=True
            )
        except Exception:  # not DICOM, cut short: inventory_study says which file and why
            continue
        if "SeriesInstanceUID" in dataset and "StudyInstanceUID" in dataset and is_image_object(dataset):
            return dataset
    return None


def _study_day(dataset: Dataset) -> dt.date | None:
    try:
        return dt.datetime.strptime(tag_text(dataset, "StudyDate")[:8], "%Y%m%d").date()
    except ValueError:
        return None


def list_studies(patient_dir: Path) -> tuple[StudyRef, ...]:
    """The studies in a patient folder, earliest first, from one header per series folder.

    Dates are read to order the studies and to count days between them, never returned. Folders
    whose study cannot be told (no readable DICOM) go with every study, so each study's inventory
    refuses them. Raises PatientInputError when the folders hold more than one patient's studies."""
    patient_dir = Path(patient_dir)
    by_uid: dict[str, list[tuple[Path, Dataset]]] = {}
    unknown: list[Path] = []
    for folder, paths in _series_folders(patient_dir) if patient_dir.is_dir() else []:
        header = _study_header(paths)
        if header is None:
            unknown.append(folder)
        else:
            by_uid.setdefault(str(header.StudyInstanceUID).strip(), []).append((folder, header))
    check_one_patient([header for members in by_uid.values() for _, header in members])
    if len(by_uid) <= 1:  # one study (or none readable): the folder is the study, as it always was
        folders = [folder for members in by_uid.values() for folder, _ in members] + unknown
        key = series_key_of(next(iter(by_uid))) if by_uid else ""
        return (StudyRef(1, key, 0 if by_uid else None, len(folders), tuple(sorted(folders))),)

    def order(uid: str) -> tuple[str, str, str]:
        first = by_uid[uid][0][1]
        # a study without a date sorts last: it cannot be placed in time
        return (tag_text(first, "StudyDate")[:8] or "99999999", tag_text(first, "StudyTime"), series_key_of(uid))

    uids = sorted(by_uid, key=order)
    days = [_study_day(by_uid[uid][0][1]) for uid in uids]
    studies = []
    for index, (uid, day) in enumerate(zip(uids, days, strict=True), start=1):
        folders = [folder for folder, _ in by_uid[uid]]
        offset = (day - days[0]).days if day is not None and days[0] is not None else None
        studies.append(StudyRef(index, series_key_of(uid), offset, len(folders), tuple(sorted(folders + unknown))))
    return tuple(studies)


def inventory_study(patient_dir: Path, folders: tuple[Path, ...] | None = None) -> StudyInventory:
    """Every image series under `patient_dir` (only those in `folders`, one study's series folders
    from `list_studies`, when given), with checksums; raises PatientInputError on bad files.

    File-level problems (not DICOM, truncated, two studies in one folder) fail the study: the
    delivery is broken. Several series of one study may share a folder (a flat export). What
    exported media always carry is left out and counted, not breakage: files that are not DICOM in
    a folder holding no DICOM image (a README, a viewer, an index page), and a second file of an
    instance already read (same SOPInstanceUID, same pixel data); the same SOPInstanceUID with other
    pixels fails the study. Geometry problems are recorded per series in `geometry_problem`: a
    scout series with three orientations must not block the study, but the T2 choice rejects a
    series that has one.
    """
    patient_dir = Path(patient_dir)
    if not patient_dir.is_dir():
        raise PatientInputError("the patient folder does not exist")
    by_uid: dict[str, _SeriesFiles] = {}
    annotations: list[AnnotationFile] = []
    instances: dict[str, tuple[str, str]] = {}  # SOPInstanceUID -> (pixel digest, where it was read)
    companions = duplicates = 0
    for folder_index, (folder, paths) in enumerate(_series_folders(patient_dir)):
        if folders is not None and folder not in folders:
            continue
        headers: list[tuple[int, Path, Dataset, str]] = []
        not_dicom: list[int] = []
        incomplete: list[tuple[int, str]] = []
        for position, path in enumerate(paths):
            try:
                data = path.read_bytes()
            except OSError as error:  # the message of an OSError carries the path: drop it
                raise PatientInputError(
                    f"cannot read a file in the drop ({error.strerror or type(error).__name__})"
                ) from None
            dataset, claims_dicom = read_dicom_bytes(data)
            if dataset is None:
                if claims_dicom:
                    incomplete.append((position, "its header cannot be parsed (cut short or corrupt)"))
                else:
                    not_dicom.append(position)
                continue
            if not is_image_object(dataset):
                if annotation := _ANNOTATION_KINDS.get(sop_class_of(dataset)):
                    annotations.append(AnnotationFile(path, annotation, _referenced_series_keys(dataset)))
                continue
            problem = incompleteness(dataset)
            if problem:
                incomplete.append((position, problem))
                if "SeriesInstanceUID" not in dataset:
                    continue
            headers.append((position, path, dataset, hashlib.sha256(data).hexdigest()))
        total = len(paths)
        where = f"the folder of {_describe([h[2] for h in headers])}" if headers else "a folder with no DICOM images"
        if not_dicom and not headers and not incomplete:  # media companions (README, viewer): no series here
            companions += len(not_dicom)
            not_dicom = []
        if not_dicom:
            positions = ", ".join(str(p + 1) for p in not_dicom[:5]) + (", ..." if len(not_dicom) > 5 else "")
            files, verb = ("file", "is") if len(not_dicom) == 1 else ("files", "are")
            raise PatientInputError(f"{files} {positions} of {total} in {where} {verb} not DICOM")
        if incomplete:
            position, problem = incomplete[0]
            more = f" (and {len(incomplete) - 1} more files)" if len(incomplete) > 1 else ""
            raise PatientInputError(f"truncated DICOM file: file {position + 1} of {total} in {where}: {problem}{more}")
        # Several series in one folder (a flat export) are read series by series; several studies
        # in one folder are not: the study list reads one header per folder and would merge them.
        studies = {tag_text(h[2], "StudyInstanceUID") for h in headers}
        if len(studies) > 1:
            raise PatientInputError(
                f"one folder mixes {len(studies)} studies ({_describe([h[2] for h in headers])}); "
                "each study's files must be in folders of their own"
            )
        for position, path, dataset, digest in headers:
            uid = str(dataset.SeriesInstanceUID)
            if _is_copy_of_read_instance(dataset, instances, f"file {position + 1} of {total} in {where}"):
                duplicates += 1
                continue
            views = frame_views(dataset)
            entry = by_uid.get(uid)
            new_series = entry is None
            if entry is None:
                entry = by_uid[uid] = _SeriesFiles(folder_index, _header_of(dataset, views))
            elif entry.folder_index != folder_index:
                raise PatientInputError(f"{_describe([dataset])} is split across several folders")
            # the header of the first frame of each image type (should the series split by type): a
            # frame's view has no pixels; a classic file's header drops them, so it is made once per file
            kinds = [image_type_of(view) for view in views]
            multiframe = is_multiframe(dataset)
            for index, kind in enumerate(kinds):
                if kind not in entry.first_of_type:
                    entry.first_of_type[kind] = (
                        views[index] if multiframe else entry.first if new_series else _header_of(dataset, views)
                    )
            echoes = [echo_time_ms(view) for view in views]
            if multiframe:
                entry.multiframe = True
                which = f"file {position + 1} of {total} (multi-frame)"
                # judged whole (the series as one volume) and volume by volume (the series split by
                # echo, by image type or by both)
                if (problem := multiframe_problem(dataset, views)) and entry.problem is None:
                    entry.problem = f"{which} {problem}"
                for volume in sorted(
                    {key for te, kind in zip(echoes, kinds) for key in ((te, None), (None, kind), (te, kind))},
                    key=lambda key: (key[0] or 0.0, key[1] or ""),
                ):
                    if problem := multiframe_problem(dataset, views, *volume):
                        entry.volume_problems.setdefault(volume, f"{which} {problem}")
            entry.frame_files.extend([len(entry.files)] * len(views))
            entry.files.append(path)
            entry.digests.append(digest)
            entry.slices.extend(SliceGeometry.of(view) for view in views)
            entry.compressions.append(compression_of(dataset))
            entry.echo_times.extend(echoes)
            entry.image_types.extend(kinds)
    if not by_uid:
        raise PatientInputError("no DICOM image files found in the patient folder")
    check_one_patient([entry.first for entry in by_uid.values()])
    volumes = [info for uid, entry in by_uid.items() for info in _series_infos(uid, entry)]
    n_files = sum(s.n_files for s in volumes)  # a joined series adds no files
    series = sorted(
        volumes + _joined_acquisitions(by_uid, volumes),
        key=lambda s: (s.series_number is None, s.series_number or 0, s.series_key),
    )
    return StudyInventory(tuple(series), n_files, companions, duplicates, tuple(annotations))


def _referenced_series_keys(dataset: Dataset) -> frozenset[str]:
    """series_key_of every series a SEG (ReferencedSeriesSequence) or an RT Structure Set
    (ReferencedFrameOfReferenceSequence > RTReferencedStudySequence > RTReferencedSeriesSequence)
    says it was drawn on."""
    items = list(dataset.get("ReferencedSeriesSequence", []))
    for frame in dataset.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            items += list(study.get("RTReferencedSeriesSequence", []))
    return frozenset(
        series_key_of(str(item.SeriesInstanceUID).strip()) for item in items if "SeriesInstanceUID" in item
    )


def _is_copy_of_read_instance(dataset: Dataset, instances: dict[str, tuple[str, str]], where: str) -> bool:
    """True when an instance with this SOPInstanceUID and the same pixel data was read already;
    records the instance otherwise. The same UID with other pixels is two objects claiming one
    identity: PatientInputError."""
    sop_uid = tag_text(dataset, "SOPInstanceUID")
    if not sop_uid:
        return False
    pixels = hashlib.sha256(dataset.PixelData or b"").hexdigest()
    seen = instances.get(sop_uid)
    if seen is None:
        instances[sop_uid] = (pixels, where)
        return False
    if seen[0] != pixels:
        raise PatientInputError(
            f"{where} and {seen[1]} carry the same SOPInstanceUID with different pixel data; "
            "one instance must not be delivered in two versions"
        )
    return True


def _series_infos(uid: str, entry: _SeriesFiles) -> list[SeriesInfo]:
    """One SeriesInfo per volume of the series, as dcm2niix splits them:

    - one per echo when its frames carry several echo times (a dual-echo PD/T2 or multi-echo T2
      acquisition stored as one series of classic files, or as Enhanced MR frames with their own
      MREchoSequence): the T2 choice weighs each echo by its own TE;
    - one per image type when frames of several image types lie at the same positions (Dixon water
      and fat images, magnitude and phase, in one series of classic files by their ImageType, or in
      one Enhanced MR file by each frame's FrameType): the T2 choice rejects the fat,
      opposed-phase, phase, real and imaginary volumes. Only then: a series whose ImageType merely
      varies between slices of one stack stays whole.
    """
    echoes = sorted({te for te in entry.echo_times if te is not None})
    by_echo = len(echoes) > 1 and None not in entry.echo_times
    positions = [slice_.position for slice_ in entry.slices]
    by_type = len(set(entry.image_types)) > 1 and None not in positions and len(set(positions)) < len(positions)
    if not (by_echo or by_type):
        return [_series_info(uid, entry)]
    volume_keys = [
        (te if by_echo else None, kind if by_type else None)
        for te, kind in zip(entry.echo_times, entry.image_types, strict=True)
    ]
    infos, description = [], tag_text(entry.first, "SeriesDescription")
    for echo, kind in sorted(set(volume_keys), key=lambda key: (key[0] or 0.0, key[1] or "")):
        frames = [i for i, key in enumerate(volume_keys) if key == (echo, kind)]
        files = sorted({entry.frame_files[i] for i in frames})  # a multi-echo file serves every echo
        # the first header of its image type (its own b-value, sequence name, ...), else of the series;
        # without pixels. Dataset.copy() would share its elements: deepcopy.
        header = copy.deepcopy(entry.first_of_type[kind] if kind is not None else entry.first)
        names = []
        if echo is not None:
            header.EchoTime = echo
            names.append(f"echo {echoes.index(echo) + 1} of {len(echoes)}")
        if kind is not None:
            names.append(", ".join(image_components(kind)) or kind)
        header.SeriesDescription = f"{description} ({'; '.join(names)})"
        part = _SeriesFiles(
            entry.folder_index,
            header,
            files=[entry.files[i] for i in files],
            digests=[entry.digests[i] for i in files],
            slices=[entry.slices[i] for i in frames],
            compressions=[entry.compressions[i] for i in files],
            echo_times=[entry.echo_times[i] for i in frames],
            frame_files=[files.index(entry.frame_files[i]) for i in frames],
            multiframe=entry.multiframe,
            problem=entry.volume_problems.get((echo, kind)),
            image_types=[entry.image_types[i] for i in frames],
        )
        # an echo keeps the key it had before image types were told apart
        name = uid + (f" echo {echo:g}" if echo is not None else "") + (f" image type {kind}" if kind else "")
        frame_type = kind if entry.multiframe else None  # classic parts hold only their type's files
        infos.append(_series_info(uid, part, echo=echo, key_name=name, image_type_of_frames=frame_type))
    return infos


# Tags on which the parts of one acquisition written as several series agree (besides the matrix,
# pixel spacing and orientation, which order_slices checks).
_ACQUISITION_TAGS = (
    "FrameOfReferenceUID",
    "Modality",
    "SeriesDescription",
    "ProtocolName",
    "SequenceName",
    "ScanningSequence",
    "ImageType",
    "EchoTime",
    "RepetitionTime",
    "ContrastBolusAgent",
)
# A joined series' slices, junctions included, are evenly spaced within this fraction of the spacing.
JOIN_SPACING_TOLERANCE = 0.05


def _joined_acquisitions(by_uid: dict[str, _SeriesFiles], volumes: list[SeriesInfo]) -> list[SeriesInfo]:
    """One series more for each acquisition the scanner wrote as several series, its parts joined.

    A T2 acquired in two breath-holds, or in stations along the body, may come as one series per
    part: the same protocol, description, TE/TR, matrix, orientation and frame of reference, each
    part covering its own stretch of the body. Each part alone is a regular stack, so without this
    the T2 choice would take one part, half a liver. dcm2niix and highdicom do not join series (they
    convert each SeriesInstanceUID on its own), hence this: series that agree on every
    `_ACQUISITION_TAGS` are joined when they lie one after another along the slice normal without
    overlap and their slices, the junctions included, are evenly spaced (within
    JOIN_SPACING_TOLERANCE). Overlapping parts (a repeat, or stations that overlap and would need
    blending) and parts with a gap are not joined; of a part acquired twice, the later run is
    joined (`_best_chain`). The parts stay in the inventory; the joined series is one more
    candidate, which the T2 choice prefers for its slices.
    """
    uid_of_key = {series_key_of(uid): uid for uid in by_uid}
    whole = {  # series that are one volume each: not split by echo or image type, a regular stack
        uid_of_key[info.uid_key]: info
        for info in volumes
        if info.series_key == info.uid_key and info.geometry_problem is None and info.n_slices >= 2
    }
    groups: dict[tuple, list[str]] = {}
    for uid in whole:
        header = by_uid[uid].first
        identity = tuple(tag_text(header, keyword) for keyword in _ACQUISITION_TAGS)
        if identity[0]:  # without a frame of reference two series' positions cannot be compared
            groups.setdefault(identity, []).append(uid)
    joined = []
    for uids in groups.values():
        if chain := _best_chain(by_uid, whole, uids):
            joined.append(_joined_series(by_uid, whole, chain))
    return joined


# Above this many series of one protocol, only all of them together are tried as one acquisition.
_MAX_SERIES_TO_COMBINE = 6


def _best_chain(by_uid: dict[str, _SeriesFiles], whole: dict[str, SeriesInfo], uids: list[str]) -> list[str] | None:
    """The series of one protocol that form the longest acquisition one after another (two at least),
    in position order; None when no two do. A part acquired again after motion overlaps its first run:
    of such alternatives the later series are taken, as the T2 choice prefers a repeat."""
    subsets = (
        [list(c) for size in range(len(uids), 1, -1) for c in itertools.combinations(uids, size)]
        if len(uids) <= _MAX_SERIES_TO_COMBINE
        else [uids]
    )

    def preference(subset: list[str]) -> tuple:
        numbers = sorted((whole[uid].series_number or 0 for uid in subset), reverse=True)
        return sum(whole[uid].n_slices for uid in subset), numbers

    for subset in sorted(subsets, key=preference, reverse=True):
        if chain := _acquisition_chain(by_uid, subset):
            return chain
    return None


def _acquisition_chain(by_uid: dict[str, _SeriesFiles], uids: list[str]) -> list[str] | None:
    """`uids` in position order when they lie one after another as one evenly spaced stack; else None."""
    slices = [slice_ for uid in uids for slice_ in by_uid[uid].slices]
    try:  # also checks the matrix, pixel spacing and orientation, and that no part overlaps another
        stack = order_slices(slices, max_gap_ratio=1.0 + JOIN_SPACING_TOLERANCE)
    except GeometryProblem:
        return None
    owner = [uid for uid in uids for _ in by_uid[uid].slices]
    in_order = [owner[index] for index in stack.order]
    chain = [uid for rank, uid in enumerate(in_order) if rank == 0 or in_order[rank - 1] != uid]
    # a part that comes back after another one is interleaved with it, not one after another
    return chain if len(chain) == len(uids) else None


def _joined_series(by_uid: dict[str, _SeriesFiles], whole: dict[str, SeriesInfo], chain: list[str]) -> SeriesInfo:
    parts = [by_uid[uid] for uid in chain]
    header = copy.deepcopy(parts[0].first)  # the first part's header, without pixels
    numbers = " and ".join(f"#{_fmt(whole[uid].series_number)}" for uid in chain)
    header.SeriesDescription = f"{tag_text(header, 'SeriesDescription')} (series {numbers} joined)"
    joined = _SeriesFiles(parts[0].folder_index, header, multiframe=any(part.multiframe for part in parts))
    for part in parts:
        offset = len(joined.files)
        joined.frame_files.extend(offset + index for index in part.frame_files)
        joined.files.extend(part.files)
        joined.digests.extend(part.digests)
        joined.slices.extend(part.slices)
        joined.compressions.extend(part.compressions)
        joined.echo_times.extend(part.echo_times)
        joined.image_types.extend(part.image_types)
    name = "joined " + " + ".join(chain)
    return replace(_series_info(name, joined), part_keys=tuple(whole[uid].series_key for uid in chain))


def _series_info(
    uid: str,
    entry: _SeriesFiles,
    echo: float | None = None,
    key_name: str | None = None,
    image_type_of_frames: str | None = None,
) -> SeriesInfo:
    header = entry.first
    number = _int(header.get("SeriesNumber"))
    description = tag_text(header, "SeriesDescription")
    problem, spacing = entry.problem, None
    if problem is None:
        try:
            stack = order_slices(entry.slices, unit="frame" if entry.multiframe else "file")
            spacing = None if np.isnan(stack.slice_spacing) else round(stack.slice_spacing, 4)
        except GeometryProblem as error:
            problem = str(error)
    first = entry.slices[0]
    ratios = [c.ratio for c in entry.compressions if c.ratio is not None]
    return SeriesInfo(
        series_key=series_key_of(key_name or uid),
        series_number=number,
        description=description,
        modality=tag_text(header, "Modality"),
        echo_time_ms=_number(header, "EchoTime"),
        repetition_time_ms=_number(header, "RepetitionTime"),
        sequence_name=tag_text(header, "SequenceName"),
        scanning_sequence=tag_text(header, "ScanningSequence"),
        # a frame's own type where the series is Enhanced MR: the file's ImageType says MIXED when
        # its frames differ
        image_type=image_type_of(header) if "FrameType" in header else tag_text(header, "ImageType"),
        diffusion_b_value=diffusion_b_value(header),
        contrast_agent=bool(tag_text(header, "ContrastBolusAgent")) or "ContrastBolusAgentSequence" in header,
        n_files=len(entry.files),
        n_slices=len(entry.slices),
        transfer_syntax="\\".join(sorted({c.transfer_syntax for c in entry.compressions})),
        lossy=any(c.lossy for c in entry.compressions),
        lossy_ratio=max(ratios) if ratios else None,
        rows=first.rows,
        columns=first.columns,
        pixel_spacing_mm=first.pixel_spacing or (0.0, 0.0),
        slice_thickness_mm=_number(header, "SliceThickness"),
        spacing_between_slices_mm=_number(header, "SpacingBetweenSlices"),
        slice_spacing_mm=spacing,
        orientation=first.orientation or (),
        geometry_problem=problem,
        checksum=hashlib.sha256("".join(sorted(entry.digests)).encode()).hexdigest(),
        files=tuple(entry.files),
        uid_key=series_key_of(uid),
        echo_of_files_ms=echo,
        image_type_of_frames=image_type_of_frames,
    )


# ---------------------------------------------------------------------------------------------
# T2 choice


def _diffusion_hint(series: SeriesInfo) -> str | None:
    if series.diffusion_b_value is not None and series.diffusion_b_value > 0:
        return f"diffusion (b = {series.diffusion_b_value:g})"
    sequence = series.sequence_name.lower()
    if "ep_b" in sequence or "diff" in sequence:
        return f"diffusion sequence {series.sequence_name!r}"
    image_type = {part.strip().upper() for part in series.image_type.split("\\")}
    if image_type & {"DIFFUSION", "ADC", "TRACEW", "TRACE", "EADC", "FA"}:
        return f"diffusion image type {series.image_type!r}"
    return None


def _sequence_kind(series: SeriesInfo) -> str:
    parts = {p.strip().upper() for p in series.scanning_sequence.split("\\")}
    if "EP" in parts:
        return "echo planar"
    if "SE" in parts:
        return "spin echo"
    if "GR" in parts:
        return "gradient echo"
    return ""


def _is_axial(series: SeriesInfo) -> bool:
    return len(series.orientation) == 6 and abs(slice_normal(series.orientation)[2]) > 0.8


# Fat suppression as series descriptions name it (SPIR: the study's Philips T2; SPAIR, STIR, ...).
_FAT_SUPPRESSED = re.compile(r"(?<![A-Z])(FS|SPIR|SPAIR|STIR|FAT ?SAT|FATSAT|FAT ?SUP\w*|SFS)(?![A-Z])")


def _is_fat_suppressed(series: SeriesInfo) -> bool:
    return bool(_FAT_SUPPRESSED.search(series.description.upper().replace("_", " ")))


def _t2_score(series: SeriesInfo) -> float:
    """Higher is more like the study's T2 series; only compared among accepted candidates."""
    te = series.echo_time_ms or 0.0
    distance = max(0.0, 60.0 - te, te - 140.0)  # TE 60-140 ms is the classic liver T2 range
    score = max(0.0, 1.0 - distance / 100.0)
    score += 0.3 * (_sequence_kind(series) == "spin echo")
    score += 0.3 * ("T2" in series.description.upper())
    score += 0.2 * _is_axial(series)
    # fat-suppressed, as the study's T2-SPIR: by its description, or a Dixon water image
    score += 0.1 * (_is_fat_suppressed(series) or "water" in image_components(series.image_type))
    score += min(series.n_slices, 200) / 1000.0  # more slices break ties
    return round(score, 4)


def _fmt(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def choose_t2_series(
    inventory: StudyInventory,
    min_slices: int = 10,
    min_echo_time_ms: float = 60.0,
    min_repetition_time_ms: float = 800.0,
) -> SeriesChoice:
    """The T2-weighted series, chosen by its tags (not its description), and why."""
    candidates: list[dict] = []
    t2_but_unusable: list[str] = []
    for series in inventory.series:
        weighting: list[str] = []  # reasons it is not a T2-weighted acquisition
        if series.modality.upper() != "MR":
            weighting.append(f"modality {series.modality or '?'}")
        te, tr = series.echo_time_ms, series.repetition_time_ms
        if te is None or te < min_echo_time_ms:
            weighting.append(f"TE {_fmt(te)} ms < {min_echo_time_ms:g}")
        if tr is None or tr < min_repetition_time_ms:
            weighting.append(f"TR {_fmt(tr)} ms < {min_repetition_time_ms:g}")
        if diffusion := _diffusion_hint(series):
            weighting.append(diffusion)
        if not_anatomy := [name for name in image_components(series.image_type) if name in _NOT_ANATOMY]:
            weighting.append(f"{' and '.join(not_anatomy)} image (ImageType {series.image_type})")
        if series.contrast_agent:
            weighting.append("contrast agent given")
        usability: list[str] = []  # T2-weighted, but not a usable volume
        if series.n_slices < min_slices:
            usability.append(f"{series.n_slices} slice{'s' if series.n_slices != 1 else ''}, need >= {min_slices}")
        if series.geometry_problem:
            usability.append(series.geometry_problem)
        why = weighting + usability
        is_accepted = not why
        if not weighting and usability:
            t2_but_unusable.append(
                f"{series.label} (TE {_fmt(te)} ms, TR {_fmt(tr)} ms) is unusable: {'; '.join(usability)}"
            )
        candidates.append(
            {
                "series_key": series.series_key,
                "series_number": series.series_number,
                "description": series.description,
                "echo_time_ms": te,
                "repetition_time_ms": tr,
                "n_files": series.n_files,
                "n_slices": series.n_slices,
                "lossy": series.lossy,
                "accepted": is_accepted,
                "score": _t2_score(series) if is_accepted else None,
                "why": _acceptance(series, min_echo_time_ms, min_repetition_time_ms) if is_accepted else ", ".join(why),
            }
        )
    accepted = [(c, s) for c, s in zip(candidates, inventory.series) if c["accepted"]]
    if not accepted:
        if t2_but_unusable:
            raise PatientInputError("the T2-weighted " + " | ".join(t2_but_unusable))
        found = "; ".join(
            f'#{_fmt(c["series_number"])} "{c["description"]}" TE {_fmt(c["echo_time_ms"])} ms '
            f"TR {_fmt(c['repetition_time_ms'])} ms ({c['why']})"
            for c in candidates
        )
        raise PatientInputError(
            f"no T2-weighted series in the study (need MR, TE >= {min_echo_time_ms:g} ms, "
            f"TR >= {min_repetition_time_ms:g} ms, no diffusion, no contrast); found: {found}"
        )
    # a lossless series is preferred to a lossy one whatever their scores: lossy pixels are a last resort.
    # Between equal scores the later series wins: a sequence is repeated when the first run failed
    # (breathing, motion), so the repeat is the one the radiologist reads.
    best, chosen = max(
        accepted,
        key=lambda pair: (not pair[0]["lossy"], pair[0]["score"], pair[1].series_number or 0, pair[1].series_key),
    )
    others = [
        f'#{_fmt(c["series_number"])} "{c["description"]}" '
        + (
            "a part of the joined series chosen"
            if c["series_key"] in chosen.part_keys
            else c["why"]
            if not c["accepted"]
            else "T2-weighted but lossy-compressed; a lossless series is preferred"
            if c["lossy"] and not best["lossy"]
            else f"T2-weighted but scored {c['score']:g} < {best['score']:g}"
            if c["score"] < best["score"]
            else f"T2-weighted and scored {c['score']:g} too; the later series is preferred (a repeat)"
        )
        for c in candidates
        if c is not best
    ]
    reason = f"{chosen.label}: {best['why']}" + (f"; rejected: {'; '.join(others)}" if others else "")
    return SeriesChoice(series=chosen, t2_score=float(best["score"]), reason=reason, candidates=candidates)


def _acceptance(series: SeriesInfo, min_te: float, min_tr: float) -> str:
    parts = [
        f"TE {_fmt(series.echo_time_ms)} ms >= {min_te:g}",
        f"TR {_fmt(series.repetition_time_ms)} ms >= {min_tr:g}",
    ]
    if kind := _sequence_kind(series):
        parts.append(kind)
    parts.append(f"{series.n_slices} slices")
    if series.part_keys:
        parts.append(f"joined from {len(series.part_keys)} series, one after another along the slice normal")
    if series.n_files == 1 and series.n_slices > 1:
        parts.append("one multi-frame (enhanced) file")
    if series.lossy:
        ratio = f", ratio {series.lossy_ratio:g}" if series.lossy_ratio is not None else ""
        parts.append(f"lossy-compressed ({_syntax_name(series.transfer_syntax)}{ratio}): flagged")
    return ", ".join(parts)


def _syntax_name(uids: str) -> str:
    return ", ".join(pydicom.uid.UID(uid).name for uid in uids.split("\\") if uid) or "unknown transfer syntax"
