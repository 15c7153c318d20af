"""Issue 11, as an attacker: no code from a bundle runs before the bundle is verified, bytecode
caches are never loaded from it, and a signature ties a bundle to the key that made it.

Each attack plants code whose only effect is to create a marker file; the tests assert the marker is
never created and that the run is refused (or, for caches a forged manifest lists, simply ignored).
"""

from __future__ import annotations

import importlib.util
import json
import marshal
import os
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
    assert code == 2 and "by the trusted key" in err and "signed by another key" in err
    proc = _smoke_py(bundle, "--trust", str(other))
    assert proc.returncode == 2 and "by the trusted key" in json.loads(proc.stdout)["error"]
    code, _, err = cli(capsys, "smoke", host_bundle[0], "--trust", pub)
    assert code == 2 and "not signed" in err


def test_rewritten_signed_bundle_is_refused(signed, tmp_path, capsys):
    """What checksums cannot catch: new tolerances and a consistent manifest; the signature can."""
    bundle = copy_bundle(signed[0], tmp_path / "b")
    golden = json.loads((bundle / "golden.json").read_text())
    golden["tolerance"]["rel"] = 1e9
    (bundle / "golden.json").write_text(json.dumps(golden))
    resign(bundle)
    code, _, err = cli(capsys, "smoke", bundle)
    assert code == 2 and "golden.json: tolerance" in err  # consistent checksums; the verifier's cap refuses it
    code, _, err = cli(capsys, "smoke", bundle, "--trust", signed[1])
    assert code == 2 and "modified after signing" in err


