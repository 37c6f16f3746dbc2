"""A deployment's settings for asset config, as the defaults of the assets' config classes.

    HCC_ASSETS_PATIENT_RUN_CONFIG  YAML for per-patient assets, e.g.
        ops: {preprocessed_volume: {config: {target_shape: [96, 96, 48]}}}
    HCC_ASSETS_COHORT_RUN_CONFIG   YAML for cohort-level assets, e.g.
        ops: {hcc_classifier: {config: {medicalnet_checkpoint: /models/r50.pth}}}

    <lake>/deployment.yaml         the same sections, for a local lake: the settings the lake was
        made with (`hcc-assets demo` writes the demo's there), read when neither variable is set,
        so `make ui`, the sensors and every later `hcc-assets` command on that lake keep them.
        Delete it to return to the assets' own defaults (the study's settings).

All are read when the definitions load (a code-location reload applies an edit). Their values
replace the defaults of each asset's config class rather than being attached to run requests,
because runs that declarative automation launches carry no run config of their own: this way every
run gets them, whoever launches it (drop-zone sensor, automation, schedule, CLI, the UI's
launchpad, which shows them as the defaults). A run's own config still wins.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from hcc_assets.lake import default_lake_root, is_local_url

PATIENT_RUN_CONFIG_ENV = "HCC_ASSETS_PATIENT_RUN_CONFIG"
COHORT_RUN_CONFIG_ENV = "HCC_ASSETS_COHORT_RUN_CONFIG"
LAKE_SETTINGS_FILE = "deployment.yaml"
# `execution` sections of older files are ignored: every run executes in process (definitions.py).
_IGNORED_SECTIONS = {"execution"}


def lake_settings_path(lake_root: str) -> Path | None:
    """Where a lake keeps the settings it was made with; None for a lake that is not a local folder."""
    return Path(lake_root) / LAKE_SETTINGS_FILE if is_local_url(lake_root) else None


def settings_files() -> list[tuple[str, Path]]:
    """(what names it, path) of each settings file in force: the two variables' files, or where
    neither is set, the lake's own file when it has one."""
    named = [
        (env, Path(os.environ[env].strip()))
        for env in (PATIENT_RUN_CONFIG_ENV, COHORT_RUN_CONFIG_ENV)
        if os.environ.get(env, "").strip()
    ]
    if named:
        return named
    in_lake = lake_settings_path(default_lake_root())
    return [(str(in_lake), in_lake)] if in_lake is not None and in_lake.is_file() else []


def _read(source: str, path: Path) -> dict:
    where = f"{source}={path}" if source != str(path) else str(path)
    settings = yaml.safe_load(path.read_text()) or {}
    if not isinstance(settings, dict):
        raise ValueError(f"{where}: expected a mapping with an `ops` section, got {type(settings).__name__}")
    unknown = set(settings) - {"ops"} - _IGNORED_SECTIONS
    if unknown:
        raise ValueError(
            f"{where}: only `ops: {{<asset>: {{config: {{...}}}}}}` is read; remove {', '.join(sorted(unknown))}"
        )
    return settings.get("ops") or {}


@cache
def _op_settings() -> dict[str, dict]:
    merged: dict[str, dict] = {}
    for source, path in settings_files():
        for asset, section in _read(source, path).items():
            merged.setdefault(asset, {}).update((section or {}).get("config") or {})
    return merged


ConfigT = TypeVar("ConfigT", bound=pydantic.BaseModel)


def deployed(config_class: type[ConfigT], asset: str) -> type[ConfigT]:
    """`config_class` with the deployment's values for `asset` as its defaults (itself when none)."""
    values = _op_settings().get(asset)
    if not values:
        return config_class
    unknown = set(values) - set(config_class.model_fields)
    if unknown:
        raise ValueError(
            f"deployment config for {asset}: unknown field(s) {', '.join(sorted(unknown))}; "
            f"{config_class.__name__} has {', '.join(sorted(config_class.model_fields))}"
        )
    # (annotation, default) per field. Typed Any: mypy checks a **dict against create_model's own
    # keyword parameters (__config__, __doc__, ...) too, which no tuple type satisfies.
    fields: dict[str, Any] = {
        name: (config_class.model_fields[name].annotation, value) for name, value in values.items()
    }
    return pydantic.create_model(config_class.__name__, __base__=config_class, **fields)
