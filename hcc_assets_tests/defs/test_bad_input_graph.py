"""Hostile input beyond a broken DICOM study: non-finite intensities, an absurdly large series, bad
label manifests, an unreadable folder. Each is refused with a clear message at the smallest unit."""

import shutil
from pathlib import Path

import dagster as dg
import pydicom
import pytest

from hcc_assets.core.errors import PatientInputError
from hcc_assets.defs.cohort import cohort
from hcc_assets.imaging.dicom_series import inventory_study
from hcc_assets_tests.defs.helpers import (
    PATIENT_ASSETS,
    failure_message,
    in_memory_instance,
    ingest_patient,
    make_lake,
    register_all,
)


def _t2_files(folder: Path) -> list[Path]:
    return sorted(next(s for s in inventory_study(folder).series if (s.echo_time_ms or 0) > 60).files)


def test_non_finite_intensities_are_refused(incoming_copy, tmp_path):
    incoming, patients = incoming_copy
    key = patients[0].patient_key
    victim = _t2_files(incoming / key)[2]
    dataset = pydicom.dcmread(victim)
    dataset.RescaleSlope = "1e400"  # a valid DS string that overflows to inf
    dataset.save_as(victim)
    lake = make_lake(tmp_path, incoming)
    with in_memory_instance() as instance:
        register_all(instance, lake)
        pid = lake.pseudonym(key)
        result = ingest_patient(instance, lake, pid, raise_on_error=False)
        assert not result.success
        message = failure_message(result)
        assert f"patient {pid}" in message and "non-finite" in message, message
        assert key not in message
        assert lake.store.query("SELECT count(*) FROM volumes WHERE patient_id = ?", [pid]).item() == 0
        # the others carry on
        assert ingest_patient(instance, lake, lake.pseudonym(patients[1].patient_key)).success


def test_an_absurdly_large_series_is_refused_before_reading_pixels(incoming_copy, tmp_path):
    incoming, patients = incoming_copy
    lake = make_lake(tmp_path, incoming)
    with in_memory_instance() as instance:
        register_all(instance, lake)
        pid = lake.pseudonym(patients[0].patient_key)
        result = dg.materialize(
            PATIENT_ASSETS,
            partition_key=pid,
            instance=instance,
            resources={"lake": lake},
            run_config={"ops": {"raw_scan": {"config": {"max_voxels": 10_000}}}},
            raise_on_error=False,
        )
        assert not result.success
        message = failure_message(result)
        assert f"patient {pid}" in message and "above the limit of 10,000" in message, message
        assert lake.store.query("SELECT count(*) FROM scans WHERE patient_id = ?", [pid]).item() == 0


def test_bad_label_manifests_exclude_only_the_patients_concerned(incoming_copy, tmp_path):
    incoming, patients = incoming_copy
    keys = [p.patient_key for p in patients]
    conflicting, non_binary = keys[0], keys[1]
    (incoming / "labels_extra.csv").write_text(
        "patient_key,hcc,source\n"
        f"{conflicting},{0 if patients[0].hcc else 1},second opinion\n"  # listed again, other label
        f"{non_binary},maybe,synthetic\n"
        "NOT-IN-DROP-ZONE,1,synthetic\n"
    )
    lake = make_lake(tmp_path, incoming)
    with in_memory_instance() as instance:
        pids = register_all(instance, lake)
        for pid in pids:
            assert ingest_patient(instance, lake, pid).success
        result = dg.materialize(
            [cohort, *PATIENT_ASSETS],
            selection=[cohort],
            instance=instance,
            resources={"lake": lake},
            raise_on_error=False,
        )
    split = set(lake.store.query("SELECT patient_id FROM cohort_split")["patient_id"])
    bad = {lake.pseudonym(conflicting), lake.pseudonym(non_binary)}
    assert not split & bad
    assert split == set(pids) - bad  # everyone else is in the cohort
    excluded = dict(lake.store.query("SELECT patient_id, reason FROM exclusions WHERE stage = 'labels'").rows())
    assert set(excluded) == bad
    assert "different labels" in excluded[lake.pseudonym(conflicting)]
    assert "'maybe'" in excluded[lake.pseudonym(non_binary)] and "not 0 or 1" in excluded[lake.pseudonym(non_binary)]
    check = {c.check_name: c for c in result.get_asset_check_evaluations()}["labels_valid"]
    assert check.passed is False
    text = check.description + str(check.metadata["problems"].value)
    assert lake.pseudonym("NOT-IN-DROP-ZONE") in text and "no ingested volume" in text
    assert not [k for k in keys if k in text] and "NOT-IN-DROP-ZONE" not in text  # pseudonyms only


def test_an_unreadable_folder_fails_clearly(incoming_copy, monkeypatch):
    """Root reads everything, so permission denial is simulated at the file-system call."""
    incoming, patients = incoming_copy
    folder = incoming / patients[0].patient_key
    real_read_bytes = Path.read_bytes

    def denied(path: Path) -> bytes:
        if folder in path.parents:
            raise PermissionError(13, "Permission denied", str(path))
        return real_read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(PatientInputError, match="Permission denied") as error:
        inventory_study(folder)
    assert patients[0].patient_key not in str(error.value).replace(str(folder), "")
    shutil.rmtree(folder)
