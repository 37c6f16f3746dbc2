"""Content versions: a short sha256 hex of what a result depends on.

A version is stored (feature store rows, Dagster data versions, model folder names) and compared
across runs, so the hash input must never change for the same content: bytes are hashed as they
are, a str as UTF-8, anything else as canonical JSON, exactly
`json.dumps(content, sort_keys=True, default=default)` (Python's default separators, ASCII
escapes), UTF-8 encoded. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

# Model folders are named by 12 hex digits; data versions and content digests use 16.
SHORT = 12
DEFAULT_LENGTH = 16


def content_version(
    content: object, *, length: int | None = DEFAULT_LENGTH, default: Callable[[object], object] | None = None
) -> str:
    """The first `length` hex digits (None: all 64) of the sha256 of `content`.

    bytes/bytearray are hashed as they are, a str as its UTF-8 encoding, anything else as
    `json.dumps(content, sort_keys=True, default=default)`: dicts hash the same whatever their key
    order; a tuple hashes like the list of its items. `default` converts values JSON cannot
    encode (e.g. `str`); without it they raise TypeError.
    """
    if isinstance(content, (bytes, bytearray)):
        data = bytes(content)
    elif isinstance(content, str):
        data = content.encode()
    else:
        data = json.dumps(content, sort_keys=True, default=default).encode()
    digest = hashlib.sha256(data).hexdigest()
    return digest if length is None else digest[:length]
