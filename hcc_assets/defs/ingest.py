"""Per-patient ingest: raw_scan -> nifti_volume -> preprocessed_volume.

Thin wiring: the imaging package does the work; these assets add partitions, lineage,
content-hash data versions, feature-store rows and what a radiologist wants to see.
Files are written by the assets themselves into the lake (no IO manager), so downstream
assets, notebooks and SQL all read the same files.
"""

import json
from typing import cast

import dagster as dg
import nibabel as nib
import numpy as np
import polars as pl

from hcc_assets.core.errors import PatientInputError
from hcc_assets.defs.deployment import deployed
from hcc_assets.defs.metadata import figure_metadata, markdown_table
from hcc_assets.defs.partitions import patients_partitions
from hcc_assets.defs.patient_errors import patient_failure
from hcc_assets.defs.resources import LakeResource
from hcc_assets.featurestore import FeatureStore
from hcc_assets.imaging import dicom_series, nifti, preprocess, preview
from hcc_assets.imaging.volume_info import volume_summary
from hcc_assets.intake.dropzone import folder_fingerprint, read_label_manifests
from hcc_assets.lake import (
    NIFTI_FILE,
    PREPROCESSED_FILE,
    RAW_SCAN_FILE,
    REFERENCE_MASK_FILE,
    sha256_bytes,
)

RAW_SCAN_VERSION = "1"
NIFTI_VERSION = "1"
PREPROCESS_VERSION = "1"

REFERENCE_MASK_SOURCE = ("reference", "liver_spleen_mask.nii.gz")


class RawScanConfig(dg.Config):
    min_slices: int = 10
    min_echo_time_ms: float = 60.0
    min_repetition_time_ms: float = 800.0
    # Refuse a T2 series above this many voxels (rows x columns x slices) before reading its pixels:
    # 100M float32 voxels is 400 MB; clinical T2 series are 0.5-30M.
    max_voxels: int = 100_000_000


class PreprocessedVolumeConfig(dg.Config):
    target_shape: list[int] = [128, 128, 64]
    intensity: str = "zscore"
    clip_percentiles: list[float] = [0.5, 99.5]
    interpolation_order: int = 1

    def to_domain(self) -> preprocess.PreprocessConfig:
        return preprocess.PreprocessConfig(
            target_shape=tuple(self.target_shape),
            intensity=self.intensity,
            clip_percentiles=tuple(self.clip_percentiles),
            interpolation_order=self.interpolation_order,
        )


def _run_id(context: dg.AssetExecutionContext) -> str:
    return context.run.run_id


