"""Bundle archives: deterministic packing, and extraction that refuses unsafe or broken archives."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edgeforge.bundle import archive
from edgeforge.errors import EdgeforgeError


def make_tree(root: Path) -> Path:
    (root / "artifact").mkdir(parents=True)
    (root / "artifact" / "model.bin").write_bytes(bytes(range(256)) * 40)
    (root / "smoke.py").write_text("print('hi')\n")
    (root / "manifest.json").write_text("{}\n")
    return root


def tree_bytes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def evil_archive(path: Path, name: str, kind=tarfile.REGTYPE, linkname: str = "") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("bundle/ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, linkname
        data = b"pwned" if kind == tarfile.REGTYPE else b""
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data) if data else None)
    return path


def test_roundtrip_and_deterministic(tmp_path):
    src = make_tree(tmp_path / "b1")
    a1 = archive.pack(src)
    a2 = archive.pack(src, tmp_path / "again.tar.gz")
    assert a1.read_bytes() == a2.read_bytes(), "packing twice must give identical bytes"
    out = archive.extract(a1, tmp_path / "out")
    assert out == tmp_path / "out" / "b1"
    assert tree_bytes(out) == tree_bytes(src)


@pytest.mark.parametrize("name,kind,link", [
    ("bundle/../../escape.txt", tarfile.REGTYPE, ""),
    ("/tmp/edgeforge-abs-escape.txt", tarfile.REGTYPE, ""),
    ("bundle/link", tarfile.SYMTYPE, "../../../etc/passwd"),
    ("bundle/hard", tarfile.LNKTYPE, "/etc/passwd"),
    ("bundle/dev", tarfile.CHRTYPE, ""),
    ("bundle/fifo", tarfile.FIFOTYPE, ""),
])
def test_unsafe_members_refused(tmp_path, name, kind, link):
    bad = evil_archive(tmp_path / "evil.tar.gz", name, kind, link)
    dest = tmp_path / "dest" / "inner"
    dest.mkdir(parents=True)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(EdgeforgeError, match="refused") as err:
        archive.extract(bad, dest)
    assert name in str(err.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before, "nothing may be written anywhere"
    assert not Path("/tmp/edgeforge-abs-escape.txt").exists()


def test_truncated_archive_refused(tmp_path):
    good = archive.pack(make_tree(tmp_path / "b"))
    data = good.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(EdgeforgeError, match="truncated"):
        archive.extract(cut, tmp_path / "dest")
    assert not (tmp_path / "dest" / "b").exists()


def test_cli_smoke_refuses_truncated_and_evil_archives(tmp_path):
    good = archive.pack(make_tree(tmp_path / "b"))
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[:300])
    evil = evil_archive(tmp_path / "evil.tar.gz", "bundle/../../x.txt")
    for path, words in ((cut, "truncated"), (evil, "'..'")):
        proc = subprocess.run([sys.executable, "-m", "edgeforge.cli", "smoke", str(path)], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert str(path) in proc.stderr and words in proc.stderr
    assert not (tmp_path.parent / "x.txt").exists()


@pytest.mark.parametrize("damage", ["crc", "length", "trailer cut", "bytes after", "inner bit"])
def test_damaged_gzip_refused_by_name(tmp_path, damage):
    """Damage that leaves every tar member intact (the gzip trailer) used to pass: gzip's CRC-32 and
    length are now checked too, and the message names the archive."""
    packed = bytearray(archive.pack(make_tree(tmp_path / "b"), tmp_path / "b.tar.gz").read_bytes())
    if damage == "crc":
        packed[-8] ^= 0xFF
    elif damage == "length":
        packed[-1] ^= 0x01
    elif damage == "trailer cut":
        packed = packed[:-3]
    elif damage == "bytes after":
        packed += b"tail"
    else:
        packed[len(packed) // 2] ^= 0x10
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(bytes(packed))
    with pytest.raises(EdgeforgeError, match=r"bad\.tar\.gz: unreadable or truncated archive"):
        archive.extract(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
