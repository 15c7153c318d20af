"""The int8 KV cache's static scales: calibrated on the numpy reference, and its arithmetic emulated
there for golden data.

ONNX Runtime's GroupQueryAttention (CPU, >= 1.31) keeps an int8 cache with one static float32
scale per KV head and channel (k_quant_type / v_quant_type PER_CHANNEL, k_scale / v_scale inputs of
shape [1, kv_heads, 1, head_dim]): it stores clip(rint(x / scale), -128, 127) and attends over
those values times the scale. Nothing is measured per token at run time, so the scales are
calibrated once, at compile time, from the reference on the calibration text that quantization
uses, with HEADROOM above the largest value seen.

Keys are stored after RoPE, which rotates each channel pair (i, i + head_dim/2) by the angle
position x inv_freq[i]: a channel's value at some far position can be anything up to the pair's
norm. For each calibrated key the statistic is the largest magnitude its pair reaches at any
position below the model's context length: the pair norm where the pair turns a full circle
within the context, less for the slowest pairs (whose rotation stays within an arc). A channel's
scale from the largest per-channel magnitude seen at the calibration positions instead keeps 0-511
better but saturates far positions (measured: KL 1.76 at positions 7680-8191 on SmolLM2;
docs/notes/kv-cache.md, Session 10).

Values get one scale per KV head (the head's largest magnitude, in every channel of the head):
per-channel maxima of 512 calibration tokens are exceeded up to 2.6x on other text, and saturating
a value costs far more than a coarser step (Session 10: per head halves the cache's own KL at
positions 0-511, 0.0054 -> 0.0028).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..progress import progress
from .reference import int8_kv

logger = logging.getLogger(__name__)

HEADROOM = 1.25  # scale = HEADROOM * largest calibrated magnitude / 127 (docs/notes/kv-cache.md)
QMAX = 127
TINY_SCALE = 1e-8  # a channel that was always 0 (a zero scale would divide by zero in the kernel)
CALIBRATION_CHUNK = 128


class KvRanges:
    """A reference kv_hook that records, per layer, each KV head's key and value ranges and stores
    what it was given unchanged. Keys: per channel, the largest magnitude a calibrated key reaches at
    any position below `context` given RoPE's `inv_freq` (the pair norm when those are not given:
    every rotation). Values: per KV head, the largest magnitude."""

    def __init__(self, num_layers: int, inv_freq: np.ndarray | None = None, context: int | None = None):
        self.keys: list[np.ndarray | None] = [None] * num_layers
        self.values: list[np.ndarray | None] = [None] * num_layers
        self.seen = [0] * num_layers  # positions so far (the calibration prefill starts at 0)
        self.inv_freq = None if inv_freq is None else np.asarray(inv_freq, np.float64)
        self.context = context

    def __call__(self, layer: int, k: np.ndarray, v: np.ndarray):
        positions = np.arange(self.seen[layer], self.seen[layer] + k.shape[1])
        self.seen[layer] += k.shape[1]
        key = reachable_key_magnitude(k, positions, self.inv_freq, self.context).max(axis=1)  # [kv_heads, D]
        value = np.broadcast_to(np.abs(v).max(axis=(1, 2))[:, None], key.shape)
        self.keys[layer] = key if self.keys[layer] is None else np.maximum(self.keys[layer], key)
        self.values[layer] = value if self.values[layer] is None else np.maximum(self.values[layer], value)
        return k, v

    def scales(self, headroom: float = HEADROOM) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer (key scale, value scale), float32 [kv_heads, head_dim]."""
        def scale(m):
            return np.maximum(m * np.float32(headroom / QMAX), np.float32(TINY_SCALE)).astype(np.float32)
        return [(scale(k), scale(v)) for k, v in zip(self.keys, self.values)]


def reachable_key_magnitude(k: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray | None,
                            context: int | None) -> np.ndarray:
    """Per key ([kv_heads, T, head_dim], after RoPE at `positions`) and channel: the largest |value|
    that key's channel takes when the same raw key sits at any position in [0, context).

    RoPE turns pair i's raw (a, b) = r (cos t, sin t) into r (cos(t + p w), sin(t + p w)) at position
    p (w = inv_freq[i]): over p in [0, context) the angle sweeps an arc of width (context - 1) w. A
    full turn or more reaches r in both channels; a shorter arc reaches r in a channel only where it
    crosses that channel's peak, else the larger of its two ends."""
    half = k.shape[-1] // 2
    a, b = k[..., :half].astype(np.float64), k[..., half:].astype(np.float64)
    r = np.sqrt(a * a + b * b)
    if inv_freq is None or context is None:
        return np.concatenate([r, r], axis=-1).astype(np.float32)
    lo = np.arctan2(b, a) - positions[None, :, None] * inv_freq  # the raw angle (position 0)
    span = (context - 1) * inv_freq
    hi = lo + span

    def peak(offset):  # the arc [lo, hi] holds offset + n pi for some n
        return np.floor((hi - offset) / np.pi) > np.floor((lo - offset) / np.pi)

    full = span >= 2 * np.pi
    cos = np.where(full | peak(0.0), 1.0, np.maximum(np.abs(np.cos(lo)), np.abs(np.cos(hi))))
    sin = np.where(full | peak(np.pi / 2), 1.0, np.maximum(np.abs(np.sin(lo)), np.abs(np.sin(hi))))
    return np.concatenate([r * cos, r * sin], axis=-1).astype(np.float32)


class KvInt8Hook:
    """A reference kv_hook that rounds new keys and values as the int8 cache stores them."""

    def __init__(self, scales: list[tuple[np.ndarray, np.ndarray]]):
        self.scales = scales

    def __call__(self, layer: int, k: np.ndarray, v: np.ndarray):
        ks, vs = self.scales[layer]
        return int8_kv(k, ks), int8_kv(v, vs)


def calibrate(model, max_tokens: int | None = None, headroom: float = HEADROOM) -> tuple[list, dict]:
    """(per layer (key scale, value scale), provenance) for `model` (a LoadedModel, normally the QDIR
    being compiled: the scales follow the weights the device runs)."""
    from ..quant.calibrate import CALIBRATION_TOKENS, _calibration_tokens
    from .reference import ReferenceModel

    ids, info = _calibration_tokens(model, max_tokens or CALIBRATION_TOKENS)
    c = model.config
    ranges = KvRanges(c.num_layers, inv_freq=c.rope_inv_freq(), context=c.context_length)
    ref = ReferenceModel(model, kv_hook=ranges, chunk=CALIBRATION_CHUNK)
    t0 = time.perf_counter()
    ref.reset()
    with progress(len(ids), "[kv-calibrate]", unit="tokens", logger=logger) as bar:
        for start in range(0, len(ids), CALIBRATION_CHUNK):
            ref.prefill(ids[start : start + CALIBRATION_CHUNK])
            bar.advance(min(CALIBRATION_CHUNK, len(ids) - start))
    logger.info(f"[kv-calibrate] int8 KV scales from {len(ids)} tokens in {time.perf_counter() - t0:.1f} s")
    info.update(statistic="keys: largest magnitude per KV head and channel at any position below the context "
                          "(RoPE arcs); values: largest magnitude per KV head",
                headroom=headroom)
    return ranges.scales(headroom), info
