"""Issue 11, as an attacker: no code from a bundle runs before the bundle is verified, bytecode
caches are never loaded from it, and a signature ties a bundle to the key that made it.

Each attack plants code whose only effect is to create a marker file; the tests assert the marker is
never created and that the run is refused (or, for caches a forged manifest lists, simply ignored).
"""

from __future__ import annotations

import importlib.util
import json
import marshal
import subprocess
import sys
from pathlib import Path

import pytest

from bundle_helpers import cli, copy_bundle, host_bundle, resign  # noqa: F401 (fixture)


def _payload(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('pwned')\n"


def _smoke_py(bundle: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "smoke.py", "--json", *args], cwd=bundle, capture_output=True,
                          text=True, timeout=300)


def _forged_pyc(source: Path, extra_code: str) -> bytes:
    """A timestamp-based .pyc that Python would accept for `source` (same mtime and size in the
    header), whose code is the source followed by `extra_code`."""
    st = source.stat()
    code = compile(source.read_text() + "\n" + extra_code, str(source), "exec")
    header = importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little")
    header += (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    return header + marshal.dumps(code)


def _plant_pyc(bundle: Path, module: str, marker: Path) -> Path:
    src = bundle / "runtime" / "edgeforge_runtime" / f"{module}.py"
    cache = src.parent / "__pycache__" / f"{module}.{sys.implementation.cache_tag}.pyc"
    cache.parent.mkdir(exist_ok=True)
    cache.write_bytes(_forged_pyc(src, _payload(marker)))
    return cache


def test_planted_pyc_is_refused_before_it_can_run(host_bundle, tmp_path, capsys):
    bundle = copy_bundle(host_bundle[0], tmp_path / "b")
    marker = tmp_path / "marker"
    _plant_pyc(bundle, "smoke", marker)
    proc = _smoke_py(bundle)
    assert proc.returncode == 2
    assert "bytecode caches are never loaded" in json.loads(proc.stdout)["error"]
    code, _, err = cli(capsys, "smoke", bundle)
    assert code == 2 and "__pycache__" in err
    assert not marker.exists()


def test_pyc_listed_by_a_forged_manifest_is_never_loaded(host_bundle, tmp_path):
    """Checksums are no authenticity: an attacker can list the cache in a rewritten manifest.
    smoke.py then passes verification, but Python must still never read the bundle's caches."""
    bundle = copy_bundle(host_bundle[0], tmp_path / "b")
    marker = tmp_path / "marker"
    for module in ("__init__", "smoke", "golden_check"):
        _plant_pyc(bundle, module, marker)
    resign(bundle)
    proc = _smoke_py(bundle)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "PASS"
    assert not marker.exists(), "a bytecode cache from the bundle was executed"


def test_module_planted_next_to_smoke_py_is_never_imported(host_bundle, tmp_path):
    """smoke.py's folder is the bundle: a json.py / hashlib.py there must not shadow the standard
    library while the verifier itself imports it (it runs before any check)."""
    bundle = copy_bundle(host_bundle[0], tmp_path / "b")
    marker = tmp_path / "marker"
    for name in ("json.py", "hashlib.py", "base64.py", "pathlib.py", "tempfile.py"):
        (bundle / name).write_text(_payload(marker))
    proc = _smoke_py(bundle)
    assert proc.returncode == 2
    assert "not listed in manifest.json" in json.loads(proc.stdout)["error"]
    assert not marker.exists()


def test_tampered_runtime_is_refused_by_smoke_py_itself(host_bundle, tmp_path):
    """The check in smoke.py covers the runtime folder it is about to import from."""
    bundle = copy_bundle(host_bundle[0], tmp_path / "b")
    marker = tmp_path / "marker"
    init = bundle / "runtime" / "edgeforge_runtime" / "__init__.py"
    init.write_text(_payload(marker) + init.read_text())
    proc = _smoke_py(bundle)
    assert proc.returncode == 2 and "modified" in json.loads(proc.stdout)["error"]
    assert not marker.exists()


# ---- signatures ----------------------------------------------------------------------------------

def _keypair(folder: Path, name: str) -> tuple[Path, Path]:
    """PEM files as `openssl genpkey -algorithm ed25519` / `openssl pkey -pubout` write them."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def signed(tiny_model, tmp_path_factory):
    from edgeforge.cli import main

    work = tmp_path_factory.mktemp("signed")
    key, pub = _keypair(work, "release")
    _, other = _keypair(work, "other")
    with pytest.raises(SystemExit) as ex:
        main(["build", str(tiny_model("llama32")), "--quant", "q4f32", "--target", "x86-cpu", "--backend", "onnx",
              "-o", str(work / "dist"), "--sign", str(key)])
    assert ex.value.code == 0
    (bundle,) = (work / "dist").iterdir()
    return bundle, pub, other


def test_signed_bundle_passes_with_its_key(signed, capsys):
    bundle, pub, _ = signed
    code, _, err = cli(capsys, "smoke", bundle, "--trust", pub)
    assert code == 0, err
    assert "signature ok" in err
    proc = _smoke_py(bundle, "--trust", str(pub))
    assert proc.returncode == 0, proc.stderr
    code, out, err = cli(capsys, "run", bundle, "--prompt", "hi", "-n", "2", "--json", "--trust", pub)
    assert code == 0, err


def test_wrong_key_and_unsigned_are_refused(signed, host_bundle, tmp_path, capsys):
    bundle, pub, other = signed
    code, _, err = cli(capsys, "smoke", bundle, "--trust", other)
    assert code == 2 and "not by the trusted key" in err
    proc = _smoke_py(bundle, "--trust", str(other))
    assert proc.returncode == 2 and "not by the trusted key" in json.loads(proc.stdout)["error"]
    code, _, err = cli(capsys, "smoke", host_bundle[0], "--trust", pub)
    assert code == 2 and "not signed" in err


def test_rewritten_signed_bundle_is_refused(signed, tmp_path, capsys):
    """What checksums cannot catch: new tolerances and a consistent manifest; the signature can."""
    bundle = copy_bundle(signed[0], tmp_path / "b")
    golden = json.loads((bundle / "golden.json").read_text())
    golden["tolerance"]["rel"] = 1e9
    (bundle / "golden.json").write_text(json.dumps(golden))
    resign(bundle)
    code, _, _ = cli(capsys, "smoke", bundle)
    assert code == 0  # integrity alone: the rewritten bundle is consistent
    code, _, err = cli(capsys, "smoke", bundle, "--trust", signed[1])
    assert code == 2 and "modified after signing" in err


def test_sign_with_a_bad_key_fails_before_building(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    code, _, err = cli(capsys, "build", tiny_model("llama32"), "--quant", "q4f32", "--target", "x86-cpu",
                       "--backend", "onnx", "-o", tmp_path / "dist", "--sign", bad)
    assert code == 2 and "--sign" in err and "bad.pem" in err
    assert not (tmp_path / "dist").exists()
