"""Issue 14: edgeforge installed from its wheel, in a fresh venv, run from outside the checkout:
target presets and toolchain scripts ship inside the package, and the main job works."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(2400)  # builds and installs the wheel (subprocess limit 1800 s)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    work = tmp_path_factory.mktemp("wheel")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                          "-w", str(work / "dist")], capture_output=True, text=True, cwd=work, timeout=600)
    assert out.returncode == 0, out.stderr
    (wheel,) = (work / "dist").glob("edgeforge-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[onnx,tvm]"],
                         capture_output=True, text=True, timeout=1800, env=_outside_env())
    assert pip.returncode == 0, pip.stderr[-2000:]
    shutil.rmtree(work / "dist")
    return venv, work


def _outside_env() -> dict:
    """The environment without the caller's checkout: with it on PYTHONPATH (its edgeforge.egg-info), pip
    skipped installing the wheel and `import edgeforge` found the checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _edf(venv: Path, cwd: Path, *args, timeout=1800, hide_nvcc=False):
    env = _outside_env()
    path = env.get("PATH", "").split(os.pathsep)
    if hide_nvcc:  # a fresh machine or a hosted runner has no nvcc, and no GPU (hidden where there is one)
        path = [d for d in path if d and not os.path.exists(os.path.join(d, "nvcc"))]
        env["CUDA_VISIBLE_DEVICES"] = ""
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    return subprocess.run([str(venv / "bin" / "edgeforge"), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


@pytest.mark.slow
def test_wheel_has_every_target_and_script(wheel_venv):
    venv, work = wheel_venv
    proc = _edf(venv, work, "targets", "--json")
    assert proc.returncode == 0, proc.stderr
    names = {row["name"] for row in json.loads(proc.stdout)}
    assert names == {p.stem for p in (ROOT / "targets").glob("*.toml")}
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import edgeforge, pathlib; "
                           "p = pathlib.Path(edgeforge.__file__).parent; print(p); "
                           "print(sorted(x.name for x in (p / '_scripts').iterdir()))"],
                          capture_output=True, text=True, cwd=work, env=_outside_env())
    pkg = Path(site.stdout.splitlines()[0])
    assert ROOT not in pkg.parents, "the test must use the installed package, not the checkout"
    assert "setup-arm64.sh" in site.stdout and "setup-vulkan.sh" in site.stdout
    # the kernels' sources, which x86 ONNX builds compile from the installed package
    assert {"ort_abi.h", "kernels.c", "op.c"} <= {p.name for p in (pkg / "backends" / "onnx" / "kernels").iterdir()}


@pytest.mark.slow
def test_wheel_builds_and_smokes_smollm2(wheel_venv, smollm2_gguf):
    venv, work = wheel_venv
    proc = _edf(venv, work, "build", "smollm2-135m", "--quant", "q4f16", "--target", "x86-cpu", "-o", "dist", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (bundle,) = json.loads(proc.stdout)["bundles"]
    assert bundle["backend"] == "onnx" and bundle["smoke"] == "PASS"  # auto: the faster backend on x86
    art = json.loads((work / bundle["path"] / "artifact" / "artifact.json").read_text())
    assert art["onnx"]["custom_ops"]["library"] == "libedgeforge_kernels.so"  # built from the wheel's sources
    proc = _edf(venv, work, "smoke", bundle["path"])
    assert proc.returncode == 0 and proc.stdout.startswith("PASS"), proc.stderr[-2000:]


@pytest.mark.slow
def test_wheel_builds_rpi5_and_smokes_it_under_qemu(wheel_venv, smollm2_gguf):
    """From the wheel alone: the arm64 toolchain through the packaged scripts, a SmolLM2 rpi5 TVM
    bundle (it carries its own aarch64 runtime-only TVM), and its smoke test under qemu."""
    venv, work = wheel_venv
    proc = _edf(venv, work, "toolchains", "install", "arm64")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _edf(venv, work, "build", "smollm2-135m", "--quant", "q4f16", "--target", "rpi5", "--backend", "tvm",
                "-o", "dist-arm", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (bundle,) = json.loads(proc.stdout)["bundles"]
    manifest = json.loads((work / bundle["path"] / "manifest.json").read_text())
    assert manifest["device_install"]["arch"] == "aarch64" and manifest["device_install"]["bundled_runtime_bytes"] > 0
    proc = _edf(venv, work, "smoke", bundle["path"], "--emulate", "--prompts", "1", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["status"] == "PASS" and result["runtime"]["tvm_from"] == "bundle"


@pytest.mark.slow
def test_wheel_builds_cuda_with_the_registry_nvcc(wheel_venv, tiny_model):
    """From the wheel alone, with no nvcc on PATH: `cuda` installs nvcc 13 from PyPI into the cache
    (once) and builds real fatbins; the build says it cannot smoke here (no GPU), exit 0."""
    venv, work = wheel_venv
    proc = _edf(venv, work, "build", str(tiny_model("llama32")), "--quant", "q4f16", "--target", "cuda",
                "--backend", "tvm", "-o", "dist-cuda", "--json", hide_nvcc=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (bundle,) = json.loads(proc.stdout)["bundles"]
    manifest = json.loads((work / bundle["path"] / "manifest.json").read_text())
    assert "cuda_13" in manifest["toolchain"]["nvcc"]
    assert manifest["device_requirements"]["gpu_arch"] == ["sm_80", "sm_86", "sm_89", "sm_90"]
    assert bundle["smoke"].startswith("not run here")
    assert (work / bundle["path"] / "runtime" / "tvm" / "lib" / "libtvm_runtime_cuda.so").is_file()
