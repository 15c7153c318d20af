"""Can this machine run a bundle? Answered from manifest.json before any native code is loaded.

Every refusal is a CannotRunHere (exit 2) whose message starts with "cannot run here:" and says what
the bundle needs, so a Metal or CUDA bundle on the wrong machine is never reported as a PASS or FAIL.
"""

from __future__ import annotations

import ctypes
import platform
import sys

from .bundle_errors import CannotRunHere

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


def host_arch() -> str:
    m = platform.machine().lower()
    return _ARCH_ALIASES.get(m, m)


def host_os() -> str:
    if hasattr(sys, "getandroidapilevel"):
        return "android"
    return {"Darwin": "macos", "Linux": "linux", "Windows": "windows"}.get(platform.system(), platform.system().lower())


def check_can_run(manifest: dict) -> None:
    target = manifest.get("target", {})
    name, want_os, want_arch = target.get("name", "?"), target.get("os", "linux"), target.get("arch", host_arch())
    device = manifest.get("device", "cpu")
    here = f"this is {host_os()} {host_arch()}"
    if want_os == "ios":
        raise CannotRunHere(f"cannot run here: target '{name}' needs an iOS app that links artifact/ "
                            f"(TVM objects + Metal shaders); there is no Python smoke on iOS ({here})")
    if want_os != host_os():
        raise CannotRunHere(f"cannot run here: target '{name}' needs {_os_name(want_os)} on {want_arch}"
                            f"{' with Metal' if device == 'metal' else ''} ({here})")
    if want_arch != host_arch():
        hint = " (on a build machine, `edgeforge smoke --emulate` runs it under qemu)" if want_arch == "aarch64" else ""
        raise CannotRunHere(f"cannot run here: target '{name}' needs an {want_arch} CPU, {here}{hint}")
    if device.startswith("cuda"):
        check_cuda(manifest.get("device_requirements", {}))


def _os_name(os_key: str) -> str:
    return {"macos": "macOS", "linux": "Linux", "android": "Android", "windows": "Windows"}.get(os_key, os_key)


def cuda_device_count() -> tuple[int, str]:
    """Number of CUDA devices through the driver API (libcuda), and why there are none."""
    names = {"linux": ["libcuda.so.1", "libcuda.so"], "windows": ["nvcuda.dll"]}.get(host_os(), [])
    for lib in names:
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        if cuda.cuInit(0) != 0:
            return 0, f"{lib} found but cuInit failed (no GPU or driver mismatch)"
        count = ctypes.c_int(0)
        if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0, "cuDeviceGetCount failed"
        return count.value, ""
    return 0, "no NVIDIA driver (libcuda) on this machine"


def check_cuda(requirements: dict) -> None:
    count, why = cuda_device_count()
    if count == 0:
        arches = ", ".join(requirements.get("gpu_arch", [])) or "any"
        raise CannotRunHere(f"cannot run here: no CUDA device ({why}); the bundle needs an NVIDIA GPU ({arches})")
