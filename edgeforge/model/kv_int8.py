"""The int8 KV cache's static scales: calibrated on the numpy reference, and its arithmetic emulated
there for golden data.

ONNX Runtime's GroupQueryAttention (CPU, >= 1.31) keeps an int8 cache with one static float32
scale per KV head and channel (k_quant_type / v_quant_type PER_CHANNEL, k_scale / v_scale inputs of
shape [1, kv_heads, 1, head_dim]): it stores clip(rint(x / scale), -128, 127) and attends over
those values times the scale. Nothing is measured per token at run time, so the scales are
calibrated once, at compile time, from the reference on the calibration text that quantization
uses, with HEADROOM above the largest value seen.

Keys are stored after RoPE, which rotates each channel pair (i, i + head_dim/2) by a
position-dependent angle: a channel's value at some far position can be anything up to the pair's
norm. Both channels of a pair get the scale of the largest pair norm seen, which RoPE cannot exceed
at any position; values get their own channel's largest magnitude.
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
    """A reference kv_hook that records, per layer, each KV head's key pair norms and value
    magnitudes (largest seen, [kv_heads, head_dim]) and stores what it was given unchanged."""

    def __init__(self, num_layers: int):
        self.keys: list[np.ndarray | None] = [None] * num_layers
        self.values: list[np.ndarray | None] = [None] * num_layers

    def __call__(self, layer: int, k: np.ndarray, v: np.ndarray):
        half = k.shape[-1] // 2
        pair = np.sqrt(k[..., :half] ** 2 + k[..., half:] ** 2).max(axis=1)  # [kv_heads, half]
        key = np.concatenate([pair, pair], axis=-1)
        value = np.abs(v).max(axis=1)
        self.keys[layer] = key if self.keys[layer] is None else np.maximum(self.keys[layer], key)
        self.values[layer] = value if self.values[layer] is None else np.maximum(self.values[layer], value)
        return k, v

    def scales(self, headroom: float = HEADROOM) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer (key scale, value scale), float32 [kv_heads, head_dim]."""
        def scale(m):
            return np.maximum(m * np.float32(headroom / QMAX), np.float32(TINY_SCALE)).astype(np.float32)
        return [(scale(k), scale(v)) for k, v in zip(self.keys, self.values)]


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
    ranges = KvRanges(model.config.num_layers)
    ref = ReferenceModel(model, kv_hook=ranges, chunk=CALIBRATION_CHUNK)
    t0 = time.perf_counter()
    ref.reset()
    with progress(len(ids), "[kv-calibrate]", unit="tokens", logger=logger) as bar:
        for start in range(0, len(ids), CALIBRATION_CHUNK):
            ref.prefill(ids[start : start + CALIBRATION_CHUNK])
            bar.advance(min(CALIBRATION_CHUNK, len(ids) - start))
    logger.info(f"[kv-calibrate] int8 KV scales from {len(ids)} tokens in {time.perf_counter() - t0:.1f} s")
    info.update(statistic="largest key pair norm (RoPE-invariant) and value magnitude per KV head and channel",
                headroom=headroom)
    return ranges.scales(headroom), info
