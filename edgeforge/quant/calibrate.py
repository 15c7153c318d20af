"""Calibration: how much each input column of each linear layer matters, measured on a text.

For every matrix W of the model, the mean square of the activations that multiply it (x @ W.T),
per input column, over the calibration text (llama.cpp's importance-matrix idea): a column that
always sees large activations must be quantized more carefully than one that sees almost zero.
The q4 format uses it as the weights of its scale search (formats.search_scales).

The text ships with the package (edgeforge/data/calibration.txt, written for edgeforge and unlike
every evaluation text). The numpy reference runs the float model over it, prefill in chunks; the
statistics and their provenance (text sha256, tokens) go into the QDIR's quantization.json.

Schemes with `gptq` quantize their q4a and q8 matrices here instead (solve_gptq): the reference
runs the calibration tokens as one prefill, and as each matrix's input X arrives, H = X^T X is
formed and the matrix quantized by GPTQ (quant/gptq.py) at once, its stored arrays spilled to a
folder. Memory stays one Hessian and one float matrix however deep the model is; the reference
itself always computes with the float weights (measured: feeding later layers the quantized
outputs, "true sequential", scored worse on SmolLM2; docs/notes/quant.md).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cache import scratch_dir
from ..progress import progress

CALIBRATION_TEXT = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"
CALIBRATION_TOKENS = 512  # measured on SmolLM2: 256 -> 512 tokens gains little past this (notes)
# GPTQ takes the whole text (1923 SmolLM2 tokens): measured on the full eval texts, KL 0.0331 ->
# 0.0290 and 0.0387 -> 0.0351 against 512 tokens (docs/notes/quant.md, session 7)
GPTQ_TOKENS = 4096
CHUNK = 128  # prefill chunk: bounds the reference's attention scores

logger = logging.getLogger(__name__)


def calibration_text() -> tuple[str, str]:
    data = CALIBRATION_TEXT.read_bytes()
    return data.decode("utf-8"), hashlib.sha256(data).hexdigest()


def _calibration_tokens(model, max_tokens: int) -> tuple[list[int], dict]:
    """The calibration text's first tokens (at most the model's context) and their provenance."""
    text, digest = calibration_text()
    ids = model.tokenizer.encode(text)[: min(max_tokens, model.config.context_length)]
    return ids, {"text": CALIBRATION_TEXT.name, "sha256": digest, "tokens": len(ids)}


class _MeanSquares:
    """Per matrix, each input column's square summed over the tokens seen (float64)."""

    def __init__(self):
        self.sums: dict[str, np.ndarray] = {}

    def add(self, name: str, x: np.ndarray) -> None:
        sq = np.einsum("ti,ti->i", x, x, dtype=np.float64)
        self.sums[name] = sq if name not in self.sums else self.sums[name] + sq

    def mean(self, tokens: int) -> dict[str, np.ndarray]:
        return {name: (s / tokens).astype(np.float32) for name, s in self.sums.items()}


def collect_importance(model, max_tokens: int = CALIBRATION_TOKENS) -> tuple[dict, dict]:
    """({tensor name: float32 [in_features] mean square of its input}, provenance) for `model`
    (a LoadedModel of float or quantized weights; the reference reads them as float32)."""
    from ..model.reference import ReferenceModel

    ids, info = _calibration_tokens(model, max_tokens)
    squares = _MeanSquares()
    t0 = time.perf_counter()
    # cache_bytes=0: the float model is streamed (quantization's memory stays ~one tensor)
    ref = ReferenceModel(model, observe=squares.add, cache_bytes=0, chunk=None)  # chunked below, by CHUNK
    ref.reset()
    with progress(len(ids), "[calibrate]", unit="tokens", logger=logger) as bar:
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            ref.prefill(chunk)
            bar.advance(len(chunk))
    importance = squares.mean(len(ids))
    info["statistic"] = "mean square of each input column of every matmul (float reference)"
    logger.info(f"[calibrate] {len(importance)} matrices from {len(ids)} tokens in {time.perf_counter() - t0:.1f} s")
    return importance, info


