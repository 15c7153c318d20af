"""Checksums and JSON reading shared by the build side and the device side."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .bundle_errors import BundleError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | os.PathLike) -> dict:
    """A JSON file of a bundle or artifact; unreadable or malformed -> BundleError naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BundleError(f"{path}: unreadable ({err})") from None
