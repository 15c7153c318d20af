"""Helpers for the TVM backend tests: build QDIR -> artifact, compare engines with the reference."""

from __future__ import annotations

import shutil
import struct
import time
from pathlib import Path

import numpy as np


PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a land far away, there lived",
    "Numbers: 1, 2, 3, 4, 5,",
]
# Bounds on max |logit error| / (logit range), from the issue: f32 schemes 1e-3, f16 schemes 2e-2.
TOLERANCE = {"float32": 1e-3, "float16": 2e-2}
BUILD_TIMES: dict[str, float] = {}  # "<what>": seconds, printed by the tests that build


def compile_tvm(qdir: Path, target: str, out: Path) -> Path:
    """Compile with the real TVM backend (via the `edgeforge compile` code path)."""
    from edgeforge.backends import compile_qdir

    start = time.time()
    compile_qdir(Path(qdir), target, "tvm", Path(out))
    BUILD_TIMES[f"{target}:{Path(qdir).name}"] = round(time.time() - start, 1)
    return Path(out)


# ---- inspecting built binaries ------------------------------------------------------------------

FATBIN_MAGIC = 0xBA55ED50
EM_CUDA = 190


def fatbin_entries(blob: bytes) -> list[dict]:
    """Entries of every CUDA fatbin embedded in `blob`: [{"kind": 1 PTX | 2 ELF, "arch": 80, ...}].

    Layout (CUDA's fatbinary.h): header {u32 magic, u16 version, u16 header size, u64 size},
    then entries {u16 kind, u16 flags, u32 header size, u64 payload size, ..., u32 arch at 28}.
    """
    entries = []
    pos = 0
    magic = struct.pack("<I", FATBIN_MAGIC)
    while (start := blob.find(magic, pos)) >= 0:
        _, _, header, size = struct.unpack_from("<IHHQ", blob, start)
        off, end = start + header, start + header + size
        while off < end:
            kind, _, ehdr, payload = struct.unpack_from("<HHIQ", blob, off)
            arch = struct.unpack_from("<I", blob, off + 28)[0]
            body = blob[off + ehdr: off + ehdr + 20]
            machine = struct.unpack_from("<H", body, 18)[0] if body[:4] == b"\x7fELF" else None
            entries.append({"kind": kind, "arch": arch, "elf_machine": machine, "size": payload})
            off += ehdr + payload
        pos = end
    return entries


def cubin_arches(blob: bytes) -> list[int]:
    """SM numbers of the CUDA ELF images (cubins) embedded in `blob` outside any fatbin: ELF headers
    with e_machine EM_CUDA; the SM is e_flags' low byte in the CUDA 12 ELF ABI (0x570557: sm_87)."""
    arches, pos = [], 1
    while (start := blob.find(b"\x7fELF", pos)) >= 0:
        pos = start + 4
        if len(blob) >= start + 52 and struct.unpack_from("<H", blob, start + 18)[0] == EM_CUDA:
            arches.append(struct.unpack_from("<I", blob, start + 48)[0] & 0xFF)
    return arches


def macho_arm64(data: bytes) -> bool:
    """A 64-bit Mach-O object for arm64 (magic 0xfeedfacf, cputype CPU_TYPE_ARM64)."""
    return len(data) > 8 and struct.unpack_from("<II", data, 0) == (0xFEEDFACF, 0x0100000C)


def elf_aarch64(data: bytes) -> bool:
    return data[:4] == b"\x7fELF" and struct.unpack_from("<H", data, 18)[0] == 183  # EM_AARCH64
