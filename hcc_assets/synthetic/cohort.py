"""A deterministic synthetic liver-MRI DICOM cohort with known truth.

Each patient gets one study of three MR series (T1 in-phase, T1 opposed-phase, T2 SPIR) with
CHAOS-like geometry, realistic tags, fake PHI (on purpose, to test de-identification), a
reference liver/spleen mask in the T2 geometry, and a row in labels.csv. All images sample one
phantom (`phantom.py`) in LPS world millimetres, so images, mask and `phantom_labels` agree.

Layout written under `out_dir` (other modules rely on it):
    <patient_key>/study_1/series_<n>/IM_<hex>.dcm
    <patient_key>/study_2/series_<n>/IM_<hex>.dcm   a follow-up study (follow_up_fraction; no mask)
    <patient_key>/reference/liver_spleen_mask.nii.gz
    <patient_key>/.complete        written last, when the patient is whole
    labels.csv                     patient_key,hcc,source; merged with an existing file

Same config, same bytes: every random draw comes from a generator seeded by (seed, patient
index, purpose) and nothing records the time of the run.

`synthesize_cohort(..., layout=...)` writes the same phantoms in the layouts of the study's two
public sources instead, for the importers (`hcc_assets.intake.sources`) to read:

- "chaos" (CHAOS challenge, Train_Sets/MR): all patients healthy; numeric folder ids 1, 2, ...
      <id>/T1DUAL/DICOM_anon/{InPhase,OutPhase}/IMG-<series 4d>-<instance 5d>.dcm
      <id>/T2SPIR/DICOM_anon/IMG-<series 4d>-<instance 5d>.dcm
      <id>/{T1DUAL,T2SPIR}/Ground/<stem of its DICOM slice>.png
  Ground PNGs are 8-bit grey, PNG[row, column] = the DICOM pixel_array[row, column], with the
  CHAOS values liver 63 (lesions included), right kidney 126, left kidney 189, spleen 252. Each
  PNG has the stem of its DICOM slice (T1DUAL: of the in-phase slice), so sorting the PNGs by
  name gives the DICOM file order, as in CHAOS. File names follow InstanceNumber, which is not
  the spatial order (the T2 is acquired interleaved): only positions say where a slice lies.
- "tcia" (TCGA-LIHC as the NBIA Data Retriever saves it): all patients HCC; TCGA-style ids.
      metadata.csv                                (NBIA columns; File Location relative to it)
      TCGA-LIHC/<PatientID>/<MM-DD-YYYY>-<StudyDescription>-<uid5>/
          <SeriesNumber>.000000-<SeriesDescription>-<uid5>/1-<instance 2d>.dcm
  The study has two more series than the drop layout: a diffusion series (DiffusionBValue
  800, TE 60-70 ms, TR > 3000 ms: TE alone cannot reject it) and a post-contrast T1
  (ContrastBolusAgent set).
No labels.csv and no `.complete` marker are written in those layouts: the importers add them.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import functools
import gzip
import io
import logging
import multiprocessing
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import pydantic
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import UID, EnhancedMRImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from scipy import ndimage

from hcc_assets.core.figures import array_png
from hcc_assets.core.files import COMPLETE_MARKER, atomic_write_bytes, publish_folder
from hcc_assets.core.versioning import content_version
from hcc_assets.imaging import geometry
from hcc_assets.intake.dropzone import merge_labels
from hcc_assets.synthetic.enhanced import enhanced_mr_file
from hcc_assets.synthetic.phantom import TISSUE_TO_LABEL, Phantom, Tissue, random_phantom, rotation_matrix
from hcc_assets.synthetic.seg import seg_bytes
from hcc_assets.synthetic.transfer_syntax import (
    DEFAULT_TRANSFER_SYNTAX,
    LOSSY_TRANSFER_SYNTAXES,
    TRANSFER_SYNTAXES,
    encode,
)

log = logging.getLogger(__name__)

LABELS_FILE = "labels.csv"
STUDY_DIR = "study_1"
FOLLOW_UP_STUDY_DIR = "study_2"  # a follow-up study (SynthConfig.follow_up_fraction)
MASK_PATH = Path("reference") / "liver_spleen_mask.nii.gz"
SEG_SERIES_FOLDER = "series_seg"  # `reference="seg"`: the SEG drawn on the T2, in a series folder of its own
MAX_STORED = 4095  # BitsStored 12

Layout = Literal["drop", "chaos", "tcia"]
LAYOUTS: tuple[str, ...] = ("drop", "chaos", "tcia")
# CHAOS Ground PNG grey values.
CHAOS_LIVER, CHAOS_RIGHT_KIDNEY, CHAOS_LEFT_KIDNEY, CHAOS_SPLEEN = 63, 126, 189, 252
TCIA_COLLECTION = "TCGA-LIHC"
TCIA_METADATA = "metadata.csv"


class SynthConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    patients: int = pydantic.Field(40, ge=1)
    seed: int = pydantic.Field(0, ge=0)
    lesion_contrast: float = pydantic.Field(1.0, ge=0.0)  # 0 = null cohort: label without signal
    hcc_fraction: float = pydantic.Field(0.5, ge=0.0, le=1.0)
    matrix: int = pydantic.Field(256, ge=16, le=1024)
    slices_min: int = pydantic.Field(26, ge=2)
    slices_max: int = pydantic.Field(50, ge=2)
    oblique_fraction: float = pydantic.Field(0.3, ge=0.0, le=1.0)
    # how every image file is encoded (transfer_syntax.TRANSFER_SYNTAXES: same pixels and tags in
    # each; or LOSSY_TRANSFER_SYNTAXES)
    transfer_syntax: str = DEFAULT_TRANSFER_SYNTAX
    # each series as one multi-frame Enhanced MR file (enhanced.py) instead of one file per slice
    enhanced: bool = False
    # this fraction of patients (seeded choice) also gets a follow-up study (drop layout): same
    # patient tags, a new StudyInstanceUID, a StudyDate 90-400 days later, its own series
    follow_up_fraction: float = pydantic.Field(0.0, ge=0.0, le=1.0)
    # the lung bases above the diaphragm (phantom.random_phantom); off: soft tissue above the liver
    lungs: bool = False
    # how the drop layout's reference mask is written: reference/liver_spleen_mask.nii.gz, or a DICOM
    # SEG drawn on the T2 series (synthetic/seg.py), as an annotation tool saves it
    reference: Literal["nifti", "seg"] = "nifti"

    @pydantic.field_validator("transfer_syntax")
    @classmethod
    def _known_syntax(cls, value: str) -> str:
        if value not in TRANSFER_SYNTAXES and value not in LOSSY_TRANSFER_SYNTAXES:
            raise ValueError(
                f"transfer_syntax must be one of {', '.join([*TRANSFER_SYNTAXES, *LOSSY_TRANSFER_SYNTAXES])}"
            )
        return value

    @pydantic.model_validator(mode="after")
    def _slice_range(self) -> SynthConfig:
        if self.slices_max < self.slices_min:
            raise ValueError("slices_max must be >= slices_min")
        return self


@dataclass(frozen=True)
class SynthPatient:
    patient_key: str  # the drop-folder name; MRN-like, i.e. fake PHI on purpose
    hcc: bool
    n_lesions: int
    phi: tuple[str, ...]  # every fake PHI string written into this patient's files
    t2_series_dir: Path
    layout: str = "drop"
    layout_id: str = ""  # the patient's folder name in its layout (CHAOS number, TCIA PatientID)
    follow_up_days: int | None = None  # days from the first study to the follow-up (None: no follow-up)


# ---------------------------------------------------------------- seeds and cohort plan

# Purposes of random streams. Seeds are fixed-length lists: SeedSequence pads with zeros, so
# [s, 1] and [s, 1, 0] would otherwise collide.
_KEYS, _HCC, _OBLIQUE, _TCIA_IDS = 1, 2, 3, 4
_ANATOMY, _LESIONS, _ACQUISITION, _IDENTITY, _TEXTURE, _NOISE = 11, 12, 13, 14, 15, 16
_EXTRA_ACQUISITION, _EXTRA_NOISE = 17, 18  # the TCIA layout's extra series (drop bytes unchanged)
_FOLLOW_UPS, _FOLLOW_UP_IDENTITY, _FOLLOW_UP_NOISE = 5, 19, 20  # own streams: the first study's bytes stay


def _cohort_rng(config: SynthConfig, purpose: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, 0, 0, purpose])


def _patient_rng(seed: int, index: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, 1, index, purpose])


@dataclass(frozen=True)
class _Planned:
    index: int
    key: str
    hcc: bool
    oblique: bool
    follow_up: bool = False


def _chosen(config: SynthConfig, purpose: int, fraction: float) -> set[int]:
    """Exactly round(patients * fraction) patient indices, seeded."""
    order = _cohort_rng(config, purpose).permutation(config.patients)
    return set(order[: round(config.patients * fraction)].tolist())


@functools.lru_cache(maxsize=32)
def _plan(config: SynthConfig) -> tuple[_Planned, ...]:
    # Keys depend on seed and index only, so a bigger cohort extends a smaller one.
    key_rng = _cohort_rng(config, _KEYS)
    keys: list[str] = []
    while len(keys) < config.patients:
        key = f"MRN{int(key_rng.integers(0, 10**8)):08d}"
        if key not in keys:
            keys.append(key)
    hcc, oblique = _chosen(config, _HCC, config.hcc_fraction), _chosen(config, _OBLIQUE, config.oblique_fraction)
    follow_ups = _chosen(config, _FOLLOW_UPS, config.follow_up_fraction)
    return tuple(_Planned(i, key, i in hcc, i in oblique, i in follow_ups) for i, key in enumerate(keys))


@functools.lru_cache(maxsize=64)
def _phantom(seed: int, index: int, hcc: bool, lungs: bool = False) -> Phantom:
    lesion_rng = _patient_rng(seed, index, _LESIONS)
    n_lesions = int(lesion_rng.integers(1, 4)) if hcc else 0
    phantom = random_phantom(_patient_rng(seed, index, _ANATOMY), lesion_rng, n_lesions, lungs)
    if hcc and not phantom.lesions:
        raise RuntimeError(f"could not place a lesion for synthetic patient #{index}")
    return phantom


def layout_config(config: SynthConfig, layout: str) -> SynthConfig:
    """The config a layout really uses: CHAOS patients are healthy, TCGA-LIHC patients have HCC.

    Use it with `phantom_labels` / `patient_phantom` for patients of the chaos or tcia layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if layout == "drop":
        return config
    return config.model_copy(update={"hcc_fraction": 0.0 if layout == "chaos" else 1.0})


