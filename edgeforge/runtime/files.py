"""Checksums and JSON reading shared by the build side and the device side."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .bundle_errors import BundleError
from .manifest_check import sha256_file  # noqa: F401 - one implementation, re-exported


def read_json(path: str | os.PathLike) -> dict:
    """A JSON file of a bundle or artifact; unreadable or malformed -> BundleError naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BundleError(f"{path}: unreadable ({err})") from None
