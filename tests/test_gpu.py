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
