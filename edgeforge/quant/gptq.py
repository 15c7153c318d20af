"""GPTQ for the grouped formats q4a and q8: quantize a weight column by column and push each column's
rounding error onto the columns not yet quantized, through the inverse Hessian of the layer's
inputs (Frantar et al. 2022, "static groups, no act-order" flavour).

H = X^T X over the calibration text's activations that multiply the weight (quant/calibrate.py
collects it). Columns are taken in order; when a column starts a group of GROUP_SIZE, that group's
(scale, zero) is chosen from the *updated* weights as the calibrated search does without GPTQ
(q4a: formats.search_asymmetric with importance = diag(H); q8: max|w| / 127), then every column of
the group is rounded with it. Measured on SmolLM2 (docs/notes/quant.md): symmetric q4 with its
signed-scale search diverges under GPTQ (the clipped +8 side feeds ever larger errors forward), so
GPTQ stores q4a and q8 only; act-order with static groups, a least-squares refit of the scales after
GPTQ and "true sequential" inputs each scored no better. The stored arrays are the format's own: dequantize() of the result
is exactly what GPTQ computed, and the backends run it unchanged.
"""

from __future__ import annotations

import numpy as np

from ..errors import EdgeforgeError
from .formats import GROUP_SIZE, Q4A, Q8, pack_q4, pack_zeros, search_asymmetric

BLOCK = 128  # columns updated eagerly; the rest gets one matrix product per block (lazy batch)
assert BLOCK % GROUP_SIZE == 0  # a group's columns must sit in one block (its grid is read from it)
DAMP = 0.3  # fraction of mean(diag H) added to the diagonal: a Hessian from a few thousand tokens
# of one text is a noisy estimate, heavy damping trusts it less. SmolLM2 KL with 512 tokens: 0.01 ->
# 0.067, 0.1 -> 0.049, 0.3 -> 0.045, 1.0 -> 0.048; with the whole text (1923): 0.056 / 0.048 / 0.046
# at 0.01 / 0.1 / 0.3 (docs/notes/quant.md, session 6)


def memory_needed(shapes) -> int:
    """Peak bytes of solving the widest of `shapes` ([out, in] each): the float64 Hessian the
    caller holds, up to four in^2 float64 arrays while inverting it, and a few float32 copies of
    the weight. Measured: Llama-3-8B's down_proj (in 14336) peaked at 8.2 GiB (docs/notes/quant.md)."""
    widest = max((int(s[1]) for s in shapes), default=0)
    largest = max((int(s[0]) * int(s[1]) for s in shapes), default=0)
    return 5 * 8 * widest * widest + 4 * 4 * largest + (512 << 20)


def inverse_cholesky(hessian: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp I)^-1 (H^-1 = U^T U), float32; columns no activation ever
    reached (diag 0) get a unit diagonal and their weights are zeroed in `w` (they never contribute)."""
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices_from(h)] += DAMP * float(np.mean(np.diag(h)))
    lower = np.linalg.cholesky(h)
    del h  # an 8B model's down_proj: 14336^2 float64 = 1.6 GB a copy; keep at most two alive
    inv = np.linalg.inv(lower)  # H^-1 = L^-T L^-1
    del lower
    hinv = inv.T @ inv
    del inv
    return np.linalg.cholesky(hinv).T.astype(np.float32)


def gptq_quantize(w, hessian, fmt, name: str = "weight") -> dict[str, np.ndarray]:
    """Stored arrays of `w` [out, in] in `fmt` (Q4A or Q8) by GPTQ with `hessian` [in, in]."""
    if not isinstance(fmt, (Q4A, Q8)):
        raise EdgeforgeError(f"tensor '{name}': GPTQ stores q4a or q8, not {fmt.name}")
    w = np.array(w, dtype=np.float32)
    fmt._check_shape(w, name)  # noqa: SLF001 - the format's own shape rule
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise EdgeforgeError(f"tensor '{name}': Hessian is {list(hessian.shape)}, the weight has {cols} input columns")
    importance = np.diag(hessian).astype(np.float32)
    u = inverse_cholesky(hessian, w)
    asym = isinstance(fmt, Q4A)
    codes = np.empty((rows, cols), np.int16)
    scales = np.empty((rows, cols // GROUP_SIZE), np.float32)
    zeros = np.zeros((rows, cols // GROUP_SIZE), np.float32)
    for b0 in range(0, cols, BLOCK):
        b1 = min(b0 + BLOCK, cols)
        wb, err = w[:, b0:b1].copy(), np.zeros((rows, b1 - b0), np.float32)
        for i in range(b1 - b0):
            col = b0 + i
            g = col // GROUP_SIZE
            if col % GROUP_SIZE == 0:  # the group's grid, from the weights as GPTQ has updated them
                groups = wb[:, i : i + GROUP_SIZE].reshape(rows, 1, GROUP_SIZE)
                imp = importance[col : col + GROUP_SIZE].reshape(1, 1, GROUP_SIZE)
                scales[:, g], zeros[:, g] = _group_params(fmt, groups, imp, name)
            s, z = scales[:, g], zeros[:, g]
            codes[:, col] = _round(wb[:, i], s, z, fmt)
            e = (wb[:, i] - (codes[:, col] - z) * s) / u[col, col]
            wb[:, i:] -= np.outer(e, u[col, col:b1])  # this block's columns now ...
            err[:, i] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]  # ... the later ones once per block
    if asym:
        return {"qweight": pack_q4(codes), "scales": scales.astype(fmt.scale_dtype), "zeros": pack_zeros(zeros.astype(np.uint8))}
    return {"qweight": codes.astype(np.int8), "scales": scales.astype(fmt.scale_dtype)}


def _group_params(fmt, groups: np.ndarray, imp: np.ndarray, name: str):
    """(scale as stored, zero) as float32 [rows] of one group of columns: q4a by the weighted
    search (diag H as importance), q8 by max|w| / 127 as without GPTQ."""
    if isinstance(fmt, Q4A):
        s, z = fmt._range(groups, name)  # noqa: SLF001
        s, z = search_asymmetric(groups, imp, s, z, fmt)
        return s.astype(np.float32)[:, 0], z[:, 0].astype(np.float32)
    return fmt._scales(groups, name).astype(np.float32)[:, 0], np.zeros(groups.shape[0], np.float32)  # noqa: SLF001


def _round(col: np.ndarray, s: np.ndarray, z: np.ndarray, fmt) -> np.ndarray:
    """Codes of one column by the format's own rounding (Q4A._codes, _Grouped._quantize_groups)."""
    one = col.reshape(-1, 1, 1)
    if isinstance(fmt, Q4A):
        codes = fmt._codes(one, s[:, None], z[:, None].astype(np.uint8))  # noqa: SLF001
    else:
        codes = fmt._quantize_groups(one, s[:, None])  # noqa: SLF001
    return codes[:, 0, 0].astype(np.int16)
