"""The ingest and cohort use cases (hcc_assets.steps), called directly: no Dagster, a temporary lake
and feature store over a copy of the synthetic drop zone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hcc_assets.core.errors import PatientInputError
from hcc_assets.featurestore import FeatureStore
from hcc_assets.imaging.preprocess import PreprocessConfig
from hcc_assets.lake import NIFTI_FILE, PREPROCESSED_FILE, RAW_SCAN_FILE, REFERENCE_MASK_FILE, DataLake, sha256_bytes
from hcc_assets.steps import ingest
from hcc_assets.steps.cohort import LABELS_STAGE, build_cohort

SMALL_GRID = PreprocessConfig(target_shape=(32, 32, 16))
LIMITS = dict(min_slices=10, min_echo_time_ms=60.0, min_repetition_time_ms=800.0, max_voxels=100_000_000)


def _id(folder_name: str) -> str:
    """A stand-in pseudonym: these tests choose the patient ids themselves."""
    return f"pt-{folder_name.lower()}"


@pytest.fixture
def lake(incoming_copy, tmp_path):
    incoming, _patients = incoming_copy
    folders = sorted(p for p in incoming.iterdir() if p.is_dir())
    return incoming, folders, DataLake(tmp_path / "lake"), FeatureStore(tmp_path / "fs.sqlite")


def _ingest(store: FeatureStore, data_lake: DataLake, incoming: Path, folder: Path, run_id: str = "run-1"):
    patient_id = _id(folder.name)
    study = ingest.read_study(folder, **LIMITS)
    raw = ingest.record_raw_scan(store, data_lake, patient_id, study, incoming, run_id)
    image, reference = ingest.read_native_volume(data_lake, patient_id, folder)
    native = ingest.record_native_volume(store, data_lake, patient_id, image, reference, run_id)
    image = ingest.read_preprocessed_volume(data_lake, patient_id, SMALL_GRID)
    preprocessed = ingest.record_preprocessed_volume(store, data_lake, patient_id, image, SMALL_GRID, run_id)
    return patient_id, raw, native, preprocessed


def test_ingest_steps_write_the_lake_files_and_rows_they_report(lake):
    incoming, folders, data_lake, store = lake
    folder = folders[0]
    patient_id, raw, native, preprocessed = _ingest(store, data_lake, incoming, folder)

    # raw_scan: the study record, one scans row per series (one chosen), the patients row
    record = json.loads(data_lake.read_bytes(data_lake.patient_file(patient_id, RAW_SCAN_FILE)))
    assert (
        raw.data_version == sha256_bytes(data_lake.read_bytes(data_lake.patient_file(patient_id, RAW_SCAN_FILE)))[:16]
    )
    scans = store.query("SELECT series_key, chosen, run_id FROM scans WHERE patient_id = ?", [patient_id])
    assert scans.height == raw.n_series == len(raw.series) == len(record["study"]["series"])
    assert scans.filter(scans["chosen"])["series_key"].to_list() == [record["chosen_series_key"]]
    assert set(scans["run_id"]) == {"run-1"}
    assert [row["chosen"] for row in raw.series].count(True) == 1
    assert all(list(row) == list(ingest.SERIES_COLUMNS) for row in raw.series)
    assert "T2" in raw.chosen_series and "TE" in raw.choice_reason
    patient = store.query("SELECT source, ingest_status, n_series FROM patients WHERE patient_id = ?", [patient_id])
    assert patient.to_dicts() == [{"source": "synthetic", "ingest_status": "ok", "n_series": raw.n_series}]

    # nifti_volume: the file whose hash is the data version, its volumes row, a passing check
    nifti_path = data_lake.patient_file(patient_id, NIFTI_FILE)
    assert native.path == nifti_path
    assert native.data_version == sha256_bytes(data_lake.read_bytes(nifti_path))[:16]
    assert native.has_reference_mask == (folder / "reference" / "liver_spleen_mask.nii.gz").exists()
    assert native.has_reference_mask == data_lake.exists(data_lake.patient_file(patient_id, REFERENCE_MASK_FILE))
    assert native.passed and native.png.startswith(b"\x89PNG")
    assert native.figure_path.endswith(f"patients/{patient_id}/figures/nifti_volume_mid_slice.png")
    assert not data_lake.exists(native.figure_path)  # the asset writes the figure, with its metadata

    # preprocessed_volume: on the configured grid, versioned with the settings' hash
    assert preprocessed.summary["shape"] == [32, 32, 16] and preprocessed.summary["orientation"] == "RAS"
    assert preprocessed.passed
    volumes = store.query(
        "SELECT kind, sha256, shape, version FROM volumes WHERE patient_id = ? ORDER BY kind", [patient_id]
    )
    assert volumes["kind"].to_list() == ["nifti", "preprocessed"]
    assert volumes["sha256"].to_list() == [
        sha256_bytes(data_lake.read_bytes(nifti_path)),
        sha256_bytes(data_lake.read_bytes(data_lake.patient_file(patient_id, PREPROCESSED_FILE))),
    ]
    settings_hash = sha256_bytes(SMALL_GRID.model_dump_json().encode())[:8]
    assert volumes["version"].to_list() == [
        f"nifti_volume@{ingest.NIFTI_VERSION}",
        f"preprocessed_volume@{ingest.PREPROCESS_VERSION}+{settings_hash}",
    ]


def test_a_series_above_max_voxels_is_refused_before_its_pixels_are_read(lake):
    _incoming, folders, _data_lake, _store = lake
    with pytest.raises(PatientInputError, match=r"voxels, above the limit of 10 \(raw_scan config max_voxels\)"):
        ingest.read_study(folders[0], **{**LIMITS, "max_voxels": 10})


def test_a_series_changed_since_raw_scan_is_refused(lake):
    incoming, folders, data_lake, store = lake
    patient_id, *_ = _ingest(store, data_lake, incoming, folders[0])
    path = data_lake.patient_file(patient_id, RAW_SCAN_FILE)
    record = json.loads(data_lake.read_bytes(path))
    for series in record["study"]["series"]:
        series["checksum"] = "0" * 64
    data_lake.write_bytes(path, json.dumps(record).encode())
    with pytest.raises(PatientInputError, match="the chosen T2 series changed since raw_scan"):
        ingest.read_native_volume(data_lake, patient_id, folders[0])


def test_a_file_rewritten_in_place_after_raw_scan_is_seen_by_nifti_volume(lake):
    """The study inventory raw_scan read is reused by nifti_volume in the same process only while
    no file changed: one chosen-series file rewritten with the same size is noticed."""
    incoming, folders, data_lake, store = lake
    folder = folders[0]
    study = ingest.read_study(folder, **LIMITS)
    assert ingest.inventoried_study(folder, 1)[2] is study.inventory  # unchanged: not read again
    patient_id = _id(folder.name)
    ingest.record_raw_scan(store, data_lake, patient_id, study, incoming, "run-1")
    victim = study.choice.series.files[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # the last pixel byte: same size, same header
    victim.write_bytes(bytes(data))
    with pytest.raises(PatientInputError, match="the chosen T2 series changed since raw_scan"):
        ingest.read_native_volume(data_lake, patient_id, folder)


def test_forget_outputs_removes_the_step_and_what_follows_it(lake):
    incoming, folders, data_lake, store = lake
    patient_id, _raw, native, preprocessed = _ingest(store, data_lake, incoming, folders[0])
    data_lake.write_bytes(preprocessed.figure_path, preprocessed.png)

    def kinds() -> list[str]:
        return store.query("SELECT kind FROM volumes WHERE patient_id = ? ORDER BY kind", [patient_id])[
            "kind"
        ].to_list()

    ingest.forget_outputs(store, data_lake, patient_id, "preprocessed_volume")
    assert kinds() == ["nifti"]  # the native volume stays valid
    assert data_lake.exists(native.path) and not data_lake.exists(preprocessed.path)
    assert not data_lake.exists(preprocessed.figure_path)

    ingest.forget_outputs(store, data_lake, patient_id, "raw_scan")
    assert kinds() == []
    for table in ("patients", "scans"):
        assert store.query(f"SELECT count(*) FROM {table} WHERE patient_id = ?", [patient_id]).item() == 0
    assert not data_lake.exists(native.path)
    assert not data_lake.exists(data_lake.patient_file(patient_id, RAW_SCAN_FILE))


def test_build_cohort_splits_the_labelled_ingested_patients_and_excludes_label_problems(lake):
    incoming, folders, data_lake, store = lake
    for folder in folders:
        _ingest(store, data_lake, incoming, folder)
    conflicting, unknown = folders[0].name, "MRN00000001"
    (incoming / "labels_extra.csv").write_text(
        f"patient_key,hcc,source\n{conflicting},2,synthetic\n{unknown},1,synthetic\n", encoding="utf-8"
    )
    warnings: list[str] = []
    result = build_cohort(store, incoming, _id, 0.25, 7, "run-1", warnings.append)

    split = store.query("SELECT patient_id, split, seed FROM cohort_split ORDER BY patient_id")
    assert _id(conflicting) not in split["patient_id"].to_list()
    assert split.height == len(folders) - 1 == result.metadata["n_patients"]
    assert set(split["seed"]) == {7} and result.metadata["seed"] == 7
    assert sum(result.per_split.values()) == split.height
    assert result.both_classes == all(
        result.per_split.get(f"{s}_{c}", 0) > 0 for s in ("train", "validation") for c in ("hcc", "healthy")
    )
    assert warnings == [f"labels: {_id(conflicting)}: {problem}" for problem in _problems(result, _id(conflicting))]
    exclusions = store.query("SELECT patient_id, stage FROM exclusions")
    assert exclusions.to_dicts() == [{"patient_id": _id(conflicting), "stage": LABELS_STAGE}]
    assert result.metadata["labelled_not_ingested"] == 1
    assert result.label_report[-1]["patient_id"] == _id(unknown)
    assert result.labels_description is not None and result.labels_description.startswith("2 label problem(s): ")

    # the same labels again: the same split and data version, and no label problems once they are fixed
    (incoming / "labels_extra.csv").unlink()
    fixed = build_cohort(store, incoming, _id, 0.25, 7, "run-2")
    assert fixed.label_report == [] and fixed.labels_description is None
    assert store.query("SELECT count(*) FROM exclusions").item() == 0
    assert fixed.metadata["n_patients"] == len(folders)
    assert build_cohort(store, incoming, _id, 0.25, 7, "run-3").data_version == fixed.data_version


def _problems(result, patient_id: str) -> list[str]:
    return [row["problem"] for row in result.label_report if row["patient_id"] == patient_id]


def test_a_patient_whose_t2_is_lossy_is_ingested_flagged_and_left_out_of_the_cohort(lake):
    import shutil

    from hcc_assets.steps.cohort import LOSSY_STAGE
    from hcc_assets.synthetic.transfer_syntax import encode

    incoming, folders, data_lake, store = lake
    victim = folders[1]
    t2 = ingest.read_study(victim, **LIMITS).choice.series
    original = victim.parent / ".original_t2"
    shutil.copytree(t2.files[0].parent, original)
    for path in t2.files:  # the same T2, as a PACS that stores JPEG 2000 (lossy) sends it
        path.write_bytes(encode(path.read_bytes(), "jpeg2000-lossy"))
    for folder in folders:
        _ingest(store, data_lake, incoming, folder)
    lossy = store.query("SELECT patient_id, lossy, lossy_ratio FROM scans WHERE chosen AND lossy")
    assert lossy["patient_id"].to_list() == [_id(victim.name)] and lossy["lossy_ratio"][0] > 2

    result = build_cohort(store, incoming, _id, 0.25, 7, "run-1")
    assert _id(victim.name) not in store.query("SELECT patient_id FROM cohort_split")["patient_id"].to_list()
    assert result.metadata["n_patients"] == len(folders) - 1 and result.metadata["lossy_excluded"] == 1
    exclusions = store.query("SELECT patient_id, stage FROM exclusions").to_dicts()
    assert exclusions == [{"patient_id": _id(victim.name), "stage": LOSSY_STAGE}]

    # the lossless files delivered again: back in the cohort, its exclusion gone
    shutil.rmtree(t2.files[0].parent)
    shutil.copytree(original, t2.files[0].parent)
    _ingest(store, data_lake, incoming, victim, "run-2")
    again = build_cohort(store, incoming, _id, 0.25, 7, "run-2")
    assert again.metadata["n_patients"] == len(folders) and again.metadata["lossy_excluded"] == 0
    assert store.query("SELECT count(*) FROM exclusions").item() == 0


def test_a_dicom_seg_in_place_of_the_nifti_reference_gives_the_same_reference_mask(lake):
    """A drop whose reference mask comes as a DICOM SEG drawn on its T2 series (as a hospital viewer
    saves it) instead of reference/liver_spleen_mask.nii.gz: nifti_volume writes the same mask."""
    import nibabel as nib
    import numpy as np

    from hcc_assets.imaging import dicom_series
    from hcc_assets_tests.imaging.test_dicom_seg import write_seg

    incoming, folders, data_lake, store = lake
    folder = next(f for f in folders if (f / "reference" / "liver_spleen_mask.nii.gz").exists())
    nifti_reference = folder / "reference" / "liver_spleen_mask.nii.gz"
    expected = np.asarray(nib.load(nifti_reference).dataobj).astype(np.uint8)
    assert set(np.unique(expected)) == {0, 1, 2}
    t2 = dicom_series.choose_t2_series(dicom_series.inventory_study(folder)).series
    write_seg(t2.files[0].parent.parent / "seg", t2.files[0].parent, expected)
    nifti_reference.unlink()

    patient_id, _raw, native, _preprocessed = _ingest(store, data_lake, incoming, folder)

    assert native.has_reference_mask
    written = nib.load(data_lake.patient_file(patient_id, REFERENCE_MASK_FILE))
    assert np.array_equal(np.asarray(written.dataobj), expected)
    assert np.allclose(written.affine, nib.load(data_lake.patient_file(patient_id, NIFTI_FILE)).affine)


def test_a_nifti_reference_saved_in_another_axis_order_is_put_on_the_t2_grid(lake):
    """A reference mask drawn on a dcm2niix conversion (rows flipped) or saved by a tool in another
    axis order: the same voxels, so it is placed on the T2 grid; one shifted by half a voxel is not."""
    import nibabel as nib
    import numpy as np

    incoming, folders, data_lake, store = lake
    folder = next(f for f in folders if (f / "reference" / "liver_spleen_mask.nii.gz").exists())
    path = folder / "reference" / "liver_spleen_mask.nii.gz"
    original = nib.load(path)
    expected = np.asarray(original.dataobj).astype(np.uint8)
    # rows flipped and the first two axes swapped: a voxel-for-voxel reordering with its own affine
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1, expected.shape[1] - 1
    swap = np.eye(4)[[1, 0, 2, 3]]
    reordered = np.flip(expected, axis=1).transpose(1, 0, 2)
    nib.save(nib.Nifti1Image(reordered, original.affine @ flip @ swap), path)

    patient_id, _raw, native, _preprocessed = _ingest(store, data_lake, incoming, folder)

    assert native.has_reference_mask
    written = nib.load(data_lake.patient_file(patient_id, REFERENCE_MASK_FILE))
    assert np.array_equal(np.asarray(written.dataobj), expected)

    shifted = original.affine.copy()
    shifted[:3, 3] += original.affine[:3, 0] / 2  # half a voxel along i: not the T2's voxels
    nib.save(nib.Nifti1Image(expected, shifted), path)
    with pytest.raises(PatientInputError, match=r"reference mask grid .* does not match the T2 volume"):
        ingest.read_native_volume(data_lake, patient_id, folder)


def test_an_rt_structure_set_in_place_of_the_nifti_reference_becomes_the_reference_mask(lake):
    """A drop whose reference comes as an RT Structure Set contouring its T2 (as a contouring tool
    saves it): nifti_volume fills the contours onto the T2 grid and writes them as the mask."""
    import nibabel as nib
    import numpy as np

    from hcc_assets_tests.imaging.test_dicom_rtstruct import truth, write_rtstruct

    incoming, folders, data_lake, store = lake
    folder = next(f for f in folders if (f / "reference" / "liver_spleen_mask.nii.gz").exists())
    shape = nib.load(folder / "reference" / "liver_spleen_mask.nii.gz").shape
    (folder / "reference" / "liver_spleen_mask.nii.gz").unlink()
    write_rtstruct(folder / "rtstruct", folder)

    patient_id, _raw, native, _preprocessed = _ingest(store, data_lake, incoming, folder)

    assert native.has_reference_mask
    written = nib.load(data_lake.patient_file(patient_id, REFERENCE_MASK_FILE))
    assert np.array_equal(np.asarray(written.dataobj), truth(shape=shape))
