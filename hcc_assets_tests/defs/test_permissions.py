"""Permission denial for real: the drop zone is read by a process that file permissions apply to
(as root, setpriv drops the capabilities that bypass them, CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH),
with one patient folder and one DICOM file of another patient made unreadable. The unreadable folder is skipped (not half-ingested) and named by
pseudonym only; the unreadable file fails its own partition; everyone else is ingested."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hcc_assets_tests.defs.helpers import make_lake

REPO = Path(__file__).resolve().parents[2]


def _unprivileged(args: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return args
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot drop privileges")
    # still uid 0 (so the checkout stays readable wherever it is), but mode bits now bind it too
    dropped = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={dropped}", f"--inh-caps={dropped}", "--", *args]


def _run(args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HOME": str(home),
        "OMP_WAIT_POLICY": "PASSIVE",
        "OMP_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "DAGSTER_HOME": "",
    }
    env.pop("DAGSTER_HOME")
    return subprocess.run(_unprivileged(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_unreadable_folder_and_file_are_scoped_to_their_patient(small_cohort, tmp_path):
    source, patients = small_cohort
    incoming = tmp_path / "incoming"
    shutil.copytree(source, incoming)
    hidden, partly, others = patients[0].patient_key, patients[1].patient_key, patients[2:4]
    for path in list(incoming.rglob("*")):  # keep only 4 patients: quicker
        if (
            path.is_dir()
            and path.parent == incoming
            and path.name not in {hidden, partly, *(p.patient_key for p in others)}
        ):
            shutil.rmtree(path)
    (incoming / hidden).chmod(0)
    unreadable_file = next((incoming / partly).rglob("*.dcm"))
    unreadable_file.chmod(0)

    done = _run(
        [sys.executable, "-m", "hcc_assets_tests.defs.permission_probe", str(tmp_path), str(incoming)], tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    lake = make_lake(tmp_path, incoming)  # same root: same pseudonym key
    hidden_pid, partly_pid = lake.pseudonym(hidden), lake.pseudonym(partly)
    other_pids = sorted(lake.pseudonym(p.patient_key) for p in others)
    assert report["skipped"] == {
        hidden_pid: "drop folder cannot be read (Permission denied); waiting until it is readable"
    }
    assert hidden_pid not in report["ready"] and hidden_pid not in report["requested"]
    assert report["requested"] == report["ready"] == sorted([partly_pid, *other_pids])
    message = report["runs"][partly_pid]["message"]
    assert not report["runs"][partly_pid]["success"]
    assert f"patient {partly_pid}: raw_scan failed" in message and "Permission denied" in message, message
    assert all(report["runs"][pid]["success"] for pid in other_pids)
    assert report["preprocessed"] == other_pids
    everything = done.stdout + done.stderr
    assert not [p.patient_key for p in patients if p.patient_key in everything]  # pseudonyms only

    # once readable again, the folder is picked up like any other
    (incoming / hidden).chmod(0o755)
    unreadable_file.chmod(0o644)
    skipped: dict[str, str] = {}
    assert hidden_pid in lake.ready_patients(skipped=skipped) and not skipped
