"""Per-patient ingest, without Dagster: raw_scan -> nifti_volume -> preprocessed_volume.

Each asset has two steps: `read_*` reads and checks the patient's input (what fails there is the
patient's: the asset turns it into a failure naming the patient, after `forget_outputs`), and
`record_*` writes the outputs (lake files, feature-store rows) and returns what the asset shows.
The imaging package does the work; bad input raises PatientInputError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import polars as pl

from hcc_assets.core.errors import PatientInputError
from hcc_assets.featurestore import FeatureStore
from hcc_assets.imaging import dicom_rtstruct, dicom_seg, dicom_series, geometry, nifti, preprocess, preview
from hcc_assets.imaging.volume_info import volume_summary
from hcc_assets.intake.dropzone import folder_fingerprint, folder_studies, read_label_manifests
from hcc_assets.intake.pseudonym import split_partition_key
from hcc_assets.lake import (
    NIFTI_FILE,
    PREPROCESSED_FILE,
    RAW_SCAN_FILE,
    REFERENCE_MASK_FILE,
    DataLake,
    sha256_bytes,
)

# 3: one study per partition (follow-ups), the record and `studies` name it; 4: the T2 choice tells
# image types apart (Dixon fat, phase), prefers fat suppression and, between equals, the later series;
# 5: Enhanced MR frames split by their own frame type, whose image type `scans` records; 6: an
# acquisition written as several series one after another (breath-holds, stations) is joined
RAW_SCAN_VERSION = "6"
# 2: MONOCHROME1 slices mirrored to MONOCHROME2 order (bright signal high); reference masks from DICOM SEG
NIFTI_VERSION = "2"
PREPROCESS_VERSION = "1"

REFERENCE_MASK_SOURCE = ("reference", "liver_spleen_mask.nii.gz")
# the columns of raw_scan's `series` table (one row per series of the study)
SERIES_COLUMNS = (
    "series_number",
    "description",
    "echo_time_ms",
    "repetition_time_ms",
    "sequence_name",
    "n_files",
    "chosen",
)
MID_SLICE = "mid_slice"


# ---- raw_scan


@dataclass(frozen=True)
class Study:
    """One DICOM study of the patient, its fingerprint and the chosen T2 series (read_study)."""

    inventory: dicom_series.StudyInventory
    choice: dicom_series.SeriesChoice
    fingerprint: str  # dropzone.study_fingerprint: the sensor compares it with the folder's
    source_key: str  # the drop folder's name: only to look up the source in the label manifests
    ref: dicom_series.StudyRef  # its index among the folder's studies and days since the first


@dataclass(frozen=True)
class RawScanResult:
    data_version: str
    chosen_series: str
    choice_reason: str
    echo_time_ms: float | None
    repetition_time_ms: float | None
    n_series: int
    n_files: int
    series: list[dict]  # one row per series, SERIES_COLUMNS
    study_checksum: str
    drop_fingerprint: str
    study_index: int
    days_since_first: int | None
    n_files_left_out: dict[str, int]  # companion files, second copies (only those that occurred)


def find_study(folder: Path, study_index: int) -> tuple[dicom_series.StudyRef, str]:
    """(the folder's study number `study_index`, its fingerprint); PatientInputError when the folder
    holds fewer studies, or studies of more than one patient."""
    studies = folder_studies(folder)
    if study_index > len(studies):
        raise PatientInputError(
            f"the drop folder holds {len(studies)} study(ies), not a study {study_index} "
            "(a re-delivery removed it); this partition has no input"
        )
    return studies[study_index - 1]


_last_study: tuple[tuple, tuple[dicom_series.StudyRef, str, dicom_series.StudyInventory]] | None = None


def inventoried_study(folder: Path, study_index: int) -> tuple[dicom_series.StudyRef, str, dicom_series.StudyInventory]:
    """find_study and the study's inventory (headers and checksums of its files), reused when the
    same process asks again for the same study and the folder's `folder_fingerprint` (every file's
    name, size and mtime, as the drop-zone sensor sees a re-delivery) is unchanged: raw_scan and
    then nifti_volume inventory the same study in one run, and reading every header a second time
    costs as much as the first (~0.15 s a patient). Only the last study is kept."""
    global _last_study
    try:
        key: tuple | None = (str(folder), study_index, folder_fingerprint(folder))
    except OSError:  # a folder that cannot be listed: the reads below say what is wrong
        key = None
    last = _last_study  # one read: another thread may replace it meanwhile
    if key is not None and last is not None and last[0] == key:
        return last[1]
    ref, fingerprint = find_study(folder, study_index)
    study = (ref, fingerprint, dicom_series.inventory_study(folder, ref.folders))
    if key is not None:
        _last_study = (key, study)
    return study


def read_study(
    folder: Path,
    min_slices: int,
    min_echo_time_ms: float,
    min_repetition_time_ms: float,
    max_voxels: int,
    study_index: int = 1,
) -> Study:
    """Inventory the drop folder's study number `study_index` (1 = earliest) and choose its T2
    series; PatientInputError when there is none or it is above `max_voxels` (refused before its
    pixels are read)."""
    ref, fingerprint, inventory = inventoried_study(folder, study_index)
    choice = dicom_series.choose_t2_series(
        inventory,
        min_slices=min_slices,
        min_echo_time_ms=min_echo_time_ms,
        min_repetition_time_ms=min_repetition_time_ms,
    )
    chosen_series = choice.series
    voxels = chosen_series.rows * chosen_series.columns * chosen_series.n_slices
    if voxels > max_voxels:
        raise PatientInputError(
            f"the T2 series {chosen_series.label} is {chosen_series.columns} x {chosen_series.rows} x "
            f"{chosen_series.n_slices} = {voxels:,} voxels, above the limit of {max_voxels:,} "
            "(raw_scan config max_voxels); refused before reading its pixels"
        )
    return Study(inventory, choice, fingerprint, folder.name, ref)


def record_raw_scan(
    store: FeatureStore, data_lake: DataLake, patient_id: str, study: Study, incoming: Path, run_id: str
) -> RawScanResult:
    """raw_scan.json in the lake and the partition's `scans`, `patients` and `studies` rows."""
    inventory, choice = study.inventory, study.choice
    record = {
        "patient_id": patient_id,
        "study_index": study.ref.index,
        "study_key": study.ref.study_key,
        "study": inventory.to_record(),
        "chosen_series_key": choice.series.series_key,
        "t2_score": choice.t2_score,
        "choice_reason": choice.reason,
        "candidates": choice.candidates,
    }
    payload = json.dumps(record, indent=2, sort_keys=True).encode()
    digest = data_lake.write_bytes(data_lake.patient_file(patient_id, RAW_SCAN_FILE), payload)

    version = f"raw_scan@{RAW_SCAN_VERSION}"
    scan_rows = pl.DataFrame(
        [
            {
                **_scan_columns(series.to_record()),
                "patient_id": patient_id,
                "chosen": series.series_key == choice.series.series_key,
                "t2_score": next(
                    (c.get("score") for c in choice.candidates if c.get("series_key") == series.series_key), None
                ),
                "choice_reason": choice.reason if series.series_key == choice.series.series_key else None,
            }
            for series in inventory.series
        ],
        infer_schema_length=None,
    )
    source = _source_of(incoming, study.source_key)
    patient_row = pl.DataFrame(
        [
            {
                "patient_id": patient_id,
                "source": source,
                "n_series": len(inventory.series),
                "n_files": inventory.n_files,
                "t2_series_key": choice.series.series_key,
                "ingest_status": "ok",
            }
        ]
    )
    store.replace_partition(
        "scans", patient_id, FeatureStore.with_provenance(scan_rows, version=version, run_id=run_id)
    )
    store.replace_partition(
        "patients", patient_id, FeatureStore.with_provenance(patient_row, version=version, run_id=run_id)
    )
    # the study's place in time: an index and a day offset, never its date
    study_row = pl.DataFrame(
        [
            {
                "patient_id": patient_id,
                "patient": split_partition_key(patient_id)[0],
                "study_index": study.ref.index,
                "days_since_first": study.ref.days_since_first,
                "study_key": study.ref.study_key,
                "n_series": len(inventory.series),
            }
        ],
        schema={
            "patient_id": pl.String,
            "patient": pl.String,
            "study_index": pl.Int32,
            "days_since_first": pl.Int32,
            "study_key": pl.String,
            "n_series": pl.Int32,
        },
    )
    store.replace_partition(
        "studies", patient_id, FeatureStore.with_provenance(study_row, version=version, run_id=run_id)
    )

    chosen = choice.series
    series_table = []
    for series in inventory.series:
        row = {**series.to_record(), "chosen": series.series_key == chosen.series_key}
        series_table.append({column: row.get(column) for column in SERIES_COLUMNS})
    return RawScanResult(
        data_version=digest[:16],
        chosen_series=f'#{chosen.series_number} "{chosen.description}"',
        choice_reason=choice.reason,
        echo_time_ms=chosen.echo_time_ms,
        repetition_time_ms=chosen.repetition_time_ms,
        n_series=len(inventory.series),
        n_files=inventory.n_files,
        series=series_table,
        study_checksum=chosen.checksum,
        drop_fingerprint=study.fingerprint,
        study_index=study.ref.index,
        days_since_first=study.ref.days_since_first,
        n_files_left_out={
            key: count
            for key, count in (
                ("companion files (not DICOM, no images in their folder)", inventory.n_companion_files),
                ("second copies of an instance", inventory.n_duplicate_files),
            )
            if count
        },
    )


