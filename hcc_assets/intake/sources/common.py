"""What the source adapters share: atomic publication of a patient's drop folder (built hidden,
renamed into place whole with its markers), the labels manifests, source digests that make a
re-import idempotent, and the per-patient result.

The drop layout every adapter produces (see `hcc_assets.intake.dropzone`):

    <incoming>/<key>/study_<k>/<series folder>/*.dcm
    <incoming>/<key>/reference/liver_spleen_mask.nii.gz     (CHAOS only: the Ground truth)
    <incoming>/<key>/.import_source                         digest of what was imported
    <incoming>/<key>/.complete                              present as soon as the folder is
    <incoming>/labels_chaos.csv, labels_tcga.csv            patient_key,hcc,source

Each patient is built in a hidden folder `<incoming>/.import-<key>.partial`, then renamed into
place whole, marker included: the folder sensor never sees half a patient, and a patient that
fails leaves nothing behind. Re-running skips patients whose source did not change (same file
names, sizes and modification times), so it is idempotent. Messages name patients by their
public challenge number (CHAOS) or TCGA barcode, and by their position otherwise; never by a
path, a date or another identifier.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom

from hcc_assets.core.errors import PatientInputError
from hcc_assets.core.files import COMPLETE_MARKER, publish_folder
from hcc_assets.intake.dropzone import merge_labels

IMPORTER_VERSION = "1"
SOURCE_MARKER = ".import_source"
MASK_PATH = Path("reference") / "liver_spleen_mask.nii.gz"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


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


def visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def source_digest(files: list[tuple[str, Path]]) -> str:
    """Digest of (relative name, size, mtime) of every source file, plus the importer version."""
    digest = hashlib.sha256(f"hcc-assets importer {IMPORTER_VERSION}\n".encode())
    for name, path in sorted(files):
        stat = path.stat()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def publish_patient(
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


def copy_files(files: list[Path], target: Path, prefix: str = "") -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in files:
        destination = target / f"{prefix}{path.name}"
        if destination.exists():
            raise PatientInputError(f"two source files would share the name {prefix}{path.name!r} in one series")
        shutil.copyfile(path, destination)


def read_header(path: Path, where: str) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        raise PatientInputError(f"{where} is not a readable DICOM file") from None
