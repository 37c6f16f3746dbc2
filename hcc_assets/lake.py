"""The data lake: where the platform writes everything it makes.

The root is an fsspec URL or a local folder, so the same code runs on a local disk or on
object storage. Writes go to a temporary name and are renamed into place, so a crash never
leaves a half-written file under a real name. data_lake/incoming/ (the drop zone) is read-only
to the platform and is addressed separately (see `incoming`).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import uuid
from pathlib import Path

import fsspec
import nibabel as nib

PATIENTS = "patients"


class DataLake:
    def __init__(self, root: str | os.PathLike[str]):
        self.root = str(root)
        self.fs, self.root_path = fsspec.core.url_to_fs(self.root)
        self.is_local = self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol

    def path(self, *parts: str) -> str:
        return "/".join([self.root_path.rstrip("/"), *parts])

    def local_path(self, *parts: str) -> Path:
        """A local filesystem path; only for libraries that need one (DuckDB, nnU-Net)."""
        if not self.is_local:
            raise RuntimeError("this operation needs the data lake on a local filesystem")
        return Path(self.path(*parts))

    def patient_file(self, patient_id: str, name: str) -> str:
        return self.path(PATIENTS, patient_id, name)

    def write_bytes(self, path: str, data: bytes) -> str:
        """Atomically write `data` to `path`; returns its sha256."""
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[1]}"
        try:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
        return hashlib.sha256(data).hexdigest()

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def remove(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path)

    def write_nifti(self, path: str, image: nib.Nifti1Image) -> str:
        return self.write_bytes(path, nifti_bytes(image))

    def read_nifti(self, path: str) -> nib.Nifti1Image:
        return nifti_from_bytes(self.read_bytes(path))


def nifti_bytes(image: nib.Nifti1Image) -> bytes:
    """Gzipped NIfTI-1 with mtime 0, so identical volumes give identical bytes."""
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def nifti_from_bytes(data: bytes) -> nib.Nifti1Image:
    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    return nib.Nifti1Image.from_bytes(raw)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
