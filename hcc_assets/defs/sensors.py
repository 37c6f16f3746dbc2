"""The drop-zone sensor: new complete patient folders become partitions and ingest runs."""

import json

import dagster as dg

from hcc_assets.defs.jobs import patient_pipeline_job
from hcc_assets.defs.partitions import PATIENTS_PARTITIONS_NAME, patients_partitions
from hcc_assets.defs.resources import LakeResource, env_seconds

# Minimum seconds between evaluations. The daemon's sensor loop wakes every 5 s (fixed in Dagster)
# and evaluates a sensor only when this much time has passed since its last tick: with 5 the loop's
# jitter skips every other wake-up (ticks 5 and 10 s apart, measured), with anything below 5 every
# wake-up evaluates it (a tick every 5 s, 2.5 s of waiting on average). An evaluation lists the drop
# zone (os.walk + stat): milliseconds for hundreds of patients.
INTERVAL_ENV = "HCC_ASSETS_SENSOR_INTERVAL_S"
DEFAULT_INTERVAL_S = 1
# The run queue starts higher priorities first: a new scan does not wait behind a refresh's
# re-embedding runs (the automation sensor gives those -1: automation.py).
NEW_SCAN_PRIORITY = "1"


@dg.sensor(
    job=patient_pipeline_job,
    minimum_interval_seconds=env_seconds(INTERVAL_ENV, DEFAULT_INTERVAL_S),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches the drop zone. A patient folder is complete when it has a `.complete` "
    "marker or has been quiet for `quiet_seconds`. Adds one partition per study in it (the earliest is the "
    "pseudonym, follow-ups `<pseudonym>.s2`, ...) and requests one patient_pipeline run (ingest + features "
    "from the current models) per (study, study fingerprint): "
    f"the cursor means it never asks twice. At most every ${INTERVAL_ENV} seconds (default {DEFAULT_INTERVAL_S}); "
    "the daemon checks sensors every 5 s.",
)
def incoming_scans_sensor(context: dg.SensorEvaluationContext, lake: LakeResource) -> dg.SensorResult:
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    unreadable: dict[str, str] = {}
    ready = lake.ready_patients(skipped=unreadable)
    for pid, reason in sorted(unreadable.items()):
        context.log.warning(f"patient {pid}: {reason}")
    changed = {pid: fingerprint for pid, (fingerprint, _) in ready.items() if seen.get(pid) != fingerprint}
    # one partition per study of a changed folder (a follow-up scan is `<pseudonym>.s2`), each with
    # its own fingerprint: a follow-up added later runs alone, the earlier studies stay as they are
    studies = {key: fp for pid in changed for key, fp in lake.study_partitions(pid).items()}
    # A lost or reset cursor must not re-ingest what is already ingested from the same bytes.
    to_run = {key: fp for key, fp in studies.items() if _ingested_fingerprint(context.instance, key) != fp}
    existing = set(context.instance.get_dynamic_partitions(PATIENTS_PARTITIONS_NAME))
    new_partitions = sorted(key for key in studies if key not in existing)
    run_requests = [
        dg.RunRequest(
            partition_key=pid,
            run_key=f"{pid}:{fingerprint}",
            tags={"hcc_assets/trigger": "drop_zone", "dagster/priority": NEW_SCAN_PRIORITY},
        )
        for pid, fingerprint in sorted(to_run.items())
    ]
    if changed:
        context.log.info(
            f"{len(changed)} patient folder(s) ready or changed ({len(studies)} studies), "
            f"{len(new_partitions)} new partition(s), "
            f"{len(to_run)} run(s) requested"
        )
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[patients_partitions.build_add_request(new_partitions)] if new_partitions else [],
        cursor=json.dumps({**seen, **changed}, sort_keys=True),
    )


def _ingested_fingerprint(instance: dg.DagsterInstance, patient_id: str) -> str | None:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("raw_scan"), asset_partitions=[patient_id]), limit=1
    ).records
    if not records or records[0].asset_materialization is None:
        return None
    value = records[0].asset_materialization.metadata.get("drop_fingerprint")
    fingerprint = value.value if value is not None else None
    return fingerprint if isinstance(fingerprint, str) else None  # stored as text by raw_scan
