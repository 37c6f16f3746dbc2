"""Turn any failure inside a patient's partition into a clear, PHI-free Dagster failure."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

from hcc_assets.core.errors import PatientInputError


def scrub(text: str, folder: Path | None) -> str:
    """Remove the drop-folder path and name (often a record number) from a message."""
    if folder is not None:
        text = text.replace(str(folder.resolve()), "<study>").replace(str(folder), "<study>")
        text = text.replace(folder.name, "<patient>")
    return text


@contextmanager
def patient_failure(
    patient_id: str, step: str, folder: Path | None = None, cleanup: Callable[[], None] | None = None
) -> Iterator[None]:
    """Re-raise any error as a Failure naming the patient and the cause, without PHI.

    `cleanup` runs first: it removes this step's outputs from an earlier success, which would
    otherwise linger and claim something that no longer holds.
    """
    try:
        yield
    except Exception as error:
        if cleanup is not None:
            cleanup()
        if isinstance(error, dg.Failure):
            raise
        cause = scrub(str(error), folder)
        if isinstance(error, PatientInputError):
            description = f"patient {patient_id}: {step} failed: {cause}"
        else:  # unexpected: keep the type, drop anything identifying
            description = f"patient {patient_id}: {step} failed unexpectedly: {type(error).__name__}: {cause}"
        raise dg.Failure(
            description=description,
            metadata={"patient_id": patient_id, "cause": cause},
            allow_retries=not isinstance(error, PatientInputError),
        ) from None