def _scan_columns(series_record: dict) -> dict:
    keep = {
        "series_key",
        "series_number",
        "description",
        "modality",
        "echo_time_ms",
        "repetition_time_ms",
        "sequence_name",
        "scanning_sequence",
        "n_files",
        "slice_thickness_mm",
        "spacing_between_slices_mm",
        "checksum",
        "transfer_syntax",
        "lossy",
        "lossy_ratio",
    }
    row = {key: series_record.get(key) for key in keep}
    row["rows_px"] = series_record.get("rows")
    row["columns_px"] = series_record.get("columns")
    row["pixel_spacing_mm"] = [float(v) for v in series_record.get("pixel_spacing_mm") or []]
    orientation = series_record.get("orientation") or []
    row["oblique"] = bool(orientation) and any(0.001 < abs(float(v)) < 0.999 for v in orientation)
    return row


def _source_of(incoming: Path, source_key: str) -> str | None:
    for row in read_label_manifests(incoming):
        if row["patient_key"] == source_key:
            return row["source"] or None
    return None


# ---- what a failed step removes

# What each step and everything after it in this group writes; removed when the step fails.
_OUTPUTS_FROM = {
    "raw_scan": (
        ("patients", "studies", "scans", "volumes"),
        (RAW_SCAN_FILE, NIFTI_FILE, REFERENCE_MASK_FILE, PREPROCESSED_FILE),
    ),
    "nifti_volume": (("volumes",), (NIFTI_FILE, REFERENCE_MASK_FILE, PREPROCESSED_FILE)),
    "preprocessed_volume": ((), (PREPROCESSED_FILE,)),
}
# the figures (patients/<id>/figures/<asset>_<name>.png) of those steps: (asset, name)
_FIGURES_FROM = {
    "raw_scan": (("nifti_volume", MID_SLICE), ("preprocessed_volume", MID_SLICE)),
    "nifti_volume": (("nifti_volume", MID_SLICE), ("preprocessed_volume", MID_SLICE)),
    "preprocessed_volume": (("preprocessed_volume", MID_SLICE),),
}


