import os

# Before anything imports torch: OpenMP busy-waiting makes CPU torch ~10x slower here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import gc
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

# A shell that starts the suite in the background (`make test &` in a script) ignores SIGINT in it.
# Dagster gives SIGTERM the handler SIGINT has in every step process (setup_interrupt_handlers), so
# SIGTERM is then ignored too, inherited by each step's compute-log `tail -F`, which outlives its
# terminate(): a 30 s wait per log stream (the Dask test went from 45 s to 240 s) and leaked tails.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Dagster's in-process runs make many short-lived container objects: with the default thresholds
# (700, 10, 10) the collector runs so often that it took about a fifth of test_automation's CPU.
# Collect young objects less often, and (pytest_collection_finish) freeze what the imports made.
gc.set_threshold(50_000, 20, 100)


def pytest_collection_finish(session):
    """Move everything the imports and the collection made to the permanent generation: the
    collections during the tests never traverse torch's, nnU-Net's and Dagster's objects again."""
    gc.collect()
    gc.freeze()


# Small geometry keeps the suite fast; the demo uses the full 256x256 cohort.
SMALL_COHORT = dict(patients=8, seed=11, matrix=64, slices_min=12, slices_max=16, oblique_fraction=0.5)


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    """A synthetic drop zone, generated once; tests copy it before changing it."""
    from hcc_assets.synthetic.cohort import SynthConfig, synthesize_cohort

    incoming = tmp_path_factory.mktemp("cohort") / "incoming"
    patients = synthesize_cohort(incoming, SynthConfig(**SMALL_COHORT))
    return incoming, patients


@pytest.fixture(scope="session")
def liver_model_folder(small_cohort, tmp_path_factory) -> Path:
    """A brief nnU-Net liver model trained once per run on the small cohort (model_configs)."""
    from hcc_assets_tests.model_configs import shared_liver_model

    return shared_liver_model(tmp_path_factory, small_cohort[0], SMALL_COHORT)


@pytest.fixture(scope="session")
def liver_model_later(small_cohort, tmp_path_factory) -> Callable[[], Path]:
    """liver_model_folder, fetched when called: a module that ingests first does not wait for the
    training meanwhile (test_segmentation_assets may be training it on the other worker)."""
    from hcc_assets_tests.model_configs import shared_liver_model

    return lambda: shared_liver_model(tmp_path_factory, small_cohort[0], SMALL_COHORT)


@pytest.fixture(scope="session")
def prepared_lake(small_cohort, liver_model_folder, tmp_path_factory):
    """The hands-off lake (hands_off.shared_prepared_lake: the small cohort ingested on the test grid,
    both models registered, every patient's mask, radiomics and embedding), built once per run and
    shared by the xdist workers; read-only: take a copy (hands_off.copy_prepared)."""
    from hcc_assets_tests.defs.hands_off import TEST_PATIENT_CONFIG, shared_prepared_lake
    from hcc_assets_tests.model_configs import TEST_CPU_THREADS, shared_run_folder

    return shared_prepared_lake(
        shared_run_folder(tmp_path_factory),
        small_cohort[0],
        SMALL_COHORT,
        liver_model_folder,
        TEST_PATIENT_CONFIG,
        TEST_CPU_THREADS,
    )


@pytest.fixture
def incoming_copy(small_cohort, tmp_path) -> tuple[Path, list]:
    incoming, patients = small_cohort
    target = tmp_path / "incoming"
    shutil.copytree(incoming, target)
    return target, patients


@pytest.fixture
def hcc_command(capsys, monkeypatch) -> Callable[..., tuple[int, str, str]]:
    """`hcc-assets ARGS...` run in the test's process: (exit code, stdout, stderr). Starting no
    interpreter saves seconds per call; the installed entry point, as a process of its own, runs in
    test_ducklake's test_the_sql_command_reads_while_writers_commit. `--lake` sets $HCC_ASSETS_LAKE
    (as it must for the Definitions): it is put back after the test."""
    from hcc_assets import cli

    if "HCC_ASSETS_LAKE" in os.environ:
        monkeypatch.setenv("HCC_ASSETS_LAKE", os.environ["HCC_ASSETS_LAKE"])
    else:
        monkeypatch.delenv("HCC_ASSETS_LAKE", raising=False)

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def memory_root():
    """A fresh root on fsspec's in-process memory filesystem (a non-local data lake), removed after."""
    import uuid

    import fsspec

    root = f"memory://hcc-test-{uuid.uuid4().hex[:8]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


# The integration tier: modules that run real Dagster jobs, daemons, servers or browsers, or train
# nnU-Net / the classifier. Everything else is the unit tier (`make test-fast`: -m "not integration"):
# domain, steps, storage, and sensors and schedules through Dagster's build contexts.
INTEGRATION_MODULES = {
    "deep/test_train.py",
    "segmentation/test_training_inference.py",
    "intake/test_receiver.py",
    "test_cli_materialize.py",
    "test_ui_browser.py",
}
UNIT_MODULES_IN_DEFS = {"defs/test_sensor.py", "defs/test_figure_metadata.py"}


