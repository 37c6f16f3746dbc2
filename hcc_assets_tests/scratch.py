"""Scratch folders for module-scoped fixtures."""

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def module_scratch(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """A folder removed when the fixture's module is done. pytest keeps mktemp folders until the
    session ends, and the suite's lakes (models, volumes, DuckDB files) add up to gigabytes that a
    CI machine short of disk cannot hold all at once."""
    path = tmp_path_factory.mktemp(name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
