"""Materialize partitions from the command line through Dagster itself.

Each patient is one Dagster run of the `patient_ingest` job (the same run the sensor would
request), recorded in the instance, so the UI shows its lineage, metadata and logs. Runs go
to a small pool of worker processes; each runs its steps in-process and uses one torch/BLAS
thread, so N workers use N cores without oversubscription.

`executor="dask"` sends each run's steps to an existing Dask cluster (`dask_address`) through the
same jobs defined with dagster-dask's executor (hcc_assets.dask_definitions).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed

import dagster as dg

THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
# Console logs at INFO: the full DEBUG event stream stays in the instance (and the UI).
_QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
# Dagster's multiprocess executor starts every step as a new interpreter that imports Dagster and the
# definitions again (2-3 s here) unless it forks the steps from a forkserver that imported them once
# per run worker (Dagster's own `start_method: forkserver`). torch and nnU-Net stay out of the
# preload: ingest steps never use them, and importing them there costs more than the ingest saves.
FORKSERVER_PRELOAD = ["hcc_assets.definitions"]
EXECUTORS = {
    "in_process": {"execution": {"config": {"in_process": {}}}, **_QUIET},
    "multiprocess": {
        "execution": {
            "config": {"multiprocess": {"start_method": {"forkserver": {"preload_modules": FORKSERVER_PRELOAD}}}}
        },
        **_QUIET,
    },
}


def _defs() -> dg.Definitions:
    from hcc_assets.definitions import defs

    return defs


def patient_ingest_job() -> dg.JobDefinition:
    return _defs().resolve_job_def("patient_ingest")


def patient_features_job() -> dg.JobDefinition:
    return _defs().resolve_job_def("patient_features")


def patient_predictions_job() -> dg.JobDefinition:
    return _defs().resolve_job_def("patient_predictions")


def patient_pipeline_job() -> dg.JobDefinition:
    return _defs().resolve_job_def("patient_pipeline")


PATIENT_JOBS = {
    "patient_ingest": patient_ingest_job,
    "patient_features": patient_features_job,
    "patient_predictions": patient_predictions_job,
    "patient_pipeline": patient_pipeline_job,
}


def cohort_refresh_job() -> dg.JobDefinition:
    return _defs().resolve_job_def("cohort_refresh")


def register_ready_patients(instance: dg.DagsterInstance, skipped: dict[str, str] | None = None) -> list[str]:
    """Add every study of every complete drop folder as a partition (the pseudonym; follow-ups
    `<pseudonym>.s2`, ...); returns all their keys. Unreadable folders go into `skipped` (pseudonym
    -> reason) when it is given."""
    resources = _defs().resources
    if resources is None:
        raise RuntimeError("the definitions have no resources (expected `lake`)")
    lake = resources["lake"]
    ready = sorted(key for pid in lake.ready_patients(skipped=skipped) for key in lake.study_partitions(pid))
    existing = set(instance.get_dynamic_partitions("patients"))
    new = [pid for pid in ready if pid not in existing]
    if new:
        instance.add_dynamic_partitions("patients", new)
    return ready


def _dask_job(job: str):
    from hcc_assets import dask_definitions as dask_jobs

    return {
        "patient_ingest": dask_jobs.patient_ingest_dask_job,
        "patient_features": dask_jobs.patient_features_dask_job,
        "patient_predictions": dask_jobs.patient_predictions_dask_job,
        "patient_pipeline": dask_jobs.patient_pipeline_dask_job,
    }[job]


_INSTANCES: dict[str, dg.DagsterInstance] = {}


def _process_instance() -> dg.DagsterInstance:
    """One DagsterInstance per DAGSTER_HOME per process: making one (reading dagster.yaml, opening
    and checking every storage) took ~0.12 s, which a worker now pays once instead of once per run."""
    home = os.environ.get("DAGSTER_HOME", "")
    if home not in _INSTANCES:
        _INSTANCES[home] = dg.DagsterInstance.get()
    return _INSTANCES[home]


def _run_patient(
    patient_id: str,
    executor: str = "in_process",
    job: str = "patient_ingest",
    torch_threads: int = 1,
    dask_address: str = "",
    assets: tuple[str, ...] | None = None,
) -> tuple[str, bool, str]:
    instance = _process_instance()
    # N workers x one torch thread each: the cores are shared, never oversubscribed
    threads = {"resources": {"compute": {"config": {"cpu_threads": torch_threads}}}}
    if executor == "dask":
        from hcc_assets.dask_definitions import cluster_run_config

        if not dask_address:
            raise ValueError("executor 'dask' needs dask_address (the scheduler, e.g. tcp://127.0.0.1:8786)")
        target, execution = _dask_job(job), {**cluster_run_config(dask_address), **_QUIET}
    else:
        target, execution = PATIENT_JOBS[job], EXECUTORS[executor]
    result = dg.execute_job(
        dg.reconstructable(target),
        instance=instance,
        run_config={**execution, **threads},
        tags={"dagster/partition": patient_id, "hcc_assets/trigger": "cli"},
        asset_selection=[dg.AssetKey(name) for name in assets] if assets else None,
        raise_on_error=False,
    )
    return patient_id, result.success, "" if result.success else failure_line(result.all_events)


def failure_line(events: Sequence[dg.DagsterEvent]) -> str:
    """The first step failure's first line; for a failed blocking asset check (whose own message
    names neither the check nor the reason) the failed checks with their metadata instead."""
    for event in events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            error = event.step_failure_data.error
            if error.cls_name == "DagsterAssetCheckFailedError":
                checks = [
                    _describe_failed_check(e.asset_check_evaluation_data)
                    for e in events
                    if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
                    and not e.asset_check_evaluation_data.passed
                    and e.asset_check_evaluation_data.severity == dg.AssetCheckSeverity.ERROR
                ]
                if checks:
                    return "; ".join(checks)
            return error.message.strip().splitlines()[0]
    return ""


def check_warnings(events: Sequence[dg.DagsterEvent]) -> list[str]:
    """One line per failed warning check among `events` (a liver cut off by the field of view, a
    fragmented mask, a low Dice): the patient's results stand, but its reader should know."""
    return [
        _describe_failed_check(e.asset_check_evaluation_data, "check")
        for e in events
        if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
        and not e.asset_check_evaluation_data.passed
        and e.asset_check_evaluation_data.severity == dg.AssetCheckSeverity.WARN
    ]


