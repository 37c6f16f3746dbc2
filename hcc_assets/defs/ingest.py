"""Per-patient ingest: raw_scan -> nifti_volume -> preprocessed_volume.

Thin wiring: hcc_assets.steps.ingest does the work (with the imaging package); these assets add
partitions, lineage, content-hash data versions and what a radiologist wants to see.
Files are written into the lake (no IO manager), so downstream assets, notebooks and SQL all read
the same files.
"""

from contextlib import AbstractContextManager
from pathlib import Path

import dagster as dg

from hcc_assets.defs.deployment import deployed
from hcc_assets.defs.metadata import figure_metadata, markdown_table
from hcc_assets.defs.partitions import patients_partitions
from hcc_assets.defs.patient_errors import patient_failure
from hcc_assets.defs.resources import LakeResource
from hcc_assets.imaging import preprocess
from hcc_assets.intake.pseudonym import split_partition_key
from hcc_assets.lake import DataLake
from hcc_assets.steps import ingest
from hcc_assets.steps.ingest import MID_SLICE, NIFTI_VERSION, PREPROCESS_VERSION, RAW_SCAN_VERSION


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


def _failures(
    lake: LakeResource, patient_id: str, step: str, folder: Path | None = None
) -> AbstractContextManager[None]:
    """Any error of reading the patient's input: a Failure naming the patient, after removing
    what this step and the ones after it wrote (old outputs must not stay behind as if valid)."""
    return patient_failure(
        patient_id, step, folder, cleanup=lambda: ingest.forget_outputs(lake.store, lake.lake, patient_id, step)
    )


def _volume_metadata(data_lake: DataLake, result: ingest.VolumeResult, details: dict) -> dict:
    """shape, spacing, `details`, the path, and the mid-slice figure (written to the lake here)."""
    return {
        "shape": dg.MetadataValue.json(result.summary["shape"]),
        "spacing_mm": dg.MetadataValue.json(result.summary["spacing_mm"]),
        **details,
        "path": dg.MetadataValue.path(result.path),
        **figure_metadata(data_lake, MID_SLICE, result.figure_path, result.png, "mid axial slice"),
    }


@dg.asset(
    partitions_def=patients_partitions,
    code_version=RAW_SCAN_VERSION,
    group_name="ingest",
    kinds={"dicom"},
    description="Inventory of one DICOM study of the patient (no PHI; a follow-up study is partition "
    "`<pseudonym>.s<n>`), the chosen T2-weighted series and why, with checksums. Rows in feature-store "
    "tables `patients`, `studies` and `scans`.",
)
def raw_scan(
    context: dg.AssetExecutionContext, config: deployed(RawScanConfig, "raw_scan"), lake: LakeResource
) -> dg.MaterializeResult:
    patient_id = context.partition_key
    folder = lake.patient_folder(patient_id)
    store = lake.store
    with _failures(lake, patient_id, "raw_scan", folder):
        study = ingest.read_study(
            folder,
            config.min_slices,
            config.min_echo_time_ms,
            config.min_repetition_time_ms,
            config.max_voxels,
            study_index=split_partition_key(patient_id)[1],
        )
    result = ingest.record_raw_scan(store, lake.lake, patient_id, study, lake.incoming_dir, context.run.run_id)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(result.data_version),
        metadata={
            "chosen_series": result.chosen_series,
            "choice_reason": dg.MetadataValue.text(result.choice_reason),
            "echo_time_ms": result.echo_time_ms,
            "repetition_time_ms": result.repetition_time_ms,
            "n_series": result.n_series,
            "n_files": result.n_files,
            "study_index": result.study_index,
            "days_since_first": result.days_since_first,
            "series": markdown_table(result.series, list(ingest.SERIES_COLUMNS)),
            "study_checksum": result.study_checksum,
            **({"files_left_out": dg.MetadataValue.json(result.n_files_left_out)} if result.n_files_left_out else {}),
            # lets the sensor skip folders already ingested from the same bytes
            "drop_fingerprint": result.drop_fingerprint,
        },
    )


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
    with _failures(lake, patient_id, "nifti_volume", folder):
        image, reference = ingest.read_native_volume(data_lake, patient_id, folder)
    result = ingest.record_native_volume(lake.store, data_lake, patient_id, image, reference, context.run.run_id)
    summary = result.summary
    return dg.MaterializeResult(
        data_version=dg.DataVersion(result.data_version),
        metadata=_volume_metadata(
            data_lake,
            result,
            {
                "orientation": summary["orientation"],
                "obliquity_deg": summary["obliquity_deg"],
                "has_reference_mask": result.has_reference_mask,
            },
        ),
        check_results=[
            dg.AssetCheckResult(
                check_name="geometry_plausible",
                passed=result.passed,
                metadata={"spacing_mm": dg.MetadataValue.json(summary["spacing_mm"]), "finite": summary["finite"]},
            )
        ],
    )


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
    with _failures(lake, patient_id, "preprocessed_volume"):
        image = ingest.read_preprocessed_volume(data_lake, patient_id, settings)
    result = ingest.record_preprocessed_volume(lake.store, data_lake, patient_id, image, settings, context.run.run_id)
    summary = result.summary
    return dg.MaterializeResult(
        data_version=dg.DataVersion(result.data_version),
        metadata=_volume_metadata(
            data_lake,
            result,
            {
                **{key: summary[key] for key in ("orientation", "intensity_mean", "intensity_std")},
                "preprocess_config": dg.MetadataValue.json(settings.model_dump(mode="json")),
            },
        ),
        check_results=[
            dg.AssetCheckResult(
                check_name="grid_and_intensity",
                passed=result.passed,
                metadata={"shape": dg.MetadataValue.json(summary["shape"]), "orientation": summary["orientation"]},
            )
        ],
    )
