"""Importers for the study's two public sources: CHAOS (healthy) and TCGA-LIHC from TCIA (HCC).

Both turn a download into the drop layout that the platform ingests (see `dropzone.py`):

    <incoming>/<key>/study_<k>/<series folder>/*.dcm
    <incoming>/<key>/reference/liver_spleen_mask.nii.gz     (CHAOS only: the Ground truth)
    <incoming>/<key>/.import_source                         digest of what was imported
    <incoming>/<key>/.complete                              present as soon as the folder is
    <incoming>/labels_chaos.csv, labels_tcga.csv            patient_key,hcc,source

Each patient is built in a hidden folder `<incoming>/.import-<key>.partial`, then renamed into
place whole, marker included: the folder sensor never sees half a patient, and a patient that
fails leaves nothing behind. Re-running skips patients whose source did not change (same file
names, sizes and modification times), so it is idempotent.

CHAOS (`Train_Sets/MR/<id>/...`):
  - T2SPIR/DICOM_anon -> study_1/T2SPIR; T1DUAL/DICOM_anon/{InPhase,OutPhase} ->
    study_1/T1DUAL_InPhase, study_1/T1DUAL_OutPhase (one study_1/T1DUAL folder when both
    phases carry the same SeriesInstanceUID, as one dual-echo series).
  - T2SPIR/Ground/*.png -> reference/liver_spleen_mask.nii.gz (uint8: liver 1, spleen 2,
    kidneys and background 0) on exactly the grid `nifti.series_to_nifti` gives the T2 series.
    Grey values: liver 55-70, right kidney 110-135, left kidney 175-200, spleen 240-255,
    background 0; anything else is an error. A PNG belongs to the DICOM slice with the same
    file stem; when the stems do not match, to the DICOM file of the same rank in name order
    (CHAOS: "the PNGs are in the same order as the DICOM files"). Each PNG is then placed
    by the ImagePositionPatient of its DICOM slice, never by its own name. PNG[row, column]
    covers DICOM pixel_array[row, column].
  - key `CHAOS-<id>`; label hcc 0, source CHAOS.

TCGA-LIHC (NBIA Data Retriever: `<PatientID>/<date-StudyDescription-uid>/<SeriesNumber-
SeriesDescription-uid>/*.dcm`, with an optional metadata.csv whose `File Location` points at
the series folders):
  - every series is kept, as study_<k>/series_<SeriesNumber> (studies ordered by StudyDate
    and UID): the drop folder names carry no dates or descriptions;
  - the study must contain a T2-weighted series by its tags (`choose_t2_series`), which is
    reported; the choice itself stays with the `raw_scan` asset;
  - key = the PatientID folder name (pseudonymized by the platform); label hcc 1, source
    TCGA-LIHC.

Messages name patients by their public challenge number (CHAOS) or TCGA barcode, and by their
position otherwise; never by a path, a date or another identifier.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pydicom

from hcc_assets.core.errors import PatientInputError
from hcc_assets.core.files import COMPLETE_MARKER, publish_folder
from hcc_assets.imaging.dicom_series import (
    GeometryProblem,
    SliceGeometry,
    choose_t2_series,
    inventory_study,
    order_slices,
)
from hcc_assets.imaging.geometry import affine_ras
from hcc_assets.imaging.nifti import make_nifti
from hcc_assets.intake.dropzone import merge_labels

log = logging.getLogger(__name__)

IMPORTER_VERSION = "1"
SOURCE_MARKER = ".import_source"
MASK_PATH = Path("reference") / "liver_spleen_mask.nii.gz"
CHAOS_LABELS_FILE = "labels_chaos.csv"
TCGA_LABELS_FILE = "labels_tcga.csv"
CHAOS_SOURCE = "CHAOS"
TCGA_SOURCE = "TCGA-LIHC"
# CHAOS Ground grey ranges (inclusive) -> reference label.
CHAOS_GREY_RANGES = (
    ("liver", 55, 70, 1),
    ("right kidney", 110, 135, 0),
    ("left kidney", 175, 200, 0),
    ("spleen", 240, 255, 2),
)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TCGA_BARCODE = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}$")


@dataclass(frozen=True)
class ImportResult:
    patient: str  # how messages name the patient (no PHI)
    key: str  # the drop folder name
    status: str  # "imported", "unchanged" or "failed"
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "failed"


def safe_key(name: str, prefix: str) -> str:
    """`name` when it is a safe folder name, else `<prefix>-<hash>` (stable, not reversible)."""
    if _SAFE_NAME.match(name):
        return name
    return f"{prefix}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"


# ---------------------------------------------------------------------------------------------
# Shared: atomic publication, labels, source digests


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _source_digest(files: list[tuple[str, Path]]) -> str:
    """Digest of (relative name, size, mtime) of every source file, plus the importer version."""
    digest = hashlib.sha256(f"hcc-assets importer {IMPORTER_VERSION}\n".encode())
    for name, path in sorted(files):
        stat = path.stat()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _publish(
    out: Path,
    key: str,
    patient: str,
    digest: str,
    build: Callable[[Path], str],
    labels_file: str,
    label: tuple[int, str],
) -> ImportResult:
    """Build one patient in the hidden staging folder `.import-<key>.partial` and rename it into
    place, markers included (`publish_folder`); a patient that fails leaves nothing behind."""
    final = out / key
    marker = final / SOURCE_MARKER
    if (final / COMPLETE_MARKER).exists() and marker.exists() and marker.read_text().strip() == digest:
        merge_labels(out, labels_file, {key: label})  # cheap; repairs a lost manifest
        return ImportResult(patient, key, "unchanged", "already imported from the same files")
    try:
        with publish_folder(final, hidden_prefix=".import-") as staging:
            message = build(staging)
            (staging / SOURCE_MARKER).write_text(digest + "\n")
            merge_labels(out, labels_file, {key: label})  # the label is there before the folder appears
    except PatientInputError as error:
        return ImportResult(patient, key, "failed", f"{patient}: {error}")
    return ImportResult(patient, key, "imported", message)


def _copy_files(files: list[Path], target: Path, prefix: str = "") -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in files:
        destination = target / f"{prefix}{path.name}"
        if destination.exists():
            raise PatientInputError(f"two source files would share the name {prefix}{path.name!r} in one series")
        shutil.copyfile(path, destination)


def _header(path: Path, where: str) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        raise PatientInputError(f"{where} is not a readable DICOM file") from None


# ---------------------------------------------------------------------------------------------
# CHAOS


def _chaos_patients(root: Path) -> list[Path]:
    if not root.is_dir():
        raise PatientInputError("the CHAOS root folder does not exist")
    folders = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and (d / "T2SPIR").is_dir()]
    if not folders:
        raise PatientInputError("no CHAOS patient folders (<id>/T2SPIR/DICOM_anon) under the CHAOS root")
    return sorted(folders, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))


def _read_png(path: Path, where: str) -> np.ndarray:
    from PIL import Image  # pillow comes with matplotlib/imageio; only CHAOS needs it

    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except Exception:
        raise PatientInputError(f"{where} is not a readable PNG") from None
    if array.ndim == 3:  # RGB(A) saved grey: all colour channels must agree
        colour = array[..., :3] if array.shape[2] >= 3 else array[..., :1]
        if not np.all(colour == colour[..., :1]):
            raise PatientInputError(f"{where} is a colour image; CHAOS Ground masks are grey")
        array = colour[..., 0]
    if array.ndim != 2:
        raise PatientInputError(f"{where} is not a 2-D grey image")
    return array


def chaos_grey_to_labels(grey: np.ndarray, where: str) -> np.ndarray:
    """CHAOS Ground grey values -> uint8 labels (liver 1, spleen 2, everything else 0)."""
    grey = np.asarray(grey).astype(np.int64)
    labels = np.zeros(grey.shape, np.uint8)
    known = grey == 0
    for _, low, high, label in CHAOS_GREY_RANGES:
        inside = (grey >= low) & (grey <= high)
        labels[inside] = label
        known |= inside
    if not known.all():
        values = np.unique(grey[~known])
        shown = ", ".join(str(int(v)) for v in values[:6]) + (", ..." if values.size > 6 else "")
        ranges = ", ".join(f"{name} {low}-{high}" for name, low, high, _ in CHAOS_GREY_RANGES)
        raise PatientInputError(
            f"{where} has unexpected grey values {shown} in {int((~known).sum())} pixels "
            f"(expected background 0, {ranges})"
        )
    return labels


def chaos_reference_mask(dicom_files: list[Path], png_files: list[Path], where: str = "T2SPIR"):
    """The NIfTI reference mask of a CHAOS series from its Ground PNGs (see module docstring)."""
    n, m = len(dicom_files), len(png_files)
    if n == 0:
        raise PatientInputError(f"{where} has no DICOM files")
    if m != n:
        raise PatientInputError(f"{where} has {n} DICOM slices but {m} Ground PNGs; every slice needs one mask PNG")
    by_stem = {path.stem: index for index, path in enumerate(dicom_files)}
    stems = [path.stem for path in png_files]
    if len(by_stem) == n and len(set(stems)) == m and set(stems) == set(by_stem):
        png_of_dicom = {by_stem[path.stem]: path for path in png_files}
    else:  # CHAOS convention: the PNGs in name order follow the DICOM files in name order
        png_of_dicom = dict(enumerate(png_files))
    headers = [_header(path, f"file {i + 1} of {n} in {where}") for i, path in enumerate(dicom_files)]
    try:
        stack = order_slices([SliceGeometry.of(h) for h in headers])
    except GeometryProblem as problem:
        raise PatientInputError(f"{where}: {problem}") from None
    rows, columns = int(headers[0].Rows), int(headers[0].Columns)
    mask = np.zeros((columns, rows, n), np.uint8)
    for k, index in enumerate(stack.order):
        png = png_of_dicom[index]
        label = f"Ground PNG {png_files.index(png) + 1} of {m} ({where})"
        grey = _read_png(png, label)
        if grey.shape != (rows, columns):
            raise PatientInputError(
                f"{label} is {grey.shape[0]}x{grey.shape[1]} pixels but its DICOM slice is {rows}x{columns}"
            )
        mask[:, :, k] = chaos_grey_to_labels(grey, label).T
    affine = affine_ras(stack.orientation, stack.first_position, stack.pixel_spacing, stack.slice_spacing)
    return make_nifti(mask, affine)


def _nifti_gz(image) -> bytes:
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def _import_chaos_patient(source: Path, out: Path, patient: str, key: str) -> ImportResult:
    t2_dir, ground_dir = source / "T2SPIR" / "DICOM_anon", source / "T2SPIR" / "Ground"
    t1_dirs = [(phase, source / "T1DUAL" / "DICOM_anon" / phase) for phase in ("InPhase", "OutPhase")]
    inputs: list[tuple[str, Path]] = []
    for folder in [t2_dir, ground_dir, *(d for _, d in t1_dirs)]:
        if folder.is_dir():
            inputs += [(str(p.relative_to(source)), p) for p in _visible_files(folder)]

    def build(staging: Path) -> str:
        if not t2_dir.is_dir():
            raise PatientInputError("T2SPIR/DICOM_anon is missing")
        if not ground_dir.is_dir():
            raise PatientInputError("T2SPIR/Ground is missing; the CHAOS importer needs the ground truth")
        t2_files = _visible_files(t2_dir)
        pngs = sorted(p for p in _visible_files(ground_dir) if p.suffix.lower() == ".png")
        mask = chaos_reference_mask(t2_files, pngs, "T2SPIR")
        study = staging / "study_1"
        _copy_files(t2_files, study / "T2SPIR")
        phases = [(phase, _visible_files(folder)) for phase, folder in t1_dirs if folder.is_dir()]
        phases = [(phase, files) for phase, files in phases if files]
        uids = {
            str(_header(files[0], f"the first file of T1DUAL {phase}").get("SeriesInstanceUID", ""))
            for phase, files in phases
        }
        if len(phases) == 2 and len(uids) == 1:  # one dual-echo series split in two folders
            for phase, files in phases:
                _copy_files(files, study / "T1DUAL", prefix=f"{phase}_")
        else:
            for phase, files in phases:
                _copy_files(files, study / f"T1DUAL_{phase}")
        (staging / MASK_PATH.parent).mkdir()
        (staging / MASK_PATH).write_bytes(_nifti_gz(mask))
        counts = np.bincount(np.asarray(mask.dataobj).ravel(), minlength=3)
        return (
            f"{len(t2_files)} T2 slices, {sum(len(f) for _, f in phases)} T1 files, "
            f"mask liver {int(counts[1])} / spleen {int(counts[2])} voxels"
        )

    return _publish(out, key, patient, _source_digest(inputs), build, CHAOS_LABELS_FILE, (0, CHAOS_SOURCE))


def import_chaos(root: Path, out: Path) -> list[ImportResult]:
    """Import every CHAOS MR patient under `root` (Train_Sets/MR) into the drop zone `out`."""
    root, out = Path(root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    folders = _chaos_patients(root)
    for number, folder in enumerate(folders, start=1):
        public = folder.name.isdigit()
        patient = f"CHAOS patient {folder.name}" if public else f"CHAOS patient folder #{number}"
        key = f"CHAOS-{folder.name}" if public else safe_key(f"CHAOS-{folder.name}", "CHAOS")
        result = _import_chaos_patient(folder, out, patient, key)
        log.info("%s: %s%s", patient, result.status, f" ({result.message})" if result.message else "")
        results.append(result)
    return results


# ---------------------------------------------------------------------------------------------
# TCGA-LIHC (TCIA / NBIA)


@dataclass
class _TciaPatient:
    name: str  # source folder name / Subject ID: may be an identifier, used only as the key
    series_folders: list[Path]
    problem: str | None = None


def _series_folders_under(folder: Path) -> list[Path]:
    found = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if any(not name.startswith(".") for name in files):
            found.append(Path(current))
    return found


def _resolve_location(location: str, root: Path, metadata_dir: Path) -> Path | None:
    parts = [p for p in PurePosixPath(location.strip().replace("\\", "/")).parts if p not in (".", "")]
    if not parts:
        return None
    candidates = [metadata_dir.joinpath(*parts), root.joinpath(*parts)]
    for skip in range(1, len(parts)):  # "./TCGA-LIHC/<id>/..." against root = .../TCGA-LIHC
        candidates.append(root.joinpath(*parts[skip:]))
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


def _tcia_patients(root: Path, metadata: Path | None) -> list[_TciaPatient]:
    if not root.is_dir():
        raise PatientInputError("the TCIA root folder does not exist")
    if metadata is None:
        folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        patients = [_TciaPatient(d.name, _series_folders_under(d)) for d in folders]
        if not patients:
            raise PatientInputError("no patient folders under the TCIA root")
        return patients
    try:
        with open(metadata, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as error:
        raise PatientInputError(f"cannot read metadata.csv ({error.strerror or type(error).__name__})") from None
    if not rows or not {"Subject ID", "File Location"} <= set(rows[0]):
        raise PatientInputError("metadata.csv has no rows with 'Subject ID' and 'File Location' columns")
    by_subject: dict[str, _TciaPatient] = {}
    for row in rows:
        subject = (row.get("Subject ID") or "").strip()
        if not subject:
            continue
        patient = by_subject.setdefault(subject, _TciaPatient(subject, []))
        folder = _resolve_location(row.get("File Location") or "", root, Path(metadata).parent)
        if folder is None:
            described = (row.get("Series Description") or "").strip() or "without description"
            patient.problem = patient.problem or (
                f"metadata.csv lists a series ({described!r}) whose folder is missing under the root"
            )
        else:
            patient.series_folders.append(folder)
    return [by_subject[s] for s in sorted(by_subject)]


def _import_tcia_patient(source: _TciaPatient, out: Path, patient: str, key: str) -> ImportResult:
    inputs = [(f"{i}/{p.name}", p) for i, folder in enumerate(source.series_folders) for p in _visible_files(folder)]

    def build(staging: Path) -> str:
        if source.problem:
            raise PatientInputError(source.problem)
        if not source.series_folders:
            raise PatientInputError("no series folders with files")
        described = []
        for index, folder in enumerate(source.series_folders):
            files = _visible_files(folder)
            header = _header(files[0], f"the first file of series folder {index + 1} of {len(source.series_folders)}")
            number = header.get("SeriesNumber")
            described.append(
                (
                    str(header.get("StudyDate", "") or ""),
                    str(header.get("StudyInstanceUID", "") or ""),
                    number,
                    index,
                    files,
                )
            )
        studies = sorted({(date, uid) for date, uid, *_ in described})
        study_of = {uid: k for k, (_, uid) in enumerate(studies, start=1)}
        used: set[Path] = set()
        for _, uid, number, _index, files in sorted(described, key=lambda d: (study_of[d[1]], _number(d[2]), d[3])):
            base = f"series_{_number(number)}" if _number(number) >= 0 else "series_x"
            target, suffix = staging / f"study_{study_of[uid]}" / base, 2
            while target in used:
                target, suffix = target.with_name(f"{base}_{suffix}"), suffix + 1
            used.add(target)
            _copy_files(files, target)
        choice = choose_t2_series(inventory_study(staging))  # raises when there is no T2 series
        return f"{len(source.series_folders)} series in {len(studies)} stud{'y' if len(studies) == 1 else 'ies'}; T2 {choice.reason}"

    return _publish(out, key, patient, _source_digest(inputs), build, TCGA_LABELS_FILE, (1, TCGA_SOURCE))


def _number(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def import_tcia(root: Path, out: Path, metadata: Path | None = None) -> list[ImportResult]:
    """Import every TCGA-LIHC patient under `root` (or listed in `metadata`) into `out`."""
    root, out = Path(root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for number, source in enumerate(_tcia_patients(root, Path(metadata) if metadata else None), start=1):
        patient = f"TCIA patient {source.name}" if _TCGA_BARCODE.match(source.name) else f"TCIA patient #{number}"
        result = _import_tcia_patient(source, out, patient, safe_key(source.name, "TCIA"))
        log.info("%s: %s%s", patient, result.status, f" ({result.message})" if result.message else "")
        results.append(result)
    return results