def latest_check_warnings(instance: dg.DagsterInstance, partitions: Sequence[str]) -> dict[str, list[str]]:
    """partition -> one line per failed warning check among the newest evaluation of each check of
    a partitioned asset: what `check_warnings` tells of one run, over every run of the partition
    (the features run that checked the mask is not the partition's newest run once its predictions
    ran). Dagster records check executions without their partition, so each is placed by its run's
    partition tag: per check, the newest executions of all partitions, page by page, until each
    wanted partition has its own."""
    wanted, found = set(partitions), dict[str, list[str]]()
    run_partition: dict[str, str | None] = {}
    graph = _defs().resolve_asset_graph()
    for check_key in sorted(graph.asset_check_keys, key=lambda key: key.to_user_string()):
        if graph.get(check_key.asset_key).partitions_def is None:
            continue
        # partition -> its newest evaluation; None where the newest execution was planned but not
        # evaluated (its run failed first): no verdict on the current asset
        latest: dict[str, dg.AssetCheckEvaluation | None] = {}
        cursor = None
        while len(latest) < len(wanted):
            records = instance.event_log_storage.get_asset_check_execution_history(
                check_key, limit=max(100, 4 * len(wanted)), cursor=cursor
            )
            if not records:
                break
            cursor = records[-1].id
            if unknown := list({r.run_id for r in records} - run_partition.keys()):
                for run_record in instance.get_run_records(dg.RunsFilter(run_ids=unknown)):
                    run = run_record.dagster_run
                    run_partition[run.run_id] = run.tags.get("dagster/partition")
            for record in records:
                partition = run_partition.get(record.run_id)
                if partition in wanted and partition not in latest:
                    event = record.event.dagster_event if record.event else None
                    evaluated = event is not None and event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
                    latest[partition] = event.asset_check_evaluation_data if event and evaluated else None
        for partition, evaluation in latest.items():
            if evaluation and not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN:
                found.setdefault(partition, []).append(_describe_failed_check(evaluation, "check"))
    return found


