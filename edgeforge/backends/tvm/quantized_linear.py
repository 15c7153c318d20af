"""Quantized linear and embedding layers whose parameters are the QDIR arrays as stored.

The dequantize is written *inside* the matmul's reduction (one TE compute, one PrimFunc), so no
kernel ever materializes the float weight: the fusion holds by construction, whatever the pass
pipeline does afterwards. tests/test_tvm_fusion.py checks the lowered IR for it.

QDIR layouts (docs/INTERNALS.md): q4 = uint32 [out, in/8] low nibble first, offset 8, scales
[out, in/32]; q4a = the same nibbles with a zero point per group, uint8 zeros [out, ceil(in/64)]
(two a byte, the even group in the low nibble);
q8 = int8 [out, in], scales [out, in/32]; f16/f32 = the weight itself.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.target import Target
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor

from ...runtime.weights import FORMAT_ARRAYS, GROUP, stored_arrays

# CPU decode form (grouped_gemv): each group of GROUP inputs is read as GROUP // LANES vectors of
# LANES consecutive inputs (LANES = the 8 nibbles of one q4 word).
LANES = 8

# Marks our fused kernels so that pipeline.py can give them a hand-written CPU schedule.
KERNEL_ATTR = "edgeforge_qmatmul"
DEQ_BLOCK = "dequantize"
GROUP_DOT_BLOCK = "group_dot"
LANES_BLOCK = "lanes"
X_SUM_BLOCK = "x_group_sum"
X_F32_BLOCK = "x_f32"
Q4_OFFSET = 8.0  # stored nibble = q + 8
QUANT = ("q4", "q4a", "q8")  # the grouped formats (one scale per GROUP inputs)


def param_arrays(fmt: str, out_f: int, in_f: int, scale_dtype: str | None) -> dict[str, tuple[tuple, str]]:
    """QDIR array kind -> (shape, dtype) for one weight of storage format `fmt` (the QDIR layout)."""
    if fmt not in FORMAT_ARRAYS:
        raise ValueError(f"unknown storage format {fmt!r}")
    return stored_arrays(fmt, (out_f, in_f), scale_dtype)


def dequant_expr(fmt: str, arrays: dict, row, col):
    """float32 value of weight[row, col] read straight from the stored arrays (a TE expression)."""
    if fmt in QUANT:
        return q_expr(fmt, arrays, row, col) * scale_expr(arrays, row, col // GROUP)
    return arrays["weight"][row, col].astype("float32")


def q_expr(fmt: str, arrays: dict, row, col, offset: bool = True):
    """float32 quantized value q (without its scale) of weight[row, col], q4, q4a or q8. With
    offset=False a q4/q4a value is the stored nibble (q + Q4_OFFSET, q + zero)."""
    if fmt in ("q4", "q4a"):
        word = arrays["qweight"][row, col // 8]
        nib = (word >> ((col % 8) * 4).astype("uint32")) & tirx.const(15, "uint32")
        nib = nib.astype("float32")
        return nib - zero_expr(fmt, arrays, row, col // GROUP) if offset else nib
    return arrays["qweight"][row, col].astype("float32")


def zero_expr(fmt: str, arrays: dict, row, group):
    """The nibble that means 0 in a group: 8 for q4, the stored zero point for q4a."""
    if fmt == "q4a":
        byte = arrays["zeros"][row, group // 2].astype("uint32")  # uint8 vector shifts break CUDA codegen
        return ((byte >> ((group % 2) * 4).astype("uint32")) & tirx.const(15, "uint32")).astype("float32")
    return tirx.const(Q4_OFFSET, "float32")


def scale_expr(arrays: dict, row, group):
    return arrays["scales"][row, group].astype("float32")


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
        if _grouped_gemv_wanted(fmt, s):
            acc = grouped_gemv(xt, fmt, stored, in_f, out_f)
            return acc if out_dtype == "float32" else _cast(acc, out_dtype)
        k = te.reduce_axis((0, in_f), name="k")
        x32 = _x_f32(xt) if _cpu_target() else None
        # A separate stage in the same kernel, so that schedules choose where it lives: inlined
        # into the reduction (GPU, decode) or a per-tile buffer reused by every prompt row (CPU
        # prefill). It never becomes a kernel or a full-size buffer of its own.
        deq = te.compute((out_f, in_f), lambda n, kk: dequant_expr(fmt, stored, n, kk), name=DEQ_BLOCK)
        acc = te.compute(
            (b, s, out_f),
            lambda i, j, n: te.sum(_x(xt, x32, i, j, k) * deq[n, k], axis=k),
            name="acc",
        )
        return acc if out_dtype == "float32" else _cast(acc, out_dtype)

    return nn.op.tensor_expr_op(
        compute, f"qmatmul_{fmt}", [x] + [arrays[n] for n in names], attrs={KERNEL_ATTR: 1}
    )


def _cast(acc, dtype):
    return te.compute(acc.shape, lambda i, j, n: acc[i, j, n].astype(dtype), name="cast")


def _cpu_target() -> bool:
    """The graph is built for a CPU (llvm) target. GPU targets keep the plain forms that dlight's
    GEMV/Matmul rules recognize."""
    target = Target.current(allow_none=True)
    return target is not None and target.kind.name == "llvm"


def _x_f32(xt):
    """CPU: the activations as float32, a stage of its own so that the prefill schedule converts
    each prompt block once per weight tile, not once per multiply (decode inlines it)."""
    return te.compute(xt.shape, lambda i, j, kk: xt[i, j, kk].astype("float32"), name=X_F32_BLOCK)


def _x(xt, x32, i, j, k):
    return x32[i, j, k] if x32 is not None else xt[i, j, k].astype("float32")


def _grouped_gemv_wanted(fmt: str, rows) -> bool:
    """One activation row of a q4/q8 weight built for a CPU target: see grouped_gemv."""
    return _cpu_target() and fmt in QUANT and isinstance(rows, tirx.IntImm) and int(rows) == 1


def grouped_gemv(xt, fmt: str, stored: dict, in_f: int, out_f: int):
    """acc[n] = sum over groups g of scale[n, g] * (sum of x_k * q_k over the group), in float32.

    The same sum as the plain form, multiplied by each scale once per group instead of once per
    weight, and for q4 with the raw nibbles: sum x_k * q_k = sum x_k * nib_k - 8 * sum x_k, the
    activation sums computed once per call (`x_group_sum`, shared by every row); q4a subtracts its
    group's own zero point instead of 8. The inner loop is
    then: unpack, convert, FMA. Partial sums keep LANES lanes (input k % LANES) until the end:
    `group_dot` [.., n, g, lane] sums the group's GROUP // LANES vectors, `lanes` [.., n, lane] the
    scaled groups, `acc` the lanes."""
    b, s = xt.shape[0], xt.shape[1]
    groups, vectors = in_f // GROUP, GROUP // LANES

    def col(g, vec, lane):
        return g * GROUP + vec * LANES + lane

    def x(i, j, g, vec, lane):
        return xt[i, j, col(g, vec, lane)].astype("float32")

    w = te.reduce_axis((0, vectors), name="w")
    group_dot = te.compute(
        (b, s, out_f, groups, LANES),
        lambda i, j, n, g, lane: te.sum(
            x(i, j, g, w, lane) * q_expr(fmt, stored, n, col(g, w, lane), offset=False), axis=w
        ),
        name=GROUP_DOT_BLOCK,
    )
    if fmt in ("q4", "q4a"):
        wx = te.reduce_axis((0, vectors), name="wx")
        x_sum = te.compute(
            (b, s, groups, LANES), lambda i, j, g, lane: te.sum(x(i, j, g, wx, lane), axis=wx), name=X_SUM_BLOCK
        )

        def dot(i, j, n, g, lane):  # sum x (nib - zero) = sum x nib - zero * sum x
            return group_dot[i, j, n, g, lane] - zero_expr(fmt, stored, n, g) * x_sum[i, j, g, lane]
    else:

        def dot(i, j, n, g, lane):
            return group_dot[i, j, n, g, lane]

    g = te.reduce_axis((0, groups), name="g")
    lanes = te.compute(
        (b, s, out_f, LANES),
        lambda i, j, n, lane: te.sum(dot(i, j, n, g, lane) * scale_expr(stored, n, g), axis=g),
        name=LANES_BLOCK,
    )
    lane = te.reduce_axis((0, LANES), name="lane")
    return te.compute((b, s, out_f), lambda i, j, n: te.sum(lanes[i, j, n, lane], axis=lane), name="acc")


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
