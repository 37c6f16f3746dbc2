"""A run launcher whose run workers start warm: forked from a process that has already imported the
definitions, torch, nnU-Net and pyradiomics.

Why by hand: Dagster's DefaultRunLauncher asks the code server to *spawn* a fresh interpreter per run
(`multiprocessing.get_context("spawn")` in dagster._grpc.server, not configurable), and that process
then imports the definitions (about 3 s here) and, in liver_mask, nnU-Net and torch (about 3 s more).
For a scan that should have its P(HCC) in 15 s, those 6 s are nearly half the budget. Dagster's multiprocess
*executor* offers a forkserver with preloaded modules, but only for steps inside a run; nothing in
Dagster does it for the run worker itself, so this module does: a "zygote" process imports once and
forks one child per run, which executes the run exactly as `dagster api execute_run` does.

Rules that keep it safe:
- The zygote only imports; it opens no database, lake or thread, so a fork copies nothing live.
- The daemon starts the zygote when it creates its run launcher, which Dagster does at the first
  launch (that run starts cold while the zygote warms); other processes only when they launch.
- The zygote is tied to the code it imported: if any .py file of hcc_assets (or a deployment
  settings file: $HCC_ASSETS_PATIENT_RUN_CONFIG, $HCC_ASSETS_COHORT_RUN_CONFIG, <lake>/deployment.yaml)
  changed since, or the run's interpreter is not this one, the run is launched cold by the
  DefaultRunLauncher and a fresh zygote is started (it imports at low priority, beside the runs going on).
- Termination sends SIGINT to the run's process (its pid is a run tag), which Dagster turns into a
  cancelled run, as it does for a cold run worker.

Configure in dagster.yaml:
    run_launcher:
      module: hcc_assets.defs.warm_runs
      class: WarmRunLauncher
"""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import dagster as dg
from dagster._core.launcher import LaunchRunContext
from dagster._core.launcher.default_run_launcher import DefaultRunLauncher
from dagster._serdes import ConfigurableClassData

from hcc_assets.defs.deployment import settings_files

# Modules, or "module:function" to call, that a run would otherwise import on its way.
PRELOAD = (
    "hcc_assets.definitions",
    "hcc_assets.deep.train",
    "hcc_assets.segmentation.inference",
    "hcc_assets.segmentation.nnunet_env:import_trainer_modules",
    "nnunetv2.inference.predict_from_raw_data",
    "radiomics.featureextractor",
    # imported where they are used (figures, the cohort split, the LASSO models), so load them here
    "matplotlib.backends.backend_agg",
    "matplotlib.figure",
    "sklearn.linear_model",
    "sklearn.model_selection",
)
WARM_PID_TAG = "hcc/warm_run_pid"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def code_fingerprint(root: Path = PACKAGE_ROOT) -> str:
    """Changes whenever a source file of the package is edited, added or removed, or one of the
    deployment's run-config files (read when the definitions load) changes: mtimes and sizes."""
    files = list(root.rglob("*.py")) + [path for _, path in settings_files()]
    entries = sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) if p.exists() else (str(p), 0, -1) for p in files)
    return json.dumps(entries)


def _in_dagster_daemon() -> bool:
    """`dagster-daemon run`, or `python -m dagster._daemon run` as `dagster dev` starts it."""
    program = Path(sys.argv[0])
    return program.name == "dagster-daemon" or program.parent.name == "_daemon"


