"""The data lake on a non-local fsspec filesystem (memory://, standing in for s3://).

The per-patient chain raw_scan -> nifti_volume -> preprocessed_volume, a (tiny) nnU-Net training
staged in a temporary folder and uploaded into the lake, and liver_mask -> radiomic_features with
the model folder staged back down, all with the lake on memory://. memory:// lives inside one
process, so everything runs with the in-process executor (dg.materialize). The DuckDB feature store
and the drop zone are local files, configured explicitly, and nothing else may appear on disk.
"""

import hashlib
import json
import shutil
import tempfile

import dagster as dg
import fsspec
import pytest

from hcc_assets.defs.cohort import cohort
from hcc_assets.defs.resources import LakeResource
from hcc_assets.defs.segmentation import liver_mask, liver_segmentation_model, radiomic_features
from hcc_assets.featurestore import FeatureStoreError
from hcc_assets.lake import LIVER_MASK_FILE, NIFTI_FILE, PREPROCESSED_FILE, RAW_SCAN_FILE, REFERENCE_MASK_FILE, DataLake
from hcc_assets.radiomics import MIN_ROI_VOXELS
from hcc_assets.steps import segmentation as segmentation_steps
from hcc_assets_tests.defs.helpers import PATIENT_ASSETS, failure_message
from hcc_assets_tests.model_configs import suite_compute

# Enough to get a non-empty liver label on the 64-matrix phantom in a few seconds; quality is not the point.
TINY_TRAINING = {
    "epochs": 3,
    "iterations_per_epoch": 8,
    "val_iterations_per_epoch": 1,
    "initial_lr": 0.02,
    "spacing": [],
    "seed": 7,
    "cpu_bf16": False,  # float32 on every CPU, as model_configs.SEGMENTATION_TRAINING
    "max_training_cases": 2,
    "hold_out_validation_split": False,
}
ALL_ASSETS = [*PATIENT_ASSETS, cohort, liver_segmentation_model, liver_mask, radiomic_features]


def test_remote_root_needs_local_feature_store_and_drop_zone(memory_root):
    lake = LakeResource(root=memory_root)
    with pytest.raises(ValueError, match=r"set LakeResource\.feature_store"):
        _ = lake.store
    with pytest.raises(ValueError, match=r"set LakeResource\.incoming"):
        _ = lake.incoming_dir
    with pytest.raises(FeatureStoreError, match="local SQLite file path or postgres"):
        _ = LakeResource(root=memory_root, feature_store=f"{memory_root}/fs.sqlite").store
    assert (
        DataLake(memory_root).patient_file("pt-x", NIFTI_FILE)
        == f"memory:///{memory_root.removeprefix('memory://')}/patients/pt-x/{NIFTI_FILE}"
    )


