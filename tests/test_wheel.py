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
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[onnx]"],
                         capture_output=True, text=True, timeout=1800)
    assert pip.returncode == 0, pip.stderr[-2000:]
    shutil.rmtree(work / "dist")
    return venv, work


def _edf(venv: Path, cwd: Path, *args, timeout=1800):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
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
                          capture_output=True, text=True, cwd=work)
    pkg = Path(site.stdout.splitlines()[0])
    assert ROOT not in pkg.parents, "the test must use the installed package, not the checkout"
    assert "setup-arm64.sh" in site.stdout and "setup-vulkan.sh" in site.stdout


@pytest.mark.slow
def test_wheel_builds_and_smokes_smollm2(wheel_venv, smollm2_gguf):
    venv, work = wheel_venv
    proc = _edf(venv, work, "build", "smollm2-135m", "--quant", "q4f16", "--target", "x86-cpu", "-o", "dist", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (bundle,) = json.loads(proc.stdout)["bundles"]
    assert bundle["backend"] == "onnx" and bundle["smoke"] == "PASS"  # auto: the faster backend on x86
    proc = _edf(venv, work, "smoke", bundle["path"])
    assert proc.returncode == 0 and proc.stdout.startswith("PASS"), proc.stderr[-2000:]
