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
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import EdgeforgeError
from .runtime.manifest_check import clean_stale_temps, owned_temp_dir  # noqa: F401 - re-exported (one implementation)

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
