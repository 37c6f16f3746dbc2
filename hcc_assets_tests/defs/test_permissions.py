"""Permission denial for real: the drop zone is read by an unprivileged user (`nobody` through
setpriv when the tests run as root), with one patient folder and one DICOM file of another
patient made unreadable. The unreadable folder is skipped (not half-ingested) and named by
pseudonym only; the unreadable file fails its own partition; everyone else is ingested."""

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hcc_assets_tests.defs.helpers import make_lake

NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]


def _unprivileged(args: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return args
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot drop privileges")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *args]


def _run(args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1", "DAGSTER_HOME": ""}
    env.pop("DAGSTER_HOME")
    return subprocess.run(_unprivileged(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def shared_tmp():
    # pytest's tmp_path lives under a 0700 root-only folder; the unprivileged user needs its own.
    folder = Path(tempfile.mkdtemp(prefix="hcc-permissions-"))
    folder.chmod(0o755)
    yield folder
    for path in folder.rglob("*"):  # make everything removable again
        if not path.is_symlink():
            path.chmod(stat.S_IRWXU)
    shutil.rmtree(folder)


def test_unreadable_folder_and_file_are_scoped_to_their_patient(small_cohort, shared_tmp):
    source, patients = small_cohort
    incoming = shared_tmp / "incoming"
    shutil.copytree(source, incoming)
    hidden, partly, others = patients[0].patient_key, patients[1].patient_key, patients[2:4]
    for path in list(incoming.rglob("*")):  # keep only 4 patients: quicker
        if path.is_dir() and path.parent == incoming and path.name not in {hidden, partly, *(p.patient_key for p in others)}:
            shutil.rmtree(path)
    if os.geteuid() == 0:
        for path in [shared_tmp, *shared_tmp.rglob("*")]:
            os.chown(path, NOBODY, NOBODY)
    probe = _run([sys.executable, "-c", "import hcc_assets, dagster"], shared_tmp)
    if probe.returncode != 0:
        pytest.skip(f"the unprivileged user cannot import the package from {REPO}: {probe.stderr[-300:]}")
    (incoming / hidden).chmod(0)
    unreadable_file = next((incoming / partly).rglob("*.dcm"))
    unreadable_file.chmod(0)

    done = _run([sys.executable, "-m", "hcc_assets_tests.defs.permission_probe", str(shared_tmp), str(incoming)],
                shared_tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    lake = make_lake(shared_tmp, incoming)  # same root: same pseudonym key
    hidden_pid, partly_pid = lake.pseudonym(hidden), lake.pseudonym(partly)
    other_pids = sorted(lake.pseudonym(p.patient_key) for p in others)
    assert report["skipped"] == {hidden_pid: "drop folder cannot be read (Permission denied); waiting until it is readable"}
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
