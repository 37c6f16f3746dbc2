"""The per-patient jobs on a Dask cluster (dagster-dask), chosen per job through `executor_def`.

The steps of a run go to the cluster's workers, one Dask task per step; a step's task waits for
the tasks of the steps it depends on. The jobs have the same names, selections and assets as those
in `hcc_assets.definitions`, whose default executor stays in_process/multiprocess; only these job
definitions carry the Dask executor. They are kept out of the main Definitions because importing
dask costs every run process about a second.

Which cluster: run config `execution: {config: {cluster: {existing: {address: tcp://host:8786}}}}`
(`cluster_run_config`), or `cluster: {local: {n_workers: 2, threads_per_worker: 1}}` for a
cluster that lives as long as the run. Every worker must reach the data lake (a shared folder or
object storage) and the feature store: with its DuckLake catalog on Postgres and its data files on
a shared path, workers may be on other machines (see docs/scaling.md).

Why not dagster-dask's `dask_executor` as it ships (0.29.27): (1) it names each task
`<job>.<step>`, so two runs of one job on one cluster share task keys and the second run silently
executes nothing (dagster-io/dagster#21418) -- exactly what parallel per-patient runs do; (2) it
passes the DagsterRun to `client.submit`, and Dask walks tuple arguments looking for futures: a
partitioned run's `partitions_subset` is a Dagster @record that refuses iteration, so every
per-patient run fails before a step starts ("Iteration is not allowed on `@record`
KeyRangesPartitionsSubset"; seen with dask 2024.10, 2024.11 and 2026.8); (3) a `local` cluster is
never closed. `PartitionSafeDaskExecutor` keeps dagster-dask's config schema, its worker function
(`query_on_dask_worker`) and its LocalCluster arguments, and changes those three things.
"""

import functools

import dagster as dg
import distributed
from dagster_dask.executor import DaskExecutor, dask_executor, get_dask_resource_requirements, query_on_dask_worker

from hcc_assets.definitions import defs
from hcc_assets.defs.jobs import patient_features_job, patient_ingest_job, patient_pipeline_job, patient_predictions_job


def cluster_run_config(address: str) -> dict:
    """Run config that sends a run's steps to the Dask scheduler at `address`."""
    return {"execution": {"config": {"cluster": {"existing": {"address": address}}}}}


class PartitionSafeDaskExecutor(DaskExecutor):
    """dagster-dask's executor for `existing` and `local` clusters, with run-unique task keys, the
    run bound into the submitted function (Dask never walks it) and a local cluster closed at the end."""

    def execute(self, plan_context, execution_plan):
        if not plan_context.instance.is_persistent:
            raise dg.DagsterInvariantViolationError("Dask execution requires a persistent DagsterInstance")
        job_name, run_id = plan_context.job_name, plan_context.run_id
        if self.cluster_type == "existing":
            cluster, owned = self.cluster_configuration["address"], None
        elif self.cluster_type == "local":
            cluster = owned = distributed.LocalCluster(**self.build_dict(job_name))
        else:
            raise dg.DagsterInvariantViolationError(
                f"cluster type {self.cluster_type!r}: this executor runs on 'existing' or 'local' Dask clusters"
            )
        run_step = functools.partial(
            query_on_dask_worker,
            recon_job=plan_context.reconstructable_job,
            dagster_run=plan_context.dagster_run,
            run_config=plan_context.run_config,
            instance_ref=plan_context.instance.get_ref(),
            known_state=execution_plan.known_state,
        )
        try:
            with distributed.Client(cluster) as client:
                futures: dict[str, distributed.Future] = {}
                for level in execution_plan.get_steps_to_execute_by_level():
                    for step in level:
                        upstream = [
                            futures[key] for step_input in step.step_inputs for key in step_input.dependency_keys
                        ]
                        futures[step.key] = client.submit(
                            functools.partial(run_step, step_keys=[step.key]),
                            upstream,
                            key=f"{job_name}.{step.key}.{run_id}",
                            resources=get_dask_resource_requirements(step.tags),
                        )
                for _, events in distributed.as_completed(list(futures.values()), with_results=True):
                    yield from events
        finally:
            if owned is not None:
                owned.close()


@dg.executor(
    name="dask",
    config_schema=dask_executor.config_schema.as_field(),  # the same Field, in the type the decorator takes
    requirements=dg.multiple_process_executor_requirements(),
)
def partition_safe_dask_executor(init_context) -> PartitionSafeDaskExecutor:
    """dagster-dask's `dask_executor` config (`cluster: {existing: {address}}` or `cluster: {local: {...}}`)."""
    ((cluster_type, cluster_configuration),) = init_context.executor_config["cluster"].items()
    return PartitionSafeDaskExecutor(cluster_type, cluster_configuration)


def _on_dask(job):
    return dg.define_asset_job(
        name=job.name, selection=job.selection, description=job.description, executor_def=partition_safe_dask_executor
    )


dask_defs = dg.Definitions(
    assets=defs.assets,
    asset_checks=defs.asset_checks,
    resources=defs.resources,
    jobs=[
        _on_dask(job)
        for job in (patient_ingest_job, patient_features_job, patient_predictions_job, patient_pipeline_job)
    ],
)


# Module-level functions, so `dg.reconstructable` can rebuild the job in every Dask worker.
def patient_ingest_dask_job() -> dg.JobDefinition:
    return dask_defs.resolve_job_def(patient_ingest_job.name)


def patient_features_dask_job() -> dg.JobDefinition:
    return dask_defs.resolve_job_def(patient_features_job.name)


def patient_predictions_dask_job() -> dg.JobDefinition:
    return dask_defs.resolve_job_def(patient_predictions_job.name)


def patient_pipeline_dask_job() -> dg.JobDefinition:
    return dask_defs.resolve_job_def(patient_pipeline_job.name)
