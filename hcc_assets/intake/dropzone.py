"""The incoming drop zone: which patient folders are complete and ready to ingest.

A patient folder is complete when it holds the marker file `.complete` (written last by the
synthetic generator, the importers and the DICOM receiver), or, for folders copied in by hand,
when nothing in it has changed for `quiet_seconds`. The fingerprint changes whenever a file is
added, removed or rewritten, so a re-delivered study is ingested again, and only then.
A folder (or any folder inside it) that cannot be listed is not ready: ingesting what can be seen
would ingest a partial study. It is reported as skipped and picked up once it is readable.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import stat
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from hcc_assets.core.files import COMPLETE_MARKER, atomic_write_bytes, publish_folder
from hcc_assets.imaging.dicom_series import REFERENCE_FOLDER, StudyRef, list_studies

LABEL_MANIFEST_GLOB = "labels*.csv"


@dataclass(frozen=True)
class DropFolder:
    source_key: str  # the folder name: may be PHI (an MRN); never log or store it
    path: Path
    fingerprint: str
    complete_by: str  # "marker" or "quiet"


@dataclass(frozen=True)
class SkippedFolder:
    source_key: str  # may be PHI: callers pseudonymize it before showing it
    reason: str  # never holds the path (it contains the folder name)


def _raise(error: OSError) -> None:
    raise error


def _file_entry(path: Path, folder: Path) -> tuple[bytes, float]:
    """One file's line of a fingerprint (relative name, size, mtime) and its mtime."""
    stat = path.stat()
    return f"{os.path.relpath(path, folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode(), stat.st_mtime


def folder_fingerprint(folder: Path) -> tuple[str, float, int]:
    """(digest of relative names, sizes and mtimes; newest mtime; file count). Raises OSError when
    any folder inside cannot be listed (os.walk would silently leave it out)."""
    digest = hashlib.sha256()
    newest = 0.0
    count = 0
    for root, dirs, files in os.walk(folder, onerror=_raise):
        dirs.sort()
        for name in sorted(files):
            line, mtime = _file_entry(Path(root, name), folder)
            digest.update(line)
            newest = max(newest, mtime)
            count += 1
    return digest.hexdigest()[:16], newest, count


def study_fingerprint(folder: Path, study: StudyRef) -> str:
    """folder_fingerprint over one study's own files: its series folders (their files, not their
    subfolders) and, for the first study, the reference masks (they lie on its grid). A follow-up
    added to a folder leaves the earlier studies' fingerprints, hence their ingest, as they were."""
    digest = hashlib.sha256()
    files = [path for series in study.folders for path in series.iterdir() if path.is_file()]
    reference = folder / REFERENCE_FOLDER
    if study.index == 1 and reference.is_dir():
        files += [path for path in reference.rglob("*") if path.is_file()]
    for path in sorted(files):
        if path.name.startswith("."):  # markers: not part of the study
            continue
        digest.update(_file_entry(path, folder)[0])
    return digest.hexdigest()[:16]


def folder_studies(folder: Path) -> list[tuple[StudyRef, str]]:
    """The studies of a drop folder, earliest first, each with its `study_fingerprint`.
    PatientInputError when they belong to more than one patient."""
    return [(study, study_fingerprint(folder, study)) for study in list_studies(folder)]


def drop_copy(source: Path, incoming: Path) -> Path:
    """Copy the study folder `source` into the drop zone as `incoming/<its name>`: built under a
    hidden name, `.complete` written last, then renamed into place, so the sensor never sees half
    a study. Refuses (FileExistsError) a name the drop zone already holds."""
    target = incoming / source.name
    if target.exists():
        # no folder name in the message: it is often a record number
        raise FileExistsError("the drop zone already holds a study folder of this name")
    with publish_folder(target, hidden_prefix=".drop-", replace=False) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True)
    return target


UNPACKED_ARCHIVES = ".unpacked"  # where a drop zone's ZIP archives go once unpacked (hidden: not scanned)


class ArchiveError(ValueError):
    """An export archive that cannot be unpacked safely; the message names no member (names may be PHI)."""


