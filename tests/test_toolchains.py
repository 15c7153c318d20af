"""Toolchains: the arm64 root under qemu and lavapipe + onnxruntime-webgpu.

The slow tests build the toolchains on first use (scripts/setup-*.sh, a few minutes, root needed)
and then run real aarch64 / WebGPU processes; their results are checked against numpy on the host.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgeforge import toolchains
from edgeforge.errors import EdgeforgeError
from edgeforge.testing import run_under_qemu

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import check_webgpu  # noqa: E402

pytestmark = pytest.mark.timeout(1800)  # the first slow test builds the arm64 root or lavapipe (minutes)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ----------------------------------------------------------------------------- fast checks


def test_missing_toolchains_are_reported_not_guessed(empty_cache):
    assert toolchains.arm64_root() is None
    assert toolchains.vulkan_env() is None
    with pytest.raises(EdgeforgeError, match="setup-arm64.sh"):
        toolchains.qemu_python_command(["-c", "pass"])


@pytest.mark.parametrize("script", ["setup-arm64.sh", "setup-vulkan.sh"])
def test_setup_scripts_check_mode_and_bad_option(script, empty_cache):
    path = REPO / "scripts" / script
    env = dict(os.environ, EDGEFORGE_CACHE=str(empty_cache))
    assert subprocess.run(["bash", str(path), "--check"], env=env).returncode == 1
    assert not empty_cache.exists(), "--check must not create anything"
    bad = subprocess.run(["bash", str(path), "--bogus"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--bogus" in bad.stderr


def test_handmade_matmul_model_is_valid_onnx():
    """check_webgpu.py encodes its model by hand; onnx must accept it and CPU ORT must compute A @ B."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    blob = check_webgpu.matmul_model(5, 32, 3)
    onnx.checker.check_model(onnx.load_from_string(blob), full_check=True)
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5, 32), dtype=np.float32), rng.standard_normal((32, 3), dtype=np.float32)
    np.testing.assert_allclose(sess.run(None, {"A": a, "B": b})[0], a @ b, rtol=1e-5, atol=1e-5)


