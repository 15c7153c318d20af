"""CUDA checks that need no GPU: which GPUs a bundle's code runs on, the refusal by name, the
CUDA-graph switch of the cuda target, and the random models bench/gpu.py regenerates on a GPU machine
(they must come out bit for bit the same there, or the bundle's checksums refuse them)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from edgeforge.runtime import hostcheck
from edgeforge.runtime.bundle_errors import CannotRunHere

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.parametrize("arch, gpu, runs", [
    ("sm_80", "sm_80", True), ("sm_80", "sm_86", True), ("sm_80", "sm_89", True), ("sm_80", "sm_90", False),
    ("sm_86", "sm_80", False), ("sm_90", "sm_90", True), ("sm_90a", "sm_90", True), ("sm_90a", "sm_100", False),
    ("sm_90", "sm_100", False), ("sm_89", "sm_120", False),
])
def test_sass_compatibility(arch, gpu, runs):
    assert hostcheck.sass_runs_on(arch, gpu) is runs


@pytest.mark.parametrize("arch, gpu, runs", [("sm_90", "sm_100", True), ("sm_90", "sm_90", True),
                                             ("sm_90", "sm_89", False), ("sm_80", "sm_120", True)])
def test_ptx_compatibility(arch, gpu, runs):
    assert hostcheck.ptx_runs_on(arch, gpu) is runs


def _fake_gpu(monkeypatch, sm: str, driver: int = 13000, name: str = "NVIDIA H200"):
    monkeypatch.setattr(hostcheck, "cuda_gpus", lambda: ([{"index": 0, "name": name, "sm": sm}], driver, ""))


def test_wrong_arch_is_refused_by_name(monkeypatch):
    _fake_gpu(monkeypatch, "sm_90")
    with pytest.raises(CannotRunHere) as err:
        hostcheck.check_cuda({"gpu_arch": ["sm_80", "sm_86"]})
    assert "NVIDIA H200 (sm_90)" in str(err.value) and "sm_80, sm_86" in str(err.value)
    assert "rebuild with 'sm_90'" in str(err.value)


def test_matching_arch_and_ptx_fallback_run(monkeypatch):
    _fake_gpu(monkeypatch, "sm_89", name="NVIDIA L4")
    assert hostcheck.check_cuda({"gpu_arch": ["sm_80"]})["name"] == "NVIDIA L4"
    _fake_gpu(monkeypatch, "sm_120")
    hostcheck.check_cuda({"gpu_arch": ["sm_90"], "gpu_ptx": ["sm_90"]})  # the driver compiles the PTX
    with pytest.raises(CannotRunHere):
        hostcheck.check_cuda({"gpu_arch": ["sm_90"]})


def test_old_driver_is_refused(monkeypatch):
    _fake_gpu(monkeypatch, "sm_90", driver=12040)
    with pytest.raises(CannotRunHere, match="supports CUDA 12.4.*built with CUDA 13.0"):
        hostcheck.check_cuda({"gpu_arch": ["sm_90"], "min_driver_cuda": 13000})


def test_no_gpu_is_not_a_pass(monkeypatch):
    monkeypatch.setattr(hostcheck, "cuda_gpus", lambda: ([], None, "no NVIDIA driver (libcuda) on this machine"))
    with pytest.raises(CannotRunHere, match="no CUDA device"):
        hostcheck.check_cuda({"gpu_arch": ["sm_90"]})


def test_cuda_graph_switch(tmp_path):
    from edgeforge.backends.tvm.compile import pass_config
    from edgeforge.backends.tvm.targets import tvm_target_for
    from edgeforge.errors import EdgeforgeError
    from edgeforge.targets import get_target

    assert pass_config(tvm_target_for(get_target("cuda")))["relax.backend.use_cuda_graph"] is True
    assert pass_config(tvm_target_for(get_target("x86-cpu")))["relax.backend.use_cuda_graph"] is False
    import gpu

    off = get_target(str(gpu._target_file(tmp_path, "cuda-off", cuda_graph=False)))
    assert pass_config(tvm_target_for(off))["relax.backend.use_cuda_graph"] is False
    bad = get_target(str(gpu._target_file(tmp_path, "cuda-bad", cuda_graph="yes")))
    with pytest.raises(EdgeforgeError, match="cuda_graph must be true or false"):
        tvm_target_for(bad)


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def test_random_qdir_is_reproducible_and_loads(tmp_path):
    import numpy as np

    import gpu
    from edgeforge.quant.qdir import load_qdir

    a = gpu.synth_qdir(tmp_path / "a", "tiny", log=lambda m: None)
    b = gpu.synth_qdir(tmp_path / "b", "tiny", log=lambda m: None)
    assert _digest(a) == _digest(b) and _digest(a)
    c = gpu.synth_qdir(tmp_path / "c", "tiny", seed=1, log=lambda m: None)
    assert _digest(a) != _digest(c)
    model = load_qdir(a)
    w = model.tensors.get("model.layers.0.mlp.down_proj.weight")
    step = gpu.WEIGHT_STD / 4.6
    codes = np.round(w / step).astype(int)
    assert set(np.unique(codes)) <= set(range(-7, 8)) and abs(codes.mean()) < 0.1  # symmetric: no bias
    assert abs(w.std() - gpu.WEIGHT_STD) < 0.2 * gpu.WEIGHT_STD


def test_keep_one_sm_zeroes_only_the_other_archs_kernels(tmp_path):
    """bench/gpu.py packs onnxruntime-gpu for one GPU by zeroing the other archs' fatbin payloads: the
    headers and the kept arch's bytes must stay exactly as they were, and the file keeps its size."""
    import struct

    import gpu

    def entry(arch: int, payload: bytes) -> bytes:
        head = struct.pack("<HHIQII", 2, 0x101, 64, len(payload), 0, len(payload)) + struct.pack("<II", 0, arch)
        return head + bytes(64 - len(head)) + payload

    payloads = {80: b"\x11" * 40, 90: b"\x22" * 24, 120: b"\x33" * 16}
    body = b"".join(entry(a, p) for a, p in payloads.items())
    blob = b"host code" + struct.pack("<IHHQ", gpu.FATBIN_MAGIC, 1, 16, len(body)) + body + b"tail"
    lib = tmp_path / "lib.so"
    lib.write_bytes(blob)
    kept, zeroed = gpu.keep_one_sm(lib, 90)
    out = lib.read_bytes()
    assert (kept, zeroed) == (24, 56) and len(out) == len(blob)
    assert b"\x22" * 24 in out and b"\x11" not in out and b"\x33" not in out
    assert out.startswith(b"host code") and out.endswith(b"tail")
    assert out.count(struct.pack("<I", gpu.FATBIN_MAGIC)) == 1  # the fatbin header itself is kept
