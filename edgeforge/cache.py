"""The edgeforge cache folder and the remembered sha256 of large files (a leaf module: the model
registry, the loaders and the toolchains all import from here, and it imports none of them)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .fsutil import clean_stale_temps
from .runtime.files import sha256_file


def cache_dir() -> Path:
    root = os.environ.get("EDGEFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgeforge"
    )
    return Path(root)


def cached_sha256(path: Path) -> str:
    """sha256_file, remembered per (path, size, mtime) in the edgeforge cache: hashing an 8B
    model takes tens of seconds and every command that loads it needs the value."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    store = cache_dir() / "sha256.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    digest = sha256_file(path)
    known[key] = digest
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f".sha256.{os.getpid()}.json")
        tmp.write_text(json.dumps(known, indent=0, sort_keys=True))
        os.replace(tmp, store)
    except OSError:
        pass  # a read-only cache only costs time
    return digest


def scratch_dir(kind: str) -> tempfile.TemporaryDirectory:
    """A temporary folder for large scratch files, on disk in the edgeforge cache (`tmp/.KIND.tmp-PID-*`)
    rather than the system temp folder, which is often tmpfs (RAM). Folders that killed runs left
    there (their pid gone) are removed first. A cache that cannot be written falls back to the
    system temp folder."""
    parent = cache_dir() / "tmp"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(parent)
        return tempfile.TemporaryDirectory(prefix=f".{kind}.tmp-{os.getpid()}-", dir=parent)
    except OSError:
        return tempfile.TemporaryDirectory(prefix=f"edgeforge-{kind}-")