# What an export archive's name may end with (ZIP from PACS web exports and viewers; TAR, plain or
# compressed, from research archives such as XNAT): the drop folder takes the name without it.
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def archive_stem(path: Path) -> str | None:
    """The archive's name without its archive suffix, or None when the name has none."""
    name = path.name
    suffix = next((s for s in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True) if name.lower().endswith(s)), None)
    return name[: -len(suffix)] if suffix and len(name) > len(suffix) else None


def is_archive(path: Path) -> bool:
    """An export archive by its name and its content (ZIP or TAR), not a folder."""
    return path.is_file() and archive_stem(path) is not None and (zipfile.is_zipfile(path) or tarfile.is_tarfile(path))


def drop_archive(archive: Path, incoming: Path) -> Path:
    """Unpack the export archive `archive` (ZIP: a PACS web export, a viewer's "download study";
    TAR, plain or gzip/bzip2/xz-compressed: a research archive's download) into the drop zone as
    `incoming/<its name without the archive suffix>`, published as drop_copy publishes a folder.

    Only regular files (and folders) are taken: link members, devices and the like are left out.
    zipfile strips absolute paths and ".." from member names; tarfile's "data" extraction filter
    refuses them, and such a TAR is refused whole. An archive whose members would not fit on the
    drop zone's disk, or that is password-protected or corrupt, is refused (ArchiveError) before
    anything is written. FileExistsError for a name the drop zone already holds. An archive lying
    in the drop zone itself is moved to UNPACKED_ARCHIVES once unpacked, so no later scan unpacks it
    again.
    """
    stem = archive_stem(archive) or archive.stem
    target = incoming / stem
    if target.exists():
        raise FileExistsError("the drop zone already holds a study folder of this name")
    if archive.name.lower().endswith(".zip") or zipfile.is_zipfile(archive):
        _unpack_zip(archive, incoming, target)
    elif archive_stem(archive) is not None or tarfile.is_tarfile(archive):
        _unpack_tar(archive, incoming, target)
    else:
        raise ArchiveError("the file is neither a ZIP nor a TAR archive")
    if archive.resolve().parent == incoming.resolve():
        (incoming / UNPACKED_ARCHIVES).mkdir(exist_ok=True)
        os.replace(archive, incoming / UNPACKED_ARCHIVES / archive.name)
    return target