@dg.asset(
    partitions_def=patients_partitions,
    code_version=RAW_SCAN_VERSION,
    group_name="ingest",
    kinds={"dicom"},
    description="Inventory of the patient's DICOM study (no PHI), the chosen T2-weighted series "
    "and why, with checksums. Rows in feature-store tables `patients` and `scans`.",
)
def raw_scan(
    context: dg.AssetExecutionContext, config: deployed(RawScanConfig, "raw_scan"), lake: LakeResource
) -> dg.MaterializeResult:
    patient_id = context.partition_key
    folder = lake.patient_folder(patient_id)
    store = lake.store
    # a study that no longer ingests must not leave its old rows and files behind as if valid
    with patient_failure(patient_id, "raw_scan", folder, cleanup=lambda: _forget(lake, patient_id, "raw_scan")):
        fingerprint = folder_fingerprint(folder)[0]
        inventory = dicom_series.inventory_study(folder)
        choice = dicom_series.choose_t2_series(
            inventory,
            min_slices=config.min_slices,
            min_echo_time_ms=config.min_echo_time_ms,
            min_repetition_time_ms=config.min_repetition_time_ms,
        )
        chosen_series = choice.series
        voxels = chosen_series.rows * chosen_series.columns * len(chosen_series.files)
        if voxels > config.max_voxels:
            raise PatientInputError(
                f"the T2 series {chosen_series.label} is {chosen_series.columns} x {chosen_series.rows} x "
                f"{len(chosen_series.files)} = {voxels:,} voxels, above the limit of {config.max_voxels:,} "
                "(raw_scan config max_voxels); refused before reading its pixels"
            )
    record = {
        "patient_id": patient_id,
        "study": inventory.to_record(),
        "chosen_series_key": choice.series.series_key,
        "t2_score": choice.t2_score,
        "choice_reason": choice.reason,
        "candidates": choice.candidates,
    }
    payload = json.dumps(record, indent=2, sort_keys=True).encode()
    digest = lake.lake.write_bytes(lake.lake.patient_file(patient_id, RAW_SCAN_FILE), payload)

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
    source = _source_of(lake, folder.name)
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
        "scans", patient_id, FeatureStore.with_provenance(scan_rows, version=version, run_id=_run_id(context))
    )
    store.replace_partition(
        "patients", patient_id, FeatureStore.with_provenance(patient_row, version=version, run_id=_run_id(context))
    )

    chosen = choice.series
    return dg.MaterializeResult(
        data_version=dg.DataVersion(digest[:16]),
        metadata={
            "chosen_series": f'#{chosen.series_number} "{chosen.description}"',
            "choice_reason": dg.MetadataValue.text(choice.reason),
            "echo_time_ms": chosen.echo_time_ms,
            "repetition_time_ms": chosen.repetition_time_ms,
            "n_series": len(inventory.series),
            "n_files": inventory.n_files,
            "series": markdown_table(
                [
                    {**series.to_record(), "chosen": series.series_key == chosen.series_key}
                    for series in inventory.series
                ],
                [
                    "series_number",
                    "description",
                    "echo_time_ms",
                    "repetition_time_ms",
                    "sequence_name",
                    "n_files",
                    "chosen",
                ],
            ),
            "study_checksum": chosen.checksum,
            # lets the sensor skip folders already ingested from the same bytes
            "drop_fingerprint": fingerprint,
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
    }
    row = {key: series_record.get(key) for key in keep}
    row["rows_px"] = series_record.get("rows")
    row["columns_px"] = series_record.get("columns")
    row["pixel_spacing_mm"] = [float(v) for v in series_record.get("pixel_spacing_mm") or []]
    orientation = series_record.get("orientation") or []
    row["oblique"] = bool(orientation) and any(0.001 < abs(float(v)) < 0.999 for v in orientation)
    return row


def _source_of(lake: LakeResource, source_key: str) -> str | None:
    for row in read_label_manifests(lake.incoming_dir):
        if row["patient_key"] == source_key:
            return row["source"] or None
    return None


# What each step and everything after it in this group writes; removed when the step fails.
_OUTPUTS_FROM = {
    "raw_scan": (("patients", "scans", "volumes"), (RAW_SCAN_FILE, NIFTI_FILE, REFERENCE_MASK_FILE, PREPROCESSED_FILE)),
    "nifti_volume": (("volumes",), (NIFTI_FILE, REFERENCE_MASK_FILE, PREPROCESSED_FILE)),
    "preprocessed_volume": ((), (PREPROCESSED_FILE,)),
}
# the figures (patients/<id>/figures/<asset>_<name>.png) of those steps: (asset, name)
_FIGURES_FROM = {
    "raw_scan": (("nifti_volume", "mid_slice"), ("preprocessed_volume", "mid_slice")),
    "nifti_volume": (("nifti_volume", "mid_slice"), ("preprocessed_volume", "mid_slice")),
    "preprocessed_volume": (("preprocessed_volume", "mid_slice"),),
}


def _forget(lake: LakeResource, patient_id: str, step: str) -> None:
    tables, files = _OUTPUTS_FROM[step]
    for table in tables:
        lake.store.delete_partition(table, patient_id)
    if step == "preprocessed_volume":  # the native volume stays valid; drop only its successor
        lake.store.delete_partition("volumes", patient_id, match={"kind": "preprocessed"})
    for name in files:
        lake.lake.remove(lake.lake.patient_file(patient_id, name))
    for asset, name in _FIGURES_FROM[step]:
        lake.lake.remove(lake.lake.patient_figure(patient_id, asset, name))


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


@dg.asset(
    partitions_def=patients_partitions,
    deps=[raw_scan],
    code_version=NIFTI_VERSION,
    group_name="ingest",
    kinds={"nifti"},
    description="The chosen T2 series as NIfTI (RAS affine, slices ordered by position, rescale "
    "applied, de-identified header), plus the reference liver/spleen mask when the drop has one.",
    check_specs=[dg.AssetCheckSpec("geometry_plausible", asset="nifti_volume")],
)
def nifti_volume(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
    patient_id = context.partition_key
    folder = lake.patient_folder(patient_id)
    data_lake = lake.lake
    with patient_failure(patient_id, "nifti_volume", folder, cleanup=lambda: _forget(lake, patient_id, "nifti_volume")):
        record = json.loads(data_lake.read_bytes(data_lake.patient_file(patient_id, RAW_SCAN_FILE)))
        inventory = dicom_series.inventory_study(folder)
        series = next((s for s in inventory.series if s.series_key == record["chosen_series_key"]), None)
        if series is None or series.checksum != next(
            s["checksum"] for s in record["study"]["series"] if s["series_key"] == record["chosen_series_key"]
        ):
            raise PatientInputError("the chosen T2 series changed since raw_scan; re-materialize raw_scan")
        image = nifti.series_to_nifti(series)
        reference = _load_reference_mask(folder, image)
    path = data_lake.patient_file(patient_id, NIFTI_FILE)
    digest = data_lake.write_nifti(path, image)
    if reference is not None:
        data_lake.write_nifti(data_lake.patient_file(patient_id, REFERENCE_MASK_FILE), reference)
    else:
        data_lake.remove(data_lake.patient_file(patient_id, REFERENCE_MASK_FILE))

    summary = volume_summary(image)
    _replace_volume_row(
        lake.store,
        _volume_row(patient_id, "nifti", path, digest, summary, reference is not None),
        f"nifti_volume@{NIFTI_VERSION}",
        _run_id(context),
    )
    png = preview.mid_slice_png(image, reference, title=f"{patient_id} T2 (native)")
    plausible = summary["finite"] and all(0.2 <= s <= 12.0 for s in summary["spacing_mm"])
    return dg.MaterializeResult(
        data_version=dg.DataVersion(digest[:16]),
        metadata={
            "shape": dg.MetadataValue.json(summary["shape"]),
            "spacing_mm": dg.MetadataValue.json(summary["spacing_mm"]),
            "orientation": summary["orientation"],
            "obliquity_deg": summary["obliquity_deg"],
            "has_reference_mask": reference is not None,
            "path": dg.MetadataValue.path(path),
            **figure_metadata(
                data_lake,
                "mid_slice",
                data_lake.patient_figure(patient_id, "nifti_volume", "mid_slice"),
                png,
                "mid axial slice",
            ),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="geometry_plausible",
                passed=bool(plausible),
                metadata={"spacing_mm": dg.MetadataValue.json(summary["spacing_mm"]), "finite": summary["finite"]},
            )
        ],
    )


def _load_reference_mask(folder, image):
    """The drop's reference mask, verified to lie on the converted volume's voxel grid."""

    source = folder.joinpath(*REFERENCE_MASK_SOURCE)
    if not source.exists():
        return None
    mask = cast(nib.Nifti1Image, nib.load(source))  # nib.load is typed as the base FileBasedImage
    if mask.shape[:3] != image.shape[:3] or not np.allclose(mask.affine, image.affine, atol=1e-3):
        raise PatientInputError(
            f"reference mask grid {mask.shape[:3]} does not match the T2 volume {image.shape[:3]} (shape or affine)"
        )
    data = np.asarray(mask.dataobj).astype(np.uint8)
    clean = nib.Nifti1Image(data, image.affine)
    clean.set_qform(image.affine, code=1)
    clean.set_sform(image.affine, code=1)
    return clean


@dg.asset(
    partitions_def=patients_partitions,
    deps=[nifti_volume],
    code_version=PREPROCESS_VERSION,
    group_name="ingest",
    kinds={"nifti"},
    description="RAS-oriented volume resampled to the model grid (default 128x128x64) with "
    "normalized intensities; the input of segmentation and the deep model.",
    check_specs=[dg.AssetCheckSpec("grid_and_intensity", asset="preprocessed_volume")],
)
def preprocessed_volume(
    context: dg.AssetExecutionContext,
    config: deployed(PreprocessedVolumeConfig, "preprocessed_volume"),
    lake: LakeResource,
) -> dg.MaterializeResult:
    patient_id = context.partition_key
    data_lake = lake.lake
    settings = config.to_domain()
    with patient_failure(
        patient_id, "preprocessed_volume", cleanup=lambda: _forget(lake, patient_id, "preprocessed_volume")
    ):
        image = data_lake.read_nifti(data_lake.patient_file(patient_id, NIFTI_FILE))
        result = preprocess.preprocess_volume(image, settings)
    path = data_lake.patient_file(patient_id, PREPROCESSED_FILE)
    digest = data_lake.write_nifti(path, result)
    summary = volume_summary(result)
    settings_hash = sha256_bytes(settings.model_dump_json().encode())[:8]
    _replace_volume_row(
        lake.store,
        _volume_row(patient_id, "preprocessed", path, digest, summary, False),
        f"preprocessed_volume@{PREPROCESS_VERSION}+{settings_hash}",
        _run_id(context),
    )
    png = preview.mid_slice_png(result, title=f"{patient_id} preprocessed")
    grid_ok = summary["shape"] == list(settings.target_shape) and summary["orientation"] == "RAS" and summary["finite"]
    return dg.MaterializeResult(
        data_version=dg.DataVersion(digest[:16]),
        metadata={
            "shape": dg.MetadataValue.json(summary["shape"]),
            "spacing_mm": dg.MetadataValue.json(summary["spacing_mm"]),
            "orientation": summary["orientation"],
            "intensity_mean": summary["intensity_mean"],
            "intensity_std": summary["intensity_std"],
            "preprocess_config": dg.MetadataValue.json(settings.model_dump(mode="json")),
            "path": dg.MetadataValue.path(path),
            **figure_metadata(
                data_lake,
                "mid_slice",
                data_lake.patient_figure(patient_id, "preprocessed_volume", "mid_slice"),
                png,
                "mid axial slice",
            ),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="grid_and_intensity",
                passed=bool(grid_ok),
                metadata={"shape": dg.MetadataValue.json(summary["shape"]), "orientation": summary["orientation"]},
            )
        ],
    )