def forget_outputs(store: FeatureStore, data_lake: DataLake, patient_id: str, step: str) -> None:
    """Remove what `step` (raw_scan, nifti_volume or preprocessed_volume) and the ingest steps after
    it wrote for the patient: an input that no longer ingests must not leave old outputs behind as if valid."""
    tables, files = _OUTPUTS_FROM[step]
    for table in tables:
        store.delete_partition(table, patient_id)
    if step == "preprocessed_volume":  # the native volume stays valid; drop only its successor
        store.delete_partition("volumes", patient_id, match={"kind": "preprocessed"})
    for name in files:
        data_lake.remove(data_lake.patient_file(patient_id, name))
    for asset, name in _FIGURES_FROM[step]:
        data_lake.remove(data_lake.patient_figure(patient_id, asset, name))


# ---- nifti_volume and preprocessed_volume


@dataclass(frozen=True)
class VolumeResult:
    """A volume written to the lake with its `volumes` row, and its mid-slice preview (not yet written)."""

    path: str
    data_version: str
    summary: dict  # hcc_assets.imaging.volume_info.volume_summary
    has_reference_mask: bool
    figure_path: str
    png: bytes
    passed: bool  # the asset's check: geometry_plausible (native) or grid_and_intensity (preprocessed)


def read_native_volume(
    data_lake: DataLake, patient_id: str, folder: Path
) -> tuple[nib.Nifti1Image, nib.Nifti1Image | None]:
    """The T2 series raw_scan chose, as NIfTI, and the drop's reference mask, or None: the NIfTI
    beside the study (first study only: it lies on the first study's grid), else a DICOM SEG of the
    study drawn on that series (imaging/dicom_seg.py), else an RT Structure Set contouring it
    (imaging/dicom_rtstruct.py). PatientInputError when the series changed since raw_scan or the
    mask is on another grid."""
    record = json.loads(data_lake.read_bytes(data_lake.patient_file(patient_id, RAW_SCAN_FILE)))
    study_index = split_partition_key(patient_id)[1]
    _, _, inventory = inventoried_study(folder, study_index)
    series = next((s for s in inventory.series if s.series_key == record["chosen_series_key"]), None)
    if series is None or series.checksum != next(
        s["checksum"] for s in record["study"]["series"] if s["series_key"] == record["chosen_series_key"]
    ):
        raise PatientInputError("the chosen T2 series changed since raw_scan; re-materialize raw_scan")
    image, sources = nifti.series_to_volume(series)
    reference = _load_reference_mask(folder, image) if study_index == 1 else None
    if reference is None:
        labels = dicom_seg.reference_mask_from_seg(inventory.annotations, series, image, sources)
        if labels is None:
            labels = dicom_rtstruct.reference_mask_from_rtstruct(inventory.annotations, series, image)
        reference = _on_grid(labels, image) if labels is not None else None
    return image, reference


