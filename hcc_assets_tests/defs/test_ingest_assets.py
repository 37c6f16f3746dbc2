"""Real Dagster materializations of the per-patient and cohort assets on a synthetic cohort."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from hcc_assets.imaging.dicom_series import choose_t2_series, inventory_study
from hcc_assets.lake import DataLake
from hcc_assets_tests.defs.helpers import check_figure, ingest_patient, materialize_cohort, module_platform


@pytest.fixture(scope="module")
def ingested(small_cohort, tmp_path_factory):
    """The cohort ingested once for the module: the tests read it, re-ingest one patient and split it."""
    source, patients = small_cohort
    with module_platform(tmp_path_factory, "ingest_assets", source) as (_root, lake, instance, pids):
        results = {pid: ingest_patient(instance, lake, pid) for pid in pids}
        yield instance, lake, pids, results, patients


def test_every_patient_gets_volumes_rows_and_radiologist_metadata(ingested):
    _instance, lake, pids, results, patients = ingested
    assert len(pids) == len(patients)
    data_lake = DataLake(lake.root)
    store = lake.store
    for pid in pids:
        result = results[pid]
        assert result.success
        raw = result.asset_materializations_for_node("raw_scan")[0]
        assert "T2" in raw.metadata["chosen_series"].value
        assert "TE" in raw.metadata["choice_reason"].value
        nifti_meta = result.asset_materializations_for_node("nifti_volume")[0].metadata
        # figures are lake files under the patient's pseudonym; metadata has their path and a thumbnail
        for asset in ("nifti_volume", "preprocessed_volume"):
            meta = result.asset_materializations_for_node(asset)[0].metadata
            path = data_lake.patient_figure(pid, asset, "mid_slice")
            assert path.endswith(f"patients/{pid}/figures/{asset}_mid_slice.png")
            check_figure(meta, "mid_slice", data_lake, path, "mid axial slice")
        assert len(nifti_meta["shape"].value) == 3 and nifti_meta["has_reference_mask"].value is True
        pre = nib.load(data_lake.patient_file(pid, "preprocessed_volume.nii.gz"))
        assert pre.shape == (128, 128, 64) and "".join(nib.aff2axcodes(pre.affine)) == "RAS"
        assert pre.get_data_dtype() == np.float32
        native = nib.load(data_lake.patient_file(pid, "nifti_volume.nii.gz"))
        mask = nib.load(data_lake.patient_file(pid, "reference_mask.nii.gz"))
        assert mask.shape == native.shape and np.allclose(mask.affine, native.affine)
        checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
        assert checks == {"geometry_plausible": True, "grid_and_intensity": True}
        record = json.loads(data_lake.read_bytes(data_lake.patient_file(pid, "raw_scan.json")))
        assert len(record["study"]["series"]) == 3
        assert "files_left_out" not in raw.metadata and "n_companion_files" not in record["study"]

    scans = store.query("SELECT patient_id, count(*) AS n, sum(chosen::INT) AS chosen FROM scans GROUP BY 1")
    assert sorted(scans["patient_id"]) == pids
    assert set(scans["n"]) == {3} and set(scans["chosen"]) == {1}
    chosen = store.query("SELECT DISTINCT description FROM scans WHERE chosen")["description"].to_list()
    assert all("T2" in d for d in chosen)
    volumes = store.query("SELECT kind, count(*) AS n FROM volumes GROUP BY 1 ORDER BY 1")
    assert volumes.rows() == [("nifti", len(pids)), ("preprocessed", len(pids))]
    assert store.query("SELECT count(*) FROM patients").item() == len(pids)


def test_rematerializing_replaces_rows_and_keeps_data_versions(ingested):
    instance, lake, pids, results, _ = ingested
    pid = pids[0]
    before = lake.store.query("SELECT run_id FROM scans WHERE patient_id = ?", [pid])["run_id"].unique().to_list()
    again = ingest_patient(instance, lake, pid)
    counts = lake.store.query("SELECT count(*) AS n FROM scans WHERE patient_id = ?", [pid]).item()
    assert counts == 3
    after = lake.store.query("SELECT run_id FROM scans WHERE patient_id = ?", [pid])["run_id"].unique().to_list()
    assert after == [again.run_id] and before != after
    for asset in ("raw_scan", "nifti_volume", "preprocessed_volume"):
        old = results[pid].asset_materializations_for_node(asset)[0].tags["dagster/data_version"]
        new = again.asset_materializations_for_node(asset)[0].tags["dagster/data_version"]
        assert old == new, asset


def test_cohort_split_is_stratified_and_stored(ingested):
    instance, lake, pids, _, patients = ingested
    result = materialize_cohort(instance, lake)
    assert result.success
    split = lake.store.query("SELECT patient_id, hcc, split, seed FROM cohort_split ORDER BY patient_id")
    assert split["patient_id"].to_list() == pids
    truth = {lake.pseudonym(p.patient_key): p.hcc for p in patients}
    assert dict(zip(split["patient_id"], split["hcc"])) == truth
    validation = split.filter(split["split"] == "validation")
    assert validation.height == round(0.2 * len(pids))
    first = split["split"].to_list()
    assert materialize_cohort(instance, lake).success
    again = lake.store.query("SELECT split FROM cohort_split ORDER BY patient_id")["split"].to_list()
    assert again == first  # seeded


def test_a_readme_and_copied_slices_are_left_out_shown_and_change_no_volume(ingested):
    """An export's README beside the study and two slices exported twice: raw_scan says what it left
    out (metadata and raw_scan.json); the volumes keep their bytes and data versions."""
    instance, lake, pids, results, patients = ingested
    pid = pids[-1]
    folder = next(lake.incoming_dir / p.patient_key for p in patients if lake.pseudonym(p.patient_key) == pid)
    (folder / "README.TXT").write_text("exported for MRN 4711\n")
    t2_files = choose_t2_series(inventory_study(folder)).series.files
    for path in t2_files[:2]:
        shutil.copy(path, path.with_name(f"copy_{path.name}"))

    again = ingest_patient(instance, lake, pid)

    raw = again.asset_materializations_for_node("raw_scan")[0]
    assert raw.metadata["files_left_out"].value == {
        "companion files (not DICOM, no images in their folder)": 1,
        "second copies of an instance": 2,
    }
    data_lake = DataLake(lake.root)
    record = json.loads(data_lake.read_bytes(data_lake.patient_file(pid, "raw_scan.json")))
    assert (record["study"]["n_companion_files"], record["study"]["n_duplicate_files"]) == (1, 2)
    for asset in ("nifti_volume", "preprocessed_volume"):
        old = results[pid].asset_materializations_for_node(asset)[0].tags["dagster/data_version"]
        assert again.asset_materializations_for_node(asset)[0].tags["dagster/data_version"] == old, asset
