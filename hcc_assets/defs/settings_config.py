"""Dagster Config classes made from the steps' settings dataclasses.

Each setting (name, type, default) is written once, in the step that uses it (`hcc_assets.steps`,
which must not import dagster); the asset's run config, and with it the UI's launchpad and the
deployment files (`deployment.deployed`), take their fields from there.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import dagster as dg
import pydantic


def config_from_settings(settings: type, name: str) -> Any:
    """A dg.Config subclass `name` with the fields of the frozen dataclass `settings`, and a
    `settings()` method that returns the dataclass filled from the run's config."""
    hints = typing.get_type_hints(settings)
    fields: dict[str, Any] = {field.name: (hints[field.name], field.default) for field in dataclasses.fields(settings)}
    doc = settings.__doc__ if not (settings.__doc__ or "").startswith(f"{settings.__name__}(") else None  # not the
    # signature dataclasses write when a class has no docstring
    config = pydantic.create_model(name, __base__=dg.Config, __doc__=doc, __module__=__name__, **fields)

    def to_settings(self: dg.Config) -> Any:
        return settings(**self.model_dump())

    config.settings = to_settings  # type: ignore[attr-defined]
    return config
