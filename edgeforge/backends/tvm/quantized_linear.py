"""Quantized linear and embedding layers whose parameters are the QDIR arrays as stored.

The dequantize is written *inside* the matmul's reduction (one TE compute, one PrimFunc), so no
kernel ever materializes the float weight: the fusion holds by construction, whatever the pass
pipeline does afterwards. tests/test_tvm_fusion.py checks the lowered IR for it.

QDIR layouts (docs/INTERNALS.md): q4 = uint32 [out, in/8] low nibble first, offset 8, scales
[out, in/32]; q8 = int8 [out, in], scales [out, in/32]; f16/f32 = the weight itself.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor

GROUP = 32

# Marks our fused kernels so that pipeline.py can give them a hand-written CPU schedule.
KERNEL_ATTR = "edgeforge_qmatmul"
DEQ_BLOCK = "dequantize"


def param_arrays(fmt: str, out_f: int, in_f: int, scale_dtype: str | None) -> dict[str, tuple[tuple, str]]:
    """QDIR array kind -> (shape, dtype) for one weight of storage format `fmt`."""
    if fmt == "q4":
        return {"qweight": ((out_f, in_f // 8), "uint32"), "scales": ((out_f, in_f // GROUP), scale_dtype)}
    if fmt == "q8":
        return {"qweight": ((out_f, in_f), "int8"), "scales": ((out_f, in_f // GROUP), scale_dtype)}
    if fmt in ("f32", "f16"):
        return {"weight": ((out_f, in_f), "float32" if fmt == "f32" else "float16")}
    raise ValueError(f"unknown storage format {fmt!r}")


def dequant_expr(fmt: str, arrays: dict, row, col):
    """float32 value of weight[row, col] read straight from the stored arrays (a TE expression)."""
    if fmt == "q4":
        word = arrays["qweight"][row, col // 8]
        nib = (word >> ((col % 8) * 4).astype("uint32")) & tirx.const(15, "uint32")
        q = nib.astype("float32") - tirx.const(8.0, "float32")
        return q * arrays["scales"][row, col // GROUP].astype("float32")
    if fmt == "q8":
        q = arrays["qweight"][row, col].astype("float32")
        return q * arrays["scales"][row, col // GROUP].astype("float32")
    return arrays["weight"][row, col].astype("float32")


class _QuantizedWeight(nn.Module):
    """Holds the stored arrays of one [out, in] weight as parameters named like the QDIR arrays."""

    def __init__(self, fmt: str, out_f: int, in_f: int, scale_dtype: str | None):
        if in_f % GROUP:
            raise ValueError(f"in_features {in_f} is not a multiple of {GROUP}")
        self.fmt, self.out_f, self.in_f = fmt, out_f, in_f
        for kind, (shape, dtype) in param_arrays(fmt, out_f, in_f, scale_dtype).items():
            setattr(self, kind, nn.Parameter(shape, dtype))

    def arrays(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in param_arrays(self.fmt, 1, GROUP, "float32")}


def qmatmul(x: Tensor, fmt: str, arrays: dict[str, Tensor], in_f: int, out_f: int, out_dtype: str) -> Tensor:
    """y = x @ W^T with W dequantized on the fly; accumulates in float32, returns `out_dtype`."""
    names = list(arrays)

    def compute(xt, *ws):
        stored = dict(zip(names, ws))
        b, s = xt.shape[0], xt.shape[1]
        k = te.reduce_axis((0, in_f), name="k")
        # A separate stage in the same kernel, so that schedules choose where it lives: inlined
        # into the reduction (GPU, decode) or a per-tile buffer reused by every prompt row (CPU
        # prefill). It never becomes a kernel or a full-size buffer of its own.
        deq = te.compute((out_f, in_f), lambda n, kk: dequant_expr(fmt, stored, n, kk), name=DEQ_BLOCK)
        acc = te.compute(
            (b, s, out_f),
            lambda i, j, n: te.sum(xt[i, j, k].astype("float32") * deq[n, k], axis=k),
            name="acc",
        )
        if out_dtype == "float32":
            return acc
        return te.compute((b, s, out_f), lambda i, j, n: acc[i, j, n].astype(out_dtype), name="cast")

    return nn.op.tensor_expr_op(
        compute, f"qmatmul_{fmt}", [x] + [arrays[n] for n in names], attrs={KERNEL_ATTR: 1}
    )


class QLinear(_QuantizedWeight):
    def __init__(self, fmt, out_f, in_f, scale_dtype, out_dtype):
        super().__init__(fmt, out_f, in_f, scale_dtype)
        self.out_dtype = out_dtype

    def forward(self, x: Tensor) -> Tensor:
        return qmatmul(x, self.fmt, self.arrays(), self.in_f, self.out_f, self.out_dtype)


class QEmbedding(_QuantizedWeight):
    """Row gather from a (possibly quantized) [vocab, hidden] table; rows dequantized as read."""

    def __init__(self, fmt, vocab, hidden, scale_dtype, out_dtype):
        super().__init__(fmt, vocab, hidden, scale_dtype)
        self.out_dtype = out_dtype

    def forward(self, ids: Tensor) -> Tensor:
        names = list(self.arrays())
        fmt, hidden, out_dtype = self.fmt, self.in_f, self.out_dtype

        def compute(idt, *ws):
            arrays = dict(zip(names, ws))
            b, s = idt.shape
            return te.compute(
                (b, s, hidden),
                lambda i, j, h: dequant_expr(fmt, arrays, idt[i, j], h).astype(out_dtype),
                name="embed",
            )

        return nn.op.tensor_expr_op(compute, f"embed_{fmt}", [ids] + [self.arrays()[n] for n in names])

    def head(self, x: Tensor) -> Tensor:
        """Tied output head: logits (float32) = x @ table^T over the same stored arrays."""
        return qmatmul(x, self.fmt, self.arrays(), self.in_f, self.out_f, "float32")
