"""Follow-up studies through real Dagster materializations: a patient folder with two studies on
different dates is two partitions (`pt-<id>` and `pt-<id>.s2`) linked to one pseudonym in `studies`,
with no date stored anywhere; the cohort takes one study per patient."""

import json
import re
import shutil
from pathlib import Path

import dagster as dg
import pytest

from hcc_assets.intake.pseudonym import study_partition_key
from hcc_assets.synthetic.cohort import FOLLOW_UP_STUDY_DIR, SynthConfig, synthesize_cohort
from hcc_assets_tests.conftest import SMALL_COHORT
from hcc_assets_tests.defs.helpers import (
    failure_message,
    in_memory_instance,
    ingest_patient,
    make_lake,
    materialize_cohort,
    sensor_tick,
)

# 6 patients, half of them with a follow-up study 90-400 days after the first
FOLLOW_UP_COHORT = {**SMALL_COHORT, "patients": 6, "seed": 23, "follow_up_fraction": 0.5}
INGEST_TABLES = ("patients", "studies", "scans", "volumes")


@pytest.fixture(scope="module")
def follow_up_cohort(tmp_path_factory):
    incoming = tmp_path_factory.mktemp("follow_ups") / "incoming"
    patients = synthesize_cohort(incoming, SynthConfig(**FOLLOW_UP_COHORT))
    assert sum(p.follow_up_days is not None for p in patients) == 3
    return incoming, patients


@pytest.fixture(scope="module")
def ingested(follow_up_cohort, tmp_path_factory):
    """Every study partition the sensor finds, ingested once for the module."""
    source, patients = follow_up_cohort
    root = tmp_path_factory.mktemp("follow_up_lake")
    incoming = root / "incoming"
    shutil.copytree(source, incoming)
    lake = make_lake(root, incoming)
    with in_memory_instance() as instance:
        tick = sensor_tick(instance, lake, None)
        keys = sorted(r.partition_key for r in tick.run_requests)
        results = {key: ingest_patient(instance, lake, key) for key in keys}
        yield instance, lake, patients, results


def _split(instance, lake) -> dg.ExecuteInProcessResult:
    """The cohort asset; its blocking both-classes check may fail on 6 patients: the split is written anyway."""
    result = materialize_cohort(instance, lake, raise_on_error=False)
    assert result.asset_materializations_for_node("cohort"), "cohort did not materialize"
    return result


def _follow_up_patient(patients):
    return next(p for p in patients if p.follow_up_days is not None)


def test_two_studies_are_two_partitions_linked_by_pseudonym_without_dates(ingested):
    _instance, lake, patients, results = ingested
    store = lake.store
    expected = sorted(
        key
        for p in patients
        for key in [lake.pseudonym(p.patient_key)]
        + ([study_partition_key(lake.pseudonym(p.patient_key), 2)] if p.follow_up_days is not None else [])
    )
    assert sorted(results) == expected and all(r.success for r in results.values())

    patient = _follow_up_patient(patients)
    pid = lake.pseudonym(patient.patient_key)
    rows = store.query(
        "SELECT patient, study_index, days_since_first, patient_id FROM studies WHERE patient = ? ORDER BY study_index",
        [pid],
    ).rows()
    assert rows == [(pid, 1, 0, pid), (pid, 2, patient.follow_up_days, f"{pid}.s2")]
    assert patient.follow_up_days is not None and patient.follow_up_days > 0

    # each study has its own volumes, T2 choice and files, joined to `studies` by partition key
    volumes = store.query(
        "SELECT s.study_index, v.kind, v.sha256, v.has_reference_mask FROM studies s "
        "JOIN volumes v USING (patient_id) WHERE s.patient = ? ORDER BY 1, 2",
        [pid],
    ).rows()
    assert [(index, kind) for index, kind, _, _ in volumes] == [
        (1, "nifti"),
        (1, "preprocessed"),
        (2, "nifti"),
        (2, "preprocessed"),
    ]
    assert volumes[0][2] != volumes[2][2]  # new noise: another volume
    assert volumes[0][3] is True and volumes[2][3] is False  # the reference mask lies on study 1's grid
    chosen = store.query(
        "SELECT patient_id, series_key FROM scans WHERE chosen AND patient_id IN (?, ?) ORDER BY 1", [pid, f"{pid}.s2"]
    ).rows()
    assert len(chosen) == 2 and chosen[0][1] != chosen[1][1]
    assert store.query("SELECT count(*) FROM scans WHERE patient_id = ?", [f"{pid}.s2"]).item() == 3
    first = json.loads(lake.lake.read_bytes(lake.lake.patient_file(pid, "raw_scan.json")))
    second = json.loads(lake.lake.read_bytes(lake.lake.patient_file(f"{pid}.s2", "raw_scan.json")))
    assert (first["study_index"], second["study_index"]) == (1, 2) and first["study_key"] != second["study_key"]
    raw = results[f"{pid}.s2"].asset_materializations_for_node("raw_scan")[0].metadata
    assert raw["study_index"].value == 2 and raw["days_since_first"].value == patient.follow_up_days

    # a single-study patient: one row, its bare pseudonym, as before follow-ups existed
    single = next(p for p in patients if p.follow_up_days is None)
    single_pid = lake.pseudonym(single.patient_key)
    assert store.query("SELECT study_index, days_since_first FROM studies WHERE patient = ?", [single_pid]).rows() == [
        (1, 0)
    ]

    # no date (nor any other fake PHI) of either study in any table: dates order studies, never stored
    dump = "\n".join(str(store.query(f"SELECT * FROM {table}").rows()) for table in INGEST_TABLES)
    dump += "\n".join(p.read_text() for p in Path(lake.root).rglob("raw_scan.json"))
    phi = {s for p in patients for s in p.phi}
    dates = {s for s in phi if re.fullmatch(r"\d{8}", s)}
    assert len(dates) >= 2 * 3  # birth dates, first and follow-up study dates
    for value in phi:
        assert not re.search(rf"(?<![0-9]){re.escape(value)}(?![0-9])", dump), "PHI found in the store"


