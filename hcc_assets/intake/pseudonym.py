"""Pseudonymous patient keys.

Drop folders are often named by a medical record number. The platform never uses that name:
a keyed HMAC turns it into a stable pseudonym (`pt-<12 hex>`), and the key lives outside the
outputs, so a dictionary of record numbers cannot reverse it. A folder with several studies (a
follow-up scan) gives one partition per study: `pt-<12 hex>` for the earliest, `pt-<12 hex>.s2`, ...
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

PREFIX = "pt-"


def pseudonymize(source_key: str, key: bytes) -> str:
    digest = hmac.new(key, source_key.strip().encode("utf-8"), hashlib.sha256).hexdigest()
    return PREFIX + digest[:12]


# A patient's follow-up studies are partitions of their own: `<pseudonym>.s<index>` (index >= 2);
# the first study keeps the bare pseudonym, so a single-study patient's key is what it always was.
STUDY_SEPARATOR = ".s"


def study_partition_key(patient: str, study_index: int) -> str:
    """The partition key of the patient's study number `study_index` (1 = earliest)."""
    if study_index < 1:
        raise ValueError(f"study index must be at least 1, got {study_index}")
    return patient if study_index == 1 else f"{patient}{STUDY_SEPARATOR}{study_index}"


def split_partition_key(partition_key: str) -> tuple[str, int]:
    """(patient pseudonym, study index) of a partition key made by `study_partition_key`."""
    patient, separator, index = partition_key.rpartition(STUDY_SEPARATOR)
    if separator and patient.startswith(PREFIX) and index.isdigit() and int(index) >= 2:
        return patient, int(index)
    return partition_key, 1


def load_or_create_key(key_file: Path, env_var: str = "HCC_ASSETS_PSEUDONYM_KEY") -> bytes:
    """The pseudonymization key: from `env_var` when set, else a key file created once.

    Creation uses O_EXCL so parallel processes agree on a single key.
    """
    from_env = os.environ.get(env_var)
    if from_env:
        return from_env.encode("utf-8")
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
    for _ in range(50):  # another process may be between O_EXCL create and write
        text = key_file.read_text().strip()
        if text:
            return text.encode("utf-8")
        time.sleep(0.01)
    raise RuntimeError("pseudonymization key file is empty")


KEY_FILE_PARTS = ("private", "pseudonym.key")  # under the lake root, never inside an output folder
DEMO_KEY_PREFIX = "synthetic-demo-key-seed-"


def write_demo_key(key_file: Path, seed: int) -> bool:
    """Give a new demo lake a key derived from the synthetic cohort's seed, so that two demos with
    the same seed give the same pseudonyms, hence the same split, models and Table 1 (a random key
    would give another split each time). Only for lakes of synthetic patients: anyone can derive
    this key, so pseudonyms made with it protect nothing. An existing key is kept (False)."""
    if key_file.exists():
        return False
    key_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{DEMO_KEY_PREFIX}{seed}")
    return True


def is_demo_key(key: bytes) -> bool:
    return key.decode("utf-8", "replace").startswith(DEMO_KEY_PREFIX)


def load_or_create_key_on(fs, path: str, env_var: str = "HCC_ASSETS_PSEUDONYM_KEY") -> bytes:
    """The same key for a lake on an fsspec filesystem (object storage): `env_var` when set, else
    the key object at `path`, created once with an exclusive write ("xb") where the filesystem
    supports one; where it does not, say how to provide the key instead of risking two keys."""
    from_env = os.environ.get(env_var)
    if from_env:
        return from_env.encode("utf-8")
    if not fs.exists(path):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        try:
            with fs.open(path, "xb") as handle:  # S3: a conditional put (If-None-Match), s3fs >= 2024.12
                handle.write(secrets.token_hex(32).encode("utf-8"))
        except Exception as error:  # another process won the race (FileExistsError, PreconditionFailed), or no "xb"
            fs.invalidate_cache(path)
            if not fs.exists(path):
                raise RuntimeError(
                    f"cannot create the pseudonymization key {path} exclusively on this filesystem "
                    f"({type(error).__name__}: {error}); set {env_var} (e.g. from a secret) or write the key "
                    "there once"
                ) from None
    for _ in range(50):
        text = fs.cat_file(path).decode("utf-8").strip()
        if text:
            return text.encode("utf-8")
        time.sleep(0.01)
    raise RuntimeError("pseudonymization key file is empty")
