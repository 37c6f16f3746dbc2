"""The drop-zone sensor on a real instance, through build_sensor_context."""

import json
import os
import shutil
import time

from hcc_assets.synthetic.cohort import SynthConfig, synthesize_cohort
from hcc_assets_tests.conftest import SMALL_COHORT
from hcc_assets_tests.defs.helpers import in_memory_instance, ingest_patient, make_lake, sensor_tick


def test_sensor_registers_requests_once_and_picks_up_new_patients(incoming_copy, tmp_path):
    incoming, patients = incoming_copy
    # a folder still being copied: no marker, just written (quiet period not over)
    partial = incoming / "STILLCOPYING"
    shutil.copytree(incoming / patients[0].patient_key, partial)
    (partial / ".complete").unlink()
    lake = make_lake(tmp_path, incoming)
    expected = sorted(lake.pseudonym(p.patient_key) for p in patients)
    with in_memory_instance() as instance:
        first = sensor_tick(instance, lake, None)
        assert sorted(r.partition_key for r in first.run_requests) == expected
        assert sorted(instance.get_dynamic_partitions("patients")) == expected
        assert all(r.run_key and r.run_key.startswith(r.partition_key) for r in first.run_requests)
        assert not any(p.patient_key in first.cursor for p in patients)  # the cursor holds pseudonyms only

        second = sensor_tick(instance, lake, first.cursor)
        assert second.run_requests == [] and second.dynamic_partitions_requests == []

        extra = synthesize_cohort(tmp_path / "more", SynthConfig(**{**SMALL_COHORT, "patients": 1, "seed": 99}))[0]
        shutil.copytree(tmp_path / "more" / extra.patient_key, incoming / extra.patient_key)
        third = sensor_tick(instance, lake, second.cursor)
        assert [r.partition_key for r in third.run_requests] == [lake.pseudonym(extra.patient_key)]

        # a lost cursor does not re-ingest a patient already ingested from the same bytes
        done = expected[0]
        assert ingest_patient(instance, lake, done).success
        reset = sensor_tick(instance, lake, None)
        requested = {r.partition_key for r in reset.run_requests}
        assert done not in requested and len(requested) == len(expected)
        assert set(json.loads(reset.cursor)) >= set(expected)

        # a PACS's ZIP export saved into the drop zone: unpacked once quiet, then requested like a folder
        zipped = synthesize_cohort(tmp_path / "zipped", SynthConfig(**{**SMALL_COHORT, "patients": 1, "seed": 98}))[0]
        archive = shutil.make_archive(
            str(incoming / zipped.patient_key), "zip", tmp_path / "zipped", zipped.patient_key
        )
        os.utime(archive, (time.time() - 3600, time.time() - 3600))
        fourth = sensor_tick(instance, lake, reset.cursor)
        assert [r.partition_key for r in fourth.run_requests] == [lake.pseudonym(zipped.patient_key)]
        assert not os.path.exists(archive) and (incoming / zipped.patient_key / ".complete").exists()