@dataclass
class Calibration:
    """What a calibrated scheme learned from the calibration text: per matrix importance (the scale
    search's weights), GPTQ's stored arrays (`store`), and the provenance for quantization.json."""

    importance: dict
    info: dict | None
    store: "GptqStore | None" = None

    def solved(self, name: str) -> dict | None:
        """GPTQ's stored arrays of `name`, or None (quantize it from the weights)."""
        return None if self.store is None else self.store.get(name)


class GptqStore:
    """Stored arrays of the matrices GPTQ quantized, one .npy file an array in `folder` (when None, a
    fresh scratch folder in the edgeforge cache, removed with this object: `edgeforge eval`), read
    back memory-mapped."""

    def __init__(self, folder: Path | None = None):
        self._tmp = None if folder is not None else scratch_dir("gptq")
        self.folder = Path(folder if folder is not None else self._tmp.name)
        self.index: dict[str, dict[str, Path]] = {}

    def put(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        paths = {}
        for role, arr in arrays.items():
            paths[role] = self.folder / f"{len(self.index)}.{role}.npy"
            np.save(paths[role], arr)
        self.index[name] = paths

    def get(self, name: str) -> dict[str, np.ndarray] | None:
        paths = self.index.get(name)
        return None if paths is None else {role: np.load(p, mmap_mode="r") for role, p in paths.items()}


def prefill_bytes(config, tokens: int) -> int:
    """Peak bytes of solve_gptq's one float prefill of `tokens` tokens: a few [tokens, width]
    activations, the attention scores (heads x tokens^2, with the softmax's copies) and the
    reference's float32 KV cache (k and v, every layer, allocated at twice the prompt)."""
    acts = 4 * tokens * (4 * config.hidden_size + 3 * config.intermediate_size)
    kv = 2 * 4 * config.num_layers * config.num_kv_heads * config.head_dim * 2 * tokens
    return acts + 3 * 4 * config.num_heads * tokens * tokens + kv


def gptq_tokens(model, max_tokens: int = GPTQ_TOKENS) -> int:
    """How many calibration tokens solve_gptq will run (for the memory check)."""
    return len(_calibration_tokens(model, max_tokens)[0])


def solve_gptq(model, formats: dict, store: GptqStore, max_tokens: int = GPTQ_TOKENS) -> tuple[dict, dict]:
    """Quantize the matrices of `formats` ({tensor name: Q4A or Q8 format}) by GPTQ on the calibration
    text into `store`; returns the importance of every other matrix (as collect_importance: the
    scale search of an embedding stored as q4 uses it) and the provenance for quantization.json. A
    matrix the forward pass never multiplies (none in a Llama model) is left out of the store."""
    from ..model.reference import ReferenceModel
    from .gptq import DAMP, gptq_quantize

    ids, info = _calibration_tokens(model, max_tokens)
    last: list = [None, None]  # q/k/v (and gate/up) see the same input: one Hessian for them
    squares = _MeanSquares()

    t0 = time.perf_counter()
    with progress(len(formats), "[gptq]", unit="matrices", logger=logger) as bar:
        def observe(name: str, x: np.ndarray) -> None:
            fmt = formats.get(name)
            if fmt is None:
                squares.add(name, x)
                return
            if name in store.index:
                return
            if last[0] is not x:
                x64 = x.astype(np.float64)
                last[0], last[1] = x, x64.T @ x64
            store.put(name, gptq_quantize(model.tensors.get(name), last[1], fmt, name))
            release = getattr(model.tensors, "release", None)
            if release is not None:
                release(name)
            bar.advance(1, name)

        # One prefill over every token: each observe() sees a matrix's whole input at once.
        ref = ReferenceModel(model, observe=observe, cache_bytes=0, chunk=None)
        ref.reset()
        ref.prefill(ids)
    logger.info(f"[gptq] {len(store.index)} matrices from {len(ids)} tokens in {time.perf_counter() - t0:.1f} s")
    missed = sorted(set(formats) - set(store.index))
    if missed:  # not in a Llama model: every matrix of a layer multiplies something
        logger.warning(f"[gptq] {len(missed)} matrices never multiplied in the forward pass, quantized without "
                       f"GPTQ: {', '.join(missed[:3])}{' ...' if len(missed) > 3 else ''}")
    info.update(method="gptq", statistic=f"H = X^T X of every quantized matmul's input (float reference), "
                f"damp {DAMP} mean(diag H); mean square of each input column for the others")
    return squares.mean(len(ids)), info
