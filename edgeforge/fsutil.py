"""Filesystem helpers: outputs appear whole or not at all, and never replace what is not ours.

Every output edgeforge writes (QDIR, compiled artifact, bundle, extracted archive) is built in a
hidden temporary folder next to its final place and renamed into place at the end. An existing
final path is replaced only when it is edgeforge's own output of that kind (each caller says how to
recognize one) or an empty folder: `-o ~` or `-o some-project` is refused, never wiped.

Temporary folders are named `.NAME.tmp-PID-XXXX` (the PID for people only) and each has a sibling
`.NAME.tmp-PID-XXXX.lock`: a marker file that edgeforge writes, flock'ed for as long as the folder is
in use (owned_temp_dir). A run killed with SIGKILL leaves both behind; the next run writing next to
them removes the folder only when the lock file is edgeforge's marker and its lock is free, which
holds across containers and PID namespaces where a PID means nothing, and never touches a folder
that merely looks like ours. SIGTERM and SIGINT unwind normally (cli.main turns SIGTERM into
SystemExit), so the folder is removed on the way out.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import EdgeforgeError

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[^/]+$")
LOCK_SUFFIX = ".lock"
MARKER = b"edgeforge temporary folder: removed by the next edgeforge run once unlocked\n"


@contextlib.contextmanager
def owned_temp_dir(prefix: str, parent: str | os.PathLike):
    """A new temporary folder in `parent`, marked as edgeforge's and locked while the block runs
    (its sibling lock file, see the module docstring); removed, with its lock file, at the end."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    lock = tmp.with_name(tmp.name + LOCK_SUFFIX)
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, MARKER)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when renamed into place
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def is_json_of_format(path: Path, fmt: str) -> bool:
    """True when `path` is a JSON file whose "format" is `fmt` (how edgeforge marks its outputs)."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            data = json.loads(f.read(1 << 20))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == fmt


def check_replaceable(final: Path, is_ours: Callable[[Path], bool], what: str) -> None:
    """Refuse to replace `final` unless it is absent, an empty folder, or edgeforge's own `what`."""
    final = Path(final)
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise EdgeforgeError(f"output {final}: exists and is not a folder; refusing to replace it")
    if final.is_dir() and any(final.iterdir()) and not is_ours(final):
        raise EdgeforgeError(f"output {final}: is a non-empty folder that is not an edgeforge {what}; "
                             "refusing to replace it (choose another path, or empty it yourself)")


@contextlib.contextmanager
def atomic_output_dir(final: str | os.PathLike, is_ours: Callable[[Path], bool], what: str):
    """Yield a fresh temporary folder next to `final`; on success it replaces `final` by rename.

    On any exception (KeyboardInterrupt and SystemExit included) the temporary folder is removed and
    `final` is left untouched. Two writers racing for the same `final` each build privately; the
    last rename wins and the result is always one whole output, never a mix.
    """
    final = Path(final).absolute()
    check_replaceable(final, is_ours, what)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EdgeforgeError(f"output {final}: cannot create its folder ({err.strerror})") from None
    clean_stale_temps(final.parent)
    try:
        owned = owned_temp_dir(f".{final.name}.tmp-{os.getpid()}-", final.parent)
        tmp = owned.__enter__()
    except OSError as err:
        raise EdgeforgeError(f"output {final}: cannot write next to it ({err.strerror})") from None
    with contextlib.ExitStack() as stack:
        stack.push(owned)  # removes the folder (whatever is left of it) and its lock, even on errors
        yield tmp
        check_replaceable(final, is_ours, what)  # again: something may have appeared meanwhile
        _replace_dir(tmp, final)


def _replace_dir(new: Path, final: Path) -> None:
    if not final.exists():
        try:
            os.rename(new, final)
            return
        except OSError:
            if not final.exists():
                raise
    # Move the old output aside first: rename() cannot replace a non-empty folder.
    with owned_temp_dir(f".{final.name}.old-{os.getpid()}-", final.parent) as trash:
        os.rename(final, trash / "old")
        os.rename(new, final)


def clean_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary folders in `folder` that edgeforge made and nobody uses any more (their
    lock file is edgeforge's marker and unlocked), and such lock files left without a folder."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if entry.name.endswith(LOCK_SUFFIX):
            continue
        if _TMP_RE.match(entry.name) and entry.is_dir() and not entry.is_symlink():
            if _remove_if_abandoned(entry, entry.with_name(entry.name + LOCK_SUFFIX)):
                removed.append(entry)
    for entry in entries:  # a run killed between removing its folder and its lock file
        if entry.name.endswith(LOCK_SUFFIX) and _TMP_RE.match(entry.name[: -len(LOCK_SUFFIX)]) \
                and not entry.with_name(entry.name[: -len(LOCK_SUFFIX)]).exists():
            _remove_if_abandoned(None, entry)
    return removed


def _remove_if_abandoned(folder: Path | None, lock: Path) -> bool:
    """Remove `folder` and `lock` when `lock` is a regular file holding MARKER whose flock is free."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False  # no marker: not ours (or not ours to judge)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or os.read(fd, len(MARKER) + 1) != MARKER:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # in use by a live run, here or in another container
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            lock.unlink()
        return True
    finally:
        os.close(fd)