# The longest modules, longest first. pytest-xdist (--dist loadfile --no-loadscope-reorder) hands out
# whole modules in collection order, and gives a worker the next module as soon as its current one has
# 2 tests or fewer left to run (a worker needs the next test in hand to run one): so a one-test module
# such as test_daemon takes the module after it along. The long ones first keep one worker from
# running a long module alone at the end.
# test_segmentation_assets comes second: its subject is training the nnU-Net liver model, and it
# publishes that model as the suite's shared one (model_configs.liver_model_slot), so nothing else
# trains it. With test_daemon second, test_daemon's fixture trained the shared model, and
# test_segmentation_assets, handed out with it, trained the same model again on the same worker.
LONGEST_FIRST = [
    "defs/test_analysis_assets.py",
    "defs/test_segmentation_assets.py",
    "defs/test_daemon.py",
    "defs/test_prediction_assets.py",
    "defs/test_dask_executor.py",
    "defs/test_parallel_runs.py",
    "test_ui_browser.py",
    "defs/test_postgres.py",
    "defs/test_deep_assets.py",
    # the unit tier's longest
    "featurestore/test_ducklake.py",
    "featurestore/test_store.py",
    "steps/test_ingest.py",
    "segmentation/test_dataset_and_plans.py",
    "featurestore/test_radiomic_vectors.py",
]


def _is_integration_module(module: str) -> bool:
    """Whole modules of the integration tier, by path relative to hcc_assets_tests/."""
    return (module.startswith("defs/") and module not in UNIT_MODULES_IN_DEFS) or module in INTEGRATION_MODULES


def pytest_ignore_collect(collection_path, config):
    """Under `-m "not integration"` (make test-fast) the integration modules are not even imported:
    their imports (Dagster's definitions, dask, the study helpers) cost each worker seconds."""
    if "".join(str(config.getoption("markexpr", "")).split()) != "notintegration":
        return None
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    try:
        module = collection_path.relative_to(Path(__file__).parent).as_posix()
    except ValueError:
        return None
    return True if _is_integration_module(module) else None


def pytest_collection_modifyitems(config, items):
    root = Path(__file__).parent
    modules = {id(item): Path(item.fspath).relative_to(root).as_posix() for item in items}
    for item in items:
        module = modules[id(item)]
        if _is_integration_module(module) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.integration)
    rank = {module: i for i, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(modules[id(item)], len(rank)))  # stable: file order otherwise


# Free space where the tests write (TMPDIR: `make test` puts it on /dev/shm where there is room),
# reported at the end: a run that fails for lack of space says so.
_free_disk_gib: dict[str, float] = {}
LOW_DISK_GIB = 1.0


def _free_gib() -> float:
    return shutil.disk_usage(tempfile.gettempdir()).free / 2**30


def pytest_sessionstart(session):
    _free_disk_gib["start"] = _free_disk_gib["lowest"] = _free_gib()


def pytest_runtest_logreport(report):
    if report.when == "call" and "lowest" in _free_disk_gib:
        _free_disk_gib["lowest"] = min(_free_disk_gib["lowest"], _free_gib())


def pytest_terminal_summary(terminalreporter):
    if "start" not in _free_disk_gib:
        return
    start, lowest = _free_disk_gib["start"], _free_disk_gib["lowest"]
    terminalreporter.write_line(
        f"free space at {tempfile.gettempdir()}: {start:.1f} GiB at the start, "
        f"{lowest:.1f} GiB at the lowest (sampled after each test)"
    )
    if lowest < LOW_DISK_GIB:
        terminalreporter.write_line(
            f"WARNING: under {LOW_DISK_GIB:.0f} GiB of free space: failures above may be writes that ran out of space",
            red=True,
        )


@pytest.fixture
def postgres():
    """A real PostgreSQL server on 127.0.0.1 in a temporary folder (hcc_assets_tests/postgres_server.py).
    Skipped where the server binaries are missing, unless $HCC_ASSETS_REQUIRE_POSTGRES is set (CI)."""
    from hcc_assets_tests.postgres_server import REQUIRE_ENV, postgres_bindir, remove, start_postgres

    if postgres_bindir() is None:
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{REQUIRE_ENV} is set but the PostgreSQL server (Debian package postgresql) is missing")
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    server = start_postgres()
    yield server
    remove(server)


@pytest.fixture
def s3_bucket(monkeypatch):
    """An S3-compatible server on 127.0.0.1 (moto's, a real HTTP server speaking the S3 API) with a
    bucket `lake`; the standard AWS variables point at it. Yields (bucket URL, boto3 client)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    settings = {
        "AWS_ACCESS_KEY_ID": "hcc-test",
        "AWS_SECRET_ACCESS_KEY": "hcc-test-secret",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    client = boto3.client(
        "s3",
        endpoint_url=settings["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id=settings["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=settings["AWS_SECRET_ACCESS_KEY"],
    )
    client.create_bucket(Bucket="lake")
    yield "s3://lake", client
    server.stop()
