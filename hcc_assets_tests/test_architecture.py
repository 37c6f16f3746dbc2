"""The layers hold: import-linter's contracts (pyproject.toml, [tool.importlinter]) are kept.

The contracts say which package may import which: orchestration (cli, runner, definitions, defs)
over steps over storage (featurestore, lake) over the domain packages over core; only the
orchestration layer imports dagster; the DICOM receiver needs nothing but pydicom and pynetdicom.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(linter), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "0 broken" in report and " kept" in report, report


def test_a_forbidden_import_breaks_a_contract(tmp_path):
    """The contracts can fail: a domain module that imports dagster is reported."""
    package = tmp_path / "hcc_assets"
    (package / "stats").mkdir(parents=True)
    (package / "defs").mkdir()
    for init in ("__init__.py", "stats/__init__.py", "defs/__init__.py"):
        (package / init).write_text("")
    (package / "stats" / "leak.py").write_text("import dagster\n")
    (tmp_path / ".importlinter").write_text(
        "[importlinter]\nroot_package = hcc_assets\ninclude_external_packages = True\n\n"
        "[importlinter:contract:dagster]\nname = Only the orchestration layer imports dagster\n"
        "type = forbidden\nsource_modules = hcc_assets.stats\nforbidden_modules = dagster\n"
    )
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(linter), "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PYTHONPATH": str(tmp_path), "PATH": str(Path(sys.executable).parent)},
    )
    assert result.returncode != 0
    assert "hcc_assets.stats.leak -> dagster" in result.stdout
