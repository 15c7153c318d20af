"""What this machine can build and run: `edgeforge doctor`, `edgeforge targets`, `edgeforge plan`."""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
import shutil
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from .. import toolchains
from ..runtime.backends import BACKENDS
from ..errors import EdgeforgeError
from ..runtime.hostcheck import cuda_device_count, host_arch


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _tool(name: str, args=("--version",)) -> tuple[bool, str]:
    path = shutil.which(name)
    if not path:
        return False, f"{name} not found on PATH"
    try:
        out = subprocess.run([path, *args], capture_output=True, text=True, timeout=20)
        lines = [l for l in (out.stdout + out.stderr).splitlines() if l.strip()]
        return True, f"{path}: {lines[-1] if name == 'nvcc' else lines[0] if lines else ''}".strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"{path}: {err}"


def _package(dist: str, module: str) -> tuple[bool, str]:
    ver = _version(dist)
    if ver is None or importlib.util.find_spec(module) is None:
        return False, f"{dist} not installed"
    return True, f"{dist} {ver}"


def _web_toolchain() -> tuple[bool, str]:
    """The pinned npm packages web bundles ship (scripts/setup-web.sh; nothing is installed here)."""
    from ..toolchains import toolchains_dir
    from ..web.assets import node_modules

    try:
        return True, str(node_modules(toolchains_dir() / "web"))
    except EdgeforgeError as err:
        return False, str(err)


def _toolchain(probe: str) -> tuple[bool, str]:
    """Ask edgeforge.toolchains about the arm64 root and the WebGPU venv + lavapipe (nothing is built)."""
    try:
        if probe == "arm64 root":
            root = toolchains.arm64_root()
            return (True, str(root)) if root else (False, "not built: run scripts/setup-arm64.sh")
        found = toolchains.vulkan_env()
        if not found:
            return False, "not built: run scripts/setup-vulkan.sh"
        if probe == "onnxruntime-webgpu":
            return True, str(found[0])
        devices = toolchains.vulkan_devices(found[1])
        return (True, ", ".join(str(d.get("name", d)) for d in devices)) if devices else (False, "lavapipe: no Vulkan device seen")
    except Exception as err:  # noqa: BLE001 - any probe failure is a doctor line, not a crash
        return False, f"{type(err).__name__}: {err}"


def _cuda_compiler(major: int) -> tuple[bool, str]:
    """A system nvcc of that CUDA major, or the PyPI wheels in the cache (nothing is installed here)."""
    try:
        found = toolchains.cuda_toolchain(major)
    except Exception as err:  # noqa: BLE001 - any probe failure is a doctor line, not a crash
        return False, f"{type(err).__name__}: {err}"
    if found is None:
        return False, f"no CUDA {major} compiler: edgeforge toolchains install {'cuda' if major == 13 else f'cuda{major}'}"
    return True, f"{found.kind} {found.path}"


def _gpu() -> tuple[bool, str]:
    count, why = cuda_device_count()
    return (True, f"{count} CUDA device(s)") if count else (False, why)


def _vulkan_loader() -> tuple[bool, str]:
    lib = ctypes.util.find_library("vulkan")
    return (True, f"Vulkan loader {lib}") if lib else (False, "no Vulkan loader (libvulkan1) on the system path")


CHECKS = {
    "apache-tvm": lambda: _package("apache-tvm", "tvm"),
    "onnx": lambda: _package("onnx", "onnx"),
    "onnxruntime": lambda: _package("onnxruntime", "onnxruntime"),
    "paramiko (ssh)": lambda: _package("paramiko", "paramiko"),
    "nvcc": lambda: _tool("nvcc"),
    "CUDA 13 compiler": lambda: _cuda_compiler(13),
    "CUDA 12 compiler": lambda: _cuda_compiler(12),
    "aarch64 g++": lambda: _tool("aarch64-linux-gnu-g++"),
    "qemu-aarch64": lambda: _tool("qemu-aarch64-static"),
    "arm64 root": lambda: _toolchain("arm64 root"),
    "onnxruntime-webgpu": lambda: _toolchain("onnxruntime-webgpu"),
    "lavapipe": lambda: _toolchain("lavapipe"),
    "chromium": lambda: _tool(os.environ.get("EDGEFORGE_CHROMIUM") or "chromium"),  # web/browser.py's choice
    "onnxruntime-web (npm)": lambda: _web_toolchain(),
    "playwright (web)": lambda: _package("playwright", "playwright"),
    "CUDA GPU": _gpu,
    "Vulkan loader": _vulkan_loader,
}


@lru_cache(maxsize=None)
def check(name: str) -> tuple[bool, str]:
    return CHECKS[name]()


def checks() -> list[dict]:
    return [{"name": n, "ok": check(n)[0], "detail": check(n)[1]} for n in CHECKS]


def _build_needs(target, backend: str) -> list[str]:
    needs = [BACKENDS[backend].compile_check]
    if backend != "tvm":
        return needs
    if target.tvm.get("cross_compiler"):
        needs.append("aarch64 g++")
    if (target.tvm.get("device") or {}).get("kind") == "cuda":
        needs.append(f"CUDA {target.tvm.get('cuda', 13)} compiler")
    return needs


RUN_NEEDS = {"qemu": ["qemu-aarch64", "arm64 root"], "cuda": ["CUDA GPU"],
             "browser": ["chromium", "onnxruntime-web (npm)", "playwright (web)"],
             "vulkan": ["onnxruntime-webgpu", "lavapipe"], "host": []}


def target_row(target) -> dict:
    missing, can_build = [], {}
    for b in target.backends:
        lacking = [n for n in _build_needs(target, b) if not check(n)[0]]
        can_build[b] = not lacking
        missing += [f"build {b}: {check(n)[1]}" for n in lacking]
    if target.run == "none":
        can_run, missing = False, missing + [f"run: needs a real {target.os} {target.arch} device"]
    elif target.run == "host" and target.arch != host_arch():
        can_run, missing = False, missing + [f"run: needs an {target.arch} host"]
    else:
        lacking = [n for n in RUN_NEEDS.get(target.run, []) if not check(n)[0]]
        can_run = not lacking
        missing += [f"run: {check(n)[1]}" for n in lacking]
    return {"name": target.name, "description": target.description, "backends": list(target.backends),
            "auto_backend": target.backends[0], "auto_why": target.backend_why, "run": target.run, "os": target.os, "arch": target.arch,
            "cpu": target.cpu or None, "can_build": can_build,
            "can_run": can_run, "missing": missing, "path": str(target.path)}


def target_rows() -> list[dict]:
    from ..targets import list_targets

    return [target_row(t) for t in list_targets()]


SMOKE_MODE = {"host": "host", "qemu": "emulate", "cuda": "gpu", "vulkan": "vulkan", "browser": "browser", "none": "none"}


def github_matrix(config: Path) -> dict:
    """{"include": [...]}: one job per target of the config, with its backends and how to smoke it."""
    from .config import config_targets, expand, read_config

    raw = read_config(config)
    include = []
    for name, backends in config_targets(raw, config).items():
        pairs = expand(name, backends, str(config))
        target = pairs[0][0]
        include.append({"target": name, "backends": " ".join(b for _, b in pairs), "run": target.run,
                        "smoke": SMOKE_MODE.get(target.run, "none"), "os": target.os, "arch": target.arch})
    return {"include": include}
