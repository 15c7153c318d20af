"""Filesystem helpers: outputs appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_output_dir(final: str | os.PathLike):
    """Yield a fresh temporary folder next to `final`; on success it replaces `final` by rename.

    On any exception the temporary folder is removed and `final` is left untouched. Two writers
    racing for the same `final` each build privately; the last rename wins and the result is always
    one whole output, never a mix.
    """
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.rename(final, trash / "old")
    os.rename(new, final)
    shutil.rmtree(trash, ignore_errors=True)

