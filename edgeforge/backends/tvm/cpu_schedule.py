"""CPU schedule for the fused dequantize-matmul kernels (quantized_linear.qmatmul).

Without a schedule TVM emits one serial scalar loop nest. Ours, per kernel:
  - rows of the weight (output features) in tiles of ROWS, tiles spread over the threads
    (TVM_NUM_THREADS) with a parallel loop;
  - the reduction split into lanes of LANES consecutive inputs kept as a vector of partial sums
    (rfactor), so each step dequantizes LANES weights with vector shifts/masks and one FMA;
  - decode (one activation row): the dequantize is inlined into the FMA (registers only);
    prefill (a prompt of rows): each [ROWS, in] weight tile is dequantized once into a small
    buffer that all prompt rows then read, instead of once per row.
Epilogue blocks (cast, residual add, SiLU*up) stay as TVM lowers them: they are O(rows) work.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from .quantized_linear import DEQ_BLOCK

ROWS = 8
# 8 lanes = the 8 nibbles of one q4 word: the word and its scale are scalar broadcasts, the
# shifts a constant vector, the activations one contiguous load (one AVX2 / two NEON registers).
LANES = 8


def ScheduleQuantizedMatmul(target):  # noqa: N802 - a pass factory, named like TVM's
    @tvm.transform.module_pass(opt_level=0, name="edgeforge_cpu_schedule")
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in mod.functions.items():
            if isinstance(func, tirx.PrimFunc):
                scheduled = schedule_qmatmul(func)
                if scheduled is not None:
                    updates[gv] = scheduled
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


def schedule_qmatmul(func):
    """Schedule one PrimFunc if it holds our 'acc' block (see quantized_linear.py); else None."""
    sch = s_tir.Schedule(func)
    try:
        block = sch.get_sblock("acc")
    except Exception:  # noqa: BLE001 - TVM raises its own error type: not one of our kernels
        return None
    loops = sch.get_loops(block)
    if len(loops) != 4:
        return None
    i, j, n, k = loops
    n_extent = _extent(sch, n)
    k_extent = _extent(sch, k)
    if not isinstance(n_extent, int) or not isinstance(k_extent, int) or k_extent % LANES:
        return None
    rows = ROWS if n_extent % ROWS == 0 else 1
    deq = sch.get_sblock(DEQ_BLOCK)
    m = sch.fuse(i, j)
    prompt_rows = _extent(sch, m)
    n_outer, n_inner = sch.split(n, [None, rows])
    k_outer, k_lane = sch.split(k, [None, LANES])
    sch.reorder(n_outer, m, n_inner, k_outer, k_lane)
    rf = sch.rfactor(k_lane, factor_axis=3)
    # rf block loops: n_outer, m, n_inner, k_outer, lane
    rf_loops = sch.get_loops(rf)
    sch.parallel(rf_loops[0])
    # Sum the lanes right after each output's reduction: the partial sums stay one vector.
    sch.reverse_compute_at(block, rf_loops[2])
    sch.vectorize(rf_loops[-1])
    if prompt_rows == 1:
        sch.compute_inline(deq)  # one activation row: dequantize straight into the FMA
    else:
        # Several rows (prefill): dequantize a [rows, in] tile once per parallel step, into a
        # small buffer (L1/L2-sized) that every prompt row then reads as plain floats.
        sch.compute_at(deq, rf_loops[0])
        _, lane = sch.split(sch.get_loops(deq)[-1], [None, LANES])
        sch.vectorize(lane)
    return sch.mod["main"]


def _extent(sch, loop):
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else ext
