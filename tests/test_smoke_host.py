"""A tiny model's host bundle end to end: build, smoke PASS, tamper detection, FAIL detection,
runtime isolation, archives, reproducibility and racing builds. Uses the real ONNX Runtime backend
(the fastest to compile); tests/test_bundle_smollm2.py covers every target on the real model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bundle_helpers import build_json, cli, cli_without_gpu, copy_bundle, host_bundle, resign  # noqa: F401 (fixture)

BLOCK_EDGEFORGE = "import sys; sys.modules['edgeforge'] = None; "  # any `import edgeforge...` now fails


def test_host_bundle_passes(host_bundle, capsys):
    bundle, _, _ = host_bundle
    assert bundle.name.endswith("-q4f32-x86-cpu-onnx")
    code, out, err = cli(capsys, "smoke", bundle, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "PASS" and result["token_agreement"] >= 0.9  # near-ties may flip
    assert 0 <= result["max_logit_err"] <= result["tolerance"]
    assert result["prefill_tok_s"] > 0 and result["decode_tok_s"] > 0 and result["peak_rss_mb"] > 0
    code, out, _ = cli(capsys, "smoke", bundle)
    assert code == 0 and out.startswith("PASS ") and "tok/s" in out


def test_layout(host_bundle):
    bundle, _, _ = host_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    for rel in ("golden.json", "artifact/artifact.json", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                "runtime/edgeforge_runtime/smoke.py", "smoke.py", "requirements.txt", "README.md"):
        assert rel in manifest["files"], rel
    assert not (bundle / "weights").exists(), "ONNX bundles carry their weights in the .onnx data file"
    assert manifest["target"]["name"] == "x86-cpu" and manifest["backend"] == "onnx" and manifest["scheme"] == "q4f32"
    assert manifest["model"]["source_sha256"] and manifest["config"]["num_layers"] == 2
    reqs = (bundle / "requirements.txt").read_text().split()
    assert any(r.startswith("onnxruntime==") for r in reqs) and any(r.startswith("numpy==") for r in reqs)
    assert not any(r.startswith(("onnx==", "apache-tvm", "torch")) for r in reqs), "no compiler on the device"
    spec = re.compile(r"[A-Za-z0-9._-]+((==|>=|<=|~=|!=)[0-9][0-9A-Za-z.+-]*)?")
    assert all(spec.fullmatch(r) for r in reqs), reqs


def test_bundle_runs_without_edgeforge(host_bundle, tmp_path):
    """The bundle's smoke.py and every runtime module import with the compiler package unimportable."""
    bundle = copy_bundle(host_bundle[0], tmp_path / "b")
    code = BLOCK_EDGEFORGE + "import runpy; sys.argv = ['smoke.py', '--json']; runpy.run_path('smoke.py', run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=bundle, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "PASS"
    code = BLOCK_EDGEFORGE + (
        "sys.path.insert(0, 'runtime'); import pkgutil, importlib, edgeforge_runtime as r; "
        "mods = [m.name for m in pkgutil.iter_modules(r.__path__)]; "
        "[importlib.import_module('edgeforge_runtime.' + m) for m in mods if m != 'tvm_engine' or "
        "importlib.util.find_spec('tvm')]; print(len(mods))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=bundle, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) >= 10
    assert not list(bundle.rglob("__pycache__")), "smoke.py must not write into the bundle"


def test_every_flipped_byte_is_refused(host_bundle, tmp_path, capsys):
    bundle = copy_bundle(host_bundle[0], tmp_path / "b")
    files = sorted(json.loads((bundle / "manifest.json").read_text())["files"]) + ["manifest.json"]
    for rel in files:
        path = bundle / rel
        original = path.read_bytes()
        data = bytearray(original)
        data[len(data) // 2] ^= 0x20
        path.write_bytes(bytes(data))
        code, _, err = cli(capsys, "smoke", bundle)
        path.write_bytes(original)
        assert code == 2, (rel, err)
        assert str(path) in err, (rel, err)
    code, _, err = cli(capsys, "smoke", bundle)
    assert code == 0, err


def test_incomplete_bundle_refused(host_bundle, tmp_path, capsys):
    bundle = copy_bundle(host_bundle[0], tmp_path / "b")
    (bundle / "artifact" / "model.onnx.data").unlink()
    code, _, err = cli(capsys, "smoke", bundle)
    assert code == 2 and "model.onnx.data: missing" in err


def test_wrong_outputs_fail(host_bundle, tmp_path, capsys):
    """Re-signed bundles whose behaviour changed: checksums pass, so only the golden check catches it."""
    bundle = copy_bundle(host_bundle[0], tmp_path / "b")
    golden = json.loads((bundle / "golden.json").read_text())
    for p in golden["prompts"]:  # shift every expected logit by a quarter of its range
        for s in p["steps"]:
            shift = 0.25 * (s["max"] - s["min"])
            s["top_logits"] = [v + shift for v in s["top_logits"]]
            s["max"], s["min"] = s["max"] + shift, s["min"] + shift  # still consistent: the verifier lets it run
    (bundle / "golden.json").write_text(json.dumps(golden))
    resign(bundle)
    code, out, err = cli(capsys, "smoke", bundle)
    assert code == 1 and out.startswith("FAIL"), (out, err)

    bundle = copy_bundle(host_bundle[0], tmp_path / "c")
    data = bundle / "artifact" / "model.onnx.data"
    raw = np.frombuffer(data.read_bytes(), dtype=np.uint8).copy()
    raw[: len(raw) // 2] = np.random.default_rng(0).integers(0, 256, len(raw) // 2, dtype=np.uint8)
    data.write_bytes(raw.tobytes())
    resign(bundle)
    code, out, err = cli(capsys, "smoke", bundle, "--json")
    assert code == 1, err
    assert json.loads(out)["status"] == "FAIL"


@pytest.mark.parametrize("edit,words", [
    # (arch stays x86_64: an aarch64 target would make this x86 ONNX bundle's golden data inconsistent, refused first)
    (lambda m: m["target"].update(os="macos", name="metal-macos"), "cannot run here: target 'metal-macos' needs macOS"),
    (lambda m: m["target"].update(os="ios", name="iphone"), "cannot run here: target 'iphone' needs an iOS app"),
    (lambda m: m["target"].update(os="android", name="android-arm64"), "cannot run here: target 'android-arm64' needs Android"),
    (lambda m: m.update(device="cuda"), "cannot run here: no CUDA device"),
])
def test_cannot_run_here(host_bundle, tmp_path, capsys, edit, words):
    bundle = copy_bundle(host_bundle[0], tmp_path / "b")
    resign(bundle, edit)
    # the CUDA case hides this machine's GPUs, if any: "no GPU" is then true everywhere
    code, out, err = cli_without_gpu("smoke", bundle) if "CUDA" in words else cli(capsys, "smoke", bundle)
    assert code == 2 and words in err and "PASS" not in out


def test_archive_smoke(host_bundle, capsys):
    _, tarball, _ = host_bundle
    code, out, err = cli(capsys, "smoke", tarball, "--json")
    assert code == 0, err
    assert json.loads(out)["status"] == "PASS"


def test_rebuild_is_identical(host_bundle, tiny_model, tmp_path, capsys):
    bundle, _, _ = host_bundle
    summary = build_json(capsys, tiny_model("llama32"), "--quant", "q4f32", "--target", "x86-cpu",
                         "--backend", "onnx", "-o", tmp_path)
    again = Path(summary["bundles"][0]["path"])
    first, second = (json.loads((b / "manifest.json").read_text())["files"] for b in (bundle, again))
    assert first == second
    assert (bundle / "artifact" / "model.onnx.data").read_bytes() == (again / "artifact" / "model.onnx.data").read_bytes()


def test_racing_builds_leave_one_whole_bundle(tiny_model, tmp_path, capsys):
    cmd = [sys.executable, "-m", "edgeforge.cli", "build", str(tiny_model("llama32")), "--quant", "q4f32",
           "--target", "x86-cpu", "--backend", "onnx", "-o", str(tmp_path)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    assert any(code == 0 for code, _ in results), results
    for code, err in results:
        assert code in (0, 2) and "Traceback" not in err, err
    (bundle,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    code, _, err = cli(capsys, "smoke", bundle)
    assert code == 0, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_build_json_gives_ci_checksums(host_bundle):
    """build --json: what a CI job needs to publish an artifact (path, sizes, sha256)."""
    import hashlib

    bundle, archive, summary = host_bundle
    (b,) = summary["bundles"]
    assert b["archive_sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert b["archive_bytes"] == archive.stat().st_size
    assert b["manifest_sha256"] == json.loads((bundle / "manifest.json").read_text())["manifest_sha256"]


VULKAN_MANIFEST = {"target": {"name": "vulkan", "run": "vulkan", "os": "linux", "arch": "x86_64"},
                   "device": "webgpu (vulkan)"}


@pytest.mark.parametrize("value, words", [
    ("nvidia", "$EDGEFORGE_VULKAN='nvidia': expected 'system'"),
    ("system", None),  # this venv's onnxruntime is the CPU build, or no Vulkan device: named either way
])
def test_system_vulkan_is_checked_before_the_smoke(monkeypatch, value, words):
    """EDGEFORGE_VULKAN=system runs a vulkan bundle on the machine's own driver, with this Python: it must
    be refused by name when this Python cannot (no WebGPU EP, no Vulkan device), never run elsewhere."""
    import platform

    from edgeforge.bundle import smoke_run
    from edgeforge.errors import EdgeforgeError

    if platform.machine() != "x86_64":
        pytest.skip("the manifest names an x86_64 target")
    monkeypatch.setenv("EDGEFORGE_VULKAN", value)
    try:
        import onnxruntime
        has_webgpu = "WebGpuExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        has_webgpu = False
    if value == "system" and has_webgpu:
        pytest.skip("this Python has onnxruntime-webgpu: the system path may legitimately run")
    with pytest.raises(EdgeforgeError) as err:
        smoke_run.python_for(VULKAN_MANIFEST, emulate=False)
    assert (words or "EDGEFORGE_VULKAN=system: ") in str(err.value)
