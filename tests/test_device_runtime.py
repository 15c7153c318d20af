"""TVM bundles carry a runtime-only TVM for their device's CPU (no ~300 MB compiler wheel on the
device), the manifest states what the device installs, and the bundle's own TVM is what runs: on
this machine, and for aarch64 under qemu in a root that has no TVM at all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tvm")

from tvm_support import elf_aarch64  # noqa: E402

from edgeforge import toolchains  # noqa: E402

pytestmark = pytest.mark.timeout(1800)  # aarch64 wheels download and emulated runs (subprocess limit 900 s)

MB = 1_000_000


def _build(tiny_model, target: str, out: Path) -> Path:
    proc = subprocess.run([sys.executable, "-m", "edgeforge.cli", "build", str(tiny_model("llama32")), "--quant", "q4f16",
                           "--target", target, "--backend", "tvm", "-o", str(out), "--json"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (bundle,) = [p for p in out.iterdir() if (p / "manifest.json").is_file()]
    return bundle


@pytest.fixture(scope="module")
def x86_bundle(tiny_model, tmp_path_factory):
    return _build(tiny_model, "x86-cpu", tmp_path_factory.mktemp("devrt") / "dist")


def _check_layout(bundle: Path, arch_check) -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    tvm_dir = bundle / "runtime" / "tvm"
    libs = sorted(p.name for p in (tvm_dir / "lib").iterdir())
    assert libs == ["libtvm_runtime.so"], libs  # no compiler, no extras
    assert arch_check((tvm_dir / "lib" / "libtvm_runtime.so").read_bytes())
    # the libraries and the version file: no Python package (it would need numpy), no compiler
    assert sorted(p.relative_to(tvm_dir).as_posix() for p in tvm_dir.rglob("*") if p.is_file()) == \
        ["_version.py", "lib/libtvm_runtime.so"]
    # every carried file is checksummed like the rest of the bundle
    carried = [p.relative_to(bundle).as_posix() for p in tvm_dir.rglob("*") if p.is_file()]
    assert carried and all(rel in manifest["files"] for rel in carried)
    reqs = (bundle / "requirements.txt").read_text().split()
    assert not any(r.startswith("apache-tvm==") for r in reqs), reqs
    assert any(r.startswith("apache-tvm-ffi==") for r in reqs)
    # the engine needs neither TVM's Python package nor numpy (~56 MB): not installed on the device
    assert not any(r.startswith(("numpy==", "ml_dtypes==")) for r in reqs), reqs
    info = manifest["device_install"]
    size = sum(p.stat().st_size for p in tvm_dir.rglob("*") if p.is_file())
    assert info["bundled_runtime_bytes"] == size and 1 * MB < size < 10 * MB, size
    pkgs = info["packages"]
    assert {"tokenizers", "jinja2", "apache-tvm-ffi"} <= set(pkgs) and not {"numpy", "ml-dtypes"} & set(pkgs)
    assert not info["unmeasured"], info["unmeasured"]
    assert info["installed_bytes"] == size + sum(p["installed_bytes"] for p in pkgs.values())
    assert "Device install" in (bundle / "README.md").read_text()
    return info


def test_x86_bundle_carries_and_runs_its_own_runtime_only_tvm(x86_bundle):
    info = _check_layout(x86_bundle, lambda b: b[:4] == b"\x7fELF" and b[18] == 62)  # EM_X86_64
    assert info["arch"] == "x86_64"
    # the bundle's smoke.py, run by this machine's Python (which has the full apache-tvm installed):
    # the TVM that runs is the bundle's, without its compiler library
    proc = subprocess.run([sys.executable, "smoke.py", "--json"], cwd=x86_bundle, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["status"] == "PASS"
    assert result["runtime"]["tvm_from"] == "bundle" and result["runtime"]["compiler_loaded"] is False


def test_a_tvm_bundle_runs_without_numpy(x86_bundle):
    """requirements.txt of a TVM bundle has no numpy: its smoke must PASS where numpy cannot be
    imported (hidden here, as on a device that never installed it)."""
    code = ("import runpy, sys; sys.modules['numpy'] = None; sys.argv = ['smoke.py', '--json']; "
            "runpy.run_path('smoke.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=x86_bundle, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["status"] == "PASS" and result["runtime"]["numpy_loaded"] is False
    assert result["max_logit_err"] <= result["tolerance"] and result["tokens_agree"] == result["tokens_total"]


def test_a_modified_carried_tvm_file_never_runs(x86_bundle, tmp_path):
    import shutil

    bundle = Path(shutil.copytree(x86_bundle, tmp_path / "b"))
    marker = tmp_path / "ran"
    lib = bundle / "runtime" / "tvm" / "lib" / "libtvm_runtime.so"
    lib.write_bytes(lib.read_bytes()[:-1] + bytes([lib.read_bytes()[-1] ^ 1]))  # one bit flipped
    version = bundle / "runtime" / "tvm" / "_version.py"  # would run if anything imported it
    version.write_text(f"open({str(marker)!r}, 'w').write('x')\n" + version.read_text())
    proc = subprocess.run([sys.executable, "smoke.py", "--json"], cwd=bundle, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and ("runtime/tvm/lib/libtvm_runtime.so" in out or "runtime/tvm/_version.py" in out), out[-2000:]
    assert not marker.exists()


@pytest.mark.slow
def test_rpi5_bundle_runs_its_aarch64_tvm_under_qemu(tiny_model, tmp_path):
    """The emulated device has no TVM (scripts/setup-arm64.sh installs none): the PASS proves the
    bundle's aarch64 runtime-only TVM, taken from the apache-tvm wheel of the compiler's version."""
    root = toolchains.ensure_arm64()
    assert not (root / toolchains.ARM64_SITE / "tvm").exists()
    bundle = _build(tiny_model, "rpi5", tmp_path / "dist")
    info = _check_layout(bundle, elf_aarch64)
    assert info["arch"] == "aarch64" and info["download_bytes"] and info["download_bytes"] < info["installed_bytes"]
    assert info["installed_bytes"] <= 60 * MB, info["installed_bytes"]  # issue 14's budget for the device install
    proc = subprocess.run([sys.executable, "-m", "edgeforge.cli", "smoke", str(bundle), "--emulate", "--json"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["status"] == "PASS"
    assert result["runtime"]["tvm_from"] == "bundle" and result["runtime"]["compiler_loaded"] is False


def test_the_runtime_follows_the_target_arch_not_the_triple_spelling(tiny_model, tmp_path):
    """`arm64-linux-gnu` is LLVM's other spelling of aarch64: the bundle must still carry an aarch64
    libtvm_runtime (it once carried this machine's x86-64 one); an arch with no runtime is refused."""
    from edgeforge.targets import get_target

    text = get_target("rpi5").path.read_text().replace('name = "rpi5"', 'name = "arm64x"')
    (tmp_path / "arm64x.toml").write_text(text.replace('mtriple = "aarch64-linux-gnu"', 'mtriple = "arm64-linux-gnu"'))
    bundle = _build(tiny_model, str(tmp_path / "arm64x.toml"), tmp_path / "dist")
    assert elf_aarch64((bundle / "runtime" / "tvm" / "lib" / "libtvm_runtime.so").read_bytes())
    (tmp_path / "rv.toml").write_text(text.replace('name = "rpi5"', 'name = "rv"').replace('arch = "aarch64"', 'arch = "riscv64"'))
    proc = subprocess.run([sys.executable, "-m", "edgeforge.cli", "build", str(tiny_model("llama32")), "--quant", "q4f16",
                           "--target", str(tmp_path / "rv.toml"), "--backend", "tvm", "-o", str(tmp_path / "rv"),
                           "--no-quality", "t"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "riscv64" in proc.stderr and "Traceback" not in proc.stderr


def test_another_tvm_on_the_library_path_is_never_mixed_in(x86_bundle):
    """TVM_LIBRARY_PATH pointing at another TVM (here the compiler's) used to make TVM's Python package
    load that libtvm_runtime; the engine loads the bundle's library by its path, so it still runs
    the bundle's own (and a process that imported another tvm is refused: test_tvm_x86)."""
    import tvm

    other = Path(tvm.__file__).resolve().parent / "lib"
    env = dict(__import__("os").environ, TVM_LIBRARY_PATH=str(other))
    proc = subprocess.run([sys.executable, "smoke.py", "--json"], cwd=x86_bundle, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:]
    runtime = json.loads(proc.stdout)["runtime"]
    assert runtime["tvm_from"] == "bundle" and "runtime/tvm/lib/libtvm_runtime.so" in runtime["tvm_library"]
    assert str(other) not in runtime["tvm_library"]


def test_an_empty_pythonpath_entry_does_not_import_from_the_bundle(x86_bundle, tmp_path):
    """PYTHONPATH=: (an empty entry = the current folder) run inside the bundle: a planted pathlib.py
    must not run before (or after) verification."""
    import os
    import shutil

    bundle = Path(shutil.copytree(x86_bundle, tmp_path / "b"))
    marker = tmp_path / "ran"
    (bundle / "pathlib.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nraise SystemExit(9)\n")
    env = dict(os.environ, PYTHONPATH=":")
    # -S: a device's plain Python. Here, site's .pth of the editable edgeforge install imports pathlib
    # while the interpreter starts, before smoke.py runs: nothing in a script can stop that (nor a
    # sitecustomize.py), which is why the READMEs say `python -I smoke.py` for bundles from elsewhere.
    proc = subprocess.run([sys.executable, "-S", "smoke.py"], cwd=bundle, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 2 and "pathlib.py" in proc.stderr, proc.stderr[-1000:]
    assert not marker.exists()
