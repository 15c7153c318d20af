"""The `gpu` tier: bundles run on this machine's GPU (skipped, with the reason, where there is none).

A tiny random Llama is built into a CUDA TVM bundle for this GPU's own arch with the real compiler
(a system nvcc 13, else the PyPI wheels: `edgeforge toolchains install cuda`); `build` smoke-tests
it here, on the GPU, and `smoke` must PASS on `cuda:0`. On a GPU machine without the compiler (a
runtime-only install, as bench/gpu_run.sh has), $EDGEFORGE_GPU_BUNDLES names a folder of prebuilt
cuda bundles (complete, weights included): each must PASS its smoke on `cuda:0`. The CPU tiers' CUDA checks (what a GPU a
bundle has no code for, or no GPU at all, gives) live in test_gpu_checks.py and test_smoke_host.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bundle_helpers import cli

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.timeout(1800)]


def this_gpu_target(folder) -> str:
    """A target file like the `cuda` preset, with only this GPU's arch (one fatbin entry: quick)."""
    from edgeforge.runtime.hostcheck import cuda_gpus

    sm = cuda_gpus()[0][0]["sm"]
    path = folder / "this-gpu.toml"
    path.write_text(f'name = "this-gpu"\ndescription = "this machine\'s GPU ({sm})"\nbackends = ["tvm"]\n'
                    'run = "cuda"\nos = "linux"\narch = "x86_64"\n\n[tvm]\n'
                    'host = { kind = "llvm", mtriple = "x86_64-linux-gnu" }\ndevice = { kind = "cuda" }\n'
                    f'arches = ["{sm}"]\nexport = "so"\n')
    return str(path)


@pytest.mark.parametrize("scheme", ["q4f16", "q4f32"])
def test_cuda_bundle_passes_its_smoke_test_on_this_gpu(tiny_model, tmp_path, capsys, scheme):
    pytest.importorskip("tvm")
    target = this_gpu_target(tmp_path)
    code, out, err = cli(capsys, "build", tiny_model("llama32"), "--quant", scheme, "--target", target,
                         "--backend", "tvm", "-o", tmp_path / "dist", "--no-quality", "gpu tier", "--json")
    assert code == 0, err
    bundle = json.loads(out)["bundles"][0]
    assert bundle["ok"] and bundle.get("smoke") == "PASS", bundle  # build ran its smoke test on the GPU
    code, out, err = cli(capsys, "smoke", bundle["path"], "--json")
    result = json.loads(out)
    assert code == 0 and result["status"] == "PASS", (err, result)
    assert result["device"].startswith("cuda:0"), result


def _prebuilt_bundles() -> list:
    import os
    from pathlib import Path

    folder = os.environ.get("EDGEFORGE_GPU_BUNDLES")
    if not folder:
        return [pytest.param(None, marks=pytest.mark.skip(reason="EDGEFORGE_GPU_BUNDLES not set (no prebuilt bundles)"))]
    found = sorted(p for p in Path(folder).iterdir() if (p / "manifest.json").exists()
                   and json.loads((p / "manifest.json").read_text())["target"].get("run") == "cuda"
                   and any((p / "weights").glob("*.safetensors")))
    assert found, f"$EDGEFORGE_GPU_BUNDLES={folder} holds no complete cuda bundle"
    return [pytest.param(p, id=p.name) for p in found]


@pytest.mark.parametrize("bundle", _prebuilt_bundles())
def test_prebuilt_cuda_bundle_passes_on_this_gpu(bundle, capsys):
    code, out, err = cli(capsys, "smoke", bundle, "--json")
    result = json.loads(out)
    assert code == 0 and result["status"] == "PASS", (err, result)
    assert result["device"].startswith("cuda:0"), result


# ---- issue 21 (session 12): the GPU's memory is checked before weights or a KV cache go there ----

def test_cuda_memory_is_reported_for_this_gpu():
    """The driver API gives this GPU's total (and its free memory once a context is active), no mock."""
    from edgeforge.runtime.hostcheck import cuda_memory

    free, total = cuda_memory(0)
    assert total and total > 1 << 30, (free, total)
    assert free is None or 0 < free <= total, (free, total)


def _huge_context_refused_then_small_one_runs(capsys, bundle):
    """`run` at the (edited) default context of 2**30 tokens is refused by name before anything goes to
    the GPU: exit 2, one error line naming the device, the bytes and what to do; --ctx 64 runs."""
    from edgeforge.runtime.memory import GIB

    code, _, err = cli(capsys, "run", bundle, "-p", "Hello", "-n", "2")
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "cuda:0" in line and "bytes needed" in line, line
    assert "--ctx" in line and "--parallel" in line and "Traceback" not in err, line
    needed = int(line.split(" bytes needed")[0].rsplit("(", 1)[1])
    assert needed > 80 * GIB, line  # the KV cache of 2**30 positions: far more than any GPU has
    code, out, err = cli(capsys, "run", bundle, "-p", "Hello", "-n", "2", "--ctx", "64")
    assert code == 0, err


def test_tvm_kv_cache_larger_than_this_gpu_is_refused_by_name(tiny_model, tmp_path, capsys):
    pytest.importorskip("tvm")
    from bundle_helpers import resign

    code, out, err = cli(capsys, "build", tiny_model("llama32"), "--quant", "q4f32", "--target", this_gpu_target(tmp_path),
                         "--backend", "tvm", "-o", tmp_path / "dist", "--no-smoke", "--no-quality", "gpu tier", "--json")
    assert code == 0, err
    bundle = Path(json.loads(out)["bundles"][0]["path"])
    config_path = bundle / "weights" / "config.json"
    config = json.loads(config_path.read_text())
    config["context_length"] = 1 << 30
    config_path.write_text(json.dumps(config))
    resign(bundle)
    _huge_context_refused_then_small_one_runs(capsys, bundle)


def test_onnx_cuda_kv_cache_larger_than_this_gpu_is_refused_by_name(tiny_model, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
    from bundle_helpers import resign

    code, out, err = cli(capsys, "build", tiny_model("llama32"), "--quant", "q4f32", "--target", "cuda", "--backend",
                         "onnx", "-o", tmp_path / "dist", "--no-smoke", "--no-quality", "gpu tier", "--json")
    assert code == 0, err
    bundle = Path(json.loads(out)["bundles"][0]["path"])
    artifact_path = bundle / "artifact" / "artifact.json"
    artifact = json.loads(artifact_path.read_text())
    artifact["onnx"]["context_length"] = 1 << 30
    artifact_path.write_text(json.dumps(artifact))
    resign(bundle)
    _huge_context_refused_then_small_one_runs(capsys, bundle)
