"""The hands-off flow, shared by test_daemon.py and benchmarks/new_scan_latency.py:

1. `prepare_lake`: a data lake whose cohort is ingested and whose models are trained and registered
   (in this process, through the real assets, recorded in the lake's own DAGSTER_HOME), so the
   daemon sees those patients as done and the models as current;
2. `Daemon`: the real Dagster daemon (`dagster-daemon run` or `dagster dev`) on workspace.yaml in
   its own process group, with DAGSTER_HOME and HCC_ASSETS_LAKE pointing at that lake;
3. `drop_patient`: a patient folder moved into incoming/ the way importers do it (staged under a
   hidden name, `.complete` inside, renamed into place), so the sensor never sees half a study;
4. `wait_for_rows` and `latency_breakdown`: when the patient's rows reach the feature store, and
   where the time went (sensor tick, queue, run start, steps), from the instance's event log.

Run config of the sensor's runs: they bring none of their own, so they get the per-patient jobs'
default, the in-process executor plus the deployment file $HCC_ASSETS_PATIENT_RUN_CONFIG
(hcc_assets.defs.jobs.patient_run_config). `prepare_lake` writes that file into the lake
(`patient_config`) and ingests the cohort with the same ops config, so the prepared patients and the
dropped one lie on the grid the classifier was trained on (deep_embedding refuses any other).
The test uses a 32x32x16 grid and lets deep_embedding use a classifier below chance: a
classifier trained in seconds on 6 patients does not reliably beat chance on its best-validation-
loss epoch (2 validation patients), and the gate has its own tests (test_deep_assets); here only the
flow matters. The benchmark keeps the default 128x128x64 grid and the default depth 50.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import yaml
from dagster import DagsterEventType

from hcc_assets_tests.model_configs import (
    CLASSIFIER_TRAINING,
    SEGMENTATION_TRAINING,
    TEST_GRID,
    built_once,
    suite_compute,
)

ROOT = Path(__file__).resolve().parents[2]
PSEUDONYM_KEY = "hands-off-test"
CLASSIFIER, SEGMENTATION = "hcc_classifier", "liver_segmentation"  # registry names
# the test's per-patient run config: see the module docstring
TEST_PATIENT_CONFIG = {
    "ops": {
        "preprocessed_volume": {"config": {"target_shape": TEST_GRID}},
        "deep_embedding": {"config": {"allow_model_below_chance": True}},
    }
}
PATIENT_CONFIG_FILE = "patient_run_config.yaml"
FEATURE_TABLES = ("liver_masks", "radiomic_features", "deep_embeddings", "hcc_predictions")


@dataclass
class PreparedLake:
    root: Path  # the lake: incoming/, feature_store.sqlite + feature_store/, models/, private/
    home: Path  # DAGSTER_HOME
    patients: list[str]
    versions: dict[str, str]  # model name -> current version
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def lake(self):
        from hcc_assets.defs.resources import LakeResource

        return LakeResource(root=str(self.root), quiet_seconds=60)

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.home))

    @classmethod
    def reopen(cls, lake_root: Path) -> PreparedLake:
        """A lake prepared earlier (by prepare_lake), e.g. to measure again without retraining."""
        from hcc_assets.defs.resources import LakeResource
        from hcc_assets.featurestore.registry import current_version
        from hcc_assets.instance import ensure_dagster_home

        lake_root = Path(lake_root)
        store = LakeResource(root=str(lake_root)).store
        patients = store.query("SELECT DISTINCT patient_id FROM volumes ORDER BY 1")["patient_id"].to_list()
        versions = {name: current_version(store, name) for name in (SEGMENTATION, CLASSIFIER)}
        return cls(lake_root, ensure_dagster_home(lake_root), patients, versions)


def _must(result, what: str) -> None:
    if not result.success:
        errors = [
            e.step_failure_data.error.message.strip()
            for e in result.all_events
            if e.is_step_failure and e.step_failure_data.error
        ]
        raise AssertionError(f"{what} failed: {errors[:2]}")


def prepare_lake(
    lake_root: Path,
    cohort_source: Path,
    patient_config: dict | None = None,
    segmentation: dict | None = None,
    liver_model: Path | None = None,
    classifier: dict | None = None,
    threads: int = 2,
    features: list[str] | None = None,
) -> PreparedLake:
    """Copy the cohort into <lake>/incoming, ingest it with the per-patient run config, split it and train
    both models with cheap training configs, recorded in the instance at $DAGSTER_HOME (set by
    ensure_dagster_home to <lake>/dagster_home when unset; the instance config reads it from the
    environment, so it stays exported: callers that care restore it). `patient_config` (run config
    of per-patient runs) goes to <lake>/patient_run_config.yaml for the daemon and is used here for
    the cohort's ingest. `liver_model`: a trained nnU-Net folder to register (mode a, as a user plugs
    one in; the tests pass the suite's shared model) instead of training one with `segmentation`.
    The classifier may fail its beats-chance check (it is registered as current anyway:
    accept_below_chance). `features`: per-patient assets to materialize for every patient once the
    models are in (one run per patient, with the per-patient run config)."""
    from hcc_assets.defs.resources import LakeResource
    from hcc_assets.featurestore.registry import current_version
    from hcc_assets.instance import ensure_dagster_home

    lake_root = Path(lake_root)
    home = ensure_dagster_home(lake_root)
    (lake_root / "private").mkdir(parents=True, exist_ok=True)
    (lake_root / "private" / "pseudonym.key").write_text(PSEUDONYM_KEY)
    shutil.copytree(cohort_source, lake_root / "incoming")
    lake = LakeResource(root=str(lake_root), quiet_seconds=60)
    resources = {"lake": lake, "compute": suite_compute(threads)}
    assets = dg.load_assets_from_modules(
        [
            importlib.import_module(f"hcc_assets.defs.{name}")
            for name in ("ingest", "cohort", "segmentation", "deep", "analysis")
        ]
    )
    seconds: dict[str, float] = {}

    patient_config = patient_config or {}
    (lake_root / PATIENT_CONFIG_FILE).write_text(yaml.safe_dump(patient_config))

    def materialize(selection, what, partition_key=None, config=None, tolerate_check=None):
        started = time.perf_counter()
        ops = {name: value for name, value in (config or {}).items() if name in selection}
        result = dg.materialize(
            assets,
            selection=selection,
            partition_key=partition_key,
            instance=instance,
            resources=resources,
            run_config={"ops": ops},
            raise_on_error=False,
        )
        failures = [
            e.step_failure_data.error.message
            for e in result.all_events
            if e.is_step_failure and e.step_failure_data.error
        ]
        if not (tolerate_check and failures and all(tolerate_check in f for f in failures)):
            _must(result, what)
        seconds[what.split(" ")[0]] = seconds.get(what.split(" ")[0], 0.0) + time.perf_counter() - started

    with dg.DagsterInstance.from_config(str(home)) as instance:
        patients = sorted(lake.ready_patients())
        instance.add_dynamic_partitions("patients", patients)
        for pid in patients:  # the run config the sensor's runs will use: same grid
            materialize(
                ["raw_scan", "nifti_volume", "preprocessed_volume"],
                f"ingest {pid}",
                pid,
                config=patient_config.get("ops"),
            )
        materialize(["cohort"], "cohort")
        materialize(
            ["liver_segmentation_model"],
            "segmentation model",
            config={
                "liver_segmentation_model": {
                    "config": {"model_folder": str(liver_model)}
                    if liver_model
                    else segmentation or SEGMENTATION_TRAINING
                }
            },
        )
        materialize(
            ["hcc_classifier"],
            "classifier",
            config={"hcc_classifier": {"config": classifier or CLASSIFIER_TRAINING}},
            tolerate_check="beats_chance_on_training",
        )
        if features:
            for pid in patients:
                materialize(features, f"features {pid}", pid, config=patient_config.get("ops"))
    versions = {name: current_version(lake.store, name) for name in (SEGMENTATION, CLASSIFIER)}
    return PreparedLake(lake_root, home, patients, versions, seconds)


# what every prepared patient has in the suite's shared prepared lake, beyond prepare_lake's ingest
PREPARED_FEATURES = ["liver_mask", "radiomic_features", "deep_embedding"]


def shared_prepared_lake(
    shared_folder: Path,
    cohort_source: Path,
    cohort_settings: dict,
    liver_model: Path,
    patient_config: dict,
    threads: int,
) -> PreparedLake:
    """`prepare_lake` plus every patient's PREPARED_FEATURES (one run per patient), made once per
    pytest run in `shared_folder` (common to the xdist workers; whoever takes the file lock first
    builds it from its copy of the cohort `cohort_settings` describes, the others wait) and never
    changed after: tests take their own `copy_prepared` of it. test_daemon and
    test_prediction_assets start from the same lake, so the suite prepares it once, not twice.
    Its DAGSTER_HOME lies beside the lake, in the folder; the environment (DAGSTER_HOME,
    HCC_ASSETS_*) is put back when it is built."""
    import pytest

    def build(folder: Path) -> dict:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("DAGSTER_HOME", str(folder / "dagster_home"))
            for name in [n for n in os.environ if n.startswith("HCC_ASSETS_")]:
                patch.delenv(name)  # the lake's own key and settings, as a daemon on it will see them
            prepared = prepare_lake(
                folder / "lake",
                cohort_source,
                patient_config=patient_config,
                liver_model=liver_model,
                threads=threads,
                features=PREPARED_FEATURES,
            )
        return {"patients": prepared.patients, "versions": prepared.versions}

    key = hashlib.sha256(
        json.dumps([cohort_settings, str(liver_model), patient_config, CLASSIFIER_TRAINING], sort_keys=True).encode()
    ).hexdigest()[:12]
    folder = shared_folder / f"prepared_lake_{key}"
    recorded = built_once(folder, build)
    return PreparedLake(folder / "lake", folder / "dagster_home", recorded["patients"], recorded["versions"])


def copy_prepared(template: PreparedLake, lake_root: Path, home: Path) -> PreparedLake:
    """A test's own copy of a prepared lake and its DAGSTER_HOME (whose storage follows
    $DAGSTER_HOME: set it to `home` before opening the instance). The feature store finds its data
    files in the copy (DuckLake's data path follows the lake); the models registry keeps the
    template's model folders, which stay until the pytest run ends, and a model trained in the
    copy goes into the copy."""
    shutil.copytree(template.root, lake_root)
    shutil.copytree(template.home, home)
    return PreparedLake(Path(lake_root), Path(home), list(template.patients), dict(template.versions))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """The real daemon on workspace.yaml, in its own process group (code server and run workers
    included), killed as a group on exit. mode: "daemon" (`dagster-daemon run`) or "dev"
    (`dagster dev`: webserver + daemon, what `make ui` runs)."""

    def __init__(self, prepared: PreparedLake, log_path: Path, mode: str = "daemon", sensor_interval_s: int = 1):
        self.prepared, self.log_path, self.mode = prepared, Path(log_path), mode
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("HCC_ASSETS_")}  # this lake only
        self.env = {
            **inherited,
            "DAGSTER_HOME": str(prepared.home),
            "HCC_ASSETS_LAKE": str(prepared.root),
            "OMP_WAIT_POLICY": "PASSIVE",
            "HCC_ASSETS_SENSOR_INTERVAL_S": str(sensor_interval_s),
        }
        if (prepared.root / PATIENT_CONFIG_FILE).exists():  # a lake made by prepare_lake (not `make demo`'s)
            self.env["HCC_ASSETS_PATIENT_RUN_CONFIG"] = str(prepared.root / PATIENT_CONFIG_FILE)
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Daemon:
        bin_dir = Path(sys.executable).parent
        if self.mode == "dev":
            command = [
                str(bin_dir / "dagster"),
                "dev",
                "-w",
                str(ROOT / "workspace.yaml"),
                "-h",
                "127.0.0.1",
                "-p",
                str(_free_port()),
            ]
        else:
            command = [str(bin_dir / "dagster-daemon"), "run", "-w", str(ROOT / "workspace.yaml")]
        self._log = open(self.log_path, "w")
        self.started_at = time.time()
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is None:
            return
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # stragglers of the group (run workers) after the leader exited
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
        self.process = None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"the daemon exited with {self.process.returncode}:\n{self.log_tail()}")


def sensor_ticks(instance: dg.DagsterInstance, name: str, limit: int = 100) -> list:
    from dagster._core.scheduler.instigation import InstigatorType

    for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR):
        if state.instigator_name == name:
            return list(instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=limit))
    return []


def wait_for_sensor(
    instance: dg.DagsterInstance,
    daemon: Daemon,
    name: str = "incoming_scans_sensor",
    timeout_s: float = 180.0,
    since: float | None = None,
    ticks: int = 1,
) -> float:
    """Block until the sensor has finished `ticks` ticks that started after `since` (default: the
    daemon's start, so one tick means the daemon and its code server are up)."""
    since = daemon.started_at if since is None else since
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        daemon.check_alive()
        done = [t for t in sensor_ticks(instance, name, limit=ticks + 5) if t.end_timestamp and t.timestamp >= since]
        if len(done) >= ticks:
            return time.time()
        time.sleep(0.5)
    raise AssertionError(f"sensor {name}: not {ticks} tick(s) within {timeout_s:.0f} s:\n{daemon.log_tail()}")


def drop_patient(source: Path, incoming: Path) -> float:
    """Drop a copy into the drop zone the way `hcc-assets predict` does (dropzone.drop_copy:
    staged under a hidden name, `.complete` inside, renamed into place); returns when."""
    from hcc_assets.intake.dropzone import drop_copy

    drop_copy(source, incoming)
    return time.time()


def rows_present(store, patient_id: str) -> dict[str, int]:
    return {
        table: store.query(f"SELECT count(*) FROM {table} WHERE patient_id = ?", [patient_id]).item()
        for table in FEATURE_TABLES
    }


def wait_for_rows(
    prepared: PreparedLake,
    instance: dg.DagsterInstance,
    daemon: Daemon,
    patient_id: str,
    timeout_s: float = 240.0,
    poll_s: float = 0.25,
) -> float:
    """Seconds-since-epoch when the patient has rows in every FEATURE_TABLE; fails fast (with the
    step errors) when the patient's run fails."""
    store = prepared.lake.store
    deadline = time.time() + timeout_s
    last = FEATURE_TABLES[-1]  # written last by the run: one cheap query per poll, not one per table
    while time.time() < deadline:
        daemon.check_alive()
        if store.query(f"SELECT count(*) FROM {last} WHERE patient_id = ?", [patient_id]).item():
            seen = time.time()
            if all(rows_present(store, patient_id).values()):
                return seen
        for run in instance.get_runs(dg.RunsFilter(tags={"dagster/partition": patient_id})):
            if run.status == dg.DagsterRunStatus.FAILURE:
                raise AssertionError(f"run {run.run_id} ({run.job_name}) failed: {run_errors(instance, run.run_id)}")
        time.sleep(poll_s)
    runs = [
        (r.job_name, r.status.value) for r in instance.get_runs(dg.RunsFilter(tags={"dagster/partition": patient_id}))
    ]
    raise AssertionError(
        f"no rows for {patient_id} after {timeout_s:.0f} s (rows {rows_present(store, patient_id)}, "
        f"runs {runs}):\n{daemon.log_tail()}"
    )


def run_errors(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    errors = []
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is not None and event.is_step_failure and event.step_failure_data.error:
            errors.append(f"{event.step_key}: {event.step_failure_data.error.message.strip()[:500]}")
        elif event is not None and event.event_type_value == "RUN_FAILURE":
            errors.append(entry.message[:500])
    return errors


def latency_breakdown(
    instance: dg.DagsterInstance, patient_id: str, dropped: float, rows: float
) -> list[tuple[str, float]]:
    """(stage, seconds) from the drop to the rows, from the sensor's tick and the run's event log."""
    runs = instance.get_run_records(dg.RunsFilter(tags={"dagster/partition": patient_id}))
    if not runs:
        return [("drop -> rows", rows - dropped)]
    record = runs[-1]  # the first run for this patient
    run_id = record.dagster_run.run_id
    tick = next((t for t in sensor_ticks(instance, "incoming_scans_sensor", limit=1000) if run_id in t.run_ids), None)
    events: dict[DagsterEventType, float] = {}
    steps: list[tuple[str, float, float]] = []
    starts: dict[str, float] = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None:
            continue
        events.setdefault(event.event_type, entry.timestamp)
        if event.event_type == DagsterEventType.STEP_START:
            starts[event.step_key] = entry.timestamp
        elif (
            event.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE)
            and event.step_key in starts
        ):
            steps.append((event.step_key, starts[event.step_key], entry.timestamp))
    created = record.create_timestamp.timestamp()
    marks: list[tuple[str, float]] = []
    if tick is not None:
        marks.append(("drop -> sensor tick that saw it (sensor interval)", tick.timestamp - dropped))
        marks.append(("tick -> run created (sensor evaluation, partition, run)", created - tick.timestamp))
    else:
        marks.append(("drop -> run created", created - dropped))
    dequeued = events.get(DagsterEventType.RUN_DEQUEUED, created)
    marks.append(("run created -> dequeued (run queue)", dequeued - created))
    launched = events.get(DagsterEventType.RUN_STARTING, dequeued)
    marks.append(("dequeued -> launched (code server asked to start the run)", launched - dequeued))
    started = events.get(DagsterEventType.RUN_START, launched)
    marks.append(
        (
            "launched -> run worker started (fork of the warm run process, or a cold spawn and imports)",
            started - launched,
        )
    )
    previous = started
    for index, (key, begin, end) in enumerate(sorted(steps, key=lambda s: s[1])):
        if begin - previous > 0.05:
            marks.append(
                ("  run set-up before the first step" if index == 0 else "  (between steps)", begin - previous)
            )
        marks.append((f"  step {key}", end - begin))
        previous = end
    marks.append(
        ("last step's end -> rows seen (poll; < 0: rows were in before the step's end event)", rows - previous)
    )
    return marks


def format_breakdown(marks: list[tuple[str, float]], total: float) -> str:
    lines = [f"{seconds:7.2f} s  {stage}" for stage, seconds in marks]
    lines.append(f"{total:7.2f} s  TOTAL drop -> rows in {', '.join(FEATURE_TABLES)}")
    return "\n".join(lines)
