"""The Dagster instance home: data_lake/dagster_home with the project's dagster.yaml."""

from __future__ import annotations

import os
from pathlib import Path

from hcc_assets.core.files import atomic_write_bytes

TEMPLATE = Path(__file__).with_name("dagster.yaml")


def ensure_dagster_home(lake_root: str | os.PathLike[str]) -> Path:
    """Create DAGSTER_HOME under the lake (unless set) and export it for this process tree.
    A remote lake (s3://...) has no local home: DAGSTER_HOME must then be set."""
    from hcc_assets.lake import is_local_url, local_path_of

    if not os.environ.get("DAGSTER_HOME") and not is_local_url(lake_root):
        raise ValueError(
            f"the data lake root {lake_root} is not a local folder: set DAGSTER_HOME to a local "
            "folder (or a deployment's instance) for Dagster's run and event storage"
        )
    home = Path(os.environ.get("DAGSTER_HOME") or local_path_of(lake_root) / "dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    if not target.exists() or target.read_bytes() != TEMPLATE.read_bytes():
        atomic_write_bytes(target, TEMPLATE.read_bytes())
    os.environ["DAGSTER_HOME"] = str(home)
    return home
