"""The int8 KV cache's static scales and rotation: calibrated on the numpy reference, and its
arithmetic emulated there for golden data.

ONNX Runtime's GroupQueryAttention (CPU, >= 1.31) keeps an int8 cache with one static float32
scale per KV head and channel (k_quant_type / v_quant_type PER_CHANNEL, k_scale / v_scale inputs of
shape [1, kv_heads, 1, head_dim]): it stores clip(rint(x / scale), -128, 127) and attends over
those values times the scale. Nothing is measured per token at run time, so the scales are
calibrated once, at compile time, from the reference on the calibration text that quantization
uses, with HEADROOM above the largest value seen.

Static scales suffer from channels: a few key and value channels are far larger than the rest
(outliers), and RoPE moves a key's energy between the two channels of a pair with the position, so
a per-channel scale must cover every position below the context (coarse steps) or saturate far
away. The graph therefore multiplies each head's keys (after RoPE) and values by an orthonormal
`rotation` (a Hadamard matrix) before the cache and undoes it where it cancels: queries get the
same rotation (q.k = qR.kR), the attention output the transpose (p @ (V R) R^T = p @ V), so the
float model is unchanged. Every rotated channel is a +-1/sqrt(head_dim) mix of all channels:
outliers and RoPE's pairs spread evenly, one scale per KV head fits every channel and every
position, and the steps it gives are fine. Measured on SmolLM2 (docs/notes/kv-cache.md,
Session 18): the cache's own KL at positions 7680-8191 falls from 0.0044 to 0.0018 (ONNX
Runtime with float activations: 0.0019). A rotated channel is no longer bounded at far positions
by construction (the safe bound, the head's largest key norm, scored 0.0077: too coarse); the
measured windows up to 8k show no saturation cost.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from ..progress import progress
from .reference import int8_kv

logger = logging.getLogger(__name__)

# scale = HEADROOM * largest calibrated magnitude / 127. 1.0: with the rotation, the steps cost more
# than the saturation of rare larger values on other text (Session 18: 1.0 / 1.1 / 1.25 / 1.5 scored
# KL 0.0019 / 0.0018 / 0.0021 / 0.0035 at 7680-8191 and 0.0013 / 0.0017 / 0.0018 / 0.0026 at 0-511).
HEADROOM = 1.0
QMAX = 127
TINY_SCALE = 1e-8  # a head that was always 0 (a zero scale would divide by zero in the kernel)
CALIBRATION_CHUNK = 128


@dataclass
class KvQuant:
    """An int8 KV cache: per layer (key scale, value scale) float32 [kv_heads, head_dim], and the
    orthonormal [head_dim, head_dim] rotation applied to keys and values before they are stored
    (None: stored as computed, the graphs compiled before Session 18)."""

    scales: list[tuple[np.ndarray, np.ndarray]]
    rotation: np.ndarray | None


def rotation_kind(head_dim: int) -> str:
    return "hadamard" if head_dim & (head_dim - 1) == 0 else "random orthogonal (seed 0)"


def rotation(head_dim: int) -> np.ndarray:
    """The orthonormal matrix the cache's keys and values are rotated by: a Sylvester Hadamard
    matrix / sqrt(head_dim) for a power-of-two head_dim (every Llama so far), else a seeded random
    orthogonal matrix (the same every compile). float32."""
    if rotation_kind(head_dim) == "hadamard":
        h = np.ones((1, 1))
        while h.shape[0] < head_dim:
            h = np.block([[h, h], [h, -h]])
        return (h / np.sqrt(head_dim)).astype(np.float32)
    q, r = np.linalg.qr(np.random.default_rng(0).standard_normal((head_dim, head_dim)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


class KvRanges:
    """A reference kv_hook that records, per layer and KV head, the largest magnitude of the keys and
    of the values once rotated by `rotation`, and stores what it was given unchanged."""

    def __init__(self, num_layers: int, rotation: np.ndarray):
        self.rotation = rotation
        self.keys: list[np.ndarray | None] = [None] * num_layers
        self.values: list[np.ndarray | None] = [None] * num_layers

    def __call__(self, layer: int, k: np.ndarray, v: np.ndarray):
        key, value = (np.abs(x @ self.rotation).max(axis=(1, 2)) for x in (k, v))  # [kv_heads]
        self.keys[layer] = key if self.keys[layer] is None else np.maximum(self.keys[layer], key)
        self.values[layer] = value if self.values[layer] is None else np.maximum(self.values[layer], value)
        return k, v

    def scales(self, headroom: float = HEADROOM) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer (key scale, value scale), float32 [kv_heads, head_dim] (one value per head)."""
        dim = self.rotation.shape[0]

        def scale(m):
            s = np.maximum(m * np.float32(headroom / QMAX), np.float32(TINY_SCALE)).astype(np.float32)
            return np.repeat(s[:, None], dim, axis=1)
        return [(scale(k), scale(v)) for k, v in zip(self.keys, self.values)]


class KvInt8Hook:
    """A reference kv_hook that rounds new keys and values as the int8 cache stores them: rotated,
    rounded by the scales, rotated back (the graph attends with rotated queries instead: equal up to
    float rounding). `perturb(x)`, when given, sees what is rounded first: golden data's dithered runs
    (bundle/golden.py) move values near a rounding boundary across it, as the graph's own float order
    for the rotation does now and then."""

    def __init__(self, quant: KvQuant, perturb=None):
        self.quant, self.perturb = quant, perturb

    def __call__(self, layer: int, k: np.ndarray, v: np.ndarray):
        (ks, vs), r = self.quant.scales[layer], self.quant.rotation
        out = []
        for x, scale in ((k, ks), (v, vs)):
            x = x if r is None else x @ r
            x = int8_kv(x if self.perturb is None else self.perturb(x), scale)
            out.append(x if r is None else x @ r.T)
        return tuple(out)


def calibrate(model, max_tokens: int | None = None, headroom: float = HEADROOM) -> tuple[KvQuant, dict]:
    """(the cache's rotation and per-layer scales, provenance) for `model` (a LoadedModel, normally
    the QDIR being compiled: the scales follow the weights the device runs)."""
    from ..quant.calibrate import CALIBRATION_TOKENS, _calibration_tokens
    from .reference import ReferenceModel

    ids, info = _calibration_tokens(model, max_tokens or CALIBRATION_TOKENS)
    c = model.config
    ranges = KvRanges(c.num_layers, rotation(c.head_dim))
    ref = ReferenceModel(model, kv_hook=ranges, chunk=CALIBRATION_CHUNK)
    t0 = time.perf_counter()
    ref.reset()
    with progress(len(ids), "[kv-calibrate]", unit="tokens", logger=logger) as bar:
        for start in range(0, len(ids), CALIBRATION_CHUNK):
            ref.prefill(ids[start : start + CALIBRATION_CHUNK])
            bar.advance(min(CALIBRATION_CHUNK, len(ids) - start))
    logger.info(f"[kv-calibrate] int8 KV scales from {len(ids)} tokens in {time.perf_counter() - t0:.1f} s")
    info.update(statistic="keys and values rotated (Hadamard): largest magnitude per KV head", headroom=headroom)
    return KvQuant(ranges.scales(headroom), ranges.rotation), info
