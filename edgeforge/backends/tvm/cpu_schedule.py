"""CPU schedule for the fused dequantize-matmul kernels (quantized_linear.qmatmul).

Without a schedule TVM emits one serial scalar loop nest. Ours, per kernel:
  - rows of the weight (output features) in tiles of ROWS, tiles spread over the threads
    (TVM_NUM_THREADS) with a parallel loop;
  - the reduction split into lanes of LANES consecutive inputs kept as a vector of partial sums
    (rfactor), so each step dequantizes LANES weights with vector shifts/masks and one FMA;
  - decode of a q4/q8 weight (one activation row; quantized_linear.grouped_gemv): the rows of a
    tile advance together group by group, each group's dot product on the raw q values scaled
    once; decode of a float weight: the same row interleave, dequantize inlined into the FMA;
    prefill (a prompt of rows): a register-blocked GEMM, each [2 * ROWS, in] weight tile
    dequantized once into a small [in, 2 * ROWS] buffer that all prompt rows then read (see
    _schedule_prefill); a weight whose rows are not a multiple of ROWS takes the decode form.
Epilogue blocks (cast, residual add, SiLU*up) stay as TVM lowers them: they are O(rows) work.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from .quantized_linear import DEQ_BLOCK, GROUP_DOT_BLOCK, LANES, LANES_BLOCK, X_F32_BLOCK, X_SUM_BLOCK

ROWS = 8
# Prefill: prompt rows per register block. 6 rows x 2 vectors of 8 outputs = 12 accumulators, plus
# 2 weight vectors and 1 broadcast: 15 of the 16 AVX2 registers.
PROMPT_BLOCK = 6
# LANES (quantized_linear.py) = 8 = the 8 nibbles of one q4 word: the word and its scale are
# scalar broadcasts, the shifts a constant vector, the activations one contiguous load (one AVX2 /
# two NEON registers).


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
    block = _find_block(sch, "acc")
    if block is None:
        return None
    if _find_block(sch, LANES_BLOCK) is not None:
        return _schedule_grouped_gemv(sch, block)
    loops = sch.get_loops(block)
    if len(loops) != 4:
        return None
    i, j, n, k = loops
    n_extent = _extent(sch, n)
    k_extent = _extent(sch, k)
    if not isinstance(n_extent, int) or not isinstance(k_extent, int) or k_extent % LANES:
        return None
    deq = sch.get_sblock(DEQ_BLOCK)
    x32 = _find_block(sch, X_F32_BLOCK)
    m = sch.fuse(i, j)
    prompt_rows = _extent(sch, m)  # symbolic for prefill
    one_row = isinstance(prompt_rows, int) and prompt_rows == 1
    if not one_row and x32 is not None and n_extent % ROWS == 0:
        _schedule_prefill(sch, block, deq, x32, m, n, k, n_extent)
        return sch.mod["main"]
    if x32 is not None:
        sch.compute_inline(x32)
    rows = ROWS if n_extent % ROWS == 0 else 1
    n_outer, n_inner = sch.split(n, [None, rows])
    k_outer, k_lane = sch.split(k, [None, LANES])
    sch.reorder(n_outer, m, n_inner, k_outer, k_lane)
    rf = sch.rfactor(k_lane, factor_axis=3)
    _schedule_decode(sch, rf, block, deq)
    return sch.mod["main"]


def _schedule_grouped_gemv(sch, acc):
    """quantized_linear.grouped_gemv: tiles of ROWS rows over the threads; inside a tile, group by
    group, each row's LANES partial sums get the group's dot product (registers) times its scale.
    The rows of a tile advance together: independent FMA chains, one activation load per tile."""
    lanes = sch.get_sblock(LANES_BLOCK)
    group_dot = sch.get_sblock(GROUP_DOT_BLOCK)
    i, j, n, lane, g = sch.get_loops(lanes)
    n_extent = _extent(sch, n)
    if not isinstance(n_extent, int):
        return None
    n_outer, n_inner = sch.split(n, [None, ROWS if n_extent % ROWS == 0 else 1])
    m = sch.fuse(i, j)
    sch.reorder(n_outer, m, g, n_inner, lane)
    sch.parallel(n_outer)
    sch.compute_at(group_dot, n_inner)
    *_, dot_lane, w = sch.get_loops(group_dot)
    sch.reorder(w, dot_lane)
    sch.unroll(w)
    sch.vectorize(dot_lane)
    _rows_in_registers(sch, lanes, n_inner, lane, acc, m, g)
    x_sum = _find_block(sch, X_SUM_BLOCK)
    if x_sum is not None:  # q4: a few hundred adds before the parallel loop
        *_, x_lane, wx = sch.get_loops(x_sum)
        sch.reorder(wx, x_lane)
        sch.vectorize(x_lane)
    return sch.mod["main"]


def _schedule_decode(sch, rf, block, deq):
    """One activation row: the tile's rows advance through k together, so each row's FMA chain
    is independent of the others (a single chain waits on the FMA latency every 8 weights) and
    each activation vector is loaded once per tile; the [rows, LANES] partial sums are registers."""
    sch.compute_inline(deq)  # dequantize straight into the FMA
    n_outer, m, n_inner, k_outer, lane = sch.get_loops(rf)
    sch.reorder(k_outer, n_inner)
    sch.parallel(n_outer)
    _rows_in_registers(sch, rf, n_inner, lane, block, m, k_outer)


def _rows_in_registers(sch, reduction, n_inner, lane, epilogue, m, reduce_loop):
    """The tail both decode forms share: the tile's rows unrolled and lanes vectorized (their
    partial sums become registers), the epilogue placed per row tile, the init split off."""
    sch.unroll(n_inner)
    sch.vectorize(lane)
    sch.reverse_compute_at(epilogue, m)
    _vectorized_init(sch, reduction, reduce_loop)


def _vectorized_init(sch, reduction, loop):
    """Split the reduction's init off above `loop` and vectorize it. Done last: vectorizing needs
    the update block to still own its init."""
    init = sch.decompose_reduction(reduction, loop)
    sch.vectorize(sch.get_loops(init)[-1])


def _schedule_prefill(sch, acc, deq, x32, m, n, k, n_extent):
    """Several rows: a register-blocked GEMM. Per parallel weight tile of `cols` output rows, the
    tile is dequantized once into a small [in, cols] buffer (L2-sized), cols contiguous; then per
    block of PROMPT_BLOCK prompt rows (converted to f32 once), each k step loads the tile row as
    cols / 8 vectors and does PROMPT_BLOCK x cols / 8 FMAs into accumulators held in registers,
    instead of one latency-bound FMA chain per (prompt row, output)."""
    cols = 2 * ROWS if n_extent % (2 * ROWS) == 0 else ROWS
    n_outer, n_inner = sch.split(n, [None, cols])
    m_outer, m_inner = sch.split(m, [None, PROMPT_BLOCK])
    sch.reorder(n_outer, m_outer, k, m_inner, n_inner)
    sch.parallel(n_outer)
    # The row count is symbolic: every statement of a block carries a bounds check. Have TVM's
    # LoopPartition pass peel the last (partial) block off, so that the rest runs unchecked and
    # its accumulators stay in registers.
    sch.annotate(m_outer, "pragma_loop_partition_hint", 1)
    write_back = sch.cache_write(acc, 0, "local")
    sch.reverse_compute_at(write_back, m_outer)
    sch.vectorize(sch.get_loops(write_back)[-1])
    sch.unroll(m_inner)
    sch.vectorize(n_inner)
    _vectorized_init(sch, acc, k)
    sch.compute_at(x32, m_outer)
    sch.vectorize(sch.split(sch.get_loops(x32)[-1], [None, LANES])[1])
    _dequantize_tile(sch, deq, n_outer)


def _dequantize_tile(sch, deq, n_outer):
    """The tile's weights, stored [in, cols]: vectors over the tile's rows, the LANES inputs of a
    q4 word unrolled so that each (gathered) word is loaded once."""
    sch.transform_layout(deq, ("write", 0), lambda row, col: (col, row))
    sch.compute_at(deq, n_outer)
    row, col = sch.get_loops(deq)[-2:]
    col_outer, col_lane = sch.split(col, [None, LANES])
    sch.reorder(col_outer, col_lane, row)
    sch.unroll(col_lane)
    sch.vectorize(row)


def _find_block(sch, name):
    try:
        return sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - TVM raises its own error type: no such block
        return None


def _extent(sch, loop):
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else ext
