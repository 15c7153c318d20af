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


def cpu_arch(name: str) -> str:
    """A CPU architecture in edgeforge's spelling (x86_64, aarch64), from any common alias."""
    m = name.lower()
    return _ARCH_ALIASES.get(m, m)


def host_arch() -> str:
    return cpu_arch(platform.machine())


def host_os() -> str:
    if hasattr(sys, "getandroidapilevel"):
        return "android"
    return {"Darwin": "macos", "Linux": "linux", "Windows": "windows"}.get(platform.system(), platform.system().lower())


def check_can_run(manifest: dict) -> None:
    target = manifest.get("target", {})
    name, want_os, want_arch = target.get("name", "?"), target.get("os", "linux"), target.get("arch", host_arch())
    device = manifest.get("device", "cpu")
    here = f"this is {host_os()} {host_arch()}"
    if want_os == "web":
        raise CannotRunHere(f"cannot run here: target '{name}' is a web page: serve the bundle (`edgeforge serve BUNDLE`) "
                            "and open it in a browser; `edgeforge smoke` runs it in headless Chromium")
    if want_os == "ios":
        raise CannotRunHere(f"cannot run here: target '{name}' needs an iOS app that links artifact/ "
                            f"(TVM objects + Metal shaders); there is no Python smoke on iOS ({here})")
    if want_os != host_os():
        raise CannotRunHere(f"cannot run here: target '{name}' needs {_os_name(want_os)} on {want_arch}"
                            f"{' with Metal' if device == 'metal' else ''} ({here})")
    if want_arch != host_arch():
        gpu = device.startswith("cuda")
        hint = (" (on a build machine, `edgeforge smoke --emulate` runs it under qemu)"
                if want_arch == "aarch64" and not gpu else "")
        raise CannotRunHere(f"cannot run here: target '{name}' needs an {want_arch} CPU"
                            f"{' with an NVIDIA GPU' if gpu else ''}, {here}{hint}")
    if device.startswith("cuda"):
        check_cuda(manifest.get("device_requirements", {}))
    check_cpu_features(manifest.get("device_requirements", {}).get("cpu_features") or [], name)


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags as Linux names them (/proc/cpuinfo), None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def check_cpu_features(required: list[str], name: str = "?") -> None:
    """Refuse a bundle whose native kernels need instructions this CPU lacks (they would fault)."""
    flags = cpu_flags() if required else None
    if flags is None:
        return
    missing = [f for f in required if f not in flags]
    if missing:
        raise CannotRunHere(f"cannot run here: target '{name}' runs kernels that need the CPU features "
                            f"{', '.join(required)}; this CPU lacks {', '.join(missing)}")


def _os_name(os_key: str) -> str:
    return {"macos": "macOS", "linux": "Linux", "android": "Android", "windows": "Windows"}.get(os_key, os_key)


# cuDeviceGetAttribute codes (CUdevice_attribute in cuda.h)
_CC_MAJOR, _CC_MINOR = 75, 76


def _libcuda():
    """(the CUDA driver library with cuInit done, None) or (None, why there is none)."""
    names = {"linux": ["libcuda.so.1", "libcuda.so"], "windows": ["nvcuda.dll"]}.get(host_os(), [])
    for lib in names:
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        try:
            if cuda.cuInit(0) != 0:
                return None, f"{lib} found but cuInit failed (no GPU or driver mismatch)"
        except AttributeError:  # not a real driver (a build-time stub, say)
            return None, f"{lib} is not an NVIDIA driver (no cuInit)"
        return cuda, ""
    return None, "no NVIDIA driver (libcuda) on this machine"


def cuda_gpus() -> tuple[list[dict], int | None, str]:
    """The CUDA devices through the driver API (libcuda): [{index, name, sm}], the driver's CUDA
    version (e.g. 13000), and why there are none. `sm` is the compute capability as 'sm_90'."""
    cuda, why = _libcuda()
    if cuda is not None:
        driver = ctypes.c_int(0)
        cuda.cuDriverGetVersion(ctypes.byref(driver))
        count = ctypes.c_int(0)
        if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return [], driver.value or None, "cuDeviceGetCount failed"
        gpus = []
        for i in range(count.value):
            dev, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
            name = ctypes.create_string_buffer(256)
            cuda.cuDeviceGet(ctypes.byref(dev), i)
            cuda.cuDeviceGetName(name, 256, dev)
            cuda.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, dev)
            cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, dev)
            gpus.append({"index": i, "name": name.value.decode(errors="replace"), "sm": f"sm_{major.value}{minor.value}"})
        return gpus, driver.value or None, ""
    return [], None, why


