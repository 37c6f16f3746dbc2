"""`hcc-assets materialize`: every ready patient ingested by one set of worker processes (shared by
the per-patient stages), with the stage breakdown printed at the end."""

import os
import subprocess
import sys

from hcc_assets import runner
from hcc_assets.featurestore import FeatureStore


def test_materialize_ingests_every_ready_patient_and_prints_the_stage_breakdown(incoming_copy, tmp_path):
    incoming, patients = incoming_copy
    lake = tmp_path / "lake"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DAGSTER_HOME", "HCC_ASSETS_FEATURE_STORE", "HCC_ASSETS_FEATURE_STORE_DATA")
    }
    env.update(HCC_ASSETS_INCOMING=str(incoming), OMP_WAIT_POLICY="PASSIVE")
    command = [sys.executable, "-m", "hcc_assets.cli", "--lake", str(lake), "materialize", "--workers", "2"]
    run = subprocess.run([*command, "--no-cohort"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    n = len(patients)
    assert f"ingested {n}/{n} patients" in run.stdout

    breakdown = run.stdout.split("stage breakdown (wall seconds):\n", 1)[1].splitlines()
    labels = {line.rsplit(maxsplit=2)[0].strip() for line in breakdown if line.strip()}
    assert labels == {"start-up (definitions, partitions)", "ingest (one run per patient)", "total"}, breakdown
    stage_total = sum(float(line.split()[-2]) for line in breakdown if "%" in line)
    assert abs(stage_total - float(breakdown[-1].split()[-1])) < 0.2

    store = FeatureStore(str(lake / "feature_store.sqlite"))
    preprocessed = store.query("SELECT count(DISTINCT patient_id) AS n FROM volumes WHERE kind = 'preprocessed'")
    assert preprocessed["n"][0] == n


def test_a_worker_pool_serves_several_stages_with_the_same_processes():
    with runner.worker_pool(2) as pool:
        assert pool is not None
        first = {pool.submit(os.getpid).result() for _ in range(6)}
        second = {pool.submit(os.getpid).result() for _ in range(6)}
    assert len(first | second) <= 2  # the second batch ran in the processes of the first
    assert os.getpid() not in first | second
    with runner.worker_pool(1) as in_this_process:
        assert in_this_process is None


def test_the_breakdown_shows_a_stages_steps_under_it_without_counting_them_twice(capsys):
    from hcc_assets.cli import DETAIL, _print_stages

    _print_stages(
        [
            ("ingest (one run per patient)", 30.0),
            ("cohort split, segmentation model, classifier", 270.0),
            (f"{DETAIL}hcc_classifier", 100.0),
            (f"{DETAIL}liver_segmentation_model", 168.0),
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].split() == ["of", "which", "hcc_classifier", "100.0", "33.3%"]
    assert lines[-1].split() == ["total", "300.0"]
