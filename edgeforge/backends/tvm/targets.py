"""From a target preset's [tvm] table to a TVM target, a build environment and an export step.

[tvm] keys used here (targets/*.toml):
  host            dict TVM target for the CPU side (kind llvm, mtriple, mcpu, mattr)
  device          dict for the GPU side ({kind = "cuda"} or {kind = "metal"}); absent on CPU targets
  arches          CUDA archs to embed real code for (default sm_80, sm_86, sm_89, sm_90)
  cross_compiler  the C++ driver that links the .so (aarch64-linux-gnu-g++); absent: host g++
  export          "so" (shared library) or "tar" (objects for the app / the Mac to link)
  cuda            CUDA major version to build with (13; jetson-orin: 12): a system nvcc of that
                  version, else the PyPI compiler wheels (edgeforge toolchains install cuda|cuda12):
                  nvcc for 13 (a fatbin for every arch + PTX), NVRTC for 12 (one arch, a cubin)
  cuda_graph      CUDA: run decode as CUDA graphs (default true; false for an A/B or a driver that
                  mishandles graphs)
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ... import toolchains
from ...errors import EdgeforgeError
from ...nvrtc import Nvrtc

DEFAULT_CUDA_ARCHES = ["sm_80", "sm_86", "sm_89", "sm_90"]
TVM_KEYS = {"host", "device", "arches", "cross_compiler", "export", "cuda", "cuda_graph"}  # the docstring's list
# What an app must link next to a tar export, per OS (recorded in artifact.json).
LINK_NOTES = {
    "macos": "xcrun clang++ -dynamiclib model.tar objects + libtvm_runtime (with Metal) -framework Metal -framework Foundation",
    "ios": "link the objects of model.tar and libtvm_runtime (Metal) into the app (Xcode); -framework Metal -framework Foundation",
    "android": "link the objects of model.tar and libtvm_runtime into the app's JNI library (NDK clang++ for aarch64-linux-android)",
}


@dataclass
class TvmTarget:
    name: str
    os: str
    host: dict
    device: dict | None
    arches: list[str] = field(default_factory=list)
    cross_compiler: str | None = None
    export_kind: str = "so"
    cuda_graph: bool = True
    cuda_major: int = 13
    arch: str = ""  # the device CPU of the target preset (x86_64, aarch64)

    # ---- what to build for -----------------------------------------------------------------------
    @property
    def is_gpu(self) -> bool:
        return self.device is not None

    @property
    def device_name(self) -> str:
        return self.device["kind"] if self.device else "cpu"

    def target(self):
        from tvm.target import Target

        if not self.device:
            return self._checked_host()
        device = dict(self.device)
        if device["kind"] == "cuda":
            # Generate code for the oldest arch; nvcc then emits real code for every arch listed
            # (the schedules do not depend on the arch once tensor-core rules are off).
            device.setdefault("arch", self.arches[0])
            # every listed arch has 48 KiB of static shared memory per block; said here, dlight stops
            # warning that it assumes so
            device.setdefault("max_shared_memory_per_block", 49152)
        return Target(device, host=self._checked_host())

    def _checked_host(self):
        """The host TVM target, refused by name where TVM or LLVM would reject or silently ignore
        what the target file says: an unknown option, CPU name or +feature (LLVM only warns and
        builds for a generic CPU)."""
        from tvm.target import Target, codegen

        where = f"target '{self.name}': [tvm] host"
        try:
            target = Target(dict(self.host))
        except (ValueError, TypeError) as err:
            raise EdgeforgeError(f"{where}: {str(err).splitlines()[0]}") from None
        triple, cpu = self.host.get("mtriple") or codegen.llvm_get_system_triple(), self.host.get("mcpu")
        if cpu and not codegen.llvm_is_valid_cpu(cpu, triple):
            raise EdgeforgeError(f"{where}: mcpu {cpu!r} is not a CPU LLVM knows for {triple}")
        enabled = set(codegen.llvm_get_cpu_features(target))
        unknown = [f for f in self.host.get("mattr") or [] if f.startswith("+") and f[1:] not in enabled]
        if unknown:
            raise EdgeforgeError(f"{where}: mattr {unknown[0]!r} is not a feature LLVM knows for {triple}")
        return target

    def describe(self) -> str:
        parts = [self.host.get("mtriple", "host"), self.host.get("mcpu", "")]
        if self.device:
            parts.append(self.device["kind"] + (" " + ",".join(self.arches) if self.arches else ""))
        return " ".join(p for p in parts if p)

    # ---- build environment -----------------------------------------------------------------------
    @property
    def is_cuda(self) -> bool:
        return bool(self.device and self.device["kind"] == "cuda")

    @functools.cached_property
    def cuda(self):
        """This target's CUDA compiler (toolchains.CudaCompiler): a system nvcc of its CUDA version,
        else the PyPI wheels (installed once into the edgeforge cache)."""
        found = toolchains.cuda_toolchain(self.cuda_major, install=True)
        if found.kind == "nvrtc" and len(self.arches) != 1:
            raise EdgeforgeError(
                f"target '{self.name}': CUDA {self.cuda_major} from PyPI compiles with NVRTC, one arch per "
                f"build (it has no fatbinary tool), but arches lists {self.arches}: list one arch, or put a "
                f"CUDA {self.cuda_major} nvcc on PATH")
        return found

    @contextlib.contextmanager
    def build_env(self):
        if not self.is_cuda:
            yield
            return
        compiler = self.cuda
        saved = {k: os.environ.get(k) for k in compiler.env}
        os.environ.update(compiler.env)
        try:
            if compiler.kind == "nvrtc":
                with _cuda_nvrtc_compiler(self.arches[0], compiler):
                    yield
            else:
                with _cuda_fatbin_compiler(self.arches):
                    yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def check_toolchain(self) -> None:
        """Fail before a long build when a tool the export needs is missing."""
        if self.export_kind == "so" and self.cross_compiler and shutil.which(self.cross_compiler) is None:
            raise EdgeforgeError(
                f"target '{self.name}': cross compiler '{self.cross_compiler}' not found "
                "(run scripts/setup-arm64.sh or apt-get install g++-aarch64-linux-gnu)"
            )
        if self.is_cuda:
            self.cuda  # noqa: B018 - a system nvcc of the right version, or the PyPI wheels (installed once)

    # ---- export ----------------------------------------------------------------------------------
    def export(self, ex, out: Path) -> list[str]:
        if self.export_kind == "tar":
            ex.export_library(str(out / "model.tar"))
            return ["model.tar"]
        kwargs = {}
        if self.cross_compiler:
            self.check_toolchain()
            from tvm.support import cc

            kwargs["fcompile"] = cc.cross_compiler(self.cross_compiler)
        ex.export_library(str(out / "model.so"), **kwargs)
        return ["model.so"]

    def toolchain_versions(self) -> dict:
        out = {}
        compiler = self.cross_compiler or ("g++" if self.export_kind == "so" else None)
        if compiler:
            out[compiler] = _first_line([compiler, "--version"])
        if self.is_cuda:
            out[self.cuda.kind] = self.cuda.version()
        return out

    def device_requirements(self) -> dict:
        req: dict = {"os": self.os, "cpu": self.host.get("mtriple", ""), "mcpu": self.host.get("mcpu", "")}
        if self.is_cuda:
            req["gpu_arch"] = list(self.arches)
            # nvcc adds PTX of the newest arch (a newer GPU JIT-compiles it); NVRTC builds hold SASS only
            req["gpu_ptx"] = [f"sm_{self.arches[-1][3:].rstrip('af')}"] if self.cuda.kind == "nvcc" else []
            # CUDA minor version compatibility: code from 13.x runs on any 13.0+ driver
            req["min_driver_cuda"] = self.cuda.major * 1000
        elif self.device:
            req["gpu"] = self.device["kind"]
        if self.export_kind == "tar":
            req["link"] = LINK_NOTES.get(self.os, "link the objects of model.tar with libtvm_runtime")
        return req


def tvm_target_for(target) -> TvmTarget:
    """TvmTarget from an edgeforge.targets.Target (reads its [tvm] table)."""
    table = getattr(target, "tvm", None) or (getattr(target, "raw", {}) or {}).get("tvm") or {}
    where = f"target '{target.name}' ({getattr(target, 'path', None) or 'preset'})"
    unknown = sorted(set(table) - TVM_KEYS)
    if unknown:  # a misspelled key would be ignored, not used
        raise EdgeforgeError(f"{where}: [tvm] unknown key {unknown[0]!r} (known: {', '.join(sorted(TVM_KEYS))})")
    host = table.get("host")
    if not isinstance(host, dict) or host.get("kind") != "llvm":
        raise EdgeforgeError(f"{where}: [tvm] host must be a table with kind = \"llvm\"")
    device = table.get("device")
    if device is not None and device.get("kind") not in ("cuda", "metal"):
        raise EdgeforgeError(f"{where}: [tvm] device kind {device.get('kind')!r} is not cuda or metal")
    export_kind = table.get("export", "so")
    if export_kind not in ("so", "tar"):
        raise EdgeforgeError(f"{where}: [tvm] export must be \"so\" or \"tar\", got {export_kind!r}")
    arches = list(table.get("arches") or (DEFAULT_CUDA_ARCHES if device and device["kind"] == "cuda" else []))
    for arch in arches:
        if not (arch.startswith("sm_") and arch[3:].rstrip("af").isdigit()):
            raise EdgeforgeError(f"{where}: [tvm] arches entry {arch!r} is not like sm_90")
    arches.sort(key=lambda a: int(a[3:].rstrip("af")))
    cuda_graph = table.get("cuda_graph", True)
    if not isinstance(cuda_graph, bool):
        raise EdgeforgeError(f"{where}: [tvm] cuda_graph must be true or false, got {cuda_graph!r}")
    return TvmTarget(
        name=target.name, os=getattr(target, "os", "linux"), host=dict(host), device=device,
        arches=arches, cross_compiler=table.get("cross_compiler"), export_kind=export_kind,
        cuda_graph=cuda_graph, cuda_major=_cuda_major(table.get("cuda", 13), where),
        arch=str(getattr(target, "arch", "") or ""),
    )


def _cuda_major(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in (12, 13):
        raise EdgeforgeError(f"{where}: [tvm] cuda must be 12 or 13, got {value!r}")
    return value


@contextlib.contextmanager
def _cuda_fatbin_compiler(arches: list[str]):
    """Make TVM compile CUDA kernels with nvcc into one fatbin holding real code for every arch.

    TVM's default callback uses NVRTC and the current GPU's arch; on a build machine without a
    GPU that leaves nothing usable, so we replace the callback for the duration of the build."""
    from tvm.support import nvcc

    if shutil.which("nvcc") is None:
        raise EdgeforgeError("CUDA target: nvcc not found (run `edgeforge toolchains install cuda`)")
    _load_cuda_codegen()
    gencode = []
    for arch in arches:
        num = arch[3:]
        gencode += ["-gencode", f"arch=compute_{num},code={arch}"]
    # PTX of the newest arch too: a newer GPU than any listed runs it through the driver's JIT
    newest = arches[-1][3:].rstrip("af")
    gencode += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]

    def compile_fatbin(code, *_target):
        return nvcc.compile_cuda(code, target_format="fatbin", arch=gencode, compiler="nvcc")

    with _cuda_compile_callback(compile_fatbin):
        yield


@contextlib.contextmanager
def _cuda_nvrtc_compiler(arch: str, compiler):
    """Make TVM compile CUDA kernels with NVRTC (edgeforge/nvrtc.py) into a cubin for `arch`."""
    _load_cuda_codegen()
    nvrtc = Nvrtc(compiler.path, list(compiler.includes))

    def compile_cubin(code, *_target):
        return nvrtc.compile_cubin(code, arch)

    with _cuda_compile_callback(compile_cubin):
        yield


@contextlib.contextmanager
def _cuda_compile_callback(compile_fn):
    """TVM calls `tvm_callback_cuda_compile` for the kernels' machine code: ours for the duration."""
    import tvm_ffi

    name = "tvm_callback_cuda_compile"
    previous = tvm_ffi.get_global_func(name, allow_missing=True)
    tvm_ffi.register_global_func(name, compile_fn, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(name, previous, override=True)


# Driver API functions libtvm_runtime_cuda.so links against (nm -D --undefined-only | grep ' cu[A-Z]').
# Plus what runtime/hostcheck.py calls: the stub stays loaded in a process that built for CUDA, and
# a later GPU check in the same process finds it under the driver's soname (it must say "no device").
_CUDA_DRIVER_SYMBOLS = (
    "cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString", "cuLaunchKernelEx",
    "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload", "cuTensorMapEncodeTiled",
    "cuInit", "cuDriverGetVersion", "cuDeviceGetCount", "cuDeviceGet", "cuDeviceGetAttribute",
)


def _load_cuda_codegen() -> None:
    """Load libtvm_runtime_cuda.so, which carries TVM's CUDA module support, on a machine with no GPU.

    It links libcuda.so.1 (the driver), absent without a GPU; `import tvm` then skips it silently
    and CUDA builds keep kernel *source* for a JIT at load time. A stub libcuda.so.1 whose
    functions all return CUDA_ERROR_NO_DEVICE satisfies the linker; it is never called while
    building, and never shipped."""
    import ctypes

    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = _load_sidecar(load_lib_ctypes, runtime_dir)
        return
    except (OSError, RuntimeError):
        pass  # no driver here: use the stub
    ctypes.CDLL(str(_cuda_driver_stub()), mode=ctypes.RTLD_GLOBAL)
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = _load_sidecar(load_lib_ctypes, runtime_dir)
    except (OSError, RuntimeError) as err:
        raise EdgeforgeError(f"CUDA target: cannot load TVM's CUDA support (libtvm_runtime_cuda.so): {err}") from None


def _load_sidecar(load_lib_ctypes, runtime_dir: Path):
    return load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")


def _cuda_driver_stub() -> Path:
    """Build (once, cached) a stub libcuda.so.1 with the host C compiler."""
    import os
    import tempfile

    from ...cache import cache_dir

    out = cache_dir() / "cuda-stub-v2" / "libcuda.so.1"  # v2: with the device-query symbols
    if out.exists():
        return out
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise EdgeforgeError("CUDA target without a GPU driver needs a C compiler (cc) to build a libcuda stub")
    out.parent.mkdir(parents=True, exist_ok=True)
    body = "\n".join(f"int {name}(void) {{ return 100; }}" for name in _CUDA_DRIVER_SYMBOLS) + "\n"
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, lib = Path(tmp) / "stub.c", Path(tmp) / "libcuda.so.1"
        src.write_text(body)
        cmd = [compiler, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(lib), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise EdgeforgeError(f"building the libcuda stub failed: {proc.stderr.strip()[-300:]}")
        os.replace(lib, out)
    return out


def _first_line(cmd: list[str], last: bool = False) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unavailable"
    if not out:
        return "unavailable"
    return out[-1] if last else out[0]
