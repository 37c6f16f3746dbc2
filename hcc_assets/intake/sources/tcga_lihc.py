"""The TCGA-LIHC adapter (TCIA, HCC, label hcc 1).

TCGA-LIHC (NBIA Data Retriever: `<PatientID>/<date-StudyDescription-uid>/<SeriesNumber-
SeriesDescription-uid>/*.dcm`, with an optional metadata.csv whose `File Location` points at
the series folders; a root one level up, the download folder holding `TCGA-LIHC/` and
`metadata.csv`, is recognized: `nbia_download_layout`):
  - every series is kept, as study_<k>/series_<SeriesNumber> (studies ordered by StudyDate
    and UID): the drop folder names carry no dates or descriptions;
  - the study must contain a T2-weighted series by its tags (`choose_t2_series`), which is
    reported; the choice itself stays with the `raw_scan` asset;
  - key = the PatientID folder name (pseudonymized by the platform); label hcc 1, source
    TCGA-LIHC.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hcc_assets.core.errors import PatientInputError
from hcc_assets.imaging.dicom_series import (
    choose_t2_series,
    inventory_study,
)
from hcc_assets.intake.sources.common import (
    ImportResult,
    copy_files,
    publish_patient,
    read_header,
    safe_key,
    source_digest,
    visible_files,
)

log = logging.getLogger(__name__)

TCGA_LABELS_FILE = "labels_tcga.csv"
TCGA_SOURCE = "TCGA-LIHC"
_TCGA_BARCODE = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}$")

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


def nbia_download_layout(root: Path, metadata: Path | None) -> tuple[Path, Path | None]:
    """(collection folder, metadata.csv) when `root` is the NBIA Data Retriever's download folder,
    one level above the collection (`<download>/metadata.csv`, `<download>/TCGA-LIHC/<Subject ID>/`):
    the download's metadata.csv is used when none is given, and the one child folder that holds
    TCGA barcode folders becomes the root. Without this a root one level too high would import the
    whole collection as a single patient named after it. Anything else is returned unchanged."""
    if metadata is None and (root / "metadata.csv").is_file():
        metadata = root / "metadata.csv"
        log.info("NBIA download: using its metadata.csv")
    children = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if not any(_TCGA_BARCODE.match(d.name) for d in children):
        collections = [d for d in children if any(_TCGA_BARCODE.match(g.name) for g in d.iterdir() if g.is_dir())]
        if len(collections) == 1:
            log.info("NBIA download: importing the patients under its collection folder %s", collections[0].name)
            root = collections[0]
    return root, metadata


def _tcia_patients(root: Path, metadata: Path | None) -> list[_TciaPatient]:
    if not root.is_dir():
        raise PatientInputError("the TCIA root folder does not exist")
    root, metadata = nbia_download_layout(root, metadata)
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
    inputs = [(f"{i}/{p.name}", p) for i, folder in enumerate(source.series_folders) for p in visible_files(folder)]

    def build(staging: Path) -> str:
        if source.problem:
            raise PatientInputError(source.problem)
        if not source.series_folders:
            raise PatientInputError("no series folders with files")
        described = []
        for index, folder in enumerate(source.series_folders):
            files = visible_files(folder)
            header = read_header(
                files[0], f"the first file of series folder {index + 1} of {len(source.series_folders)}"
            )
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
            copy_files(files, target)
        choice = choose_t2_series(inventory_study(staging))  # raises when there is no T2 series
        return f"{len(source.series_folders)} series in {len(studies)} stud{'y' if len(studies) == 1 else 'ies'}; T2 {choice.reason}"

    return publish_patient(out, key, patient, source_digest(inputs), build, TCGA_LABELS_FILE, (1, TCGA_SOURCE))


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
