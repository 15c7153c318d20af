"""Calibration: how much each input column of each linear layer matters, measured on a text.

For every matrix W of the model, the mean square of the activations that multiply it (x @ W.T),
per input column, over the calibration text (llama.cpp's importance-matrix idea): a column that
always sees large activations must be quantized more carefully than one that sees almost zero.
The q4 format uses it as the weights of its scale search (formats.search_scales).

The text ships with the package (edgeforge/data/calibration.txt, written for edgeforge and unlike
every evaluation text). The numpy reference runs the float model over it, prefill in chunks; the
statistics and their provenance (text sha256, tokens) go into the QDIR's quantization.json.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np

from ..progress import progress

CALIBRATION_TEXT = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"
CALIBRATION_TOKENS = 512  # measured on SmolLM2: 256 -> 512 tokens gains little past this (notes)
CHUNK = 128  # prefill chunk: bounds the reference's attention scores

logger = logging.getLogger(__name__)


def calibration_text() -> tuple[str, str]:
    data = CALIBRATION_TEXT.read_bytes()
    return data.decode("utf-8"), hashlib.sha256(data).hexdigest()


def collect_importance(model, max_tokens: int = CALIBRATION_TOKENS) -> tuple[dict, dict]:
    """({tensor name: float32 [in_features] mean square of its input}, provenance) for `model`
    (a LoadedModel of float or quantized weights; the reference reads them as float32)."""
    from ..model.reference import ReferenceModel

    text, digest = calibration_text()
    ids = model.tokenizer.encode(text)[: min(max_tokens, model.config.context_length)]
    sums: dict[str, np.ndarray] = {}

    def observe(name: str, x: np.ndarray) -> None:
        sq = np.einsum("ti,ti->i", x, x, dtype=np.float64)
        sums[name] = sq if name not in sums else sums[name] + sq

    t0 = time.perf_counter()
    # cache_bytes=0: the float model is streamed (quantization's memory stays ~one tensor)
    ref = ReferenceModel(model, observe=observe, cache_bytes=0)
    ref.reset()
    with progress(len(ids), "[calibrate]", unit="tokens", logger=logger) as bar:
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            ref.prefill(chunk)
            bar.advance(len(chunk))
    importance = {name: (s / len(ids)).astype(np.float32) for name, s in sums.items()}
    info = {"text": CALIBRATION_TEXT.name, "sha256": digest, "tokens": len(ids),
            "statistic": "mean square of each input column of every matmul (float reference)"}
    logger.info(f"[calibrate] {len(importance)} matrices from {len(ids)} tokens in {time.perf_counter() - t0:.1f} s")
    return importance, info