def _unpack_zip(archive: Path, incoming: Path, target: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = [m for m in bundle.infolist() if not m.is_dir() and not _is_symlink(m)]
            if any(m.flag_bits & 0x1 for m in members):
                raise ArchiveError("the archive is password-protected; export it without a password")
            _check_room(incoming, sum(m.file_size for m in members))
            with publish_folder(target, hidden_prefix=".drop-", replace=False) as staging:
                bundle.extractall(staging, members)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as error:
        raise ArchiveError(f"the archive is damaged ({type(error).__name__})") from None


def _unpack_tar(archive: Path, incoming: Path, target: Path) -> None:
    try:
        with tarfile.open(archive) as bundle:
            members = [m for m in bundle.getmembers() if m.isfile() or m.isdir()]
            _check_room(incoming, sum(m.size for m in members if m.isfile()))
            with publish_folder(target, hidden_prefix=".drop-", replace=False) as staging:
                bundle.extractall(staging, members, filter="data")
    except tarfile.FilterError as error:  # an absolute path or ".." in a member name
        raise ArchiveError(
            f"the archive has members that would land outside its folder ({type(error).__name__})"
        ) from None
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ArchiveError(f"the archive is damaged ({type(error).__name__})") from None


def _check_room(incoming: Path, needed: int) -> None:
    incoming.mkdir(parents=True, exist_ok=True)
    if needed > shutil.disk_usage(incoming).free:
        raise ArchiveError(f"the archive unpacks to {needed / 2**30:.1f} GiB, more than the drop zone's free space")


def _is_symlink(member: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(member.external_attr >> 16)


def _unpack_dropped_archive(archive: Path, incoming: Path, quiet_seconds: float, now: float) -> str | None:
    """Unpack an export archive lying in the drop zone (drop_archive, which also moves it to
    UNPACKED_ARCHIVES) once nothing has written to it for `quiet_seconds` (it may still be
    arriving); why it was not, or None."""
    if now - archive.stat().st_mtime < quiet_seconds:
        return None
    kind = "ZIP" if archive.name.lower().endswith(".zip") else "TAR"
    try:
        drop_archive(archive, incoming)
    except ArchiveError as error:
        return f"{kind} archive not unpacked: {error}"
    except FileExistsError:
        return f"{kind} archive not unpacked: a study folder of its name is already in the drop zone"
    return None


def scan_drop_zone(
    incoming: Path, quiet_seconds: float = 60.0, now: float | None = None, skipped: list[SkippedFolder] | None = None
) -> list[DropFolder]:
    """Complete patient folders under `incoming`, sorted by folder name. Folders that cannot be
    read are left out and, when `skipped` is given, appended to it with the reason.

    An export archive in the drop zone (ZIP or TAR, ARCHIVE_SUFFIXES) is unpacked first into a folder
    of its name, once it has been quiet for `quiet_seconds`, and moved to `.unpacked/`; one that
    cannot be unpacked stays and is reported in `skipped`."""
    if not incoming.is_dir():
        return []
    now = time.time() if now is None else now
    for entry in sorted(incoming.iterdir()):
        stem = archive_stem(entry)
        if stem is not None and entry.is_file() and not entry.name.startswith("."):
            try:
                why = _unpack_dropped_archive(entry, incoming, quiet_seconds, now)
            except OSError as error:
                why = f"archive not unpacked ({error.strerror or type(error).__name__})"
            if why and skipped is not None:
                skipped.append(SkippedFolder(stem, why))
    ready = []
    for entry in sorted(incoming.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        try:
            fingerprint, newest, _count = folder_fingerprint(entry)
            if (entry / COMPLETE_MARKER).exists():
                ready.append(DropFolder(entry.name, entry, fingerprint, "marker"))
            elif now - max(newest, entry.stat().st_mtime) >= quiet_seconds:
                # an empty folder counts too: its run fails with a clear "no DICOM files" error
                ready.append(DropFolder(entry.name, entry, fingerprint, "quiet"))
        except OSError as error:
            if skipped is not None:
                what = error.strerror or type(error).__name__
                skipped.append(
                    SkippedFolder(entry.name, f"drop folder cannot be read ({what}); waiting until it is readable")
                )
    return ready


def _manifest_reader(handle) -> csv.DictReader:
    """Rows keyed by lower-case, stripped column names (`Patient_Key, HCC` from a spreadsheet is fine)."""
    reader = csv.DictReader(handle)
    if reader.fieldnames:
        reader.fieldnames = [name.strip().lower() for name in reader.fieldnames]
    return reader


def read_label_manifests(incoming: Path) -> list[dict[str, str]]:
    """Rows of every labels*.csv in the drop zone: patient_key, hcc (0/1), source."""
    rows: dict[str, dict[str, str]] = {}
    for manifest in sorted(incoming.glob(LABEL_MANIFEST_GLOB)):
        with open(manifest, newline="", encoding="utf-8-sig") as handle:  # Excel writes a BOM
            for row in _manifest_reader(handle):
                key = (row.get("patient_key") or "").strip()
                if key:
                    rows[key] = {
                        "patient_key": key,
                        "hcc": str(row.get("hcc", "")).strip(),
                        "source": (row.get("source") or "").strip(),
                    }
    return list(rows.values())


@dataclass(frozen=True)
class LabelProblem:
    patient_key: str  # the drop-folder name: callers must pseudonymize it before showing it
    problem: str  # names the manifest and line, never the key


def validate_labels(incoming: Path) -> tuple[dict[str, tuple[bool, str | None]], list[LabelProblem]]:
    """Labels from every labels*.csv, and the problems that exclude a patient: a label that is
    not 0/1, or a patient listed more than once with different labels (an identical repeat is
    fine). Returns ({patient_key: (hcc, source)}, problems); a patient with a problem has no label."""
    seen: dict[str, list[tuple[str, str, str]]] = {}  # key -> [(hcc, source, where)]
    problems: list[LabelProblem] = []
    for manifest in sorted(incoming.glob(LABEL_MANIFEST_GLOB)):
        try:
            with open(manifest, newline="", encoding="utf-8-sig") as handle:  # Excel writes a BOM
                reader = _manifest_reader(handle)
                if not reader.fieldnames or not {"patient_key", "hcc"} <= set(reader.fieldnames):
                    problems.append(LabelProblem("", f"{manifest.name} has no patient_key and hcc columns; ignored"))
                    continue
                for line, row in enumerate(reader, start=2):
                    key = (row.get("patient_key") or "").strip()
                    if key:
                        seen.setdefault(key, []).append(
                            (
                                str(row.get("hcc") or "").strip(),
                                (row.get("source") or "").strip(),
                                f"{manifest.name}:{line}",
                            )
                        )
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            problems.append(LabelProblem("", f"{manifest.name} cannot be read ({type(error).__name__}); ignored"))
    labels: dict[str, tuple[bool, str | None]] = {}
    for key, entries in seen.items():
        bad = [(hcc, where) for hcc, _, where in entries if hcc not in ("0", "1")]
        if bad:
            hcc, where = bad[0]
            shown = hcc if len(hcc) <= 12 else hcc[:12] + "..."
            problems.append(LabelProblem(key, f"label {shown!r} at {where} is not 0 or 1"))
            continue
        if len({hcc for hcc, _, _ in entries}) > 1:
            places = ", ".join(f"{hcc} at {where}" for hcc, _, where in entries)
            problems.append(LabelProblem(key, f"listed {len(entries)} times with different labels ({places})"))
            continue
        hcc, source, _ = entries[-1]
        labels[key] = (hcc == "1", source or None)
    return labels, problems


def label_studies(incoming: Path) -> tuple[dict[str, int], list[LabelProblem]]:
    """The study each patient is labelled (and trained) on, from the optional `study` column of the
    labels*.csv manifests: its study index (1 = earliest). Returns ({patient_key: index} for rows
    that name one, problems): an index that is not a whole number >= 1, or different indices for one
    patient, is a problem; the cohort then leaves the patient out (which study is meant is unknown)."""
    seen: dict[str, list[tuple[str, str]]] = {}  # key -> [(study, where)]
    for manifest in sorted(incoming.glob(LABEL_MANIFEST_GLOB)):
        try:
            with open(manifest, newline="", encoding="utf-8-sig") as handle:
                reader = _manifest_reader(handle)
                if not reader.fieldnames or "study" not in reader.fieldnames:
                    continue
                for line, row in enumerate(reader, start=2):
                    key, study = (row.get("patient_key") or "").strip(), str(row.get("study") or "").strip()
                    if key and study:
                        seen.setdefault(key, []).append((study, f"{manifest.name}:{line}"))
        except (OSError, UnicodeDecodeError, csv.Error):
            continue  # validate_labels reports the unreadable manifest
    studies: dict[str, int] = {}
    problems: list[LabelProblem] = []
    for key, entries in seen.items():
        bad = [(study, where) for study, where in entries if not (study.isdigit() and int(study) >= 1)]
        if bad:
            study, where = bad[0]
            shown = study if len(study) <= 12 else study[:12] + "..."
            problems.append(LabelProblem(key, f"study {shown!r} at {where} is not a study index (1, 2, ...)"))
        elif len({int(study) for study, _ in entries}) > 1:
            places = ", ".join(f"{study} at {where}" for study, where in entries)
            problems.append(LabelProblem(key, f"names different studies ({places})"))
        else:
            studies[key] = int(entries[-1][0])
    return studies, problems


def merge_labels(incoming: Path, file_name: str, rows: dict[str, tuple[int, str]]) -> None:
    """Add or replace rows (patient_key -> (hcc, source)) in the manifest `incoming/file_name`,
    sorted by key and written atomically (`atomic_write_bytes`)."""
    path = incoming / file_name
    merged: dict[str, tuple[str, str]] = {}
    if path.exists():
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                merged[row["patient_key"]] = (row["hcc"], row.get("source") or "")
    merged.update({key: (str(hcc), source) for key, (hcc, source) in rows.items()})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["patient_key", "hcc", "source"])
    writer.writerows([key, *merged[key]] for key in sorted(merged))
    atomic_write_bytes(path, buffer.getvalue().encode())
