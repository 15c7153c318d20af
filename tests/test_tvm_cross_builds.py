"""Builds for machines this one cannot run: CUDA fatbins for every listed arch without a GPU, Metal
(macOS/iOS) tars of Mach-O objects with the shader source of every kernel, Android object tars."""

from __future__ import annotations

import json
import re
import tarfile

import pytest

pytest.importorskip("tvm")

from tvm_support import compile_tvm, cubin_arches, elf_aarch64, fatbin_entries, macho_arm64  # noqa: E402

from edgeforge.model.loader import load_model  # noqa: E402
from edgeforge.quant.qdir import write_qdir  # noqa: E402
from edgeforge.targets import get_target  # noqa: E402

pytestmark = pytest.mark.timeout(2400)  # CUDA builds may install the compiler wheels first (subprocess limit 1800 s)


@pytest.fixture(scope="module")
def qdir(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("tvm-cross")
    write_qdir(load_model(tiny_model("llama32")), "q4f16", root / "qdir")
    return root / "qdir"


def tar_members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


@pytest.mark.slow
def test_cuda_fatbin_has_real_code_for_every_arch(qdir, tmp_path):
    art = compile_tvm(qdir, "cuda", tmp_path / "cuda")
    artifact = json.loads((art / "artifact.json").read_text())
    arches = get_target("cuda").tvm["arches"]
    assert artifact["device_requirements"]["gpu_arch"] == arches
    entries = fatbin_entries((art / "model.so").read_bytes())
    cubins = {e["arch"] for e in entries if e["kind"] == 2 and e["elf_machine"] == 190}
    assert cubins == {int(a[3:]) for a in arches}, entries
    # PTX for the newest arch, so that a newer GPU can JIT it; the manifest says so, and which driver
    ptx = {e["arch"] for e in entries if e["kind"] == 1}
    assert ptx == {int(arches[-1][3:])}, entries
    req = artifact["device_requirements"]
    assert req["gpu_ptx"] == [arches[-1]] and req["min_driver_cuda"] >= 12000
    # no CUDA source left for a JIT at load time (there is no compiler on the device)
    assert b"extern \"C\" __global__" not in (art / "model.so").read_bytes()
    # the build loaded a stub libcuda.so.1 into this process: a GPU check afterwards must still say
    # "no device" cleanly (it once died with AttributeError: no cuInit in the stub)
    from edgeforge.runtime.hostcheck import cuda_gpus

    gpus, _, why = cuda_gpus()
    if not gpus:
        assert why


@pytest.mark.parametrize("target", ["metal-macos", "iphone"])
def test_metal_tar_has_macho_objects_and_shader_source(qdir, tmp_path, target):
    art = compile_tvm(qdir, target, tmp_path / target)
    artifact = json.loads((art / "artifact.json").read_text())
    assert artifact["device"] == "metal" and "link" in artifact["device_requirements"]
    members = tar_members(art / "model.tar")
    assert members and all(macho_arm64(data) for data in members.values()), list(members)
    blob = b"".join(members.values())
    # kernels the host code launches: named in the device-module table and defined in MSL
    defined = set(re.findall(rb"kernel void ([A-Za-z0-9_]+)\(", blob))
    assert len(defined) >= 10
    assert any(name.startswith(b"qmatmul") or b"qmatmul" in name for name in defined), sorted(defined)
    for name in defined:
        assert blob.count(name) >= 2, f"{name} defined in MSL but never referenced by the module"
    assert blob.count(b"#include <metal_stdlib>") >= len(defined)


def test_android_tar_has_aarch64_objects(qdir, tmp_path):
    art = compile_tvm(qdir, "android-arm64", tmp_path / "android")
    members = tar_members(art / "model.tar")
    assert members and all(elf_aarch64(data) for data in members.values()), list(members)
    assert json.loads((art / "artifact.json").read_text())["device_requirements"]["os"] == "android"


@pytest.mark.slow
def test_cuda_builds_with_the_pypi_compiler_when_the_machine_has_none(qdir, tmp_path):
    """A fresh machine or a hosted runner has no nvcc: the cuda target installs CUDA 13's compiler
    wheels from PyPI into the edgeforge cache (once) and builds real fatbins with them."""
    import os
    import shutil
    import subprocess
    import sys

    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and not (os.path.exists(os.path.join(d, "nvcc"))))
    env = dict(os.environ, PATH=path)
    assert shutil.which("nvcc", path=path) is None
    proc = subprocess.run([sys.executable, "-m", "edgeforge.cli", "compile", str(qdir), "--target", "cuda",
                           "--backend", "tvm", "-o", str(tmp_path / "cuda"), "--json"], capture_output=True,
                          text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    artifact = json.loads(proc.stdout)
    assert "cuda_13.0" in artifact["toolchain"]["nvcc"]  # the pinned wheel's "Build cuda_13.0.r13.0/..." line
    entries = fatbin_entries((tmp_path / "cuda" / "model.so").read_bytes())
    assert {e["arch"] for e in entries if e["kind"] == 2} == {80, 86, 89, 90}


@pytest.mark.slow
def test_jetson_orin_builds_with_cuda_12_nvrtc_from_pypi(qdir, tmp_path):
    """JetPack 6 runs CUDA 12, and PyPI has no CUDA 12 nvcc: jetson-orin compiles its kernels with
    NVRTC 12.6 from PyPI (installed once into the cache) into a cubin for sm_87, linked into an
    aarch64 .so; the artifact names the compiler and asks for a CUDA 12 driver."""
    art = compile_tvm(qdir, "jetson-orin", tmp_path / "jetson")
    artifact = json.loads((art / "artifact.json").read_text())
    so = (art / "model.so").read_bytes()
    assert elf_aarch64(so)
    assert set(cubin_arches(so)) == {87}, cubin_arches(so)
    assert not fatbin_entries(so)  # no fatbin (no PTX): one cubin for the one arch
    assert b"extern \"C\" __global__" not in so  # no CUDA source left for a JIT at load time
    assert artifact["toolchain"]["nvrtc"].startswith("NVRTC 12.")
    req = artifact["device_requirements"]
    assert req["gpu_arch"] == ["sm_87"] and req["gpu_ptx"] == [] and req["min_driver_cuda"] == 12000


@pytest.mark.slow
def test_cuda_12_with_several_arches_is_refused_by_name(qdir, tmp_path):
    """NVRTC builds one arch: a CUDA 12 target listing two is refused before compiling, naming both."""
    import subprocess
    import sys

    toml = tmp_path / "orin2.toml"
    toml.write_text(get_target("jetson-orin").path.read_text().replace('arches = ["sm_87"]', 'arches = ["sm_72", "sm_87"]')
                    .replace('name = "jetson-orin"', 'name = "orin2"'))
    proc = subprocess.run([sys.executable, "-m", "edgeforge.cli", "compile", str(qdir), "--target", str(toml),
                           "--backend", "tvm", "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "one arch" in proc.stderr and "sm_72" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("target", ["cuda", "metal-macos"])
def test_asymmetric_q4_builds_for_the_gpu_codegens(tiny_model, tmp_path, target):
    """q4f16_m's q4a kernels (zero points two a byte, an odd number of groups in ffn down) through
    the GPU schedules and code generators: a uint8 vector shift once broke CUDA's codegen."""
    write_qdir(load_model(tiny_model("llama2")), "q4f16_m", tmp_path / "qdir")
    quant = json.loads((tmp_path / "qdir" / "quantization.json").read_text())
    assert any(t["format"] == "q4a" and t["shape"][1] % 64 for t in quant["tensors"].values())
    art = compile_tvm(tmp_path / "qdir", target, tmp_path / target)
    artifact = json.loads((art / "artifact.json").read_text())
    assert artifact["device"] == ("cuda" if target == "cuda" else "metal")
