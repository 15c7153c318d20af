"""Turn QDIR stored arrays into ONNX Runtime's layouts, bit for bit (no re-quantization).

- q4: `qweight` uint32 [N, K/8] is, as little-endian bytes, MatMulNBits' 4-bit blob [N, K/32, 16]
  with the default zero point 8 (docs/INTERNALS.md): packed along the last axis, low nibble first
  (runtime/embedding.py reads embedding rows from the same bytes).
- q4a: the same blob with its zero points as MatMulNBits' `zero_points` input: uint8 [N, ceil(K/32 / 2)],
  two per byte, the even block in the low nibble.
- q8: int8 q -> uint8(q + 128), blob [N, K/32, 32]; both ops' default 8-bit zero point is 128
  (checked against numpy in tests/test_onnx_ops.py).
- f32/f16: the weight as is, in the graph's dtype.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from ...errors import EdgeforgeError
from ...runtime.weights import GROUP, zeros_width
QUANT_BITS = {"q4": 4, "q4a": 4, "q8": 8}


@dataclass
class QuantLinear:
    """A block-quantized [N, K] weight in MatMulNBits layout."""

    blob: np.ndarray  # uint8 [N, K/32, 32*bits/8]
    scales: np.ndarray  # model dtype [N, K/32]
    bits: int
    zero_points: np.ndarray | None = None  # q4a: uint8 [N, ceil(K/32 / 2)], packed

    @property
    def n(self) -> int:
        return self.blob.shape[0]

    @property
    def k(self) -> int:
        return self.blob.shape[1] * GROUP


def quant_linear(name: str, entry: dict, arrays: dict, dtype) -> QuantLinear:
    fmt = entry["format"]
    n, k = _shape2(name, entry)
    if k % GROUP:
        raise EdgeforgeError(f"tensor '{name}': in_features {k} is not a multiple of {GROUP}")
    q, scales = _need(name, arrays, "qweight"), _need(name, arrays, "scales")
    if scales.shape != (n, k // GROUP):
        raise EdgeforgeError(f"tensor '{name}': scales shape {scales.shape}, expected {(n, k // GROUP)}")
    zero_points = None
    if fmt in ("q4", "q4a"):
        if q.dtype != np.uint32 or q.shape != (n, k // 8):
            raise EdgeforgeError(f"tensor '{name}': {fmt} qweight must be uint32 {(n, k // 8)}, got {q.dtype} {q.shape}")
        words = q if sys.byteorder == "little" else q.byteswap()
        blob = np.ascontiguousarray(words).view(np.uint8).reshape(n, k // GROUP, GROUP // 2)
        if fmt == "q4a":
            zero_points = _zero_points(name, _need(name, arrays, "zeros"), n, k // GROUP)
    elif fmt == "q8":
        if q.dtype != np.int8 or q.shape != (n, k):
            raise EdgeforgeError(f"tensor '{name}': q8 qweight must be int8 {(n, k)}, got {q.dtype} {q.shape}")
        blob = (q.astype(np.int16) + 128).astype(np.uint8).reshape(n, k // GROUP, GROUP)
    else:
        raise EdgeforgeError(f"tensor '{name}': format '{fmt}' is not block-quantized")
    return QuantLinear(blob=blob, scales=scales.astype(dtype), bits=QUANT_BITS[fmt], zero_points=zero_points)


def _zero_points(name: str, zeros: np.ndarray, n: int, blocks: int) -> np.ndarray:
    """q4a zeros as stored (two a byte, formats.pack_zeros) are MatMulNBits' `zero_points` as they are."""
    want = (n, zeros_width(blocks))
    if zeros.dtype != np.uint8 or zeros.shape != want:
        raise EdgeforgeError(f"tensor '{name}': q4a zeros must be uint8 {want} (two a byte), got {zeros.dtype} {zeros.shape}")
    return np.ascontiguousarray(zeros)


def dense(name: str, entry: dict, arrays: dict, dtype) -> np.ndarray:
    """An f32/f16 tensor in the graph's dtype (norm weights, q0 linear weights)."""
    if entry["format"] not in ("f32", "f16"):
        raise EdgeforgeError(f"tensor '{name}': format '{entry['format']}' is not a float format")
    w = _need(name, arrays, "weight")
    if list(w.shape) != list(entry["shape"]):
        raise EdgeforgeError(f"tensor '{name}': stored shape {tuple(w.shape)}, quantization.json says {entry['shape']}")
    return np.asarray(w).astype(dtype)


def concat_rows(parts: list[QuantLinear]) -> QuantLinear:
    """Stack weights along N (fused QKV, fused gate/up): rows are independent in these layouts."""
    bits = {p.bits for p in parts}
    if len(bits) != 1 or len({p.k for p in parts}) != 1 or len({p.zero_points is None for p in parts}) != 1:
        raise EdgeforgeError("cannot fuse weights with different bits, zero points or in_features")
    zp = None if parts[0].zero_points is None else np.concatenate([p.zero_points for p in parts])
    return QuantLinear(np.concatenate([p.blob for p in parts]), np.concatenate([p.scales for p in parts]), bits.pop(), zp)


def _shape2(name: str, entry: dict) -> tuple[int, int]:
    shape = entry.get("shape", [])
    if len(shape) != 2:
        raise EdgeforgeError(f"tensor '{name}': expected a 2-D weight, quantization.json says shape {shape}")
    return int(shape[0]), int(shape[1])


def _need(name: str, arrays: dict, role: str) -> np.ndarray:
    if role not in arrays:
        raise EdgeforgeError(f"tensor '{name}': quantization.json lists no '{role}' array")
    return arrays[role]