def _tcia_ids(config: SynthConfig) -> tuple[str, ...]:
    """TCGA-style PatientIDs (TCGA-XX-XXXX), one per patient, seeded like the keys."""
    rng = _cohort_rng(config, _TCIA_IDS)
    ids: list[str] = []
    alphabet = np.array(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    while len(ids) < config.patients:
        chars = "".join(rng.choice(alphabet, 6))
        candidate = f"TCGA-{chars[:2]}-{chars[2:]}"
        if candidate not in ids:
            ids.append(candidate)
    return tuple(ids)


def patient_phantom(config: SynthConfig, patient_key: str) -> Phantom:
    """The phantom behind a synthesized patient (anatomy does not depend on matrix or slices)."""
    for planned in _plan(config):
        if planned.key == patient_key:
            return _phantom(config.seed, planned.index, planned.hcc, config.lungs)
    raise KeyError("patient key is not part of this synthetic cohort")


def phantom_labels(config: SynthConfig, patient_key: str, points_lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Truth at LPS world points (..., 3) in mm for a synthesized patient.

    Returns (labels, lesion_ids): labels 0 background, 1 liver (lesions included), 2 spleen;
    lesion_ids 0 outside lesions, n inside the n-th lesion.
    """
    return patient_phantom(config, patient_key).labels_at(points_lps)


# ---------------------------------------------------------------- acquisition parameters


@dataclass(frozen=True)
class _Sequence:
    number: int
    description: str
    protocol: str
    contrast: str  # key into _SIGNAL
    scanning_sequence: str
    sequence_variant: str
    sequence_name: str
    image_type: tuple[str, ...]
    flip_angle: float
    echo_train: int


_SEQUENCES = (
    _Sequence(
        3,
        "T1_DUAL_IN_PHASE",
        "T1_DUAL_FFE",
        "t1_in",
        "GR",
        "SP",
        "*fl2d1",
        ("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"),
        80.0,
        1,
    ),
    _Sequence(
        4,
        "T1_DUAL_OPP_PHASE",
        "T1_DUAL_FFE",
        "t1_opp",
        "GR",
        "SP",
        "*fl2d1",
        ("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"),
        80.0,
        1,
    ),
    _Sequence(
        5,
        "T2_SPIR",
        "T2_SPIR_TSE",
        "t2",
        "SE",
        "SK",
        "*tse2d1_17",
        ("ORIGINAL", "PRIMARY", "M_SE", "M", "SE"),
        90.0,
        17,
    ),
)
T2_SERIES_NUMBER = 5
# Extra series of the TCIA layout: diffusion (rejected only by its b-value: TE and TR look T2)
# and a post-contrast T1 (rejected by TE and by its contrast agent).
_DWI = _Sequence(
    6, "Ax DWI b800", "DWI_SSEPI", "dwi", "EP", "SK\\SP", "*epse2d1_128", ("ORIGINAL", "PRIMARY", "M", "ND"), 90.0, 1
)
_POST = _Sequence(
    7,
    "Ax T1 3D FS POST",
    "T1_3D_FS_POST",
    "t1_post",
    "GR",
    "SS\\SP",
    "*fl3d1",
    ("ORIGINAL", "PRIMARY", "M", "ND"),
    12.0,
    1,
)
_EXTRA_TAGS: dict[str, dict[str, object]] = {
    "dwi": {"DiffusionBValue": 800.0},
    "t1_post": {"ContrastBolusAgent": "GADOXETATE DISODIUM", "ContrastBolusRoute": "IV"},
}

# Mean signal per tissue (order of phantom.Tissue); LESION rows copy LIVER, the lesion's own
# contrast is applied on top, scaled by lesion_contrast. T2 SPIR suppresses fat.
#          AIR SOFT  FAT LIVER SPLEEN KIDNEY BONE  CSF VESSEL LESION
_SIGNAL = {
    "t1_in": [0, 330, 950, 560, 470, 430, 620, 250, 700, 0],
    "t1_opp": [0, 310, 380, 560, 460, 420, 380, 240, 680, 0],  # liver: set from fat fraction
    "t2": [0, 210, 120, 330, 720, 800, 330, 1500, 60, 0],
    "dwi": [0, 60, 20, 110, 260, 200, 40, 30, 10, 0],  # b 800: restricted diffusion stays bright
    "t1_post": [0, 420, 300, 900, 950, 1100, 300, 150, 1500, 0],  # portal venous, fat-saturated
}
# Relative amplitude of the smooth texture per tissue (lesions: the liver's, under their own).
_TEXTURE_AMPLITUDE = np.array([0, 0.15, 0.06, 0.05, 0.05, 0.08, 0.10, 0.03, 0.10, 0.05], np.float32)
# Internal heterogeneity of lesions at full contrast (relative to the liver signal).
_LESION_HETEROGENEITY = {"t1_in": 0.12, "t1_opp": 0.12, "t2": 0.25, "dwi": 0.2, "t1_post": 0.15}


@dataclass(frozen=True)
class _SeriesAcquisition:
    sequence: _Sequence
    echo_time: float
    repetition_time: float
    slope: float
    intercept: float
    gain: float
    noise_sigma: float
    first_slice: int  # T1 series cover a sub-range of the T2 slice positions
    stop_slice: int
    instance_numbers: tuple[int, ...]  # per spatial slice (ascending along the normal)
    file_names: tuple[str, ...]  # per spatial slice


@dataclass(frozen=True)
class _Acquisition:
    orientation: tuple[float, ...]  # ImageOrientationPatient as written
    first_position: tuple[float, ...]  # ImagePositionPatient of the lowest slice, as written
    pixel_spacing: float
    slice_spacing: float
    slice_thickness: float
    shape_kji: tuple[int, int, int]
    series: tuple[_SeriesAcquisition, ...]

    @property
    def affine_lps(self) -> np.ndarray:
        spacing = [self.pixel_spacing] * 2
        return geometry.affine_lps(self.orientation, self.first_position, spacing, self.slice_spacing)


def _file_names(rng: np.random.Generator, n: int, taken: set[str], orders: list[np.ndarray]) -> tuple[str, ...]:
    """Random IM_<6 hex> names whose sort order matches none of `orders` (when n allows)."""
    while True:
        names = [f"IM_{int(v):06x}.dcm" for v in rng.integers(0, 16**6, n)]
        if len(set(names)) < n or taken.intersection(names):
            continue
        by_name = np.argsort(names)
        if n < 3 or not any(np.array_equal(by_name, order) for order in orders):
            taken.update(names)
            return tuple(names)


def _acquisition(config: SynthConfig, planned: _Planned, phantom: Phantom) -> _Acquisition:
    rng = _patient_rng(config.seed, planned.index, _ACQUISITION)
    n = int(rng.integers(config.slices_min, config.slices_max + 1))
    spacing = round(float(rng.uniform(5.5, 9.0)), 2)
    thickness = round(spacing - float(rng.choice([0.5, 1.0, 1.5])), 2)  # CHAOS-like slice gap
    pixel = round(float(rng.uniform(1.4, 1.9)) * 256 / config.matrix, 4)  # FOV stays 360-480 mm
    rotation = np.eye(3)
    if planned.oblique:
        angles = np.zeros(3)
        axes = rng.choice(3, size=int(rng.integers(1, 3)), replace=False)
        angles[axes] = rng.uniform(5, 20, axes.size) * rng.choice([-1, 1], axes.size)
        rotation = rotation_matrix(angles)
    # Values are rounded to what the DICOM tags carry; render from exactly those.
    orientation = tuple(round(float(v), 6) + 0.0 for v in np.r_[rotation[:, 0], rotation[:, 1]])
    center = phantom.center + np.r_[rng.uniform(-10, 10, 2), rng.uniform(-15, 15)]
    half = np.array([(config.matrix - 1) * pixel, (config.matrix - 1) * pixel, (n - 1) * spacing]) / 2
    normal = geometry.slice_normal(orientation)
    frame = np.stack([np.array(orientation[:3]), np.array(orientation[3:]), normal], axis=1)
    first = tuple(round(float(v), 4) + 0.0 for v in center - frame @ half)

    t1_trim = (int(rng.integers(0, 3)), int(rng.integers(0, 3))) if n >= 8 else (0, 0)
    tr_t1 = round(float(rng.uniform(150, 200)), 1)
    spatial = np.arange(n)
    interleaved = np.r_[spatial[0::2], spatial[1::2]]  # acquisition order of T2 slices
    if rng.random() < 0.5:
        interleaved = interleaved[::-1]
    taken: set[str] = set()
    series = []
    for sequence in _SEQUENCES:
        lo, hi = (0, n) if sequence.contrast == "t2" else (t1_trim[0], n - t1_trim[1])
        count = hi - lo
        if sequence.contrast == "t2":
            acquisition_order = interleaved
            echo, repetition = float(rng.integers(70, 101)), float(rng.integers(1500, 2001))
        else:  # in-phase numbered head to feet, opposed-phase feet to head
            acquisition_order = np.arange(count)[::-1] if sequence.contrast == "t1_in" else np.arange(count)
            echo, repetition = (4.6 if sequence.contrast == "t1_in" else 2.3), tr_t1
        instances = np.empty(count, int)
        instances[acquisition_order] = np.arange(1, count + 1)
        names = _file_names(rng, count, taken, [np.arange(count), np.argsort(instances)])
        series.append(
            _drawn_series(
                rng,
                sequence,
                echo,
                repetition,
                (9, 16),
                (lo, hi),
                tuple(int(v) for v in instances),
                names,
            )
        )
    return _Acquisition(orientation, first, pixel, spacing, thickness, (n, config.matrix, config.matrix), tuple(series))


def _drawn_series(
    rng: np.random.Generator,
    sequence: _Sequence,
    echo: float,
    repetition: float,
    noise_range: tuple[float, float],
    slices: tuple[int, int],
    instance_numbers: tuple[int, ...],
    file_names: tuple[str, ...],
) -> _SeriesAcquisition:
    """A series' scanner gain, rescale slope/intercept and noise, drawn from `rng` in this order."""
    gain = float(rng.uniform(0.85, 1.15))
    slope = round(float(rng.uniform(1.5, 2.5)), 4)
    intercept = round(float(rng.uniform(-100, 0)), 2)
    return _SeriesAcquisition(
        sequence=sequence,
        echo_time=echo,
        repetition_time=repetition,
        slope=slope,
        intercept=intercept,
        gain=gain,
        noise_sigma=gain * float(rng.uniform(*noise_range)),
        first_slice=slices[0],
        stop_slice=slices[1],
        instance_numbers=instance_numbers,
        file_names=file_names,
    )


def _extra_series(config: SynthConfig, planned: _Planned, acquisition: _Acquisition) -> tuple[_SeriesAcquisition, ...]:
    """The TCIA layout's DWI and post-contrast series on the T2 grid (own random stream)."""
    rng = _patient_rng(config.seed, planned.index, _EXTRA_ACQUISITION)
    n = acquisition.shape_kji[0]
    series = []
    for sequence in (_DWI, _POST):
        if sequence is _DWI:
            echo, repetition = float(rng.integers(60, 71)), float(rng.integers(3500, 6001))
        else:
            echo, repetition = round(float(rng.uniform(1.8, 2.4)), 2), round(float(rng.uniform(3.8, 4.6)), 2)
        instances = tuple(range(n, 0, -1))  # numbered head to feet
        series.append(_drawn_series(rng, sequence, echo, repetition, (4, 8), (0, n), instances, ("",) * n))
    return tuple(series)


# ---------------------------------------------------------------- fake identity (PHI)

_SYLLABLES = (
    "ZOR",
    "VAX",
    "QUI",
    "MEL",
    "THAR",
    "DRU",
    "XEN",
    "PAL",
    "KYR",
    "BEL",
    "OST",
    "VIR",
    "NAK",
    "LUM",
    "FEN",
    "GRAV",
    "SYL",
    "MOR",
)
_INSTITUTIONS = ("SAINT SYNTHETIC HOSPITAL", "PHANTOM VALLEY CLINIC", "FICTIVIA MERCY MEDICAL CENTRE")


@dataclass(frozen=True)
class _Identity:
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    other_patient_id: str
    address: str
    institution: str
    referring_physician: str
    accession: str
    study_date: str
    study_time: str

    @property
    def phi(self) -> tuple[str, ...]:
        names = [part for name in (self.patient_name, self.referring_physician) for part in name.split("^")]
        values = (
            self.patient_id,
            self.patient_name,
            *names,
            self.birth_date,
            self.other_patient_id,
            self.address,
            self.institution,
            self.referring_physician,
            self.accession,
            self.study_date,
            self.study_time,
        )
        return tuple(dict.fromkeys(values))  # a name part may repeat; keep each string once


def _identity(config: SynthConfig, planned: _Planned) -> _Identity:
    rng = _patient_rng(config.seed, planned.index, _IDENTITY)

    def word(syllables: int) -> str:  # nonsense names: never a real word, easy to grep
        return "".join(rng.choice(_SYLLABLES, syllables))

    def day(first_year: int, last_year: int) -> str:
        start = dt.date(first_year, 1, 1)
        span = (dt.date(last_year, 12, 31) - start).days
        return (start + dt.timedelta(days=int(rng.integers(0, span + 1)))).strftime("%Y%m%d")

    seconds = int(rng.integers(7 * 3600, 18 * 3600))
    return _Identity(
        patient_name=f"{word(3)}^{word(3)}",
        patient_id=planned.key,
        birth_date=day(1930, 1979),
        sex=str(rng.choice(["F", "M"])),
        other_patient_id=f"ALT{int(rng.integers(10**7, 10**8))}",
        address=f"{int(rng.integers(10, 999))} {word(2)} STREET, {word(2)}BURG",
        institution=str(rng.choice(_INSTITUTIONS)),
        referring_physician=f"{word(3)}^{word(2)}",
        accession=f"ACC{int(rng.integers(10**6, 10**7))}",
        study_date=day(2008, 2016),
        # Fractional seconds: a bare HHMMSS would turn up by chance inside printed numbers.
        study_time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}.{int(rng.integers(0, 1000)):03d}",
    )


@dataclass(frozen=True)
class _FollowUp:
    identity: _Identity  # the same patient tags; another date, time and accession number
    days: int


def _follow_up_identity(config: SynthConfig, planned: _Planned, first: _Identity) -> _FollowUp:
    """The follow-up study's identity: the first study's patient, 90-400 days later."""
    rng = _patient_rng(config.seed, planned.index, _FOLLOW_UP_IDENTITY)
    days = int(rng.integers(90, 401))
    date = (dt.datetime.strptime(first.study_date, "%Y%m%d") + dt.timedelta(days=days)).strftime("%Y%m%d")
    seconds = int(rng.integers(7 * 3600, 18 * 3600))
    time = f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}.{int(rng.integers(0, 1000)):03d}"
    accession = f"ACC{int(rng.integers(10**6, 10**7))}"
    return _FollowUp(dataclasses.replace(first, study_date=date, study_time=time, accession=accession), days)


