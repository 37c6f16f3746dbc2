"""`make ui`'s server really starts on workspace.yaml and serves the asset lineage over GraphQL."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUERY = "{ assetNodes { assetKey { path } dependencyKeys { path } isPartitioned groupName } }"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_webserver_serves_asset_graph(tmp_path):
    port = _free_port()
    env = {**os.environ, "HCC_ASSETS_LAKE": str(tmp_path / "lake"), "DAGSTER_HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "dagster.yaml").write_bytes((ROOT / "hcc_assets" / "dagster.yaml").read_bytes())
    webserver = Path(sys.executable).with_name("dagster-webserver")
    server = subprocess.Popen(
        [str(webserver), "-w", str(ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        payload = None
        while time.time() < deadline:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/graphql",
                    data=json.dumps({"query": QUERY}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                payload = json.load(urllib.request.urlopen(request, timeout=5))
                if payload.get("data", {}).get("assetNodes"):
                    break
            except OSError:
                pass
            time.sleep(1)
        assert payload and payload["data"]["assetNodes"], payload
        nodes = {"/".join(n["assetKey"]["path"]): n for n in payload["data"]["assetNodes"]}
        deps = {name: {"/".join(d["path"]) for d in node["dependencyKeys"]} for name, node in nodes.items()}
        assert deps["nifti_volume"] == {"raw_scan"}
        assert deps["preprocessed_volume"] == {"nifti_volume"}
        assert "preprocessed_volume" in deps["cohort"]
        assert nodes["raw_scan"]["isPartitioned"] and not nodes["cohort"]["isPartitioned"]
    finally:
        server.terminate()
        server.wait(30)
