"""Storage formats of QDIR weights: F32, F16, Q8, Q4, Q4A (bit layouts defined in docs/INTERNALS.md).

Each format turns one float weight into a dict of stored numpy arrays (`quantize`) and back into
float32 (`dequantize`). Quantized formats work per row of a [out, in] weight on groups of
GROUP_SIZE consecutive `in` elements with one scale per group. The scale is rounded to the scale
dtype *before* quantizing, and that stored scale is the one used: dequantize(quantize(w)) is then
exactly what every backend computes from the stored arrays.
"""

from __future__ import annotations

import numpy as np

from ..errors import EdgeforgeError
# The stored layout itself (group size, nibbles a word, array shapes) is runtime/weights.py's.
from ..runtime.weights import GROUP as GROUP_SIZE, Q4_PER_WORD, stored_arrays, zeros_width  # noqa: F401 - re-exported

# The constants of the storage formats, in one place (backends import them from here).
Q8_MAX = 127  # q8: q = clip(round(w / scale), -127, 127), int8
Q4_MIN, Q4_MAX = -8, 7  # q4: q = clip(round(w / scale), -8, 7) + Q4_OFFSET, in [0, 15]
Q4_OFFSET = 8  # also ONNX MatMulNBits' default 4-bit zero point
Q4_LEVELS = 15  # q4a: codes 0..15 and a zero point in 0..15 per group
Q8_ONNX_ZERO_POINT = 128  # MatMulNBits 8-bit stores uint8(q + 128)

SCALE_DTYPES = ("float16", "float32")
BLOCK_ELEMENTS = 1 << 22  # rows quantized per step: bounds temporaries to ~16 MB of float32


def _as_f32(w, name: str) -> np.ndarray:
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        raise EdgeforgeError(f"tensor '{name}': contains inf or NaN, cannot be stored")
    return w