# ---------------------------------------------------------------- image synthesis


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return ((field - field.mean()) / field.std()).astype(np.float32)


def _interpolation_matrix(n: int, m: int) -> np.ndarray:
    """(n, m) linear interpolation from m samples spread evenly over n positions."""
    matrix = np.zeros((n, m), np.float32)
    t = np.linspace(0, m - 1, n)
    lo = np.minimum(np.floor(t).astype(int), m - 2) if m > 1 else np.zeros(n, int)
    w = (t - lo).astype(np.float32) if m > 1 else np.zeros(n, np.float32)
    matrix[np.arange(n), lo] = 1 - w
    if m > 1:
        matrix[np.arange(n), lo + 1] += w
    return matrix


def _texture(
    rng: np.random.Generator, phantom: Phantom, affine: np.ndarray, shape_kji: tuple[int, int, int]
) -> np.ndarray:
    """Smooth tissue texture (unit sd) from a random field on a 12 mm world grid.

    The field is sampled in world space on a coarse in-plane subset of voxels (trilinear), then
    spread to every voxel with two small interpolation matrix products: cheap, and smooth at
    the ~20 mm scale that matters.
    """
    grid_mm, half = 12.0, np.array([300.0, 300.0, 420.0])
    field = _smooth_noise(rng, tuple((2 * half / grid_mm).astype(int) + 1), 1.0)
    field_origin = phantom.center - half
    nk, nj, ni = shape_kji
    m = [max(2, int(np.ceil((n - 1) * np.linalg.norm(affine[:3, a]) / 6.0)) + 1) for n, a in ((nj, 1), (ni, 0))]
    mj, mi = min(m[0], nj), min(m[1], ni)
    fj, fi = (nj - 1) / max(mj - 1, 1), (ni - 1) / max(mi - 1, 1)
    to_field = np.stack([affine[:3, 2], fj * affine[:3, 1], fi * affine[:3, 0]], axis=1) / grid_mm
    coarse = ndimage.affine_transform(
        field,
        to_field,
        offset=(affine[:3, 3] - field_origin) / grid_mm,
        output_shape=(nk, mj, mi),
        order=1,
        mode="nearest",
    )
    spread = np.einsum(
        "ja,kab,ib->kji", _interpolation_matrix(nj, mj), coarse, _interpolation_matrix(ni, mi), optimize=True
    )  # BLAS; stacked @ is not
    return np.ascontiguousarray(spread)


