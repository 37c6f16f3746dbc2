"""Run by test_permissions.py in a process that file permissions bind (as root: without the
capabilities that bypass them): scan the drop zone, evaluate the sensor and ingest every ready
patient; print one JSON object."""

import json
import sys
from pathlib import Path

import dagster as dg

from hcc_assets.defs.sensors import incoming_scans_sensor
from hcc_assets_tests.defs.helpers import failure_message, ingest_patient, make_lake


def main(root: Path, incoming: Path) -> dict:
    lake = make_lake(root, incoming)
    skipped: dict[str, str] = {}
    ready = sorted(lake.ready_patients(skipped=skipped))
    with dg.instance_for_test() as instance:
        sensor = incoming_scans_sensor(dg.build_sensor_context(instance=instance, resources={"lake": lake}))
        requested = sorted(request.partition_key for request in sensor.run_requests)
        instance.add_dynamic_partitions("patients", ready)
        runs = {}
        for pid in ready:
            result = ingest_patient(instance, lake, pid, raise_on_error=False)
            runs[pid] = {"success": result.success, "message": failure_message(result)}
    rows = lake.store.query("SELECT patient_id FROM volumes WHERE kind = 'preprocessed'")["patient_id"].to_list()
    return {"ready": ready, "skipped": skipped, "requested": requested, "runs": runs, "preprocessed": sorted(rows)}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))))
