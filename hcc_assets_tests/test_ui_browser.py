"""The Dagster UI in a real browser (headless Debian Chromium driven by Playwright).

The webserver is started as `make ui` starts it (`dagster dev -w workspace.yaml -h <host from the
Makefile>`, on a free port) on a temporary lake holding two synthetic patients. The test checks the
asset lineage the webserver serves over GraphQL, then does what a researcher does: looks at the
lineage, materializes one patient's ingest assets by clicking, waits for the run and finds the
mid-slice figure in the asset's metadata: the path of the PNG in the lake and its inline thumbnail.
Screenshots of every step go to $HCC_ASSETS_TEST_ARTIFACTS (default hcc_assets_tests/artifacts/ui/,
git-ignored), with the webserver log and the timings.

Chromium comes from Debian (`apt-get install chromium`; .ci/run installs it when missing); never
from `playwright install`. Without it the test is skipped on a developer machine, and fails where
HCC_ASSETS_REQUIRE_BROWSER=1 (set by .ci/run), so CI cannot pass by skipping it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu"]
ARTIFACTS = Path(os.environ.get("HCC_ASSETS_TEST_ARTIFACTS") or ROOT / "hcc_assets_tests" / "artifacts" / "ui")
LOCATION = "hcc_assets.definitions"  # workspace.yaml's module, Dagster's default location name
INGEST = ["raw_scan", "nifti_volume", "preprocessed_volume"]
GROUPS = ["ingest", "cohort", "models", "features", "predictions", "analysis", "maintenance"]
STARTUP_S = 180  # `dagster dev` on 2 busy cores: 15-60 s
RUN_S = 240  # one patient's ingest run: about 40 s here, queue and step subprocesses included
UI_MS = 60_000  # Playwright waits (the UI polls GraphQL every few seconds)
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}
ASSET_GRAPH = "{ assetNodes { assetKey { path } dependencyKeys { path } isPartitioned } }"


def _browser_or_skip() -> None:
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"{CHROMIUM} (install Debian's package: sudo apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -e '.[test]')")
    if missing:
        reason = "browser UI test needs " + " and ".join(missing)
        if os.environ.get("HCC_ASSETS_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + "; HCC_ASSETS_REQUIRE_BROWSER=1 forbids skipping")
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_ui_host() -> str:
    """The `-h` of the `dagster dev` line in the Makefile's `ui` recipe."""
    recipe = re.search(r"^ui:.*?\n((?:\t.*\n?)+)", (ROOT / "Makefile").read_text(), re.M)
    assert recipe, "Makefile has no ui recipe"
    command = re.search(r"dagster dev (.*)", recipe.group(1).replace("\\\n", " "))
    assert command, recipe.group(1)
    host = re.search(r"(?:-h|--host)[ =](\S+)", command.group(1))
    assert host, f"`make ui` must bind an explicit host: {command.group(0)}"
    return host.group(1)