class F32:
    """The weight as float32."""

    def __repr__(self):
        return type(self).__name__ + "()"

    name = "f32"
    array_names = ("weight",)
    scale_dtype = None

    def quantize(self, w, name: str = "weight", importance=None) -> dict[str, np.ndarray]:
        return {"weight": _as_f32(w, name)}

    def dequantize(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(arrays["weight"], dtype=np.float32)

    def stored(self, shape) -> dict[str, tuple[tuple, str]]:
        """role -> (shape, dtype) of the arrays quantize() returns for a weight of `shape`."""
        return stored_arrays(self.name, shape)


class F16:
    """The weight as float16 (relative error <= 2^-11 in the normal range)."""

    def __repr__(self):
        return type(self).__name__ + "()"

    name = "f16"
    array_names = ("weight",)
    scale_dtype = None

    def quantize(self, w, name: str = "weight", importance=None) -> dict[str, np.ndarray]:
        w = _as_f32(w, name)
        with np.errstate(over="ignore"):
            h = w.astype(np.float16)
        if not np.isfinite(h).all():
            raise EdgeforgeError(f"tensor '{name}': values beyond float16 range (max |w| = {np.abs(w).max():g})")
        return {"weight": h}

    def dequantize(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(arrays["weight"]).astype(np.float32)

    def stored(self, shape) -> dict[str, tuple[tuple, str]]:
        return stored_arrays(self.name, shape)


class _Grouped:
    """Shared part of Q8 and Q4: one scale per group of GROUP_SIZE along the last axis, no zero point."""

    name = ""
    qmin, qmax = 0, 0
    # False: scale = max|w| / qmax (q8). True: scale = (the element of largest magnitude) / qmin,
    # signed, so that element is exactly qmin and the other side gets up to qmax (q4: -8..7).
    signed_scale = False
    searchable = False  # quantize(importance=...) searches the scales (q4)
    array_names = ("qweight", "scales")

    def __init__(self, scale_dtype: str = "float16"):
        if str(np.dtype(scale_dtype)) not in SCALE_DTYPES:
            raise EdgeforgeError(f"scale dtype '{scale_dtype}': use one of {', '.join(SCALE_DTYPES)}")
        self.scale_dtype = str(np.dtype(scale_dtype))

    def __repr__(self):
        return f"{type(self).__name__}(scale_dtype={self.scale_dtype!r})"

    def _check_shape(self, w: np.ndarray, name: str) -> None:
        if w.ndim != 2:
            raise EdgeforgeError(f"tensor '{name}': {self.name} needs a 2-D [out, in] weight, got shape {list(w.shape)}")
        if w.shape[1] % GROUP_SIZE:
            raise EdgeforgeError(
                f"tensor '{name}': width {w.shape[1]} is not divisible by the group size {GROUP_SIZE}, "
                f"cannot store it as {self.name}"
            )

    def _scales(self, groups: np.ndarray, name: str) -> np.ndarray:
        """Scales in the scale dtype; this rounded value is the one quantization divides by."""
        if self.signed_scale:
            first_max = np.abs(groups).argmax(axis=2)[:, :, None]  # argmax: the first one on ties
            extreme, divisor = np.take_along_axis(groups, first_max, axis=2)[:, :, 0], self.qmin
        else:
            extreme, divisor = np.abs(groups).max(axis=2), self.qmax
        with np.errstate(over="ignore"):
            scales = (extreme / np.float32(divisor)).astype(self.scale_dtype)
        if not np.isfinite(scales).all():
            raise EdgeforgeError(f"tensor '{name}': a group scale overflows {self.scale_dtype}")
        return scales

    def _quantize_groups(self, groups: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """q in [qmin, qmax]; a zero scale (zero group, or one that underflowed) gives q = 0."""
        s = scales.astype(np.float32)[:, :, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.rint(groups / s)  # rint: round half to even, as the format says
        q = np.where(s == 0, 0.0, q)
        # The rounded scale can be a hair small, so round() may overshoot by one; and with a
        # signed scale the side opposite the extreme reaches up to -qmin = qmax + 1: clip.
        return np.clip(q, self.qmin, self.qmax).astype(np.int8)

    def quantize(self, w, name: str = "weight", importance=None) -> dict[str, np.ndarray]:
        """Stored arrays of `w`. `importance` (float [in], the mean square of the activations that
        multiply each input column, from calibration) switches q4 from round-to-nearest scales to a
        weighted search (search_scales); the stored format and dequantize() are the same."""
        w = np.asarray(w)
        self._check_shape(w, name)
        if importance is not None:
            importance = np.asarray(importance, dtype=np.float32).reshape(-1)
            if importance.shape[0] != w.shape[1]:
                raise EdgeforgeError(f"tensor '{name}': importance has {importance.shape[0]} entries, the weight "
                                     f"has {w.shape[1]} input columns")
            importance = importance.reshape(1, -1, GROUP_SIZE)
        # Blocks of rows: rows are independent, and the float temporaries stay ~BLOCK_ELEMENTS
        # large even for an 8B model's 500M-element embedding.
        step = max(1, BLOCK_ELEMENTS // max(1, w.shape[1]))
        parts = {k: [] for k in self.array_names}
        for r in range(0, w.shape[0], step):
            groups = _as_f32(w[r : r + step], name).reshape(-1, w.shape[1] // GROUP_SIZE, GROUP_SIZE)
            for k, v in self._quantize_block(groups, importance, name).items():
                parts[k].append(v)
        if not parts["qweight"]:  # zero rows
            return {k: np.zeros(shape, dtype) for k, (shape, dtype) in self.stored(w.shape).items()}
        return {k: np.concatenate(v) for k, v in parts.items()}

    def _quantize_block(self, groups: np.ndarray, importance, name: str) -> dict[str, np.ndarray]:
        """The stored arrays of some rows ([rows, groups, GROUP_SIZE] floats)."""
        s = self._scales(groups, name)
        if importance is not None and self.searchable:
            s = search_scales(groups, importance, s, self)
        return {"qweight": self._store(self._quantize_groups(groups, s).reshape(groups.shape[0], -1)), "scales": s}

    def dequantize(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        q = self._load(np.asarray(arrays["qweight"])).astype(np.float32)
        scales = np.asarray(arrays["scales"]).astype(np.float32)
        out = q.reshape(q.shape[0], -1, GROUP_SIZE) * scales[:, :, None]
        return out.reshape(q.shape)

    def stored(self, shape) -> dict[str, tuple[tuple, str]]:
        return stored_arrays(self.name, shape, self.scale_dtype)

    def _store(self, q: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _load(self, stored: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Q8(_Grouped):
    """int8 `qweight` [out, in] and `scales` [out, in/32]: w ~= q * scale."""

    name = "q8"
    qmin, qmax = -Q8_MAX, Q8_MAX
    qweight_dtype = "int8"
    per_item = 1

    def _store(self, q):
        return q

    def _load(self, stored):
        if stored.dtype != np.int8:
            raise EdgeforgeError(f"q8 qweight must be int8, got {stored.dtype}")
        return stored


class Q4(_Grouped):
    """uint32 `qweight` [out, in/8] (8 nibbles of q + 8 per word) and `scales` [out, in/32].

    All 16 levels are used, as llama.cpp's Q4_0 does: scale = (the group's element of largest
    magnitude) / -8, so that element is exactly -8 * scale and q + 8 is in [0, 15]. Scales can be
    negative. Measured on SmolLM2-135M this cuts KL(float || q4f16) by a quarter compared with the
    symmetric max|w| / 7 (docs/notes/quant.md); the stored bits and dequantize are the same.
    """

    name = "q4"
    qmin, qmax = Q4_MIN, Q4_MAX
    signed_scale = True
    searchable = True
    qweight_dtype = "uint32"
    per_item = Q4_PER_WORD

    def _store(self, q):
        return pack_q4(q.astype(np.int16) + Q4_OFFSET)

    def _load(self, stored):
        if stored.dtype != np.uint32:
            raise EdgeforgeError(f"q4 qweight must be uint32, got {stored.dtype}")
        return unpack_q4(stored).astype(np.int16) - Q4_OFFSET


# The scale search (llama.cpp's make_qx_quants idea, weighted by calibration importance): start from
# scale = extreme / divisor for each divisor below (the extreme on -8 as round-to-nearest puts it,
# give or take one level; on +7 for the other sign; or past -8, clipping an outlier), refit the scale to the rounded codes by
# weighted least squares (twice), keep the candidate with the smallest weighted squared error, all
# measured with the scale as stored (rounded to the scale dtype) and the exact rounding of
# _quantize_groups.
SEARCH_DIVISORS = np.concatenate([-8 - np.arange(-4, 5) * 0.25, 7 + np.arange(-2, 3) * 0.25,
                                  -8 * np.array([1.25, 1.5, 2.0, 3.0])]).astype(np.float32)  # the last: clip an outlier
SEARCH_REFITS = 2


def search_weights(groups: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """Error weight of each element: the importance of its input column times sqrt(mean square of
    its group + its own square) (small weights still count; large ones count more). Measured on
    SmolLM2 against importance alone and x^2 alone: docs/notes/quant.md."""
    sigma2 = np.mean(groups * groups, axis=2, keepdims=True)
    return (importance * np.sqrt(sigma2 + groups * groups)).astype(np.float32)


def search_scales(groups: np.ndarray, importance: np.ndarray, start: np.ndarray, fmt) -> np.ndarray:
    """Scales (in fmt's scale dtype) that minimise sum w (x - s q(x, s))^2 per group, q as stored."""
    w = search_weights(groups, importance)
    first = np.abs(groups).argmax(axis=2)[:, :, None]
    extreme = np.take_along_axis(groups, first, axis=2)
    best_s = start.astype(np.float32)[:, :, None]
    best_err = _weighted_error(groups, w, best_s, fmt)
    q = np.empty_like(groups)
    wq = np.empty_like(groups)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for divisor in SEARCH_DIVISORS * np.float32(-fmt.qmin / 8):  # the same levels in any format
            s = extreme / divisor
            for _ in range(SEARCH_REFITS):  # the codes for this scale, then the best scale for them
                np.multiply(groups, np.float32(1) / s, out=q)
                np.clip(np.rint(q, out=q), fmt.qmin, fmt.qmax, out=q)
                np.multiply(w, q, out=wq)
                refit = np.einsum("gij,gij->gi", wq, groups)[:, :, None] / np.einsum("gij,gij->gi", wq, q)[:, :, None]
                s = np.where(np.isfinite(refit) & (refit != 0), refit, s)
            s = s.astype(fmt.scale_dtype).astype(np.float32)
            s = np.where(np.isfinite(s), s, best_s)
            err = _weighted_error(groups, w, s, fmt)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better, s, best_s)
    return best_s[:, :, 0].astype(fmt.scale_dtype)


def _weighted_error(groups, w, s, fmt) -> np.ndarray:
    """sum w (x - s q)^2 with q exactly as _quantize_groups stores it for scale s ([g, n, 1])."""
    q = fmt._quantize_groups(groups, s[:, :, 0]).astype(np.float32)  # noqa: SLF001 - the stored rounding
    np.multiply(q, s, out=q)
    np.subtract(groups, q, out=q)
    return np.einsum("gij,gij,gij->gi", w, q, q)[:, :, None]


def pack_q4(nibbles: np.ndarray) -> np.ndarray:
    """[rows, n] values in 0..15 -> uint32 [rows, n/8]; element 8k+j goes to bits 4j..4j+3 of word k."""
    n = np.asarray(nibbles).astype(np.uint32)
    n = n.reshape(n.shape[0], -1, Q4_PER_WORD)
    shifts = (4 * np.arange(Q4_PER_WORD, dtype=np.uint32))
    return np.bitwise_or.reduce(n << shifts, axis=2).astype(np.uint32)


def unpack_q4(words: np.ndarray) -> np.ndarray:
    """uint32 [rows, n/8] -> uint8 [rows, n] nibbles (inverse of pack_q4)."""
    w = np.asarray(words, dtype=np.uint32)
    shifts = (4 * np.arange(Q4_PER_WORD, dtype=np.uint32))
    n = (w[:, :, None] >> shifts) & np.uint32(0xF)
    return n.reshape(w.shape[0], -1).astype(np.uint8)


def pack_zeros(zeros: np.ndarray) -> np.ndarray:
    """uint8 zero points [rows, groups] (0..15) -> [rows, ceil(groups / 2)], two a byte, the even
    group in the low nibble (MatMulNBits' `zero_points` layout, so ONNX takes them as stored)."""
    z = np.asarray(zeros)
    if z.size and (z.min() < 0 or z.max() > Q4_LEVELS):
        raise EdgeforgeError(f"q4a zero points must be in 0..{Q4_LEVELS}, got {z.min()}..{z.max()}")
    z = z.astype(np.uint8)
    padded = np.zeros((z.shape[0], z.shape[1] + z.shape[1] % 2), np.uint8)
    padded[:, : z.shape[1]] = z
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8)


def unpack_zeros(packed: np.ndarray, groups: int) -> np.ndarray:
    """Inverse of pack_zeros: uint8 [rows, ceil(groups / 2)] -> [rows, groups]."""
    p = np.asarray(packed, dtype=np.uint8)
    both = np.stack([p & 0xF, p >> 4], axis=2).reshape(p.shape[0], -1)
    return both[:, :groups]


class Q4A(Q4):
    """Asymmetric q4: uint32 `qweight` [out, in/8] of codes 0..15, `scales` [out, in/32] and uint8
    `zeros` [out, ceil(in/64)]: a zero point 0..15 per group, two a byte (pack_zeros):
    w ~= (code - zero) * scale.

    ONNX MatMulNBits' 4-bit layout with its `zero_points` input, and TVM computes the same;
    0.125 bit a weight more than q4 (half a byte a group). Round to nearest spans
    each group's [min, max] (widened to hold 0) with the 16 codes; with calibration importance, quantize() searches
    (scale, zero) per group by weighted error instead (search_asymmetric)."""

    name = "q4a"
    qmin, qmax = 0, 15
    signed_scale = False
    array_names = ("qweight", "scales", "zeros")

    def _range(self, groups: np.ndarray, name: str):
        """Round-to-nearest (scale, zero): the 16 codes span [min(min, 0), max(max, 0)] (an integer
        zero point 0..15 always represents 0 exactly, so the span must hold it); scale as stored."""
        lo, hi = _zero_span(groups)
        with np.errstate(over="ignore"):
            scales = ((hi - lo) / np.float32(Q4_LEVELS)).astype(self.scale_dtype)
        if not np.isfinite(scales).all():
            raise EdgeforgeError(f"tensor '{name}': a group scale overflows {self.scale_dtype}")
        return scales, self._zeros(lo, scales)

    @staticmethod
    def _zeros(lo: np.ndarray, scales: np.ndarray) -> np.ndarray:
        s = scales.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.rint(-lo / s)
        return np.clip(np.where(s == 0, 0, z), 0, Q4_LEVELS).astype(np.uint8)

    def _codes(self, groups: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
        """code = clip(rint(w / scale) + zero, 0, 15); a zero scale gives code = zero (w = 0)."""
        s = scales.astype(np.float32)[:, :, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.rint(groups / s)
        q = np.where(s == 0, 0.0, q) + zeros[:, :, None]
        return np.clip(q, 0, Q4_LEVELS).astype(np.uint8)

    def _quantize_block(self, groups: np.ndarray, importance, name: str) -> dict[str, np.ndarray]:
        scales, zeros = self._range(groups, name)
        if importance is not None:
            scales, zeros = search_asymmetric(groups, importance, scales, zeros, self)
        codes = self._codes(groups, scales, zeros).reshape(groups.shape[0], -1)
        return {"qweight": pack_q4(codes), "scales": scales, "zeros": pack_zeros(zeros)}

    def dequantize(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        codes = self._load(np.asarray(arrays["qweight"])).astype(np.float32)
        packed, groups = np.asarray(arrays["zeros"]), codes.shape[1] // GROUP_SIZE
        if packed.dtype != np.uint8 or packed.shape != (codes.shape[0], zeros_width(groups)):
            raise EdgeforgeError(f"q4a zeros must be uint8 {(codes.shape[0], zeros_width(groups))} "
                                 f"(two a byte), got {packed.dtype} {packed.shape}")
        zeros = unpack_zeros(packed, groups)
        scales = np.asarray(arrays["scales"]).astype(np.float32)
        groups = codes.reshape(codes.shape[0], -1, GROUP_SIZE) - zeros.astype(np.float32)[:, :, None]
        return (groups * scales[:, :, None]).reshape(codes.shape)

    def _load(self, stored):
        if stored.dtype != np.uint32:
            raise EdgeforgeError(f"q4a qweight must be uint32, got {stored.dtype}")
        return unpack_q4(stored)


# The asymmetric search: for each candidate span (a fraction of [min, max], clipping the tails) and
# zero, the codes, then the scale refit to them by weighted least squares with the zero fixed
# (an integer: MatMulNBits' uint8 zero points), the best by weighted error as stored.
ASYM_SPANS = np.array([1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 1.05], dtype=np.float32)
ASYM_ZERO_SHIFTS = (-1, 0, 1)


def search_asymmetric(groups, importance, scales, zeros, fmt):
    """(scales, zeros) that minimise sum w (x - s (code - z))^2 per group, codes as stored."""
    w = search_weights(groups, importance)
    best_s, best_z = scales.astype(np.float32), zeros.copy()
    best_err = _asym_error(groups, w, best_s, best_z, fmt)
    lo, hi = _zero_span(groups)
    mid = (lo + hi) / 2
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for frac in ASYM_SPANS:
            half = (hi - lo) * frac / 2
            s0 = ((2 * half) / np.float32(Q4_LEVELS)).astype(fmt.scale_dtype).astype(np.float32)
            z0 = fmt._zeros(mid - half, s0)  # noqa: SLF001
            for shift in ASYM_ZERO_SHIFTS:
                z = np.clip(z0.astype(np.int16) + shift, 0, Q4_LEVELS).astype(np.uint8)
                s = s0
                for _ in range(SEARCH_REFITS):
                    d = fmt._codes(groups, s, z).astype(np.float32) - z[:, :, None]  # noqa: SLF001
                    refit = np.einsum("gij,gij,gij->gi", w, d, groups) / np.einsum("gij,gij,gij->gi", w, d, d)
                    s = np.where(np.isfinite(refit) & (refit > 0), refit, s).astype(fmt.scale_dtype).astype(np.float32)
                err = _asym_error(groups, w, s, z, fmt)
                better = err < best_err
                best_err = np.where(better, err, best_err)
                best_s, best_z = np.where(better, s, best_s), np.where(better, z, best_z)
    return best_s.astype(fmt.scale_dtype), best_z.astype(np.uint8)


def _zero_span(groups: np.ndarray):
    """Each group's [min, max] widened to hold 0."""
    return np.minimum(groups.min(axis=2), 0), np.maximum(groups.max(axis=2), 0)


def _asym_error(groups, w, s, z, fmt) -> np.ndarray:
    d = (fmt._codes(groups, s, z).astype(np.float32) - z[:, :, None]) * s[:, :, None]  # noqa: SLF001
    np.subtract(groups, d, out=d)
    return np.einsum("gij,gij,gij->gi", w, d, d)


def get_format(name: str, scale_dtype: str | None = None):
    """A format object by its QDIR name ('f32', 'f16', 'q8', 'q4', 'q4a')."""
    if name == "f32":
        return F32()
    if name == "f16":
        return F16()
    if name in QUANT_FORMATS:
        if scale_dtype is None:
            raise EdgeforgeError(f"format '{name}' needs a scale_dtype ({', '.join(SCALE_DTYPES)})")
        return QUANT_FORMATS[name](scale_dtype)
    raise EdgeforgeError(f"unknown storage format '{name}' (known: f32, f16, {', '.join(QUANT_FORMATS)})")


QUANT_FORMATS = {"q8": Q8, "q4": Q4, "q4a": Q4A}