class _Zygote:
    """The warm process: `python -m hcc_assets.defs.warm_runs` over a pair of pipes."""

    def __init__(self, preload: tuple[str, ...]):
        self.fingerprint = code_fingerprint()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hcc_assets.defs.warm_runs", *preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.ready = threading.Event()
        threading.Thread(target=self._wait_ready, daemon=True).start()

    def _wait_ready(self) -> None:
        if self.process.stdout and self.process.stdout.readline().strip() == "ready":
            self.ready.set()

    def ready_and_alive(self) -> bool:
        return self.ready.is_set() and self.process.poll() is None

    def usable(self) -> bool:
        return self.ready_and_alive() and self.fingerprint == code_fingerprint()

    def fork_run(self, run_id: str, instance_ref: str) -> int:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps({"run_id": run_id, "instance_ref": instance_ref}) + "\n")
        reply = self.process.stdout.readline()
        if not reply:
            raise RuntimeError("the warm run process exited")
        return int(reply)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class WarmRunLauncher(DefaultRunLauncher):
    """DefaultRunLauncher whose runs start in a process forked from a warm zygote (see module doc)."""

    def __init__(self, inst_data: ConfigurableClassData | None = None, preload: list[str] | None = None):
        super().__init__(inst_data=inst_data)
        self._preload = tuple(preload or PRELOAD)
        self._lock = threading.Lock()
        # The daemon dequeues and launches the runs: it warms up at once. Other processes that load the
        # instance (webserver, CLI) never start a zygote unless they launch a run themselves.
        self._zygote: _Zygote | None = _Zygote(self._preload) if _in_dagster_daemon() else None

    @classmethod
    def config_type(cls):
        return {
            "preload": dg.Field(
                [str], is_required=False, description="modules the warm process imports before forking runs"
            )
        }

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls(inst_data=inst_data, preload=config_value.get("preload"))

    def warm_up(self) -> None:
        """Start a zygote unless a live one for the current code exists (warming or ready)."""
        with self._lock:
            self._ensure_zygote()

    def wait_until_warm(self, timeout_s: float) -> bool:
        zygote = self._zygote
        return zygote is not None and zygote.ready.wait(timeout_s) and zygote.usable()

    def _ensure_zygote(self) -> _Zygote:
        zygote = self._zygote
        if zygote is None or zygote.process.poll() is not None or zygote.fingerprint != code_fingerprint():
            if zygote is not None:
                zygote.stop()
            zygote = self._zygote = _Zygote(self._preload)
        return zygote

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        origin = run.job_code_origin
        pid = None
        with self._lock:
            zygote = self._ensure_zygote()  # a stale or dead one is replaced; the new one serves later runs
            # _ensure_zygote has just compared the code's fingerprint: no second scan of the files
            if zygote.ready_and_alive() and origin is not None and origin.executable_path == sys.executable:
                pid = zygote.fork_run(run.run_id, dg.serialize_value(self._instance.get_ref()))
        if pid is None:  # still warming, or another interpreter: a cold start as Dagster does it
            super().launch_run(context)
            return
        self._instance.add_run_tags(run.run_id, {WARM_PID_TAG: str(pid)})
        self._run_ids.add(run.run_id)

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        if run is None or WARM_PID_TAG not in run.tags:
            return super().terminate(run_id)
        if run.status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED):
            return False
        self._instance.report_run_canceling(run)
        try:
            os.kill(int(run.tags[WARM_PID_TAG]), signal.SIGINT)
        except ProcessLookupError:
            return False
        return True

    def dispose(self) -> None:
        with self._lock:
            if self._zygote is not None:
                self._zygote.stop()
                self._zygote = None
        super().dispose()


def _execute_forked_run(run_id: str, instance_ref: str) -> None:
    """In the forked child: execute the run as `dagster api execute_run` does."""
    from dagster._cli.api import _execute_run_command_body
    from dagster._core.instance.ref import InstanceRef
    from dagster._utils.interrupts import capture_interrupts

    with capture_interrupts(), dg.DagsterInstance.from_ref(dg.deserialize_value(instance_ref, InstanceRef)) as instance:
        _execute_run_command_body(run_id, instance, lambda _event: None, set_exit_code_on_failure=False)


def _zygote_main(preload: list[str]) -> None:
    import gc
    import importlib

    # The control pipe is a private copy of stdout; anything printed (by nnU-Net, by the runs) goes to stderr.
    control_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, niceness + 10)  # warming must not slow the run going on meanwhile
    gc.disable()  # no collection while importing: no freed holes in the pages the runs will share
    for entry in preload:
        module, _, function = entry.partition(":")
        loaded = importlib.import_module(module)
        if function:
            getattr(loaded, function)()
    # The imported modules' objects (millions, with torch, nnU-Net and Dagster) move to the permanent
    # generation: no run's collection traverses them again, and their pages stay shared with the
    # forked runs instead of being copied when a collection touches them (Python's gc.freeze recipe).
    gc.freeze()
    gc.enable()
    try:  # the runs forked later should not inherit the low priority (allowed to root or CAP_SYS_NICE)
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except PermissionError:
        pass
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    control_out.write("ready\n")
    control_out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                control_out.close()
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                _execute_forked_run(request["run_id"], request["instance_ref"])
            finally:
                os._exit(0)
        control_out.write(f"{pid}\n")
        control_out.flush()


if __name__ == "__main__":
    _zygote_main(sys.argv[1:])