def record_native_volume(
    store: FeatureStore,
    data_lake: DataLake,
    patient_id: str,
    image: nib.Nifti1Image,
    reference: nib.Nifti1Image | None,
    run_id: str,
) -> VolumeResult:
    """The native NIfTI (and the reference mask, or none) in the lake and its `volumes` row."""
    path = data_lake.patient_file(patient_id, NIFTI_FILE)
    digest = data_lake.write_nifti(path, image)
    if reference is not None:
        data_lake.write_nifti(data_lake.patient_file(patient_id, REFERENCE_MASK_FILE), reference)
    else:
        data_lake.remove(data_lake.patient_file(patient_id, REFERENCE_MASK_FILE))

    summary = volume_summary(image)
    _replace_volume_row(
        store,
        _volume_row(patient_id, "nifti", path, digest, summary, reference is not None),
        f"nifti_volume@{NIFTI_VERSION}",
        run_id,
    )
    png = preview.mid_slice_png(image, reference, title=f"{patient_id} T2 (native)")
    plausible = summary["finite"] and all(0.2 <= s <= 12.0 for s in summary["spacing_mm"])
    return VolumeResult(
        path=path,
        data_version=digest[:16],
        summary=summary,
        has_reference_mask=reference is not None,
        figure_path=data_lake.patient_figure(patient_id, "nifti_volume", MID_SLICE),
        png=png,
        passed=bool(plausible),
    )


