"""Turn any failure inside a patient's partition into a clear, PHI-free Dagster failure."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import dagster as dg

from hcc_assets.imaging.errors import IngestError


def scrub(text: str, folder: Path | None) -> str:
    """Remove the drop-folder path and name (often a record number) from a message."""
    if folder is not None:
        text = text.replace(str(folder.resolve()), "<study>").replace(str(folder), "<study>")
        text = text.replace(folder.name, "<patient>")
    return text


@contextmanager
def patient_failure(patient_id: str, step: str, folder: Path | None = None) -> Iterator[None]:
    try:
        yield
    except dg.Failure:
        raise
    except IngestError as error:
        raise dg.Failure(
            description=f"patient {patient_id}: {step} failed: {scrub(str(error), folder)}",
            metadata={"patient_id": patient_id, "cause": scrub(str(error), folder)},
            allow_retries=False,
        ) from None
    except Exception as error:  # unexpected: keep the type, drop anything identifying
        raise dg.Failure(
            description=f"patient {patient_id}: {step} failed unexpectedly: "
            f"{type(error).__name__}: {scrub(str(error), folder)}",
            metadata={"patient_id": patient_id},
        ) from None
