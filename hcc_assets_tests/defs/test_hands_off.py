"""Hands-off: with the real Dagster daemon running on workspace.yaml (what `make ui` starts), a
patient folder copied into incoming/ becomes that patient's raw_scan ... deep_embedding, made with
the current models, and rows in the feature store, with no further action.

The lake is prepared in this process first (cohort ingested, both models trained briefly and
registered; the per-patient run config, a 32x32x16 grid, is the deployment file the daemon's runs
read: see hands_off.py), recorded in the lake's
own DAGSTER_HOME, so the daemon finds those patients ingested and the models current. The daemon
and everything it starts run in their own process group, killed at the end whatever happens.
"""

from __future__ import annotations

import os
import time

import dagster as dg
import pytest

from hcc_assets.synthetic.cohort import SynthConfig, synthesize_cohort
from hcc_assets_tests.conftest import SMALL_COHORT
from hcc_assets_tests.defs.hands_off import (
    CLASSIFIER,
    SEGMENTATION,
    TEST_PATIENT_CONFIG,
    Daemon,
    drop_patient,
    format_breakdown,
    latency_breakdown,
    prepare_lake,
    wait_for_rows,
    wait_for_sensor,
)

PATIENT_ASSETS = [
    "raw_scan",
    "nifti_volume",
    "preprocessed_volume",
    "liver_mask",
    "radiomic_features",
    "deep_embedding",
    "hcc_prediction",
]
TERMINAL = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


@pytest.mark.slow
def test_a_dropped_scan_becomes_features_with_the_current_models(
    small_cohort, liver_model_folder, tmp_path, monkeypatch
):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))  # restored after the test
    for name in [n for n in os.environ if n.startswith("HCC_ASSETS_")]:
        monkeypatch.delenv(name)  # the prepared lake's own key and settings, as the daemon will see them
    source, _ = small_cohort
    prepared = prepare_lake(
        tmp_path / "lake", source, patient_config=TEST_PATIENT_CONFIG, liver_model=liver_model_folder
    )
    assert all(prepared.versions.values()), prepared.versions
    new = synthesize_cohort(tmp_path / "new", SynthConfig(**{**SMALL_COHORT, "patients": 1, "seed": 99}))[0]
    pid = prepared.lake.pseudonym(new.patient_key)
    assert pid not in prepared.patients

    with Daemon(prepared, tmp_path / "daemon.log") as daemon, prepared.instance() as instance:
        wait_for_sensor(instance, daemon)  # the daemon is up and has seen the prepared drop zone
        dropped = drop_patient(tmp_path / "new" / new.patient_key, prepared.root / "incoming")
        rows = wait_for_rows(prepared, instance, daemon, pid, timeout_s=240)
        deadline = time.time() + 60
        while time.time() < deadline:
            runs = instance.get_runs(dg.RunsFilter(tags={"dagster/partition": pid}))
            if runs and all(r.status in TERMINAL for r in runs):
                break
            time.sleep(0.5)
        print(
            f"\nnew scan -> rows, {pid}:\n"
            + format_breakdown(latency_breakdown(instance, pid, dropped, rows), rows - dropped)
        )

        # one run, requested by the sensor, of the per-patient pipeline, and it succeeded
        assert [(r.job_name, r.status) for r in runs] == [("patient_pipeline", dg.DagsterRunStatus.SUCCESS)]
        assert runs[0].tags["dagster/sensor_name"] == "incoming_scans_sensor"
        assert runs[0].tags["hcc_assets/trigger"] == "drop_zone"
        assert int(runs[0].tags["dagster/priority"]) > 0  # ahead of queued refresh runs
        # the prepared patients were recognised as ingested: the sensor launched nothing else
        launched = instance.get_runs(dg.RunsFilter(tags={"dagster/sensor_name": "incoming_scans_sensor"}))
        assert [r.tags["dagster/partition"] for r in launched] == [pid]
        assert pid in instance.get_dynamic_partitions("patients")
        for name in PATIENT_ASSETS:
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(name), asset_partitions=[pid]), limit=1
            ).records
            assert records and records[0].run_id == runs[0].run_id, name

    # the rows, made with the models that were current when the scan arrived
    store = prepared.lake.store
    assert (
        store.query("SELECT model_version FROM liver_masks WHERE patient_id = ?", [pid]).item()
        == prepared.versions[SEGMENTATION]
    )
    assert (
        store.query("SELECT model_version FROM deep_embeddings WHERE patient_id = ?", [pid]).item()
        == prepared.versions[CLASSIFIER]
    )
    assert store.query("SELECT count(*) FROM radiomic_features WHERE patient_id = ?", [pid]).item() > 50
    assert store.query("SELECT count(*) FROM volumes WHERE patient_id = ?", [pid]).item() == 2  # nifti + preprocessed
    # its P(HCC) from the current classifier, unlabelled as it is; the LASSO models are not trained
    # in this lake, and the rows say so
    predictions = {
        r["model"]: r
        for r in store.query("SELECT * FROM current_hcc_predictions WHERE patient_id = ?", [pid]).iter_rows(named=True)
    }
    assert set(predictions) == {"deep", "radiomic", "explainable"}
    deep = predictions["deep"]
    assert deep["status"] == "predicted" and deep["model_version"] == prepared.versions[CLASSIFIER]
    assert 0.0 <= deep["probability"] <= 1.0 and deep["decision"] == (deep["probability"] > 0.5)
    assert predictions["radiomic"]["status"] == "unavailable"
    assert "radiomic_model" in predictions["radiomic"]["reason"]
    assert store.query("SELECT count(*) FROM cohort_split WHERE patient_id = ?", [pid]).item() == 0
    # the deployment's run config reached the sensor's run: the volume is on its grid
    shape = store.query("SELECT shape FROM volumes WHERE patient_id = ? AND kind = 'preprocessed'", [pid]).item()
    assert list(shape) == [32, 32, 16]
