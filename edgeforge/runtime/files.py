"""Checksums and JSON reading shared by the build side and the device side."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .bundle_errors import BundleError
from .manifest_check import sha256_file  # noqa: F401 - one implementation, re-exported


def read_json(path: str | os.PathLike, fmt: str | None = None, version: int | None = None) -> dict:
    """The one JSON reader: a JSON object from `path`, else a BundleError naming the file (missing,
    unreadable, not UTF-8, not JSON, not an object, or not of edgeforge format `fmt` [`version`])."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path}: missing") from None
    except OSError as err:
        raise BundleError(f"{path}: cannot read ({err.strerror})") from None
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BundleError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if fmt is not None and (data.get("format") != fmt or (version is not None and data.get("version") != version)):
        want = f"'{fmt}'" + (f" version {version}" if version is not None else "")
        raise BundleError(f"{path}: expected format {want}, got '{data.get('format')}' version {data.get('version')}")
    return data
