"""manifest.json: canonical writing and verification (checksums, sizes, extra/missing files, links).

These check the verifier on plain files; tests/test_smoke_host.py checks the same through
`edgeforge smoke` on a real compiled bundle.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from edgeforge.runtime import manifest_check as mc
from edgeforge.runtime.bundle_errors import BundleError
from edgeforge.runtime.manifest_check import read_manifest, verify_bundle, write_manifest


@pytest.fixture
def bundle(tmp_path):
    root = tmp_path / "b"
    (root / "artifact").mkdir(parents=True)
    (root / "artifact" / "model.so").write_bytes(os.urandom(3000))
    (root / "golden.json").write_text('{"x": 1}\n')
    (root / "runtime" / "edgeforge_runtime").mkdir(parents=True)
    (root / "runtime" / "edgeforge_runtime" / "__init__.py").write_text("")
    write_manifest(root, {"name": "b", "target": {"name": "x86-cpu"}})
    return root


def test_write_then_verify(bundle):
    m = verify_bundle(bundle)
    assert set(m["files"]) == {"SHA256SUMS", "artifact/model.so", "golden.json", "runtime/edgeforge_runtime/__init__.py"}
    assert m["files"]["artifact/model.so"]["size"] == 3000
    # a bytecode cache is code Python would run: never exempt (issue 11)
    (bundle / "runtime" / "edgeforge_runtime" / "__pycache__").mkdir()
    (bundle / "runtime" / "edgeforge_runtime" / "__pycache__" / "x.pyc").write_bytes(b"x")
    with pytest.raises(BundleError, match="bytecode caches are never loaded"):
        verify_bundle(bundle)


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rel", ["artifact/model.so", "golden.json", "manifest.json"])
@pytest.mark.parametrize("where", [0, 7, -1])
def test_flipped_byte_names_the_file(bundle, rel, where):
    flip(bundle / rel, where)
    with pytest.raises(BundleError) as err:
        verify_bundle(bundle)
    assert str(bundle / rel) in str(err.value)


def test_missing_extra_and_linked_files(bundle):
    (bundle / "extra.txt").write_text("surprise")
    with pytest.raises(BundleError, match="extra.txt: not listed"):
        verify_bundle(bundle)
    (bundle / "extra.txt").unlink()
    (bundle / "golden.json").unlink()
    with pytest.raises(BundleError, match="golden.json: missing"):
        verify_bundle(bundle)
    os.symlink("/etc/passwd", bundle / "golden.json")
    with pytest.raises(BundleError, match="golden.json: not a regular file"):
        verify_bundle(bundle)


def test_manifest_entry_leaving_the_bundle_refused(bundle):
    # A manifest that claims a file outside the bundle, re-hashed as an attacker would do it.
    data = json.loads((bundle / "manifest.json").read_text())
    data["files"]["../outside"] = {"sha256": "0" * 64, "size": 1}
    body = {k: v for k, v in data.items() if k != mc.SELF_KEY}
    data[mc.SELF_KEY] = hashlib.sha256(mc.canonical_bytes(body)).hexdigest()
    (bundle / "manifest.json").write_bytes(mc.canonical_bytes(data))
    with pytest.raises(BundleError, match="leaves the bundle"):
        verify_bundle(bundle)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="manifest.json: missing"):
        read_manifest(tmp_path)