def _bias(
    rng: np.random.Generator, phantom: Phantom, affine: np.ndarray, shape_kji: tuple[int, int, int]
) -> np.ndarray:
    """Smooth multiplicative coil shading exp(beta.d + gamma |d|^2), d = (p - c) / 200 mm.

    It is separable in the grid's own orthonormal frame, so it costs three 1-D arrays.
    """
    center = phantom.center + rng.normal(0, 30, 3)
    beta, gamma = rng.normal(0, 0.15, 3), float(rng.uniform(-0.2, 0.0))
    steps = np.linalg.norm(affine[:3, :3], axis=0)
    frame = affine[:3, :3] / steps
    offset, slope = frame.T @ (affine[:3, 3] - center), frame.T @ beta
    factors = []
    for axis, n in zip((2, 1, 0), shape_kji):  # k, j, i
        d = (offset[axis] + np.arange(n) * steps[axis]) / 200.0
        factors.append(np.exp(slope[axis] * d + gamma * d * d).astype(np.float32))
    return factors[0][:, None, None] * factors[1][None, :, None] * factors[2][None, None, :]


@dataclass(frozen=True)
class _Lesion:
    voxels: np.ndarray  # flat indices into the T2 grid
    field: np.ndarray  # heterogeneity at those voxels, unit sd
    t2_ratio: float  # lesion / liver T2 signal at full contrast