def read_preprocessed_volume(
    data_lake: DataLake, patient_id: str, settings: preprocess.PreprocessConfig
) -> nib.Nifti1Image:
    """The patient's native volume resampled and normalized as `settings` say."""
    image = data_lake.read_nifti(data_lake.patient_file(patient_id, NIFTI_FILE))
    return preprocess.preprocess_volume(image, settings)


def record_preprocessed_volume(
    store: FeatureStore,
    data_lake: DataLake,
    patient_id: str,
    image: nib.Nifti1Image,
    settings: preprocess.PreprocessConfig,
    run_id: str,
) -> VolumeResult:
    """The preprocessed NIfTI in the lake and its `volumes` row (versioned with a hash of `settings`)."""
    path = data_lake.patient_file(patient_id, PREPROCESSED_FILE)
    digest = data_lake.write_nifti(path, image)
    summary = volume_summary(image)
    settings_hash = sha256_bytes(settings.model_dump_json().encode())[:8]
    _replace_volume_row(
        store,
        _volume_row(patient_id, "preprocessed", path, digest, summary, False),
        f"preprocessed_volume@{PREPROCESS_VERSION}+{settings_hash}",
        run_id,
    )
    png = preview.mid_slice_png(image, title=f"{patient_id} preprocessed")
    grid_ok = summary["shape"] == list(settings.target_shape) and summary["orientation"] == "RAS" and summary["finite"]
    return VolumeResult(
        path=path,
        data_version=digest[:16],
        summary=summary,
        has_reference_mask=False,
        figure_path=data_lake.patient_figure(patient_id, "preprocessed_volume", MID_SLICE),
        png=png,
        passed=bool(grid_ok),
    )


def _volume_row(patient_id: str, kind: str, path: str, digest: str, summary: dict, has_reference: bool) -> dict:
    return {
        "patient_id": patient_id,
        "kind": kind,
        "path": path,
        "sha256": digest,
        "shape": summary["shape"],
        "spacing_mm": summary["spacing_mm"],
        "orientation": summary["orientation"],
        "intensity_mean": summary["intensity_mean"],
        "intensity_std": summary["intensity_std"],
        "has_reference_mask": has_reference,
    }


def _replace_volume_row(store: FeatureStore, row: dict, version: str, run_id: str) -> None:
    """volumes holds one row per (patient, kind); replace just this kind."""
    rows = FeatureStore.with_provenance(pl.DataFrame([row]), version=version, run_id=run_id)
    store.replace_partition("volumes", row["patient_id"], rows, match={"kind": row["kind"]})


def _load_reference_mask(folder: Path, image: nib.Nifti1Image) -> nib.Nifti1Image | None:
    """The drop's reference mask, verified to lie on the converted volume's voxel grid."""

    source = folder.joinpath(*REFERENCE_MASK_SOURCE)
    if not source.exists():
        return None
    mask = cast(nib.Nifti1Image, nib.load(source))  # nib.load is typed as the base FileBasedImage
    labels = np.asarray(mask.dataobj).astype(np.uint8)
    if mask.shape[:3] == image.shape[:3] and np.allclose(mask.affine, image.affine, atol=1e-3):
        return _on_grid(labels, image)
    try:  # the same voxels in another axis order or direction (a tool that flips rows, as dcm2niix does)
        return _on_grid(
            geometry.onto_grid(labels, mask.affine, image.shape[:3], image.affine),
            image,
        )
    except ValueError:
        raise PatientInputError(
            f"reference mask grid {mask.shape[:3]} does not match the T2 volume {image.shape[:3]} (shape or affine)"
        ) from None


def _on_grid(labels: np.ndarray, image: nib.Nifti1Image) -> nib.Nifti1Image:
    """A uint8 label volume with the T2 volume's affine and a fresh header."""
    clean = nib.Nifti1Image(labels, image.affine)
    clean.set_qform(image.affine, code=1)
    clean.set_sform(image.affine, code=1)
    return clean