def test_sensor_requests_every_study_and_a_redelivered_follow_up_alone(follow_up_cohort, tmp_path):
    source, patients = follow_up_cohort
    patient = _follow_up_patient(patients)
    incoming = tmp_path / "incoming"
    # first delivery: the first study only
    shutil.copytree(source / patient.patient_key, incoming / patient.patient_key)
    shutil.rmtree(incoming / patient.patient_key / FOLLOW_UP_STUDY_DIR)
    lake = make_lake(tmp_path, incoming)
    pid = lake.pseudonym(patient.patient_key)
    with in_memory_instance() as instance:
        first = sensor_tick(instance, lake, None)
        assert [r.partition_key for r in first.run_requests] == [pid]
        assert ingest_patient(instance, lake, pid).success

        # re-delivered with the follow-up: only the new study runs (the first study's files are unchanged)
        shutil.copytree(
            source / patient.patient_key / FOLLOW_UP_STUDY_DIR, incoming / patient.patient_key / FOLLOW_UP_STUDY_DIR
        )
        second = sensor_tick(instance, lake, first.cursor)
        assert [r.partition_key for r in second.run_requests] == [f"{pid}.s2"]
        assert sorted(instance.get_dynamic_partitions("patients")) == [pid, f"{pid}.s2"]
        assert not any(patient.patient_key in (r.run_key or "") for r in second.run_requests)
        assert sensor_tick(instance, lake, second.cursor).run_requests == []

        # a lost cursor: both studies of a fresh two-study folder become partitions and runs
        other = next(p for p in patients if p.follow_up_days is not None and p is not patient)
        shutil.copytree(source / other.patient_key, incoming / other.patient_key)
        other_pid = lake.pseudonym(other.patient_key)
        reset = sensor_tick(instance, lake, None)
        assert sorted(r.partition_key for r in reset.run_requests) == sorted(
            [f"{pid}.s2", other_pid, f"{other_pid}.s2"]
        )
        assert {other_pid, f"{other_pid}.s2"} <= set(instance.get_dynamic_partitions("patients"))


def test_two_patients_in_one_folder_are_still_refused(follow_up_cohort, tmp_path):
    """Another patient's study moved into a folder fails that folder's partition, naming only the pseudonym."""
    source, patients = follow_up_cohort
    patient, other = patients[0], patients[1]
    incoming = tmp_path / "incoming"
    shutil.copytree(source / patient.patient_key, incoming / patient.patient_key)
    shutil.copytree(source / other.patient_key / "study_1", incoming / patient.patient_key / "other_study")
    lake = make_lake(tmp_path, incoming)
    pid = lake.pseudonym(patient.patient_key)
    with in_memory_instance() as instance:
        tick = sensor_tick(instance, lake, None)
        assert [r.partition_key for r in tick.run_requests] == [pid]  # the bare pseudonym: its run says why
        result = ingest_patient(instance, lake, pid, raise_on_error=False)
        message = failure_message(result)
        assert not result.success and pid in message and "different patients" in message
        assert patient.patient_key not in message and other.patient_key not in message


def test_cohort_takes_the_study_the_manifest_names_else_the_earliest(ingested):
    instance, lake, patients, _ = ingested
    with_follow_up = [p for p in patients if p.follow_up_days is not None]
    named, unnamed = with_follow_up[0], with_follow_up[1]
    named_pid, unnamed_pid = lake.pseudonym(named.patient_key), lake.pseudonym(unnamed.patient_key)
    store = lake.store

    # no `study` column: every patient's earliest study, follow-ups left out
    _split(instance, lake)
    cohort = set(store.query("SELECT patient_id FROM cohort_split")["patient_id"].to_list())
    assert cohort == {lake.pseudonym(p.patient_key) for p in patients}

    # a manifest naming study 2 for one patient: that study is in the cohort, its first study is not
    manifest = Path(lake.incoming_dir) / "labels_studies.csv"
    manifest.write_text(f"patient_key,hcc,study\n{named.patient_key},{int(named.hcc)},2\n")
    try:
        result = _split(instance, lake)
        rows = dict(store.query("SELECT patient_id, hcc FROM cohort_split").rows())
        assert f"{named_pid}.s2" in rows and named_pid not in rows and rows[f"{named_pid}.s2"] == named.hcc
        assert unnamed_pid in rows and f"{unnamed_pid}.s2" not in rows
        assert len(rows) == len(patients)
        cohort_meta = result.asset_materializations_for_node("cohort")[0].metadata
        assert cohort_meta["other_studies_of_labelled"].value == len(with_follow_up)

        # a study that is not an index leaves the patient out, with the reason
        manifest.write_text(f"patient_key,hcc,study\n{named.patient_key},{int(named.hcc)},second\n")
        _split(instance, lake)
        cohort = set(store.query("SELECT patient_id FROM cohort_split")["patient_id"].to_list())
        assert named_pid not in cohort and f"{named_pid}.s2" not in cohort
        reasons = store.query("SELECT reason FROM exclusions WHERE patient_id = ?", [named_pid])["reason"].to_list()
        assert any("not a study index" in r for r in reasons)
        assert not any(named.patient_key in r for r in reasons)
    finally:
        manifest.unlink()