def _lesions(rng: np.random.Generator, phantom: Phantom, lesion_id: np.ndarray, affine: np.ndarray) -> list[_Lesion]:
    lesions = []
    for number, blob in enumerate(phantom.lesions, start=1):
        field_mm, half = 3.0, blob.radius + 6.0
        field = _smooth_noise(rng, (int(2 * half / field_mm) + 2,) * 3, 1.0)
        voxels = np.flatnonzero(lesion_id == number)
        kji = np.stack(np.unravel_index(voxels, lesion_id.shape))
        world = affine[:3, :3] @ kji[::-1] + affine[:3, 3:4]
        at = ndimage.map_coordinates(field, (world - (blob.center - half)[:, None]) / field_mm, order=1, mode="nearest")
        lesions.append(_Lesion(voxels, at.astype(np.float32), float(rng.uniform(1.5, 2.0))))
    return lesions


def _tissue_means(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-patient tissue signal: each tissue jittered, liver opposed-phase from its fat."""
    jitter = np.exp(rng.normal(0, 0.06, len(Tissue)))
    fat_fraction = float(rng.uniform(0.05, 0.30))  # NAFLD: steatotic liver drops out of phase
    means = {name: np.array(values, float) * jitter for name, values in _SIGNAL.items()}
    means["t1_opp"][Tissue.LIVER] = means["t1_in"][Tissue.LIVER] * (1 - 2 * fat_fraction)
    for values in means.values():
        values[Tissue.LESION] = values[Tissue.LIVER]
    return means


def _lesion_ratio(contrast: str, means: dict[str, np.ndarray], lesion: _Lesion) -> float:
    """Lesion / liver signal at full contrast: HCC is T1-hypo, fat-free, T2-hyper."""
    liver_in = means["t1_in"][Tissue.LIVER]
    target = {
        "t1_in": 0.8 * liver_in,
        "t1_opp": 0.78 * liver_in,
        "t2": lesion.t2_ratio * means["t2"][Tissue.LIVER],
        "dwi": 2.0 * means["dwi"][Tissue.LIVER],  # HCC restricts diffusion
        "t1_post": 0.7 * means["t1_post"][Tissue.LIVER],
    }[contrast]  # portal-venous washout
    return float(target / means[contrast][Tissue.LIVER])


def _render(
    series: _SeriesAcquisition,
    tissue: np.ndarray,
    structure: np.ndarray,
    means: dict[str, np.ndarray],
    lesions: list[_Lesion],
    lesion_contrast: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Intended intensities of one series on the T2 grid (float32)."""
    contrast = series.sequence.contrast
    image = (means[contrast] * series.gain).astype(np.float32)[tissue]
    image *= structure
    flat = image.reshape(-1)
    for lesion in lesions:
        # Relative to the liver value at the same voxel: contrast 0 leaves the liver untouched.
        change = _lesion_ratio(contrast, means, lesion) - 1 + _LESION_HETEROGENEITY[contrast] * lesion.field
        flat[lesion.voxels] *= 1 + np.float32(lesion_contrast) * change
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(series.noise_sigma)
    return np.abs(image, out=image)  # magnitude image: background noise is rectified (Rician-like)


def _stored(image: np.ndarray, series: _SeriesAcquisition) -> np.ndarray:
    stored = np.rint((image - series.intercept) / series.slope)
    return np.clip(stored, 0, MAX_STORED).astype("<u2")


# ---------------------------------------------------------------- writing


def _ds(value: float, decimals: int = 4) -> str:
    return np.format_float_positional(round(value, decimals) + 0.0, trim="-")


def _config_digest(config: SynthConfig) -> str:
    # `enhanced` changes how the acquisition is stored, not the acquisition: same UIDs either way;
    # follow-ups add a study and leave the first one's UIDs (and bytes) as they were
    # the reference's format changes how the mask is stored, not the images: same UIDs either way
    return content_version(config.model_dump_json(exclude={"enhanced", "follow_up_fraction", "reference"}))


def _series_template(
    identity: _Identity,
    acquisition: _Acquisition,
    series: _SeriesAcquisition,
    uids: dict[str, str],
    window: tuple[float, float],
    extra: dict[str, object] | None = None,
) -> dict[int, bytes]:
    """Encoded data elements shared by every slice of a series, keyed by tag."""
    sequence = series.sequence
    template = Dataset()
    values = dict(
        SpecificCharacterSet="ISO_IR 100",
        ImageType=list(sequence.image_type),
        SOPClassUID=MRImageStorage,
        StudyDate=identity.study_date,
        SeriesDate=identity.study_date,
        AcquisitionDate=identity.study_date,
        ContentDate=identity.study_date,
        StudyTime=identity.study_time,
        AccessionNumber=identity.accession,
        Modality="MR",
        Manufacturer="Philips",
        InstitutionName=identity.institution,
        ReferringPhysicianName=identity.referring_physician,
        StudyDescription="MR ABDOMEN LIVER",
        SeriesDescription=sequence.description,
        ManufacturerModelName="Achieva",
        PatientName=identity.patient_name,
        PatientID=identity.patient_id,
        PatientBirthDate=identity.birth_date,
        PatientSex=identity.sex,
        OtherPatientIDs=identity.other_patient_id,
        PatientAddress=identity.address,
        BodyPartExamined="ABDOMEN",
        ScanningSequence=sequence.scanning_sequence,
        SequenceVariant=sequence.sequence_variant,
        MRAcquisitionType="2D",
        SequenceName=sequence.sequence_name,
        SliceThickness=_ds(acquisition.slice_thickness),
        RepetitionTime=_ds(series.repetition_time),
        EchoTime=_ds(series.echo_time),
        ImagingFrequency="63.89",
        MagneticFieldStrength="1.5",
        SpacingBetweenSlices=_ds(acquisition.slice_spacing),
        EchoTrainLength=sequence.echo_train,
        FlipAngle=_ds(sequence.flip_angle),
        ProtocolName=sequence.protocol,
        PatientPosition="HFS",
        StudyInstanceUID=uids["study"],
        SeriesInstanceUID=uids[f"series{sequence.number}"],
        StudyID="1",
        SeriesNumber=sequence.number,
        AcquisitionNumber=1,
        FrameOfReferenceUID=uids["frame"],
        PositionReferenceIndicator="",
        ImageOrientationPatient=[_ds(v, 6) for v in acquisition.orientation],
        SamplesPerPixel=1,
        PhotometricInterpretation="MONOCHROME2",
        Rows=acquisition.shape_kji[1],
        Columns=acquisition.shape_kji[2],
        PixelSpacing=[_ds(acquisition.pixel_spacing)] * 2,
        BitsAllocated=16,
        BitsStored=12,
        HighBit=11,
        PixelRepresentation=0,
        WindowCenter=_ds(window[0], 0),
        WindowWidth=_ds(window[1], 0),
        RescaleIntercept=_ds(series.intercept, 2),
        RescaleSlope=_ds(series.slope),
        RescaleType="US",
    )
    values.update(extra or {})
    for keyword, value in values.items():
        setattr(template, keyword, value)
    return _encoded(template)


def _encoded(dataset: Dataset) -> dict[int, bytes]:
    """Each element of `dataset` encoded alone (Explicit VR Little Endian), keyed by tag.

    Encoding the shared elements once per series and only five per slice makes writing about
    four times faster than a dcmwrite per file; the bytes are the same.
    """
    encoded: dict[int, bytes] = {}
    for element in dataset:
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_data_element(buffer, element)
        encoded[element.tag] = buffer.getvalue()
    return encoded


def _dicom_bytes(
    template: dict[int, bytes],
    sop_uid: UID,
    instance: int,
    position: np.ndarray,
    slice_location: float,
    pixels: np.ndarray,
) -> bytes:
    """A Part-10 file: preamble, file meta, then the elements in ascending tag order."""
    own = Dataset()
    own.SOPInstanceUID = sop_uid
    own.InstanceNumber = instance
    own.ImagePositionPatient = [_ds(v) for v in position]
    own.SliceLocation = _ds(slice_location)
    own.add_new(0x7FE00010, "OW", pixels.tobytes())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    write_file_meta_info(header, meta, enforce_standard=True)
    elements = {**template, **_encoded(own)}
    return b"".join([bytes(128), b"DICM", header.getvalue(), *(elements[tag] for tag in sorted(elements))])


def _mask_bytes(labels_kji: np.ndarray, acquisition: _Acquisition) -> bytes:
    affine = geometry.affine_ras(
        acquisition.orientation, acquisition.first_position, [acquisition.pixel_spacing] * 2, acquisition.slice_spacing
    )
    image = nib.Nifti1Image(np.ascontiguousarray(labels_kji.transpose(2, 1, 0)), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def _merge_synthetic_labels(out_dir: Path, rows: dict[str, int]) -> None:
    merge_labels(out_dir, LABELS_FILE, {key: (hcc, "synthetic") for key, hcc in rows.items()})


def _chaos_ground(tissue: np.ndarray, phantom: Phantom, affine: np.ndarray) -> np.ndarray:
    """CHAOS grey values (k, row, column) on the T2 grid; kidneys split by the body midline."""
    grey = np.zeros(tissue.shape, np.uint8)
    grey[(tissue == Tissue.LIVER) | (tissue == Tissue.LESION)] = CHAOS_LIVER
    grey[tissue == Tissue.SPLEEN] = CHAOS_SPLEEN
    kidney = np.nonzero(tissue == Tissue.KIDNEY)
    if kidney[0].size:
        k, j, i = kidney
        x = affine[0, 0] * i + affine[0, 1] * j + affine[0, 2] * k + affine[0, 3]  # LPS x: + is left
        grey[kidney] = np.where(x < phantom.center[0], CHAOS_RIGHT_KIDNEY, CHAOS_LEFT_KIDNEY)
    return grey


def _nbia_date(yyyymmdd: str) -> str:
    return f"{yyyymmdd[4:6]}-{yyyymmdd[6:8]}-{yyyymmdd[:4]}"


def _series_folder(layout: str, series: _SeriesAcquisition, uids: dict[str, str]) -> Path:
    sequence = series.sequence
    if layout == "drop":
        return Path(STUDY_DIR) / f"series_{sequence.number}"
    if layout == "chaos":
        return {
            "t1_in": Path("T1DUAL/DICOM_anon/InPhase"),
            "t1_opp": Path("T1DUAL/DICOM_anon/OutPhase"),
            "t2": Path("T2SPIR/DICOM_anon"),
        }[sequence.contrast]
    uid5 = uids[f"series{sequence.number}"][-5:]
    return Path(f"{sequence.number}.000000-{sequence.description}-{uid5}")


def _file_name(layout: str, series: _SeriesAcquisition, row: int) -> str:
    instance = series.instance_numbers[row]
    if layout == "drop":
        return series.file_names[row]
    if layout == "chaos":
        return f"IMG-{series.sequence.number:04d}-{instance:05d}.dcm"
    return f"1-{instance:02d}.dcm"


def _synthesize_patient(
    out_dir: Path, config: SynthConfig, planned: _Planned, layout: str = "drop", merge_label: bool = True
) -> tuple[SynthPatient, list[dict[str, str]]]:
    """Write one patient in `layout`; returns it and (tcia) its metadata.csv rows. `merge_label`
    False: the caller has put the patient's labels.csv row in already (parallel writers)."""
    phantom = _phantom(config.seed, planned.index, planned.hcc, config.lungs)
    acquisition = _acquisition(config, planned, phantom)
    identity = _identity(config, planned)
    layout_id = {"drop": planned.key, "chaos": str(planned.index + 1)}.get(layout) or _tcia_ids(config)[planned.index]
    if layout == "tcia":
        identity = dataclasses.replace(identity, patient_id=layout_id)
    affine = acquisition.affine_lps
    tissue, lesion_id = phantom.tissue_on_grid(affine, acquisition.shape_kji)

    texture_rng = _patient_rng(config.seed, planned.index, _TEXTURE)
    means = _tissue_means(texture_rng)
    structure = _texture(texture_rng, phantom, affine, acquisition.shape_kji)
    structure *= _TEXTURE_AMPLITUDE[tissue]
    structure += 1
    structure *= _bias(texture_rng, phantom, affine, acquisition.shape_kji)
    lesions = _lesions(texture_rng, phantom, lesion_id, affine)
    noise_rng = _patient_rng(config.seed, planned.index, _NOISE)

    digest = _config_digest(config)

    def uid(*parts: str) -> UID:
        return generate_uid(entropy_srcs=[digest, planned.key, *parts])

    all_series = acquisition.series + (_extra_series(config, planned, acquisition) if layout == "tcia" else ())
    uids: dict[str, str] = {"study": uid("study"), "frame": uid("frame")}
    uids.update({f"series{s.sequence.number}": uid("series", str(s.sequence.number)) for s in all_series})

    parent = out_dir / TCIA_COLLECTION if layout == "tcia" else out_dir
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / layout_id
    # built under the hidden name .<id>.partial (the folder sensor skips it), renamed into place whole
    with publish_folder(final, marker=COMPLETE_MARKER if layout == "drop" else None) as staging:
        study_folder = (
            Path(f"{_nbia_date(identity.study_date)}-MR ABDOMEN LIVER-{uids['study'][-5:]}")
            if layout == "tcia"
            else Path()
        )
        normal = geometry.slice_normal(acquisition.orientation)
        metadata, t2_dir, file_stems = [], Path(), {}
        extra_noise_rng = _patient_rng(config.seed, planned.index, _EXTRA_NOISE)

        def write_series(
            series: _SeriesAcquisition,
            study: _Identity,
            study_uids: dict[str, str],
            rng: np.random.Generator,
            relative: Path,
            tag: tuple[str, ...] = (),
        ) -> tuple[list[str], int]:
            """Render and write one series of one study; (file names, bytes). `tag` sets a
            follow-up study's SOP UIDs apart (empty for the first study: its UIDs as they were)."""
            image = _render(series, tissue, structure, means, lesions, config.lesion_contrast, rng)
            stored = _stored(image[series.first_slice : series.stop_slice], series)
            body = image[tissue > 0]
            window = (float(np.percentile(body[::17], 50)), float(np.percentile(body[::17], 99)) * 1.2)
            template = _series_template(
                study, acquisition, series, study_uids, window, _EXTRA_TAGS.get(series.sequence.contrast)
            )
            series_dir = staging / relative
            series_dir.mkdir(parents=True)
            names, size = [], 0
            classic = []
            for row, k in enumerate(range(series.first_slice, series.stop_slice)):
                position = affine[:3, 3] + k * affine[:3, 2]
                data = _dicom_bytes(
                    template,
                    uid(*tag, str(series.sequence.number), str(k)),
                    series.instance_numbers[row],
                    position,
                    float(position @ normal),
                    stored[row],
                )
                if config.enhanced:
                    classic.append(data)
                    continue
                data = encode(data, config.transfer_syntax)
                names.append(_file_name(layout, series, row))
                (series_dir / names[-1]).write_bytes(data)
                size += len(data)
            if config.enhanced:
                number = str(series.sequence.number)
                data = encode(
                    enhanced_mr_file(classic, uid(*tag, number, "enhanced"), uid(*tag, number, "dimensions")),
                    config.transfer_syntax,
                )
                names.append(_file_name(layout, series, 0))
                (series_dir / names[-1]).write_bytes(data)
                size += len(data)
            return names, size

        for series in all_series:
            rng = extra_noise_rng if series.sequence.contrast in ("dwi", "t1_post") else noise_rng
            relative = study_folder / _series_folder(layout, series, uids)
            names, size = write_series(series, identity, uids, rng, relative)
            file_stems[series.sequence.contrast] = [Path(name).stem for name in names]
            if series.sequence.number == T2_SERIES_NUMBER:
                t2_dir = relative
            if layout == "tcia":
                metadata.append(
                    {
                        "Series UID": uids[f"series{series.sequence.number}"],
                        "Collection": TCIA_COLLECTION,
                        "3rd Party Analysis": "NO",
                        "Data Description URI": "",
                        "Subject ID": layout_id,
                        "Study UID": uids["study"],
                        "Study Description": "MR ABDOMEN LIVER",
                        "Study Date": _nbia_date(identity.study_date).replace("-", "/"),
                        "Series Description": series.sequence.description,
                        "Manufacturer": "Philips",
                        "Modality": "MR",
                        "SOP Class Name": "Enhanced MR Image Storage" if config.enhanced else "MR Image Storage",
                        "SOP Class UID": EnhancedMRImageStorage if config.enhanced else MRImageStorage,
                        "Number of Images": str(len(names)),
                        "File Size": f"{size / 1e6:.2f} MB",
                        "File Location": "./" + (Path(TCIA_COLLECTION) / layout_id / relative).as_posix(),
                        "Download Timestamp": "",
                    }
                )
        if layout == "drop" and planned.follow_up:
            follow_up = _follow_up_identity(config, planned, identity)
            fu_uids: dict[str, str] = {"study": uid("follow-up", "study"), "frame": uid("follow-up", "frame")}
            fu_uids.update(
                {f"series{s.sequence.number}": uid("follow-up", "series", str(s.sequence.number)) for s in all_series}
            )
            fu_rng = _patient_rng(config.seed, planned.index, _FOLLOW_UP_NOISE)  # new noise, same anatomy
            for series in all_series:
                relative = Path(FOLLOW_UP_STUDY_DIR) / f"series_{series.sequence.number}"
                write_series(series, follow_up.identity, fu_uids, fu_rng, relative, ("follow-up",))
        if layout == "drop" and config.reference == "seg":
            seg_dir = staging / t2_dir.parent / SEG_SERIES_FOLDER  # beside the T2, in its study
            seg_dir.mkdir(parents=True)
            labels = np.ascontiguousarray(TISSUE_TO_LABEL[tissue].transpose(2, 1, 0))  # (i, j, k): the volume's
            seg = seg_bytes(staging / t2_dir, labels, series_uid=uid("seg", "series"), sop_uid=uid("seg", "instance"))
            (seg_dir / "seg.dcm").write_bytes(seg)
        elif layout == "drop":
            (staging / MASK_PATH.parent).mkdir()
            (staging / MASK_PATH).write_bytes(_mask_bytes(TISSUE_TO_LABEL[tissue], acquisition))
        elif layout == "chaos":
            grey = _chaos_ground(tissue, phantom, affine)
            for folder, contrast in (("T2SPIR", "t2"), ("T1DUAL", "t1_in")):
                series = next(s for s in acquisition.series if s.sequence.contrast == contrast)
                (staging / folder / "Ground").mkdir(parents=True)
                for row, k in enumerate(range(series.first_slice, series.stop_slice)):
                    (staging / folder / "Ground" / f"{file_stems[contrast][row]}.png").write_bytes(array_png(grey[k]))
        if layout == "drop" and merge_label:
            _merge_synthetic_labels(out_dir, {planned.key: int(planned.hcc)})  # the label is there before the folder
    follow_up_phi: tuple[str, ...] = ()
    follow_up_days: int | None = None
    if layout == "drop" and planned.follow_up:
        follow_up_phi, follow_up_days = follow_up.identity.phi, follow_up.days
    patient = SynthPatient(
        patient_key=planned.key,
        hcc=planned.hcc,
        n_lesions=len(phantom.lesions),
        phi=tuple(dict.fromkeys(identity.phi + follow_up_phi)),
        t2_series_dir=final / t2_dir,
        layout=layout,
        layout_id=layout_id,
        follow_up_days=follow_up_days,
    )
    return patient, metadata


def _merge_metadata(out_dir: Path, rows: list[dict[str, str]]) -> None:
    """NBIA-style metadata.csv keyed by Series UID; rows given here replace existing ones."""
    if not rows:
        return
    path = out_dir / TCIA_METADATA
    merged: dict[str, dict[str, str]] = {}
    if path.exists():
        with path.open(newline="") as handle:
            merged = {row["Series UID"]: row for row in csv.DictReader(handle)}
    merged.update({row["Series UID"]: row for row in rows})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(sorted(merged.values(), key=lambda r: (r["File Location"], r["Series UID"])))
    atomic_write_bytes(path, buffer.getvalue().encode())


def synthesize_cohort(
    out_dir: Path, config: SynthConfig, layout: Layout = "drop", workers: int = 1
) -> list[SynthPatient]:
    """Write the synthetic cohort under `out_dir` (see module docstring) and describe it.

    `workers` > 1 writes patients in that many processes at once; each patient draws from its own
    seeded generators, so the files are the same bytes as with one.

    A patient folder that already exists is replaced as a whole; other content of `out_dir`
    is left alone except for labels.csv (drop) or metadata.csv (tcia), which gain (or update)
    this cohort's rows. The chaos and tcia layouts use `layout_config(config, layout)`: every
    CHAOS patient is healthy and every TCGA-LIHC patient has HCC, whatever `hcc_fraction` says.
    """
    if config.enhanced and layout == "chaos":
        raise ValueError("the CHAOS layout has one Ground PNG per slice file: it cannot be written as Enhanced MR")
    if config.follow_up_fraction and layout != "drop":
        raise ValueError("follow-up studies are written in the drop layout only")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = layout_config(config, layout)
    plan = _plan(config)
    results: Iterable[tuple[SynthPatient, list[dict[str, str]]]]
    if workers > 1 and len(plan) > 1:
        # labels.csv is read, changed and rewritten: processes merging their own rows at once would
        # lose each other's. All rows go in here first, so each label is still there before its folder.
        if layout == "drop":
            _merge_synthetic_labels(out_dir, {planned.key: int(planned.hcc) for planned in plan})
        context = multiprocessing.get_context("spawn")  # the caller may hold threads: never fork
        with ProcessPoolExecutor(max_workers=min(workers, len(plan)), mp_context=context) as pool:
            results = list(
                pool.map(_synthesize_patient, repeat(out_dir), repeat(config), plan, repeat(layout), repeat(False))
            )
    else:
        results = (_synthesize_patient(out_dir, config, planned, layout) for planned in plan)
    patients, metadata = [], []
    for number, (planned, (patient, rows)) in enumerate(zip(plan, results), start=1):
        patients.append(patient)
        metadata.extend(rows)
        log.info(
            "synthetic patient %d/%d written (%s, %s layout)",
            number,
            len(plan),
            "hcc" if planned.hcc else "healthy",
            layout,
        )
    _merge_metadata(out_dir, metadata)
    return patients
