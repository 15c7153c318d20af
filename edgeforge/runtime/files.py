"""Checksums and JSON reading shared by the build side and the device side."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .bundle_errors import BundleError
from .manifest_check import read_regular, sha256_file  # noqa: F401 - one implementation, re-exported

MAX_JSON_BYTES = 64 << 20  # configs, indexes, golden data: far below; a 50k-entry index is ~5 MB
MAX_TEXT_BYTES = 256 << 20  # texts to score, chat templates, TOML


def read_text(path: str | os.PathLike, limit: int = MAX_TEXT_BYTES, what: str = "text file") -> str:
    """A UTF-8 file read whole, bounded (read_regular: a regular file, links followed, at most
    `limit` bytes); BundleError naming the file otherwise."""
    data = read_regular(Path(path), limit, what, follow_links=True)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BundleError(f"{path}: not UTF-8 text ({err})") from None


def read_json(path: str | os.PathLike, fmt: str | None = None, version: int | None = None) -> dict:
    """The one JSON reader: a JSON object from `path`, else a BundleError naming the file (missing,
    unreadable, not UTF-8, not JSON, not an object, or not of edgeforge format `fmt` [`version`])."""
    path = Path(path)
    try:
        data = json.loads(read_text(path, MAX_JSON_BYTES, "JSON file"))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BundleError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if fmt is not None and (data.get("format") != fmt or (version is not None and data.get("version") != version)):
        want = f"'{fmt}'" + (f" version {version}" if version is not None else "")
        raise BundleError(f"{path}: expected format {want}, got '{data.get('format')}' version {data.get('version')}")
    return data


def artifact_file(artifact_dir: Path, name, key: str) -> Path:
    """The file artifact.json's `key` names, which must be a plain file name in the artifact folder: an
    absolute path, a subfolder or `..` would load a file the bundle's manifest never hashed."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise BundleError(f"{Path(artifact_dir) / 'artifact.json'}: {key} {str(name)[:80]!r} is not a file name in "
                          "the artifact folder (paths elsewhere are never loaded)")
    return Path(artifact_dir) / name

