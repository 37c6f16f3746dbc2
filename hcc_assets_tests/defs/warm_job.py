"""A tiny job for test_warm_runs: importable by the warm process (its preload) and by the run."""

import os
import time

import dagster as dg


@dg.op(config_schema={"sleep_s": dg.Field(float, default_value=0.0)})
def report_pid(context: dg.OpExecutionContext) -> int:
    time.sleep(context.op_config["sleep_s"])
    context.log.info(f"ran in pid {os.getpid()}")
    return os.getpid()


@dg.job(executor_def=dg.in_process_executor)
def warm_job():
    report_pid()
