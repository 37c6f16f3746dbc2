"""Materialize partitions from the command line through Dagster itself.

Each patient is one Dagster run of the `patient_ingest` job (the same run the sensor would
request), recorded in the instance, so the UI shows its lineage, metadata and logs. Runs go
to a small pool of worker processes; each runs its steps in-process and uses one torch/BLAS
thread, so N workers use N cores without oversubscription.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import dagster as dg

THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
EXECUTORS = {
    "in_process": {"execution": {"config": {"in_process": {}}}},
    "multiprocess": {"execution": {"config": {"multiprocess": {}}}},
}


def _defs() -> dg.Definitions:
    from hcc_assets.definitions import defs

    return defs


def patient_ingest_job() -> dg.JobDefinition:
    return _defs().resolve_job_def("patient_ingest")


def cohort_refresh_job() -> dg.JobDefinition:
    return _defs().resolve_job_def("cohort_refresh")


def register_ready_patients(instance: dg.DagsterInstance) -> list[str]:
    """Add every complete drop folder's pseudonym as a partition; returns all ready pseudonyms."""
    lake = _defs().resources["lake"]
    ready = sorted(lake.ready_patients())
    existing = set(instance.get_dynamic_partitions("patients"))
    new = [pid for pid in ready if pid not in existing]
    if new:
        instance.add_dynamic_partitions("patients", new)
    return ready


def _ingest_one(patient_id: str, executor: str = "in_process") -> tuple[str, bool, str]:
    instance = dg.DagsterInstance.get()
    result = dg.execute_job(
        dg.reconstructable(patient_ingest_job),
        instance=instance,
        run_config=EXECUTORS[executor],
        tags={"dagster/partition": patient_id, "hcc_assets/trigger": "cli"},
        raise_on_error=False,
    )
    failure = ""
    if not result.success:
        for event in result.all_events:
            if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
                failure = event.step_failure_data.error.message.strip().splitlines()[0]
                break
    return patient_id, result.success, failure


def materialize_patients(
    patient_ids: list[str], workers: int = 2, executor: str = "in_process"
) -> list[tuple[str, bool, str]]:
    """Ingest each patient in its own run; returns (patient_id, success, first error line)."""
    os.environ.update(THREAD_ENV)  # inherited by the spawned workers before torch loads
    if workers <= 1:
        return [_ingest_one(pid, executor) for pid in patient_ids]
    context = multiprocessing.get_context("spawn")  # never fork a process that holds torch threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(pool.map(_ingest_one, patient_ids, [executor] * len(patient_ids)))


def materialize_cohort() -> bool:
    result = dg.execute_job(
        dg.reconstructable(cohort_refresh_job),
        instance=dg.DagsterInstance.get(),
        run_config=EXECUTORS["in_process"],
        tags={"hcc_assets/trigger": "cli"},
        raise_on_error=False,
    )
    return result.success