def test_cpuinfo_follows_host_cpu_count(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cpuinfo").write_text("processor\t: 0\n" * 999)
    toolchains._sync_cpuinfo(tmp_path)
    text = (tmp_path / "proc" / "cpuinfo").read_text()
    assert text.count("processor\t:") == os.cpu_count()
    assert "CPU implementer\t: 0x41" in text  # an ARM entry, which onnxruntime's cpuinfo can parse


def test_a_cpu_view_describes_its_core_and_passes_host_paths_through(tmp_path):
    """Another core than the root's A76 gets a view: links to the root's entries, its own cpuinfo
    (a Cortex-A72 has no int8 dot product or float16 arithmetic, so none in its Features), and real
    folders at /root, /tmp and /home so that host paths under them resolve in the guest."""
    root = tmp_path / "arm64-root"
    for name in ("usr", "lib", "root", "tmp", "proc"):
        (root / name).mkdir(parents=True)
    view = toolchains._cpu_view(root, "cortex-a72")
    info = (view / "proc" / "cpuinfo").read_text()
    assert "CPU part\t: 0xd08" in info and "asimddp" not in info and "fphp" not in info
    assert info.count("processor\t:") == os.cpu_count()
    assert (view / "usr").is_symlink() and (view / "usr").resolve() == (root / "usr").resolve()
    assert all((view / d).is_dir() and not (view / d).is_symlink() for d in ("root", "tmp"))
    assert toolchains._cpu_view(root, "cortex-a72") == view  # made once
    assert toolchains._cpu_view(root, "cortex-a76") == root and "asimddp" in (root / "proc" / "cpuinfo").read_text()
    assert toolchains._cpu_view(root, "max") == root  # no cpuinfo of its own: the A76's


def test_a_cpu_view_that_cannot_be_made_is_an_error_not_another_core(tmp_path, monkeypatch):
    """Another user's read-only cache: emulating the A76 instead would be a wrong verdict; say why."""
    root = tmp_path / "arm64-root"
    (root / "usr").mkdir(parents=True)

    def read_only(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(EdgeforgeError, match="cannot make the cortex-a53 view .*Permission denied"):
        toolchains._cpu_view(root, "cortex-a53")


@pytest.mark.skipif(not toolchains.shutil.which(toolchains.QEMU), reason="qemu-user-static not installed")
def test_qemu_cpu_for_target_mcpu():
    assert toolchains.qemu_cpu_for(None) == "cortex-a76"
    assert toolchains.qemu_cpu_for("cortex-a53") == "cortex-a53"
    assert toolchains.qemu_cpu_for("no-such-core") == "max"


def _can_build(*tools: str) -> bool:
    """Building needs root, and these host tools already present (else the script runs apt)."""
    return os.geteuid() == 0 and all(toolchains.shutil.which(t) for t in tools)


@pytest.mark.skipif(not _can_build("qemu-aarch64-static", "aarch64-linux-gnu-g++", "debootstrap"),
                    reason="needs root and the arm64 host tools")
def test_arm64_setup_failure_is_one_clear_line(empty_cache, monkeypatch):
    monkeypatch.setenv("EDGEFORGE_DEBIAN_MIRROR", "http://127.0.0.1:9/debian")  # nothing listens there
    with pytest.raises(EdgeforgeError) as err:
        toolchains.ensure_arm64()
    message = str(err.value)
    assert "debootstrap" in message and "127.0.0.1:9" in message and "\n" not in message
    assert toolchains.arm64_root() is None
    assert not list((empty_cache / "toolchains").glob(".arm64-root.tmp-*")), "half-built root left behind"


@pytest.mark.skipif(not _can_build("apt-get", "dpkg-deb"), reason="needs root on a Debian host")
def test_vulkan_setup_failure_is_one_clear_line(empty_cache, monkeypatch):
    monkeypatch.setenv("EDGEFORGE_DEBIAN_MIRROR", "http://127.0.0.1:9/debian")
    with pytest.raises(EdgeforgeError) as err:
        toolchains.ensure_vulkan()
    message = str(err.value)
    assert "apt-get update" in message and "127.0.0.1:9" in message and "\n" not in message
    assert toolchains.vulkan_env() is None
    assert not (empty_cache / "toolchains" / "vulkan").exists()


# ----------------------------------------------------------------------------- arm64 under qemu


def _arm64_root() -> Path:
    try:
        return toolchains.ensure_arm64()
    except EdgeforgeError as err:
        if os.geteuid() != 0:
            pytest.skip(f"arm64 root not built and building needs root: {err}")
        raise


def _aarch64_tvm_runtime(dest: Path) -> Path:
    """The runtime-only aarch64 TVM a bundle carries (the arm64 root has none): dest/tvm, for PYTHONPATH."""
    pytest.importorskip("tvm")
    from edgeforge.testing import copy_runtime

    return copy_runtime(dest, tvm_arch="aarch64")


def _run_qemu(args, extra_pythonpath=(), timeout=600):
    proc = run_under_qemu(args, extra_pythonpath=extra_pythonpath, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


ARM64_STACK_CHECK = r"""
import json, platform, sys
import numpy as np, jinja2, onnxruntime as ort, tokenizers
from edgeforge_runtime.tvm_engine import compiler_loaded, import_tvm_runtime
ffi, info = import_tvm_runtime()  # the carried libtvm_runtime, as TVM bundles load it
assert ffi.get_global_func("runtime.TVMTensorAllocWithScope") is not None
work = sys.argv[1]
sess = ort.InferenceSession(work + "/model.onnx", providers=["CPUExecutionProvider"])
x = np.load(work + "/x.npy")
np.save(work + "/y_arm64.npy", sess.run(None, {"x": x})[0])
tok = tokenizers.Tokenizer.from_file(work + "/tokenizer.json")
print(json.dumps({
    "machine": platform.machine(),
    "tvm_runtime_only": not compiler_loaded() and "/rt/tvm/lib/" in info["tvm_library"],
    "providers": sess.get_providers(),
    "ids": tok.encode("hello tiny world").ids,
    "template": jinja2.Template("{{ a }}+{{ b }}").render(a=1, b=2),
}))
"""


@pytest.mark.slow
@pytest.mark.arm
def test_arm64_python_runs_numpy_onnxruntime_tokenizers_and_tvm_runtime(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    from tokenizers import Tokenizer, models, pre_tokenizers

    _arm64_root()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8), dtype=np.float32)
    bias = rng.standard_normal(8, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, tmp_path / "model.onnx")
    x = rng.standard_normal((4, 16), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    vocab = {"[UNK]": 0, "hello": 1, "tiny": 2, "world": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    script = tmp_path / "check.py"
    script.write_text(ARM64_STACK_CHECK)

    start = time.perf_counter()
    runtime = _aarch64_tvm_runtime(tmp_path / "rt")
    result = json.loads(_run_qemu([script, tmp_path], extra_pythonpath=[runtime]).strip().splitlines()[-1])
    print(f"emulated check took {time.perf_counter() - start:.1f} s")

    assert result["machine"] == "aarch64"
    assert result["tvm_runtime_only"] is True
    assert result["providers"] == ["CPUExecutionProvider"]
    assert result["ids"] == tok.encode("hello tiny world").ids == [1, 2, 3]
    assert result["template"] == "1+2"
    np.testing.assert_allclose(np.load(tmp_path / "y_arm64.npy"), x @ w + bias, rtol=1e-5, atol=1e-5)


TVM_RUN = r"""
import sys, numpy as np
from edgeforge_runtime.tvm_engine import POOLED_ALLOCATOR, import_tvm_runtime
ffi, _ = import_tvm_runtime()  # libtvm_runtime + tvm_ffi, the way TVM bundles run (no tvm package)
work = sys.argv[1]
vm = ffi.load_module(work + "/affine.so")["vm_load_executable"]()
vm["vm_initialization"](1, 0, POOLED_ALLOCATOR)  # kDLCPU 0
out = vm["main"](ffi.from_dlpack(np.load(work + "/x.npy")), ffi.from_dlpack(np.load(work + "/w.npy")))
np.save(work + "/y_arm64.npy", np.from_dlpack(out))
"""


@pytest.mark.slow
@pytest.mark.arm
def test_cross_compiled_tvm_module_runs_under_qemu(tmp_path):
    """The whole ARM chain: TVM compiles for aarch64, the cross g++ links, runtime-only TVM runs it."""
    tvm = pytest.importorskip("tvm")
    from tvm import relax
    from tvm.support import cc

    _arm64_root()
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 32), "float32"))
    w = relax.Var("w", relax.TensorType((32, 8), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.add(relax.op.matmul(x, w), relax.const(1.0, "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    target = tvm.target.Target(
        {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "mattr": ["+neon"]}
    )
    relax.build(bb.get(), target=target).export_library(
        str(tmp_path / "affine.so"), fcompile=cc.cross_compiler("aarch64-linux-gnu-g++")
    )
    assert (tmp_path / "affine.so").read_bytes()[18] == 183  # ELF e_machine EM_AARCH64
    rng = np.random.default_rng(2)
    xv, wv = rng.standard_normal((4, 32), dtype=np.float32), rng.standard_normal((32, 8), dtype=np.float32)
    np.save(tmp_path / "x.npy", xv)
    np.save(tmp_path / "w.npy", wv)
    (tmp_path / "run.py").write_text(TVM_RUN)
    _run_qemu([tmp_path / "run.py", tmp_path], extra_pythonpath=[_aarch64_tvm_runtime(tmp_path / "rt")])
    np.testing.assert_allclose(np.load(tmp_path / "y_arm64.npy"), xv @ wv + 1.0, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.arm
def test_ensure_arm64_is_instant_when_cached():
    _arm64_root()
    start = time.perf_counter()
    root = toolchains.ensure_arm64()
    assert time.perf_counter() - start < 5
    assert (root / toolchains.ARM64_PYTHON).exists()
    # no TVM in the root: TVM bundles bring their own runtime-only copy (backends/tvm/device_runtime.py)
    assert not (root / toolchains.ARM64_SITE / "tvm").exists()


# ----------------------------------------------------------------------------- Vulkan (lavapipe)


def _vulkan():
    try:
        return toolchains.ensure_vulkan()
    except EdgeforgeError as err:
        if os.geteuid() != 0:
            pytest.skip(f"lavapipe not set up and setting it up needs root: {err}")
        raise


WEBGPU_RUN = r"""
import json, sys, numpy as np, onnxruntime as ort
work = sys.argv[1]
opts = ort.SessionOptions()
opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
sess = ort.InferenceSession(work + "/model.onnx", opts, providers=["WebGpuExecutionProvider"])
np.save(work + "/y_webgpu.npy", sess.run(None, {"x": np.load(work + "/x.npy")})[0])
print(json.dumps({"providers": sess.get_providers(), "version": ort.__version__}))
"""


@pytest.mark.slow
@pytest.mark.vulkan
def test_webgpu_matmul_runs_on_lavapipe(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    python, env = _vulkan()
    devices = toolchains.vulkan_devices(env, python)
    assert [d["type"] for d in devices] == ["cpu"] and "llvmpipe" in devices[0]["name"], devices

    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 48), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 48])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, tmp_path / "model.onnx")
    x = rng.standard_normal((16, 64), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "run.py").write_text(WEBGPU_RUN)
    cmd = [str(python), str(tmp_path / "run.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["providers"][0] == "WebGpuExecutionProvider"
    np.testing.assert_allclose(np.load(tmp_path / "y_webgpu.npy"), x @ w, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.vulkan
def test_webgpu_check_fails_loudly_without_an_adapter(tmp_path):
    """With no Vulkan driver ORT would fall back to CPU silently; check_webgpu.py must fail instead."""
    python, env = _vulkan()
    env = dict(env, VK_DRIVER_FILES=str(tmp_path / "none.json"), VK_ICD_FILENAMES=str(tmp_path / "none.json"))
    cmd = [str(python), str(REPO / "scripts" / "check_webgpu.py")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "WebGPU EP" in proc.stderr


@pytest.mark.arm
def test_smoke_emulates_the_targets_own_core(tiny_model, tmp_path, monkeypatch, capsys):
    """rpi4's bundle runs as a Cortex-A72 (float32 graph: PASS, to float32's bound). The same model with
    a float16 graph, as rpi4 used to build it, dies with SIGILL on that core: smoke says so (exit 2),
    where emulating an A76 for every bundle had passed it."""
    from edgeforge.cli import main

    _arm64_root()
    user_targets = tmp_path / "targets"
    user_targets.mkdir()
    text = (REPO / "targets" / "rpi4.toml").read_text()
    (user_targets / "rpi4-f16.toml").write_text(
        text.replace('name = "rpi4"', 'name = "rpi4-f16"').replace("accuracy_level = 1", "accuracy_level = 4")
        .replace('compute_dtype = "float32"', 'compute_dtype = "float16"'))
    monkeypatch.setenv("EDGEFORGE_TARGETS", str(user_targets))
    dist = tmp_path / "dist"

    def cli(*args):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        out, err = capsys.readouterr()
        return exit_info.value.code, out, err

    code, _, err = cli("build", tiny_model("llama32"), "--quant", "q4f16", "--target", "rpi4", "--target", "rpi4-f16",
                       "--backend", "onnx", "-o", dist, "--no-quality", "test speed")
    assert code == 0, err
    good, bad = dist / "tiny-llama320-q4f16-rpi4-onnx", dist / "tiny-llama320-q4f16-rpi4-f16-onnx"
    assert json.loads((good / "manifest.json").read_text())["target"]["cpu"] == "cortex-a72"
    code, out, err = cli("smoke", good, "--emulate", "--json")
    assert code == 0, err
    assert "emulating a cortex-a72" in err and json.loads(out)["status"] == "PASS"
    code, out, err = cli("smoke", bad, "--emulate", "--json")
    assert code == 2 and "SIGILL" in err and "PASS" not in out, (code, out, err)
