"""Bundle archives (.tar.gz): deterministic packing and extraction that refuses unsafe members.

Extraction checks every member before writing anything (a truncated archive fails on the read), then
extracts into a private temporary folder renamed into place: nothing lands outside the target folder
and nothing half-extracted is left behind.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import posixpath
import tarfile
import zlib
from pathlib import Path

from ..errors import EdgeforgeError
from ..fsutil import atomic_output_dir

SUFFIX = ".tar.gz"


def pack(bundle: Path, dest: Path | None = None) -> Path:
    """Write BUNDLE.tar.gz next to the bundle (or at dest): sorted, mtime 0, owner 0, no links."""
    bundle = Path(bundle)
    dest = Path(dest) if dest else bundle.with_name(bundle.name + SUFFIX)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in _walk(bundle):
                tar.addfile(*_member(bundle, path))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _walk(root: Path):
    """The bundle folder and everything below it, in a fixed order (reproducible archives)."""
    yield root
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(dirnames + filenames):
            yield Path(dirpath, name)


def _member(root: Path, path: Path):
    rel = path.relative_to(root).as_posix()
    arcname = root.name if rel == "." else posixpath.join(root.name, rel)
    if path.is_symlink() or not (path.is_file() or path.is_dir()):
        raise EdgeforgeError(f"{path}: not a regular file or folder; bundles hold neither links nor devices")
    info = tarfile.TarInfo(arcname)
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    if path.is_dir():
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        return info, None
    info.size = path.stat().st_size
    info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
    return info, open(path, "rb")


# Bounds checked while reading, before anything is written: a small archive must not expand into
# gigabytes of memory or /tmp before it is refused. Quantized weights barely compress, so a real
# bundle expands far less than MAX_EXPANSION times; MIN_ALLOWANCE covers small, text-heavy bundles.
MAX_MEMBERS = 10_000
MAX_EXPANSION = 20
MIN_ALLOWANCE = 256 << 20
CHUNK = 1 << 20


def check_members(archive: Path) -> list[tarfile.TarInfo]:
    """Stream the whole archive once and refuse unsafe members; returns the members. Nothing is
    written and memory stays at one chunk: member data is read and dropped (a truncated archive
    must fail here), counts and sizes are bounded as they come."""
    archive = Path(archive)
    try:
        allowance = max(MIN_ALLOWANCE, MAX_EXPANSION * archive.stat().st_size)
    except OSError as err:
        raise EdgeforgeError(f"{archive}: cannot read ({err.strerror})") from None
    total = 0
    try:
        with open(archive, "rb") as raw, _decompressed(raw) as stream, tarfile.open(fileobj=stream, mode="r:") as tar:
            members = []
            for m in tar:
                _check_member(archive, m)
                members.append(m)
                if len(members) > MAX_MEMBERS:
                    raise EdgeforgeError(f"{archive}: more than {MAX_MEMBERS} members; not a bundle, refused")
                total += m.size
                if total > allowance:
                    raise EdgeforgeError(f"{archive}: members expand to more than {allowance >> 20} MiB "
                                         f"({MAX_EXPANSION}x the archive's size); refused before extracting")
                if m.isfile():
                    data = tar.extractfile(m)
                    while data.read(CHUNK):
                        pass
            # tar stops at its end marker; read the stream to its end too, where gzip checks the
            # CRC and length of what it inflated (a damaged or cut trailer, or bytes after it)
            while stream.read(CHUNK):
                pass
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile, zlib.error) as err:
        raise EdgeforgeError(f"{archive}: unreadable or truncated archive ({type(err).__name__}: {err})") from None
    if not members:
        raise EdgeforgeError(f"{archive}: empty archive")
    return members


def _decompressed(raw):
    """The archive's tar stream: through gzip (which verifies CRC-32 and length at the end) when
    the file starts with gzip's magic, else the file itself (a plain .tar)."""
    magic = raw.read(2)
    raw.seek(0)
    return gzip.GzipFile(fileobj=raw, mode="rb") if magic == b"\x1f\x8b" else contextlib.nullcontext(raw)


def _check_member(archive: Path, m: tarfile.TarInfo) -> None:
    name = m.name
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise EdgeforgeError(f"{archive}: member {name!r} has an absolute path; refused")
    if ".." in parts:
        raise EdgeforgeError(f"{archive}: member {name!r} climbs out with '..'; refused")
    if m.issym() or m.islnk():
        raise EdgeforgeError(f"{archive}: member {name!r} is a link ({m.linkname!r}); bundles hold no links; refused")
    if not (m.isfile() or m.isdir()):
        raise EdgeforgeError(f"{archive}: member {name!r} is a device, fifo or special file; refused")
    if m.issparse():
        raise EdgeforgeError(f"{archive}: member {name!r} is a sparse file (its size is not its data); refused")


def extract(archive: Path, dest_parent: Path) -> Path:
    """Extract a bundle archive under dest_parent; returns the bundle folder (the single top folder)."""
    archive = Path(archive)
    members = check_members(archive)
    tops = {m.name.split("/")[0] for m in members}
    if len(tops) != 1 or "." in tops:
        raise EdgeforgeError(f"{archive}: expected one top-level bundle folder, found {sorted(tops)[:5]}")
    top = tops.pop()
    final = Path(dest_parent) / top
    with atomic_output_dir(final, lambda p: False, "bundle") as tmp:  # dest_parent is a fresh folder
        with tarfile.open(archive, "r:*") as tar:
            # The members were checked above; the "data" filter is a second line of defence.
            tar.extractall(tmp, members=_strip(tar, top), filter="data")
    return final


def _strip(tar: tarfile.TarFile, top: str):
    for m in tar:
        if m.name == top:
            continue
        yield m.replace(name=m.name[len(top) + 1:], deep=False)


def is_archive(path: Path) -> bool:
    return Path(path).is_file() and str(path).endswith((SUFFIX, ".tgz", ".tar"))
