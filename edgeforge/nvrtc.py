"""CUDA kernels to a cubin with NVRTC, called through ctypes.

For CUDA 12 (JetPack 6) builds: PyPI's CUDA 12 compiler wheel holds ptxas but no nvcc, while
nvidia-cuda-nvrtc-cu12 has NVRTC, which compiles CUDA C++ straight to machine code (it embeds ptxas).
TVM's own NVRTC path needs the cuda-bindings package of the same CUDA version (none exists on PyPI
for 12.6), so this calls libnvrtc.so.12 directly. Without the fatbinary tool one build holds one
arch, as a cubin (TVM's CUDA module loads a cubin or a fatbin alike).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from .errors import EdgeforgeError

# What TVM's generated CUDA source expects from nvcc's headers and NVRTC does not provide (the same
# fix-ups TVM's tvm.support.nvcc applies before its NVRTC call).
PREAMBLE = """#include <cuda/std/cstdint>
using cuda::std::uint8_t;
using cuda::std::uint16_t;
using cuda::std::uint32_t;
using cuda::std::uint64_t;
using cuda::std::int8_t;
using cuda::std::int16_t;
using cuda::std::int32_t;
using cuda::std::int64_t;
#ifndef __asm__
#define __asm__ asm
#endif
#ifndef __volatile__
#define __volatile__ volatile
#endif
#include <cuda/std/limits>
#ifndef INFINITY
#define INFINITY (::cuda::std::numeric_limits<float>::infinity())
#endif
"""
OPTIONS = ("-default-device", "--use_fast_math",
           "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
           "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__")


class Nvrtc:
    def __init__(self, library: Path, include_dirs: list[str]):
        try:
            self.lib = ctypes.CDLL(str(library))
            self.lib.nvrtcCompileProgram  # noqa: B018 - a library without NVRTC's API is refused here
        except (OSError, AttributeError) as err:
            raise EdgeforgeError(f"{library}: cannot load NVRTC ({err})") from None
        self.includes = list(include_dirs)
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def version(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        return major.value, minor.value

    def _check(self, code: int, what: str, log: str = "") -> None:
        if code != 0:
            msg = self.lib.nvrtcGetErrorString(code).decode()
            # the first errors are the cause; later ones usually follow from them
            raise EdgeforgeError(f"NVRTC {what} failed: {msg}" + (f"\n{log.strip()[:3000]}" if log.strip() else ""))

    def compile_cubin(self, code: str, arch: str) -> bytes:
        """Machine code for `arch` (like "sm_87") of TVM's generated CUDA source."""
        # `#line 1` makes NVRTC's messages count lines of TVM's source, not of our preamble
        source = PREAMBLE + '#line 1 "tvm_kernels.cu"\n' + "\n".join(
            line for line in code.splitlines() if line.strip() != "#include <cuda.h>")
        prog = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"tvm_kernels.cu", 0, None, None),
                    "nvrtcCreateProgram")
        try:
            opts = [f"--gpu-architecture={arch}", *OPTIONS, *(f"-I{d}" for d in self.includes)]
            argv = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
            result = self.lib.nvrtcCompileProgram(prog, len(opts), argv)
            if result != 0:
                self._check(result, f"compile for {arch}", self._log(prog))
            size = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
            buf = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetCUBIN(prog, buf), "nvrtcGetCUBIN")
            if size.value == 0:  # a virtual arch (compute_XX) gives PTX, no cubin
                raise EdgeforgeError(f"NVRTC made no machine code for {arch} (use a real arch like sm_87)")
            return buf.raw
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))

    def _log(self, prog) -> str:
        size = ctypes.c_size_t()
        if self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)) != 0 or size.value <= 1:
            return ""
        buf = ctypes.create_string_buffer(size.value)
        self.lib.nvrtcGetProgramLog(prog, buf)
        return buf.value.decode(errors="replace")
