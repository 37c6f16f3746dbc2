"""The CHAOS adapter (healthy livers, label hcc 0): one patient folder per challenge case.

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
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np

from hcc_assets.core.errors import PatientInputError
from hcc_assets.imaging.dicom_series import (
    GeometryProblem,
    SliceGeometry,
    order_slices,
)
from hcc_assets.imaging.geometry import affine_ras
from hcc_assets.imaging.nifti import make_nifti
from hcc_assets.intake.sources.common import (
    MASK_PATH,
    ImportResult,
    copy_files,
    publish_patient,
    read_header,
    safe_key,
    source_digest,
    visible_files,
)

log = logging.getLogger(__name__)

CHAOS_LABELS_FILE = "labels_chaos.csv"
CHAOS_SOURCE = "CHAOS"
# CHAOS Ground grey ranges (inclusive) -> reference label.
CHAOS_GREY_RANGES = (
    ("liver", 55, 70, 1),
    ("right kidney", 110, 135, 0),
    ("left kidney", 175, 200, 0),
    ("spleen", 240, 255, 2),
)

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
    headers = [read_header(path, f"file {i + 1} of {n} in {where}") for i, path in enumerate(dicom_files)]
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
            inputs += [(str(p.relative_to(source)), p) for p in visible_files(folder)]

    def build(staging: Path) -> str:
        if not t2_dir.is_dir():
            raise PatientInputError("T2SPIR/DICOM_anon is missing")
        if not ground_dir.is_dir():
            raise PatientInputError("T2SPIR/Ground is missing; the CHAOS importer needs the ground truth")
        t2_files = visible_files(t2_dir)
        pngs = sorted(p for p in visible_files(ground_dir) if p.suffix.lower() == ".png")
        mask = chaos_reference_mask(t2_files, pngs, "T2SPIR")
        study = staging / "study_1"
        copy_files(t2_files, study / "T2SPIR")
        phases = [(phase, visible_files(folder)) for phase, folder in t1_dirs if folder.is_dir()]
        phases = [(phase, files) for phase, files in phases if files]
        uids = {
            str(read_header(files[0], f"the first file of T1DUAL {phase}").get("SeriesInstanceUID", ""))
            for phase, files in phases
        }
        if len(phases) == 2 and len(uids) == 1:  # one dual-echo series split in two folders
            for phase, files in phases:
                copy_files(files, study / "T1DUAL", prefix=f"{phase}_")
        else:
            for phase, files in phases:
                copy_files(files, study / f"T1DUAL_{phase}")
        (staging / MASK_PATH.parent).mkdir()
        (staging / MASK_PATH).write_bytes(_nifti_gz(mask))
        counts = np.bincount(np.asarray(mask.dataobj).ravel(), minlength=3)
        return (
            f"{len(t2_files)} T2 slices, {sum(len(f) for _, f in phases)} T1 files, "
            f"mask liver {int(counts[1])} / spleen {int(counts[2])} voxels"
        )

    return publish_patient(out, key, patient, source_digest(inputs), build, CHAOS_LABELS_FILE, (0, CHAOS_SOURCE))


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