def _listening(pgid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state owned by a process of the group."""
    inodes = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:  # the process ended, or is not ours to read
            continue
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not os.path.exists(table):
            continue
        with open(table) as handle:
            for line in handle.readlines()[1:]:
                fields = line.split()
                if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                    continue
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)
                # the kernel prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add((socket.inet_ntop(family, raw), int(port, 16)))
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _graphql(base: str, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{base}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        payload = json.load(response)
    assert not payload.get("errors"), payload["errors"]
    return payload["data"]


def _runs(base: str, tag: str, value: str) -> list[dict]:
    query = (
        "query ($filter: RunsFilter) { runsOrError(filter: $filter) { ... on Runs { results { runId status "
        "tags { key value } } } } }"
    )
    return _graphql(base, query, {"filter": {"tags": [{"key": tag, "value": value}]}})["runsOrError"]["results"]


def _run_status(base: str, run_id: str) -> str:
    query = "query ($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"
    return _graphql(base, query, {"id": run_id})["runOrError"]["status"]


def _log_tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def _stop(server: subprocess.Popen) -> None:
    """End the whole `dagster dev` process group: webserver, daemon, code servers, runs."""
    if server.poll() is None:
        try:
            os.killpg(server.pid, signal.SIGINT)  # what Ctrl-C in `make ui` sends
            server.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(server.pid, signal.SIGKILL)  # whatever is left (a hung child, a run)
    except ProcessLookupError:
        pass
    server.wait(10)


@pytest.fixture
def ui_lake(tmp_path, monkeypatch):
    """A lake with two synthetic patients registered as `patients` partitions, not yet ingested."""
    _browser_or_skip()  # before building anything
    import dagster as dg

    from hcc_assets.defs.resources import LakeResource
    from hcc_assets.instance import ensure_dagster_home
    from hcc_assets.synthetic.cohort import SynthConfig, synthesize_cohort

    lake = tmp_path / "lake"
    incoming = lake / "incoming"
    patients = synthesize_cohort(incoming, SynthConfig(patients=2, matrix=64, slices_min=12, slices_max=16))
    # ensure_dagster_home exports DAGSTER_HOME; monkeypatch gives this process its old value back
    monkeypatch.setenv("DAGSTER_HOME", str(lake / "dagster_home"))
    home = ensure_dagster_home(lake)
    keys = [LakeResource(root=str(lake)).pseudonym(p.patient_key) for p in patients]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("patients", keys)
    # The drop-zone sensor is on by default in the UI and would ingest both patients itself. Make
    # the folders look still in transfer (no `.complete` marker, newest file a day ahead) so it
    # leaves them alone and the only run is the one launched from the browser.
    ahead = time.time() + 86_400
    for patient in patients:
        folder = incoming / patient.patient_key
        (folder / ".complete").unlink(missing_ok=True)
        for path in [*folder.rglob("*"), folder]:
            os.utime(path, (ahead, ahead))
    return lake, home, keys


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ui_in_browser_materializes_one_patient(ui_lake):
    from playwright.sync_api import expect, sync_playwright

    lake, home, keys = ui_lake
    key = keys[0]
    host = _make_ui_host()
    assert host == "127.0.0.1", f"`make ui` must serve on the loopback interface only, not {host}"
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log_path = ARTIFACTS / "dagster_dev.log"
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)

    port = _free_port()
    base = f"http://{host}:{port}"
    inherited = {k: v for k, v in os.environ.items() if k not in ("HCC_ASSETS_INCOMING", "HCC_ASSETS_FEATURE_STORE")}
    env = {
        **inherited,  # the drop zone and feature store are the temporary lake's
        "DAGSTER_HOME": str(home),
        "HCC_ASSETS_LAKE": str(lake),
        "OMP_WAIT_POLICY": "PASSIVE",
        "PYTHONUNBUFFERED": "1",
        "HCC_ASSETS_AUTOMATION_INTERVAL_S": "5",  # the automation's own run below comes within seconds
    }
    dagster = Path(sys.executable).with_name("dagster")
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [str(dagster), "dev", "-w", "workspace.yaml", "-h", host, "-p", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        # -- the server is up and its code location loaded ------------------------------------
        deadline = time.time() + STARTUP_S
        while True:
            assert server.poll() is None, f"dagster dev exited ({server.returncode}):\n{_log_tail(log_path)}"
            try:
                if _graphql(base, "{ assetNodes { id } }")["assetNodes"]:
                    break
            except OSError:
                pass
            assert time.time() < deadline, f"dagster dev not serving after {STARTUP_S} s:\n{_log_tail(log_path)}"
            time.sleep(1)
        lap("dagster_dev_startup")
        # `make ui`'s address: nothing that `dagster dev` started listens beyond loopback
        listeners = _listening(server.pid)
        assert (host, port) in listeners, listeners
        assert all(_is_loopback(address) for address, _ in listeners), listeners
        # the asset lineage the UI draws, as the webserver serves it over GraphQL
        nodes = {"/".join(n["assetKey"]["path"]): n for n in _graphql(base, ASSET_GRAPH)["assetNodes"]}
        deps = {name: {"/".join(d["path"]) for d in node["dependencyKeys"]} for name, node in nodes.items()}
        assert deps["nifti_volume"] == {"raw_scan"}
        assert deps["preprocessed_volume"] == {"nifti_volume"}
        assert "preprocessed_volume" in deps["cohort"]
        assert nodes["raw_scan"]["isPartitioned"] and not nodes["cohort"]["isPartitioned"]

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            context = browser.new_context(viewport={"width": 1600, "height": 1000})
            context.set_default_timeout(UI_MS)
            # expect() has its own 5 s default: too short for a page that loads partition counts on a busy CPU
            expect.set_options(timeout=UI_MS)
            # the first visit offers a "Join the Dagster community" dialog: mark it seen
            context.add_init_script("window.localStorage.setItem('communityNux', '1')")
            page = context.new_page()
            page.add_locator_handler(
                page.get_by_role("dialog").filter(has_text="Join the Dagster community"),
                lambda dialog: dialog.get_by_role("button", name="Skip").click(),
            )
            shot = lambda name: page.screenshot(path=str(ARTIFACTS / f"{name}.png"))  # noqa: E731
            try:
                # 1. the global asset lineage: every group, then the ingest group opened in place
                page.goto(f"{base}/asset-groups")
                expect(page.get_by_text("Global asset lineage")).to_be_visible()
                group_node = lambda name: page.locator("foreignObject.group").filter(  # noqa: E731
                    has=page.locator(f'[data-tooltip="{name}"]')
                )
                for group in GROUPS:
                    expect(group_node(group)).to_be_visible()
                shot("01_global_lineage")
                group_node("ingest").click()
                expect(page).to_have_url(re.compile(r"expanded=.*ingest"))
                for label in [
                    "raw_scan",
                    "nifti_volume",
                    re.compile(r"^preprocess.*volume$"),
                ]:  # long names are shortened
                    expect(page.locator("foreignObject").get_by_text(label)).to_be_visible()
                shot("02_global_lineage_ingest_expanded")

                # the ingest group's lineage: full asset nodes left to right, downstream assets beside
                page.goto(f"{base}/locations/{LOCATION}/asset-groups/ingest")
                nodes = [page.locator(f'foreignObject [data-tooltip="{name}"]') for name in INGEST]
                for node in nodes:
                    expect(node).to_be_visible()
                downstream = ["cohort", "liver_mask", "deep_embedding", "radiomic_features"]
                for name in downstream:
                    expect(page.locator(f'foreignObject span.label[title="{name}"]')).to_be_visible()
                x = [node.bounding_box()["x"] for node in nodes]
                assert x == sorted(x) and len(set(x)) == 3, f"ingest nodes not laid out upstream to downstream: {x}"
                cohort_x = page.locator('foreignObject span.label[title="cohort"]').bounding_box()["x"]
                assert cohort_x > x[-1], (cohort_x, x)
                expect(page.get_by_text("2 partitions").first).to_be_visible()
                shot("03_ingest_group_lineage")
                lap("lineage")

                # 2. materialize one patient: Materialize all -> Custom partition -> Launch 1 run
                page.get_by_role("button", name=re.compile(r"Materialize all")).click()
                dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize 3 assets")
                expect(dialog).to_be_visible()
                # the dialog may open on "All" (every partition chosen) or on an empty "Custom":
                # in the partition picker, tick exactly the one patient
                dialog.get_by_role("button", name="Custom", exact=True).click()
                dialog.locator('[aria-haspopup="dialog"]').get_by_role("img", name="expand_more").click()
                search = page.get_by_placeholder("Filter partitions")
                for candidate in keys:
                    search.fill(candidate)
                    item = page.get_by_role("menuitem").filter(has=page.get_by_title(candidate, exact=True))
                    if item.get_by_role("checkbox").is_checked() != (candidate == key):
                        item.click()
                dialog.get_by_text("Launch runs to materialize 3 assets").click()  # closes the picker
                expect(search).to_be_hidden()
                for candidate in keys:
                    tag = dialog.locator(f'[aria-haspopup="dialog"] [data-tooltip="{candidate}"]')
                    expect(tag).to_have_count(1 if candidate == key else 0)
                expect(dialog.get_by_text("1 partition", exact=True)).to_be_visible()
                shot("04_launch_dialog")
                dialog.get_by_role("button", name="Launch 1 run").click()
                expect(page.get_by_text(re.compile(r"^Launched run \w+"))).to_be_visible()
                shot("05_run_launched")
                view = page.locator('a[href^="/runs/"]').filter(has_text="View")
                run_id = view.get_attribute("href").split("/runs/")[1].split("?")[0]
                view.click()
                expect(page).to_have_url(re.compile(rf"/runs/{run_id}"))
                lap("launch_from_ui")

                # 3. the run succeeds (poll GraphQL), and its page says so
                query = (
                    "query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status "
                    "tags { key value } assetSelection { path } } } }"
                )
                deadline = time.time() + RUN_S
                while True:
                    run = _graphql(base, query, {"id": run_id})["runOrError"]
                    if run.get("status") in TERMINAL:
                        break
                    assert time.time() < deadline, f"run {run_id} still {run.get('status')} after {RUN_S} s"
                    time.sleep(2)
                lap("run")
                tags = {tag["key"]: tag["value"] for tag in run["tags"]}
                assert tags.get("dagster/partition") == key, tags
                assert sorted(a["path"][-1] for a in run["assetSelection"]) == sorted(INGEST), run
                page.reload()
                status = page.get_by_text(re.compile(r"^(Success|Failure|Canceled)$")).first
                expect(status).to_be_visible()
                expect(page.get_by_text("Loading run logs")).to_have_count(0)
                shot("06_run_page")
                assert run["status"] == "SUCCESS", (
                    f"run {run_id} ended {run['status']}; see {ARTIFACTS}/06_run_page.png\n{_log_tail(log_path)}"
                )
                expect(status).to_have_text("Success")

                # 4. the partition's page: materialized; the mid-slice figure is a file in the lake,
                # and the metadata shows its path and an inline thumbnail (no full PNG in the event log)
                page.goto(f"{base}/assets/preprocessed_volume?view=partitions&partition={key}")
                expect(page.get_by_text("Materialized", exact=True).first).to_be_visible()
                figure = lake / "patients" / key / "figures" / "preprocessed_volume_mid_slice.png"
                assert figure.read_bytes().startswith(b"\x89PNG"), figure
                path_row = page.get_by_role("row").filter(has=page.get_by_text("mid_slice", exact=True))
                expect(path_row.get_by_text(str(figure), exact=True)).to_be_visible()
                row = page.get_by_role("row").filter(has=page.get_by_text("mid_slice_thumbnail", exact=True))
                expect(row.get_by_text("[Show Markdown]")).to_be_visible()
                row.scroll_into_view_if_needed()
                shot("07_partition_metadata")
                row.get_by_text("[Show Markdown]").click()
                image = page.get_by_role("dialog").locator('img[src^="data:image/"]')
                expect(image).to_be_visible()
                expect(image).to_have_attribute("alt", "mid axial slice")
                width, height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
                assert 64 <= max(width, height) <= 480, (width, height)  # decoded, not a broken image; a thumbnail
                assert len(image.get_attribute("src")) <= 16 * 1024
                shot("08_mid_slice")
                page.keyboard.press("Escape")
                lap("asset_page")

                # 5. declarative automation: the new volume makes hcc_prediction due for this patient;
                # with no model trained in this lake, its page says so, and the Automation tab says why
                deadline = time.time() + RUN_S
                while not (predicted := _runs(base, "hcc_assets/trigger", "automation")):
                    assert time.time() < deadline, f"no automation run after {RUN_S} s:\n{_log_tail(log_path)}"
                    time.sleep(2)
                while (status := _run_status(base, predicted[0]["runId"])) not in TERMINAL:
                    assert time.time() < deadline, f"automation run not done after {RUN_S} s"
                    time.sleep(2)
                assert status == "SUCCESS", _log_tail(log_path)
                assert {t["key"]: t["value"] for t in predicted[0]["tags"]}["dagster/partition"] == key
                page.goto(f"{base}/assets/hcc_prediction?view=partitions&partition={key}")
                expect(page.get_by_text("Materialized", exact=True).first).to_be_visible()
                row = page.get_by_role("row").filter(has=page.get_by_text("p_hcc_deep", exact=True))
                expect(row.get_by_text("unavailable", exact=True)).to_be_visible()
                row = page.get_by_role("row").filter(has=page.get_by_text("predictions", exact=True))
                expect(row.get_by_text("no usable hcc_classifier: none is registered yet").first).to_be_visible()
                shot("09_prediction_page")
                page.goto(f"{base}/assets/hcc_prediction?view=automation")
                requested = page.get_by_role("row").filter(has=page.get_by_text("1 requested", exact=True)).first
                expect(requested).to_be_visible()
                expect(page.get_by_text("Not requested", exact=True).first).to_be_visible()
                shot("10_automation_tab")
                requested.get_by_role("button").first.click()  # that evaluation: the condition tree, and why
                expect(page.get_by_text("predict when a model or an input changes").first).to_be_visible()
                shot("11_automation_evaluation")
                lap("prediction_page")
            except BaseException:
                page.screenshot(path=str(ARTIFACTS / "failure.png"))
                (ARTIFACTS / "failure.html").write_text(page.content())
                raise
            finally:
                browser.close()

        # the browser's run and the automation's prediction: nothing else ran behind their backs
        runs = _graphql(
            base, "{ runsOrError { ... on Runs { results { runId jobName status tags { key value } } } } }"
        )["runsOrError"]["results"]
        assert sorted(r["runId"] for r in runs) == sorted([run_id, predicted[0]["runId"]]), runs
    finally:
        _stop(server)
        lap("shutdown")
        timings["total"] = round(time.perf_counter() - started, 1)
        (ARTIFACTS / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
        print(f"ui browser test timings (s): {timings}; artifacts in {ARTIFACTS}")
