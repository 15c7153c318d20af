"""The edgeforge cache folder and the remembered sha256 of large files (a leaf module: the model
registry, the loaders and the toolchains all import from here, and it imports none of them)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

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


SCRATCH_LOCK = ".lock"
ABANDONED_AFTER_S = 24 * 3600  # a scratch folder without a lock file (its creator died at once)


def scratch_dir(kind: str) -> tempfile.TemporaryDirectory:
    """A temporary folder for large scratch files, on disk in the edgeforge cache (`tmp/.KIND.scratch-*`)
    rather than the system temp folder, which is often tmpfs (RAM). The folder holds an exclusive
    flock on its `.lock` file while in use; folders whose lock nobody holds (their run was killed)
    are removed first. A lock, not the pid in a name: the cache may be shared by containers or
    hosts where another run's pid means nothing. A cache that cannot be written falls back to the
    system temp folder."""
    parent = cache_dir() / "tmp"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(parent, kind)
        tmp = tempfile.TemporaryDirectory(prefix=f".{kind}.scratch-", dir=parent)
        tmp.lock = _hold_lock(Path(tmp.name) / SCRATCH_LOCK)  # released when tmp is collected
        return tmp
    except OSError:
        return tempfile.TemporaryDirectory(prefix=f"edgeforge-{kind}-")


def _hold_lock(path: Path):
    handle = open(path, "w")  # noqa: SIM115 - kept open: the lock lives as long as the folder is used
    try:
        import fcntl

        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass  # no flock (Windows): folders are then never taken for abandoned
    return handle


def _remove_abandoned(parent: Path, kind: str) -> None:
    try:
        import fcntl
    except ImportError:
        return
    for folder in parent.glob(f".{kind}.scratch-*"):
        if folder.is_symlink() or not folder.is_dir():
            continue
        lock = folder / SCRATCH_LOCK
        try:
            with open(lock, "r") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken: nobody uses the folder
        except FileNotFoundError:
            try:
                if time.time() - folder.stat().st_mtime < ABANDONED_AFTER_S:
                    continue  # being created right now, or its creator died at once: wait
            except OSError:
                continue
        except OSError:
            continue  # held by a live run (BlockingIOError), or unreadable
        shutil.rmtree(folder, ignore_errors=True)
