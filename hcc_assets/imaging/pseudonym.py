"""Pseudonymous patient keys.

Drop folders are often named by a medical record number. The platform never uses that name:
a keyed HMAC turns it into a stable pseudonym (`pt-<12 hex>`), and the key lives outside the
outputs, so a dictionary of record numbers cannot reverse it.
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
