"""edgeforge's own block-quantized matmul kernels for ONNX Runtime on x86 (the custom op edgeforge.MatMulQ).

Why: ONNX Runtime's MatMulNBits repacks weights at load, 4-bit ones into 6 bits a weight and 8-bit
ones into 10 (MLAS), so decode moves 1.33x the bytes of llama.cpp's Q4_0 for the same weights
(docs/notes/onnx.md, Session 15). These kernels read the bundle's 4.5 (8.5) bits a weight where ONNX
Runtime placed them, one copy, for prefill (tiled int8 GEMM) and decode (streaming GEMV) alike, with
MatMulNBits' accuracy_level-4 arithmetic (int8 activations per block of 32), so golden data needs
no new emulation.

- pack_blocks: MatMulNBits' blob (4- or 8-bit) + fp16 scales -> the kernels' layout (kernels.c's comment).
- reference: the numpy product the kernels compute (their test oracle).
- build_library: the host C compiler -> libedgeforge_kernels.so (ort_abi.h declares the C ABI we call).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ....errors import EdgeforgeError
from ....model.reference import int8_blocks
# The layout's constants live with the runtime, which reads a tied embedding's rows from it.
from ....runtime.embedding import KERNEL_GROUP_ROWS as GROUP_ROWS
from ....runtime.embedding import KERNEL_LAYOUTS, ZERO_POINT, kernel_block_bytes
from ....runtime.onnx_engine import CUSTOM_OP_LIBRARY as LIBRARY

SOURCES = Path(__file__).resolve().parent
SOURCE_FILES = ("ort_abi.h", "kernels.c", "op.c")
DOMAIN, OP = "edgeforge", "MatMulQ"
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "vnni": ["-DEF_VNNI", "-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512vnni"],
}


def layout(bits: int) -> str:
    """artifact.json's name of the layout of `bits`-bit weights (a tied embedding table's `layout`)."""
    return next(name for name, b in KERNEL_LAYOUTS.items() if b == bits)


def supported(n: int, k: int, bits: int) -> bool:
    """Whether a weight can take the kernels: 4 or 8 bits, K a multiple of 32 (whole blocks)."""
    return bits in ZERO_POINT and k % 32 == 0 and n > 0


def packed_bytes(n: int, k: int, bits: int) -> int:
    return (n + GROUP_ROWS - 1) // GROUP_ROWS * (k // 32) * kernel_block_bytes(bits)


def codes_of(blob: np.ndarray, bits: int = 4) -> np.ndarray:
    """MatMulNBits' blob [N, nb, 32 * bits / 8] -> unsigned codes [N, nb, 32] (4-bit: byte j holds
    element 2j low, 2j + 1 high; 8-bit: one code a byte)."""
    if bits == 8:
        return blob
    codes = np.empty(blob.shape[:2] + (32,), np.uint8)
    codes[..., 0::2], codes[..., 1::2] = blob & 0x0F, blob >> 4
    return codes


def pack_blocks(blob: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """blob uint8 [N, nb, 32 * bits / 8] (MatMulNBits), scales [N, nb] (float16 exactly) -> uint8
    [packed_bytes(N, 32 nb, bits)]: groups of 8 rows, per block the 8 fp16 scales then 32-byte
    chunks of 8 rows x 4 elements (4-bit: chunk j byte 4r + t = row r's code of element 8j + t
    (low nibble) and 8j + 4 + t (high); 8-bit: chunk j byte 4r + t = row r's code of 4j + t)."""
    n, nb = scales.shape
    if bits not in ZERO_POINT or blob.shape != (n, nb, 32 * bits // 8):
        raise EdgeforgeError(f"pack_blocks: blob {blob.shape} and scales {scales.shape} are not one {bits}-bit weight")
    g = (n + GROUP_ROWS - 1) // GROUP_ROWS
    pad = g * GROUP_ROWS - n
    codes, sc = codes_of(blob, bits), scales.astype(np.float16)
    if pad:
        codes = np.concatenate([codes, np.full((pad, nb, 32), ZERO_POINT[bits], np.uint8)])
        sc = np.concatenate([sc, np.zeros((pad, nb), np.float16)])
    if bits == 4:  # [g, 8 rows, nb, 4 chunks, 2 halves, 4 t] -> [g, nb, chunk, row, t] per half
        c = codes.reshape(g, GROUP_ROWS, nb, 4, 2, 4).transpose(0, 2, 3, 4, 1, 5)
        body = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).astype(np.uint8).reshape(g, nb, 128)
    else:  # [g, 8 rows, nb, 8 chunks, 4 t] -> [g, nb, chunk, row, t]
        body = codes.reshape(g, GROUP_ROWS, nb, 8, 4).transpose(0, 2, 3, 1, 4).reshape(g, nb, 256)
    s = sc.reshape(g, GROUP_ROWS, nb).transpose(0, 2, 1).copy().view(np.uint8).reshape(g, nb, 16)
    out = np.ascontiguousarray(np.concatenate([s, body], axis=2).reshape(-1))
    assert out.size == packed_bytes(n, nb * 32, bits)
    return out


def reference(x: np.ndarray, blob: np.ndarray, scales: np.ndarray, bits: int = 4) -> np.ndarray:
    """What edgeforge.MatMulQ computes: int8-block-rounded x times the dequantized weight, in float64
    (the kernels sum in float32 in another order; tests allow for that)."""
    w = (codes_of(blob, bits).astype(np.float64) - ZERO_POINT[bits]) * scales.astype(np.float64)[..., None]
    return int8_blocks(x.astype(np.float32)).astype(np.float64) @ w.reshape(w.shape[0], -1).T


def source_digest() -> str:
    h = hashlib.sha256()
    for name in SOURCE_FILES:
        h.update((SOURCES / name).read_bytes())
    return h.hexdigest()


def find_compiler() -> str | None:
    """The host C compiler for x86-64 builds: $CC, else gcc, else cc (None: none on PATH)."""
    for cc in (os.environ.get("CC"), "gcc", "cc"):
        if cc and shutil.which(cc):
            return cc
    return None


def build_library(out_dir: Path, cc: str | None = None) -> Path:
    """Compile libedgeforge_kernels.so for x86-64 into out_dir (AVX2 and AVX-512 VNNI kernels, one
    picked at load)."""
    cc = cc or find_compiler()
    if cc is None:
        raise EdgeforgeError("building edgeforge's kernels needs a C compiler: neither $CC, gcc nor cc is on PATH "
                             "(apt-get install gcc, or set [onnx] kernels = \"onnxruntime\" in the target)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeforge-kernels-") as tmp:
        objs = []
        common = ["-O3", "-fPIC", "-fvisibility=hidden", "-std=gnu11", "-Wall"]
        for isa, flags in ISA_FLAGS.items():
            obj = os.path.join(tmp, f"kernels_{isa}.o")
            _run([cc, *common, *flags, "-c", str(SOURCES / "kernels.c"), "-o", obj])
            objs.append(obj)
        op = os.path.join(tmp, "op.o")
        _run([cc, *common, "-c", str(SOURCES / "op.c"), "-o", op])
        target, part = out_dir / LIBRARY, out_dir / (LIBRARY + ".part")
        _run([cc, "-shared", "-o", str(part), op, *objs])
        os.replace(part, target)
    return target


def compiler_version(cc: str) -> str:
    done = subprocess.run([cc, "--version"], capture_output=True, text=True)
    return done.stdout.splitlines()[0].strip() if done.returncode == 0 and done.stdout else cc


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise EdgeforgeError(f"building edgeforge's kernels failed ({' '.join(cmd[:1] + cmd[-3:])}):\n"
                             f"{done.stderr.strip()[-2000:]}")
