"""manifest.json: the canonical writer and the checksum verification that runs before any native code.

The manifest lists every other file of the bundle with its sha256 and size. It also carries a hash of
itself (`manifest_sha256`, over its canonical bytes without that field), and its bytes must be exactly
the canonical serialization: so a flipped byte anywhere in manifest.json is caught too.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .bundle_errors import BundleError
from .files import sha256_file

MANIFEST = "manifest.json"
FORMAT = "edgeforge-bundle"
VERSION = 1
SELF_KEY = "manifest_sha256"
# Python writes these when the bundle's own code is imported; they are never loaded as data.
IGNORED_DIRS = {"__pycache__"}


def canonical_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")


def list_files(root: Path) -> list[str]:
    """Every file below root (POSIX relative paths, sorted), except manifest.json and caches."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_DIRS)
        # os.walk does not descend into linked folders: list them so that they are refused.
        out.extend(Path(dirpath, d).relative_to(root).as_posix() for d in dirnames if Path(dirpath, d).is_symlink())
        for name in filenames:
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def file_table(root: Path) -> dict:
    root = Path(root)
    return {rel: {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}
            for rel in list_files(root)}


def write_manifest(root: Path, data: dict) -> dict:
    """Add format, the file table and the self hash to `data`; write root/manifest.json."""
    root = Path(root)
    body = {k: v for k, v in data.items() if k != SELF_KEY}
    body.update(format=FORMAT, version=VERSION, files=file_table(root))
    body[SELF_KEY] = hashlib.sha256(canonical_bytes({k: v for k, v in body.items() if k != SELF_KEY})).hexdigest()
    (root / MANIFEST).write_bytes(canonical_bytes(body))
    return body


def read_manifest(root: Path) -> dict:
    """Parse manifest.json and check its self hash; BundleError naming manifest.json otherwise."""
    path = Path(root) / MANIFEST
    if not path.is_file() or path.is_symlink():
        raise BundleError(f"{path}: missing: not a bundle, or an incomplete one")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise BundleError(f"{path}: corrupt (not JSON: {err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{path}: not an edgeforge bundle manifest")
    if data.get("version") != VERSION:
        raise BundleError(f"{path}: bundle format version {data.get('version')!r}, this runtime reads {VERSION}")
    claimed = data.get(SELF_KEY)
    body = {k: v for k, v in data.items() if k != SELF_KEY}
    if hashlib.sha256(canonical_bytes(body)).hexdigest() != claimed or canonical_bytes(data) != raw:
        raise BundleError(f"{path}: modified or corrupt (its self checksum does not match)")
    return data


def verify_bundle(root: Path) -> dict:
    """Check manifest.json, then every file's presence, type, size and sha256; refuse extra files.

    Runs before any native library of the bundle is loaded. Returns the manifest.
    """
    root = Path(root)
    manifest = read_manifest(root)
    files = manifest.get("files") or {}
    for rel, entry in sorted(files.items()):
        _check_file(root, rel, entry)
    extra = [rel for rel in list_files(root) if rel not in files]
    if extra:
        raise BundleError(f"{root / extra[0]}: not listed in manifest.json (unexpected file in the bundle)")
    return manifest


def _check_file(root: Path, rel: str, entry: dict) -> None:
    path = root / rel
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise BundleError(f"{root / MANIFEST}: file entry {rel!r} leaves the bundle")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise BundleError(f"{path}: not a regular file (links and devices are refused)")
    if not path.exists():
        raise BundleError(f"{path}: missing (incomplete bundle)")
    size = path.stat().st_size
    if size != entry.get("size"):
        raise BundleError(f"{path}: size {size} bytes, manifest says {entry.get('size')} (truncated or modified)")
    if sha256_file(path) != entry.get("sha256"):
        raise BundleError(f"{path}: sha256 does not match manifest.json (modified or corrupt)")
