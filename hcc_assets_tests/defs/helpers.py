"""Shared set-up for tests that materialize real Dagster assets."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from hcc_assets.defs import ingest
from hcc_assets.defs.cohort import cohort
from hcc_assets.defs.resources import LakeResource

PATIENT_ASSETS = [ingest.raw_scan, ingest.nifti_volume, ingest.preprocessed_volume]


def make_lake(tmp_path: Path, incoming: Path) -> LakeResource:
    return LakeResource(root=str(tmp_path / "lake"), incoming=str(incoming), quiet_seconds=3600)


def register_all(instance: dg.DagsterInstance, lake: LakeResource) -> list[str]:
    pids = sorted(lake.ready_patients())
    instance.add_dynamic_partitions("patients", pids)
    return pids


def ingest_patient(instance, lake, pid, raise_on_error=True) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        PATIENT_ASSETS, partition_key=pid, instance=instance, resources={"lake": lake}, raise_on_error=raise_on_error
    )


def materialize_cohort(instance, lake) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [cohort, *PATIENT_ASSETS], selection=[cohort], instance=instance, resources={"lake": lake}
    )


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    for event in result.all_events:
        if event.is_step_failure:
            return event.step_failure_data.error.message
    return ""