def cuda_memory(index: int = 0) -> tuple[int | None, int | None]:
    """(free, total) bytes of CUDA device `index` through the driver API, each None where unknown.

    Free memory is read in the device's primary context (the one the CUDA runtime, hence ONNX Runtime's
    CUDA EP and TVM, uses) only when that context is already active: asking never creates a context
    (hundreds of MB of device memory) for a process that has not used the GPU yet. Without it, or
    without a driver: total only, or nothing. Never raises."""
    try:
        cuda, _ = _libcuda()
        if cuda is None:
            return None, None
        dev, size = ctypes.c_int(0), ctypes.c_size_t(0)
        if cuda.cuDeviceGet(ctypes.byref(dev), int(index)) != 0:
            return None, None
        total = size.value if cuda.cuDeviceTotalMem_v2(ctypes.byref(size), dev) == 0 and size.value else None
        flags, active = ctypes.c_uint(0), ctypes.c_int(0)
        if cuda.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active)) != 0 or not active.value:
            return None, total
        ctx = ctypes.c_void_p()
        if cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) != 0:
            return None, total
        free, whole = ctypes.c_size_t(0), ctypes.c_size_t(0)
        try:
            if cuda.cuCtxPushCurrent_v2(ctx) != 0:
                return None, total
            try:
                ok = cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(whole)) == 0
            finally:
                cuda.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
        finally:
            release = getattr(cuda, "cuDevicePrimaryCtxRelease_v2", None) or cuda.cuDevicePrimaryCtxRelease
            release(dev)
        return (free.value, whole.value or total) if ok else (None, total)
    except (AttributeError, OSError, ValueError):  # an old or partial driver: unknown
        return None, None


def cuda_device_count() -> tuple[int, str]:
    """Number of CUDA devices, and why there are none."""
    gpus, _, why = cuda_gpus()
    return len(gpus), why


def _sm_number(arch: str) -> tuple[int, int, bool]:
    """'sm_86' -> (8, 6, False); 'sm_90a' -> (9, 0, True): arch-specific code runs on that chip only."""
    digits = arch.removeprefix("sm_").removeprefix("compute_")
    specific = digits.endswith(("a", "f"))
    digits = digits.rstrip("af")
    return int(digits[:-1]), int(digits[-1]), specific


def sass_runs_on(arch: str, gpu_sm: str) -> bool:
    """Machine code (SASS) for `arch` runs on a GPU of the same major version and an equal or newer
    minor one (sm_80 code runs on sm_86 and sm_89, never on sm_90); sm_90a only on sm_90."""
    major, minor, specific = _sm_number(arch)
    g_major, g_minor, _ = _sm_number(gpu_sm)
    return major == g_major and (minor == g_minor if specific else minor <= g_minor)


def ptx_runs_on(arch: str, gpu_sm: str) -> bool:
    """PTX for `arch` is compiled by the driver for any GPU of that arch or newer."""
    return _sm_number(arch)[:2] <= _sm_number(gpu_sm)[:2]


def check_cuda(requirements: dict) -> dict:
    """Refuse, by name, a machine whose GPU 0 the bundle has no code for, or whose driver is older
    than the bundle's CUDA. Returns GPU 0's description for the result."""
    gpus, driver, why = cuda_gpus()
    arches = list(requirements.get("gpu_arch", []))
    ptx = list(requirements.get("gpu_ptx", []))
    if not gpus:
        raise CannotRunHere(f"cannot run here: no CUDA device ({why}); the bundle needs an NVIDIA GPU "
                            f"({', '.join(arches) or 'any'})")
    gpu = gpus[0]
    if arches and not (any(sass_runs_on(a, gpu["sm"]) for a in arches) or any(ptx_runs_on(a, gpu["sm"]) for a in ptx)):
        have = ", ".join(arches) + (f" (PTX: {', '.join(ptx)})" if ptx else "")
        raise CannotRunHere(f"cannot run here: GPU 0 is {gpu['name']} ({gpu['sm']}); the bundle has code for {have} "
                            f"only: rebuild with {gpu['sm']!r} in the target's [tvm] arches")
    need = requirements.get("min_driver_cuda")
    if need and driver and driver < int(need):
        raise CannotRunHere(f"cannot run here: the NVIDIA driver supports CUDA {_cuda_version(driver)}; the bundle "
                            f"was built with CUDA {_cuda_version(int(need))} and needs a driver that supports it")
    return dict(gpu, driver_cuda=_cuda_version(driver) if driver else None)


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"