def _describe_failed_check(evaluation, kind: str = "blocking check") -> str:
    """`asset: blocking check NAME failed (key value, ...)`, from an AssetCheckEvaluation."""
    values = ", ".join(
        f"{key} {getattr(value, 'value', value)}" for key, value in sorted((evaluation.metadata or {}).items())
    )
    why = evaluation.description or values
    return f"{evaluation.asset_key.to_user_string()}: {kind} {evaluation.check_name} failed" + (
        f" ({why})" if why else ""
    )


def _spawned_pool(workers: int) -> ProcessPoolExecutor:
    os.environ.update(THREAD_ENV)  # inherited by the spawned workers before torch loads
    context = multiprocessing.get_context("spawn")  # never fork a process that holds torch threads
    return ProcessPoolExecutor(max_workers=workers, mp_context=context)


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """Worker processes to pass to several `materialize_patients` calls in a row (ingest, features,
    predictions), so each worker imports Dagster, the definitions, torch and the models once rather
    than once per stage; None for one worker (runs in this process)."""
    if workers <= 1:
        yield None
        return
    with _spawned_pool(workers) as pool:
        yield pool


def materialize_patients(
    patient_ids: list[str],
    workers: int = 2,
    executor: str = "in_process",
    job: str = "patient_ingest",
    progress: Callable[[int, int, tuple[str, bool, str], float], None] | None = None,
    dask_address: str = "",
    assets: tuple[str, ...] | None = None,
    pool: ProcessPoolExecutor | None = None,
) -> list[tuple[str, bool, str]]:
    """Run `job` for each patient, one run per patient; returns (patient_id, success, first error
    line) in input order. `progress(done, total, result, elapsed_s)` is called as each run ends.
    executor: in_process | multiprocess | dask (steps on the Dask scheduler at `dask_address`).
    `assets`: only these assets of the job (default: all). `pool`: the `worker_pool(workers)` to
    run in (default: a pool of `workers` for this call only)."""
    os.environ.update(THREAD_ENV)  # inherited by the spawned workers before torch loads
    n = len(patient_ids)
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    started = time.perf_counter()
    results: dict[str, tuple[str, bool, str]] = {}

    def finished(result: tuple[str, bool, str]) -> None:
        results[result[0]] = result
        if progress is not None:
            progress(len(results), n, result, time.perf_counter() - started)

    if workers <= 1:
        for pid in patient_ids:
            finished(_run_patient(pid, executor, job, threads, dask_address, assets))
        return [results[pid] for pid in patient_ids]
    with contextlib.ExitStack() as own:
        runs_in = pool or own.enter_context(_spawned_pool(workers))
        futures = [
            runs_in.submit(_run_patient, pid, executor, job, threads, dask_address, assets) for pid in patient_ids
        ]
        for future in as_completed(futures):
            finished(future.result())
    return [results[pid] for pid in patient_ids]


def has_assets(job: str) -> bool:
    return bool(_defs().resolve_job_def(job).asset_layer.executable_asset_keys)


def analysis_refresh_job() -> dg.JobDefinition:
    return _defs().resolve_job_def("analysis_refresh")


COHORT_JOBS = {"cohort_refresh": cohort_refresh_job, "analysis_refresh": analysis_refresh_job}


def asset_names(job: str) -> list[str]:
    return sorted(key.to_user_string() for key in _defs().resolve_job_def(job).asset_layer.executable_asset_keys)


def materialize_cohort(
    job: str = "cohort_refresh", assets: list[str] | None = None, steps: list[tuple[str, float]] | None = None
) -> bool:
    """Run a cohort-level job (only `assets` of it, when given) in this process; True on success.
    `steps`, when given, receives (step, wall seconds) for each step that ran, in start order."""
    instance = dg.DagsterInstance.get()
    result = dg.execute_job(
        dg.reconstructable(COHORT_JOBS[job]),
        instance=instance,
        run_config=EXECUTORS["in_process"],
        tags={"hcc_assets/trigger": "cli"},
        asset_selection=[dg.AssetKey(name) for name in assets] if assets else None,
        raise_on_error=False,
    )
    if steps is not None:
        timed = [
            (s.start_time, s.step_key, s.end_time - s.start_time)
            for s in instance.get_run_step_stats(result.run_id)
            if s.start_time is not None and s.end_time is not None
        ]
        steps += [(key, seconds) for _, key, seconds in sorted(timed)]
    return result.success