def test_sign_with_a_bad_key_fails_before_building(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    code, _, err = cli(capsys, "build", tiny_model("llama32"), "--quant", "q4f32", "--target", "x86-cpu",
                       "--backend", "onnx", "-o", tmp_path / "dist", "--sign", bad)
    assert code == 2 and "--sign" in err and "bad.pem" in err
    assert not (tmp_path / "dist").exists()


# ---- issue 21, item 2: verification the bundle cannot subvert ------------------------------------

@pytest.mark.parametrize("spelling", [
    ["--trust={other}"], ["--tru", "{other}"], ["--trus={other}"], ["-t", "{other}"], ["--trust"],
    ["--trust", "{pub}", "--trust", "{other}"], ["--trust", "{other}", "--trust", "{pub}"], ["--TRUST", "{other}"],
    ["--json", "--trust={other}"], ["--trust", "{other}", "--prompts", "0"],
])
def test_no_spelling_of_trust_skips_the_check(signed, spelling):
    """smoke.py with a key that did not sign the bundle, spelled every way a user or a script might:
    never exit 0 (the old parser skipped the check for --trust=KEY and --tru KEY)."""
    _, pub, other = signed
    args = [a.format(pub=pub, other=other) for a in spelling]
    proc = _smoke_py(signed[0], *args)
    assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("spelling", [["--trust={pub}"], ["--trust", "{pub}"]])
def test_right_key_passes_in_both_spellings(signed, spelling):
    proc = _smoke_py(signed[0], *[a.format(pub=signed[1]) for a in spelling])
    assert proc.returncode == 0, proc.stderr
    assert "signature ok" in proc.stderr and json.loads(proc.stdout)["status"] == "PASS"


def _openssl_recipe() -> str:
    """The device recipe exactly as docs/BUNDLES.md prints it (the block after its marker)."""
    doc = (Path(__file__).parent.parent / "docs" / "BUNDLES.md").read_text()
    block = doc.split("<!-- device-verify-recipe -->", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return block


def _run_recipe(bundle: Path, pub: Path) -> subprocess.CompletedProcess:
    script = _openssl_recipe().replace("BUNDLE", str(bundle)).replace("PUB.pem", str(pub))
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=120)


def test_openssl_recipe_accepts_a_signed_bundle(signed):
    proc = _run_recipe(signed[0], signed[1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Signature Verified Successfully" in proc.stdout


@pytest.mark.parametrize("attack", ["other key", "file changed", "sums rewritten", "file added", "file linked",
                                    "resigned by attacker", "added under an unlisted name"])
def test_openssl_recipe_refuses(signed, tmp_path, attack):
    """Standard tools alone (openssl, sha256sum, grep, find) refuse each tampering."""
    bundle = copy_bundle(signed[0], tmp_path / "b")
    _, pub, other = signed
    data = bundle / "artifact" / "model.onnx.data"
    key = pub
    if attack == "other key":
        key = other
    elif attack == "file changed":
        data.write_bytes(data.read_bytes()[:-1] + b"\x00")
    elif attack == "sums rewritten":  # the change and a matching SHA256SUMS line
        data.write_bytes(data.read_bytes()[:-1] + b"\x00")
        import hashlib
        sums = (bundle / "SHA256SUMS").read_text().splitlines()
        fixed = [f"{hashlib.sha256(data.read_bytes()).hexdigest()}  artifact/model.onnx.data"
                 if line.endswith("  artifact/model.onnx.data") else line for line in sums]
        (bundle / "SHA256SUMS").write_text("\n".join(fixed) + "\n")
    elif attack == "file added":
        (bundle / "runtime" / "edgeforge_runtime" / "json.py").write_text("print('pwned')\n")
    elif attack == "added under an unlisted name":  # manifest.json, manifest.sig, SHA256SUMS only at the top
        (bundle / "runtime" / "manifest.json").write_text("{}\n")
        (bundle / "tokenizer" / "SHA256SUMS").write_text("\n")
    elif attack == "file linked":
        (bundle / "evil").symlink_to("/etc/passwd")
    elif attack == "resigned by attacker":  # changed, then every checksum (SHA256SUMS too) made consistent
        data.write_bytes(data.read_bytes()[:-1] + b"\x00")
        resign(bundle)
    proc = _run_recipe(bundle, key)
    assert proc.returncode != 0, (attack, proc.stdout, proc.stderr)


def test_edgeforge_verify(signed, host_bundle, tmp_path, capsys):
    bundle, pub, other = signed
    code, out, err = cli(capsys, "verify", bundle, "--trust", pub, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "OK" and result["signed_by"] and result["files"] > 10
    code, out, _ = cli(capsys, "verify", bundle)
    assert code == 0 and "signature not checked" in out
    code, _, err = cli(capsys, "verify", bundle, "--trust", other)
    assert code == 2 and "signed by another key" in err
    code, _, err = cli(capsys, "verify", host_bundle[0], "--trust", pub)
    assert code == 2 and "not signed" in err
    tampered = copy_bundle(bundle, tmp_path / "t")
    (tampered / "smoke.py").write_text("print('PASS')\n")  # the bundle's own verifier replaced
    code, _, err = cli(capsys, "verify", tampered, "--trust", pub)
    assert code == 2 and "smoke.py" in err


@pytest.mark.parametrize("bad", ["dir", "fifo", "big", "link to a fifo"])
def test_trust_key_file_must_be_a_small_regular_file(signed, tmp_path, capsys, bad):
    """A link the user made to a key is followed (test_a_trusted_key_may_be_a_link_the_user_made); what
    it, or the path itself, names must still be a small regular file."""
    path = tmp_path / "key.pem"
    if bad == "dir":
        path.mkdir()
    elif bad == "fifo":
        os.mkfifo(path)
    elif bad == "big":
        path.write_bytes(b"A" * (1 << 20))
    else:
        os.mkfifo(tmp_path / "fifo")
        path.symlink_to(tmp_path / "fifo")
    code, _, err = cli(capsys, "verify", signed[0], "--trust", path)
    assert code == 2 and str(path) in err and "Traceback" not in err, err


def test_used_bytes_are_the_verified_bytes(signed, tmp_path):
    """Verify-then-use without a race: what open_verified loads is a private copy made from the
    bytes it hashed, so changing the bundle right after (or during) the check changes nothing."""
    from edgeforge.commands.bundle_cmds import open_verified
    from edgeforge.runtime.generate import generate
    from edgeforge.runtime.sampling import Sampler

    bundle = copy_bundle(signed[0], tmp_path / "b")
    session = open_verified(bundle, trust=signed[1])
    engine, tok = session.engine, session.tokenizer
    before = generate(engine, tok.encode("one two"), 6, Sampler(0, 1, 0)).tokens
    data = bundle / "artifact" / "model.onnx.data"
    data.write_bytes(bytes(len(data.read_bytes())))  # zero every weight after the check
    for f in bundle.rglob("*.py"):
        f.write_text("raise SystemExit('pwned')\n")
    engine.reset()
    assert generate(engine, tok.encode("one two"), 6, Sampler(0, 1, 0)).tokens == before


def test_verified_copy_is_private_and_exact(signed, tmp_path):
    from edgeforge.runtime.manifest_check import sha256_file, verified_copy

    manifest, copy = verified_copy(signed[0], signed[1])
    assert (copy.stat().st_mode & 0o077) == 0  # nobody else can swap files in it
    for rel, entry in manifest["files"].items():
        assert sha256_file(copy / rel) == entry["sha256"]
    assert (copy / "manifest.sig").read_bytes() == (signed[0] / "manifest.sig").read_bytes()


def test_generate_takes_trust(signed, host_bundle, capsys):
    code, out, err = cli(capsys, "generate", signed[0], "-p", "one two", "-n", "3", "--trust", signed[1], "--json")
    assert code == 0, err
    assert len(json.loads(out)["tokens"]) == 3
    code, _, err = cli(capsys, "generate", host_bundle[0], "-p", "one two", "--trust", signed[1])
    assert code == 2 and "not signed" in err
    code, _, err = cli(capsys, "generate", signed[0], "-p", "one two", "--trust", signed[2])
    assert code == 2 and "signed by another key" in err


# ---- serve.py: the bundle's own server, verified before anything of runtime/ is imported ---------

def _serve_py(bundle: Path, *args: str, cwd=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-I", str(bundle / "serve.py"), "--port", "0", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_serve_py_serves_a_verified_signed_bundle(signed):
    from serve_helpers import LiveServer

    bundle, pub, _ = signed
    cmd = [sys.executable, "-I", str(bundle / "serve.py"), "--trust", str(pub), "--port", "0"]
    with LiveServer(bundle, command=cmd) as live:
        code, body, _ = live.get("/v1/models")
        assert code == 200 and body["data"][0]["id"] == bundle.name
        assert any("checksums ok" in line and "signature ok" in line for line in live.log), live.log


@pytest.mark.parametrize("attack", ["sitecustomize in runtime", "stdlib shadow next to serve.py",
                                    "runtime edited, signed by another key", "--trust abbreviated", "--trust twice"])
def test_serve_py_refuses_before_running_any_bundle_code(signed, tmp_path, attack):
    """Found by attacking `PYTHONPATH=runtime python3 -m edgeforge_runtime.server`, which imports the
    bundle's code before its own --trust check: serve.py verifies first, so none of the payloads runs."""
    from edgeforge.runtime.manifest_check import sign_bundle

    bundle, pub, _ = signed
    bundle = copy_bundle(bundle, tmp_path / "b")
    marker = tmp_path / "pwned"
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    args = ["--trust", str(pub)]
    if attack == "sitecustomize in runtime":
        (bundle / "runtime" / "sitecustomize.py").write_text(payload)
    elif attack == "stdlib shadow next to serve.py":
        (bundle / "hmac.py").write_text(payload)
    elif attack == "runtime edited, signed by another key":
        session = bundle / "runtime" / "edgeforge_runtime" / "session.py"
        session.write_text(payload + session.read_text())
        resign(bundle)
        attacker, _ = _keypair(tmp_path, "attacker")
        sign_bundle(bundle, attacker)
    elif attack == "--trust abbreviated":
        args = ["--tr", str(pub)]
    elif attack == "--trust twice":
        args = ["--trust", str(pub), "--trust", str(pub)]
    proc = _serve_py(bundle, *args, cwd=bundle)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "serving" not in err and "Traceback" not in err, (attack, err)
    assert not marker.exists(), attack


def test_a_trusted_key_may_be_a_link_the_user_made(signed, tmp_path, capsys):
    """keys/current.pem -> release.pem is a user's own arrangement (the bundle never names the key):
    verify follows it, and still refuses the other key behind a link."""
    bundle, pub, other = signed
    (tmp_path / "current.pem").symlink_to(pub)
    code, out, err = cli(capsys, "verify", bundle, "--trust", tmp_path / "current.pem")
    assert code == 0 and "signature" in out, err
    (tmp_path / "wrong.pem").symlink_to(other)
    code, _, err = cli(capsys, "verify", bundle, "--trust", tmp_path / "wrong.pem")
    assert code == 2 and "signed by another key" in err