def test_patient_chain_and_segmentation_on_a_memory_lake(small_cohort, tmp_path, memory_root, monkeypatch):
    source, _ = small_cohort
    incoming = tmp_path / "incoming"
    shutil.copytree(source, incoming)
    store_file = tmp_path / "store" / "feature_store.sqlite"
    work = tmp_path / "cwd"  # a local folder named after the URL ("memory:/...") would appear here
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("HCC_ASSETS_PSEUDONYM_KEY", raising=False)
    lake = LakeResource(root=memory_root, incoming=str(incoming), feature_store=str(store_file), quiet_seconds=3600)
    resources = {"lake": lake, "compute": suite_compute()}
    fs, data_lake = fsspec.filesystem("memory"), DataLake(memory_root)

    # on-disk instance, made before staging is patched: an in-memory one makes its compute-log folder
    # in the staging folder during the runs, and the test requires staging to end up empty
    with dg.instance_for_test() as instance:
        staging = tmp_path / "tmp"  # every staged copy goes here and must be gone afterwards
        staging.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(staging))
        # the first two drop folders: the lake's pseudonym key is new on every run, so two patients
        # picked by pseudonym would be other patients each time, and so would the brief model and
        # its masks (the larger liver ranged from 38 to 5216 voxels; with these two, 5246-5554)
        first_two = sorted(folder.name for folder in incoming.iterdir() if folder.is_dir())[:2]
        pids = sorted(lake.pseudonym(name) for name in first_two)
        assert set(pids) <= set(lake.ready_patients())
        instance.add_dynamic_partitions("patients", pids)
        for pid in pids:
            result = dg.materialize(PATIENT_ASSETS, partition_key=pid, instance=instance, resources=resources)
            assert result.success

        # the per-patient files are in the memory filesystem, with the hashes the store recorded
        store = lake.store
        volumes = store.query("SELECT patient_id, kind, path, sha256 FROM volumes ORDER BY patient_id, kind")
        assert volumes.height == 2 * len(pids)
        for pid, kind, path, digest in volumes.iter_rows():
            name = NIFTI_FILE if kind == "nifti" else PREPROCESSED_FILE
            assert path == data_lake.patient_file(pid, name) and path.startswith("memory://")
            assert hashlib.sha256(fs.cat_file(path)).hexdigest() == digest
        for pid in pids:
            record = json.loads(fs.cat_file(data_lake.patient_file(pid, RAW_SCAN_FILE)))
            assert record["patient_id"] == pid
            assert fs.exists(data_lake.patient_file(pid, REFERENCE_MASK_FILE))
        assert store.query("SELECT count(*) FROM patients").item() == len(pids)
        assert store.query("SELECT count(*) FROM scans").item() == 3 * len(pids)
        assert fs.exists(data_lake.path("private", "pseudonym.key"))

        # nnU-Net trains in a local staging folder; the model folder is uploaded into the lake
        training = dg.materialize(
            ALL_ASSETS,
            selection=[liver_segmentation_model],
            instance=instance,
            resources=resources,
            run_config={"ops": {"liver_segmentation_model": {"config": TINY_TRAINING}}},
            raise_on_error=False,
        )
        assert training.success, failure_message(training)
        model = store.query("SELECT path, version FROM models WHERE model_name = 'liver_segmentation' AND current")
        model_path, version = model.row(0)
        assert model_path.startswith(data_lake.path("models", "segmentation", version) + "/")
        assert fs.exists(f"{model_path}/fold_all/checkpoint_final.pth") and fs.exists(f"{model_path}/plans.json")

        # liver_mask stages the model folder down; radiomics reads both volumes from the lake
        segmentation_steps._SEGMENTERS.clear()  # load from the lake, as a fresh worker would
        # a model trained this briefly may give a mask outside the plausible liver volume (which
        # blocks radiomics), or one too small for texture features; the mask's quality is not what
        # this test is about, so radiomics runs on the patient whose mask is the larger
        any_volume = {"ops": {"liver_mask": {"config": {"liver_volume_ml_min": 0.0, "liver_volume_ml_max": 1e9}}}}
        for pid in pids:
            masks = dg.materialize(
                ALL_ASSETS,
                selection=[liver_mask],
                partition_key=pid,
                instance=instance,
                resources=resources,
                run_config=any_volume,
                raise_on_error=False,
            )
            assert masks.success, failure_message(masks)
        pid, voxels = store.query("SELECT patient_id, liver_voxels FROM liver_masks ORDER BY liver_voxels DESC").row(0)
        assert voxels >= MIN_ROI_VOXELS, f"the briefly trained model found at most {voxels} liver voxels"
        features = dg.materialize(
            ALL_ASSETS,
            selection=[radiomic_features],
            partition_key=pid,
            instance=instance,
            resources=resources,
            raise_on_error=False,
        )
        assert features.success, failure_message(features)
        mask_row = store.query("SELECT path, sha256, model_version FROM liver_masks WHERE patient_id = ?", [pid]).row(0)
        assert mask_row[0] == data_lake.patient_file(pid, LIVER_MASK_FILE) and mask_row[2] == version
        assert hashlib.sha256(fs.cat_file(mask_row[0])).hexdigest() == mask_row[1]
        assert store.query("SELECT count(*) FROM radiomic_features WHERE patient_id = ?", [pid]).item() > 100

        # nothing but the drop zone, the feature store and staging (now empty) exists locally
        for _, staged in segmentation_steps._SEGMENTERS.values():
            if staged is not None:
                staged.cleanup()
        segmentation_steps._SEGMENTERS.clear()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "incoming", "store", "tmp"]
        assert not any(work.iterdir()), list(work.iterdir())
        leftovers = [p.name for p in staging.iterdir() if not p.name.startswith("torchinductor")]  # torch's cache
        assert not leftovers, leftovers
        # the DuckLake catalog (SQLite, WAL, the write lock FeatureStore takes) and its Parquet files beside it
        assert {p.name for p in store_file.parent.iterdir()} <= {
            store_file.name,
            store_file.name + "-wal",
            store_file.name + "-shm",
            store_file.name + ".writelock",
            "feature_store",
        }
        assert list((store_file.parent / "feature_store").rglob("*.parquet"))
