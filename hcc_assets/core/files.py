"""Writing files and folders so that no reader ever sees half of one.

- `atomic_write` / `atomic_write_bytes` / `atomic_write_text`: the data goes to a hidden temporary
  file in the same folder (`temp_name`), is flushed and fsynced, then `os.replace`d over the
  target: a reader sees the old file or the new one, and a crash leaves at most a temporary file.
- `publish_folder`: a folder is built under a hidden staging name, gets its `.complete` marker
  last, and is renamed into place whole (the drop-zone protocol of the synthetic generator, the
  importers, `hcc-assets predict` and the DICOM receiver).

Standard library only: the DICOM receiver imports this module on a gateway machine that has only
pydicom and pynetdicom.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

# The marker file that makes a drop-zone patient folder complete (written last, empty).
COMPLETE_MARKER = ".complete"
# Temporary files of an atomic write: `.tmp-<32 hex>-<target name>`, hidden, unique per write, and
# recognisable (the data lake removes stale ones left by a writer that died).
TEMP_PREFIX = ".tmp-"
TEMP_NAME = re.compile(r"\.tmp-[0-9a-f]{32}-.+")


def temp_name(name: str) -> str:
    """The name of a temporary file for an atomic write of the file `name` (matches TEMP_NAME)."""
    return f"{TEMP_PREFIX}{uuid.uuid4().hex}-{name}"


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """`write(file)` into a temporary file beside `path`, fsync, then `os.replace` it into place.
    On any error the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    temporary = path.with_name(temp_name(path.name))
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically replace the file `path` by `data` (see `atomic_write`)."""
    atomic_write(path, lambda file: file.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Atomically replace the file `path` by `text` (no newline translation: `\\n` stays `\\n`)."""
    atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def publish_folder(
    final: str | os.PathLike[str],
    *,
    marker: str | None = COMPLETE_MARKER,
    hidden_prefix: str = ".",
    staging: str | os.PathLike[str] | None = None,
    replace: bool = True,
) -> Iterator[Path]:
    """Build the folder `final` under a hidden name and rename it into place whole.

        with publish_folder(incoming / key) as folder:
            ...  # write everything into `folder`

    1. the staging folder (`staging`, by default `<parent>/<hidden_prefix><name>.partial`, a
       hidden name the drop-zone scan skips) is emptied and created, and yielded;
    2. when the block ends, the empty `marker` file (None: no marker) is written into it last;
    3. it is renamed to `final`. An existing `final` is moved aside to
       `<parent>/<hidden_prefix><name>.old` first and removed afterwards (restored if the rename
       fails); with `replace=False`, FileExistsError instead (its message names no folder: drop
       folder names are often record numbers).
    If the block raises, the staging folder is removed and nothing changes under `final`. Do
    anything that must be there before the folder appears (a labels manifest) inside the block.
    `staging` must be on the same filesystem as `final`.
    """
    final = Path(final)
    staging = Path(staging) if staging is not None else final.parent / f"{hidden_prefix}{final.name}.partial"
    aside = final.parent / f"{hidden_prefix}{final.name}.old"
    if not replace and final.exists():
        raise FileExistsError("the folder to publish already exists")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if marker is not None:
            (staging / marker).write_bytes(b"")
        if final.exists():
            if not replace:
                raise FileExistsError("the folder to publish already exists")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
            try:
                os.replace(staging, final)
            except BaseException:
                os.replace(aside, final)
                raise
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
