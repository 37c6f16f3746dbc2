"""WarmRunLauncher: runs forked from a warm process execute like any run, can be cancelled, and a
code change retires the warm process."""

import os
import time

import dagster as dg
import pytest
from dagster._core.launcher import LaunchRunContext

from hcc_assets.defs import warm_runs
from hcc_assets.defs.warm_runs import WARM_PID_TAG, WarmRunLauncher, code_fingerprint

PRELOAD = ["hcc_assets_tests.defs.warm_job"]
TERMINAL = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


def _create_run(instance: dg.DagsterInstance, sleep_s: float = 0.0) -> dg.DagsterRun:
    from hcc_assets_tests.defs.warm_job import warm_job

    recon = dg.reconstructable(warm_job)
    run_config = {"ops": {"report_pid": {"config": {"sleep_s": sleep_s}}}}
    return instance.create_run_for_job(
        job_def=warm_job, run_config=run_config, job_code_origin=recon.get_python_origin()
    )


def _wait(instance: dg.DagsterInstance, run_id: str, statuses: set, timeout_s: float = 120) -> dg.DagsterRun:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = instance.get_run_by_id(run_id)
        if run is not None and run.status in statuses:
            return run
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} did not reach {statuses}")


@pytest.fixture
def launcher(tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        launcher = WarmRunLauncher(preload=PRELOAD)
        launcher.register_instance(instance)
        launcher.warm_up()
        assert launcher.wait_until_warm(120)
        yield instance, launcher
        launcher.dispose()


def test_a_run_forked_from_the_warm_process_succeeds(launcher):
    instance, warm = launcher
    run = _create_run(instance)
    warm.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
    done = _wait(instance, run.run_id, TERMINAL)
    assert done.status == dg.DagsterRunStatus.SUCCESS
    pid = int(done.tags[WARM_PID_TAG])
    assert pid != os.getpid()
    logs = " ".join(e.message for e in instance.all_logs(run.run_id))
    assert f"ran in pid {pid}" in logs  # the op ran in the forked child the tag names


def test_terminate_cancels_a_forked_run(launcher):
    instance, warm = launcher
    run = _create_run(instance, sleep_s=60)
    warm.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
    _wait(instance, run.run_id, {dg.DagsterRunStatus.STARTED})
    assert warm.terminate(run.run_id)
    done = _wait(instance, run.run_id, TERMINAL, timeout_s=60)
    assert done.status == dg.DagsterRunStatus.CANCELED


def test_a_code_change_retires_the_warm_process(launcher, tmp_path, monkeypatch):
    _instance, warm = launcher
    assert warm.wait_until_warm(1)
    package = tmp_path / "package"
    package.mkdir()
    (package / "module.py").write_text("A = 1\n")
    before = code_fingerprint(package)
    time.sleep(0.01)
    (package / "module.py").write_text("A = 22\n")
    assert code_fingerprint(package) != before
    # the launcher compares against the fingerprint of hcc_assets; make "the code" change under it
    monkeypatch.setattr(warm_runs, "code_fingerprint", lambda root=None: "edited")
    assert not warm.wait_until_warm(1)  # a stale zygote is not used
    old = warm._zygote
    warm.warm_up()
    assert warm._zygote is not old and old is not None and old.process.poll() is not None


def test_the_fingerprint_follows_the_deployment_run_config(tmp_path, monkeypatch):
    """The definitions read $HCC_ASSETS_PATIENT_RUN_CONFIG when they load: an edit must retire the warm process."""
    settings = tmp_path / "patient.yaml"
    settings.write_text("ops: {}\n")
    monkeypatch.setenv("HCC_ASSETS_PATIENT_RUN_CONFIG", str(settings))
    package = tmp_path / "package"
    package.mkdir()
    (package / "module.py").write_text("A = 1\n")
    before = code_fingerprint(package)
    settings.write_text("ops: {liver_mask: {config: {min_dice_liver: 0.5}}}\n")
    assert code_fingerprint(package) != before
