"""The real SmolLM2-135M: ONE `edgeforge build examples/smollm2.toml` makes q4f16 bundles for
x86-cpu (tvm, onnx), rpi5 (tvm, onnx), cuda (tvm), jetson-orin (tvm), vulkan (onnx) and metal-macos (tvm); each is
smoke-tested where this machine can run it (host, qemu, lavapipe) and the others must say
"cannot run here" with exit 2. About 7 min to build on 2 cores, plus ~4 min per emulated smoke.

Set EDGEFORGE_SMOLLM2_DIST to a folder holding such a build to reuse it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bundle_helpers import cli, cli_without_gpu

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # one SmolLM2 build of every target (~7 min on 2 idle cores) + emulated smokes
ROOT = Path(__file__).resolve().parent.parent
EXPECTED = {("x86-cpu", "tvm"), ("x86-cpu", "onnx"), ("rpi5", "tvm"), ("rpi5", "onnx"), ("cuda", "tvm"),
            ("jetson-orin", "tvm"), ("vulkan", "onnx"), ("metal-macos", "tvm")}


def name(target, backend):
    return f"smollm2-135m-q4f16-{target}-{backend}"


@pytest.fixture(scope="module")
def dist(smollm2_gguf, tmp_path_factory):
    reuse = os.environ.get("EDGEFORGE_SMOLLM2_DIST")
    if reuse:
        return Path(reuse)
    out = tmp_path_factory.mktemp("smollm2-dist")
    proc = subprocess.run([sys.executable, "-m", "edgeforge.cli", "build", str(ROOT / "examples" / "smollm2.toml"),
                           "-o", str(out), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert {(b["target"], b["backend"]) for b in summary["bundles"] if b["ok"]} == EXPECTED
    return out


def smoke_json(capsys, bundle, *args):
    code, out, err = cli(capsys, "smoke", bundle, *args, "--json")
    return code, (json.loads(out) if out.strip() else {}), err


def test_one_build_makes_every_bundle(dist):
    for target, backend in EXPECTED:
        manifest = json.loads((dist / name(target, backend) / "manifest.json").read_text())
        assert (manifest["target"]["name"], manifest["backend"], manifest["scheme"]) == (target, backend, "q4f16")
        assert manifest["model"]["source_sha256"] and manifest["config"]["num_layers"] == 30
    # every TVM bundle ships the same quantized weights (quantized once)
    weights = [{k: v for k, v in json.loads((dist / name(t, b) / "manifest.json").read_text())["files"].items()
                if k.startswith("weights/")} for t, b in EXPECTED if b == "tvm"]
    assert weights[0] and all(w == weights[0] for w in weights)


@pytest.mark.parametrize("backend", ["tvm", "onnx"])
def test_x86_smoke_passes(dist, capsys, backend):
    code, result, err = smoke_json(capsys, dist / name("x86-cpu", backend))
    assert code == 0, err
    assert result["status"] == "PASS" and result["token_agreement"] >= 0.9


@pytest.mark.arm
@pytest.mark.parametrize("backend", ["tvm", "onnx"])
def test_rpi5_smoke_passes_under_qemu(dist, capsys, backend):
    # One golden prompt: emulated TVM decodes at seconds per token (docs/notes/bundle.md).
    code, result, err = smoke_json(capsys, dist / name("rpi5", backend), "--emulate", "--prompts", "1")
    assert code == 0, (err, result)
    assert result["status"] == "PASS" and (result["prompts_checked"], result["prompts_total"]) == (1, 3)


@pytest.mark.vulkan
def test_vulkan_smoke_passes_on_lavapipe(dist, capsys):
    code, result, err = smoke_json(capsys, dist / name("vulkan", "onnx"))
    assert code == 0, (err, result)
    assert result["status"] == "PASS" and result["device"].startswith("webgpu")


@pytest.mark.vulkan
def test_vulkan_bench_exits_zero_after_its_webgpu_session(dist):
    """Dawn on lavapipe crashes when a WebGPU session is destroyed: `edgeforge bench` exited 139 after
    printing its numbers. It must exit 0 and leave no verified copy behind."""
    import glob
    import tempfile

    from edgeforge import toolchains

    python, env = toolchains.vulkan_env(ensure=True)
    site = next(Path(python).parent.parent.glob("lib/python3*/site-packages"))  # onnxruntime-webgpu
    env = dict(env, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), ".edgeforge-verified*")))
    proc = subprocess.run([sys.executable, "-m", "edgeforge.cli", "bench", str(dist / name("vulkan", "onnx")),
                           "-p", "8", "-n", "4", "-r", "1", "--json"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = json.loads(proc.stdout)
    assert [r["test"] for r in records] == ["pp8", "tg4"] and records[0]["device"].startswith("webgpu")
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), ".edgeforge-verified*"))) <= before


@pytest.mark.parametrize("target,words", [("cuda", "cannot run here: no CUDA device"),
                                          ("jetson-orin", "cannot run here: target 'jetson-orin' needs an aarch64 CPU with an NVIDIA GPU"),
                                          ("metal-macos", "cannot run here: target 'metal-macos' needs macOS")])
def test_gpu_bundles_cannot_run_here(dist, capsys, target, words):
    # the cuda case hides this machine's GPUs, if any (test_cuda_smoke_passes_on_this_gpu runs on them)
    code, out, err = cli_without_gpu("smoke", dist / name(target, "tvm")) if target == "cuda" else \
        cli(capsys, "smoke", dist / name(target, "tvm"))
    assert code == 2 and words in err and "PASS" not in out


@pytest.mark.gpu
def test_cuda_smoke_passes_on_this_gpu(dist, capsys):
    """The preset's fatbins (sm_80 to sm_90, PTX for newer GPUs) run the real model on this GPU."""
    code, result, err = smoke_json(capsys, dist / name("cuda", "tvm"))
    assert code == 0, (err, result)
    assert result["status"] == "PASS" and result["device"].startswith("cuda:0")
