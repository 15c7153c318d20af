"""How much does quantization cost? Perplexity of the float model and of each scheme on a text,
and the mean KL(float || quantized) of the next-token distributions over the same positions.

Everything runs on the numpy reference (teacher forcing: one forward over each chunk), on weights
quantized in memory exactly as a QDIR would store them (quant.qdir.quantize_in_memory).
Other checkpoints of the same model (say llama.cpp's Q4_K_M GGUF of the same float weights) can be
scored alongside (`compare`): same tokens, same positions, same scorer, so their rows compare
exactly with the schemes' rows.

The token stream is the whole text encoded once (with BOS when the tokenizer adds one), cut to
`max_tokens`, then split into chunks of at most the model's context length. Each chunk is scored
on its own (fresh KV cache): position t predicts token t+1, so a chunk of n tokens gives n-1
predictions. Chunks shorter than 2 tokens are dropped.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from ..errors import EdgeforgeError
from .qdir import quantize_in_memory
from .schemes import check_embed_bits, get_scheme

logger = logging.getLogger(__name__)

FLOAT = "float"


@dataclass
class EvalRow:
    scheme: str  # "float", a scheme name, or the label of a compared checkpoint
    ppl: float
    ppl_ratio: float  # ppl / ppl(float)
    kl: float  # mean KL(float || this) in nats per predicted token; 0 for float
    nll: float  # mean negative log-likelihood (nats per token)
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def token_ids(model, text: str, max_tokens: int | None) -> list[int]:
    ids = list(model.tokenizer.encode(text))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise EdgeforgeError(f"eval text gives {len(ids)} token(s); at least 2 are needed to score a prediction")
    return ids


def split_chunks(ids: list[int], context: int) -> list[list[int]]:
    chunks = [ids[i : i + context] for i in range(0, len(ids), context)]
    return [c for c in chunks if len(c) >= 2]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=-1, keepdims=True))).astype(np.float32)


def reference_forward(model) -> Callable[[list[int]], np.ndarray]:
    """ids -> float32 logits [len(ids), vocab] of a fresh sequence, by the numpy reference."""
    from ..model.reference import ReferenceModel

    return ReferenceModel(model).forward  # converts (dequantizes) every weight once, here


def chunk_logprobs(model, chunks, make_forward) -> list[np.ndarray]:
    """Per chunk, log-probabilities [n-1, vocab] of the predictions for positions 1..n-1."""
    forward = make_forward(model)
    return [log_softmax(np.asarray(forward(c), dtype=np.float32)[:-1]) for c in chunks]


def mean_nll(logprobs: list[np.ndarray], chunks) -> float:
    total = sum(-float(lp[np.arange(len(c) - 1), c[1:]].astype(np.float64).sum()) for lp, c in zip(logprobs, chunks))
    return total / sum(len(c) - 1 for c in chunks)


def mean_kl(ref: list[np.ndarray], other: list[np.ndarray]) -> float:
    """Mean over positions of sum_v p(v) (log p(v) - log q(v)), p = float model."""
    total, count = 0.0, 0
    for lp, lq in zip(ref, other):
        p = np.exp(lp.astype(np.float64))
        total += float((p * (lp.astype(np.float64) - lq.astype(np.float64))).sum())
        count += lp.shape[0]
    return total / count


def evaluate(model, schemes, text: str, max_tokens: int | None = 256, embed_bits: int | None = None,
             make_forward=reference_forward, compare: dict | None = None) -> dict:
    """Perplexity and KL of `model` (float), of `model` quantized with each of `schemes`, and of
    each checkpoint in `compare` ({label: loaded model}, scored as they are)."""
    schemes = [get_scheme(s).name for s in schemes]
    check_embed_bits(embed_bits)
    compare = compare or {}
    for label, other in compare.items():
        check_comparable(model, other, label)
    ids = token_ids(model, text, max_tokens)
    chunks = split_chunks(ids, int(model.config.context_length))
    predicted = sum(len(c) - 1 for c in chunks)
    logger.info(f"{len(ids)} tokens in {len(chunks)} chunk(s) of <= {model.config.context_length}, {predicted} predictions")

    start = time.perf_counter()
    ref = chunk_logprobs(model, chunks, make_forward)
    float_nll = mean_nll(ref, chunks)
    rows = [EvalRow(FLOAT, math.exp(float_nll), 1.0, 0.0, float_nll, time.perf_counter() - start)]
    logger.info(f"{FLOAT}: ppl {rows[0].ppl:.4f}")
    importance, calibrations = None, {}
    if any(get_scheme(n).calibrated and not get_scheme(n).gptq for n in schemes):  # once for all of them
        from .calibrate import collect_importance

        importance = collect_importance(model)
    for name in schemes:
        start = time.perf_counter()
        quantized = quantize_in_memory(model, name, embed_bits, importance=importance)  # GPTQ: solved here
        if quantized.source["calibration"]:
            calibrations[name] = quantized.source["calibration"]
        rows.append(_score(name, quantized, chunks, make_forward, ref, float_nll, start))
        logger.info(f"{name}: ppl {rows[-1].ppl:.4f} (x{rows[-1].ppl_ratio:.4f}), KL {rows[-1].kl:.5f}")
    for label, other in compare.items():
        rows.append(_score(label, other, chunks, make_forward, ref, float_nll, time.perf_counter()))
        logger.info(f"{label}: ppl {rows[-1].ppl:.4f} (x{rows[-1].ppl_ratio:.4f}), KL {rows[-1].kl:.5f}")
    return {"tokens": len(ids), "predictions": predicted, "chunks": len(chunks), "embed_bits": embed_bits,
            "calibration": next(iter(calibrations.values()), None), "calibrations": calibrations,
            "rows": [r.to_dict() for r in rows]}


def _score(label: str, model, chunks, make_forward, ref, float_nll: float, start: float) -> EvalRow:
    lq = chunk_logprobs(model, chunks, make_forward)
    nll = mean_nll(lq, chunks)
    return EvalRow(label, math.exp(nll), math.exp(nll - float_nll), mean_kl(ref, lq), nll, time.perf_counter() - start)


def check_comparable(model, other, label: str) -> None:
    """A compared checkpoint must be the same network: same vocabulary and shapes, or KL is meaningless."""
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
        mine, theirs = getattr(model.config, key), getattr(other.config, key)
        if mine != theirs:
            raise EdgeforgeError(f"--compare {label}: {key} is {theirs}, but the evaluated model has {mine}; "
                                 "compare only checkpoints of the same model")


def format_table(result: dict) -> str:
    width = max(8, *(len(r["scheme"]) for r in result["rows"]))
    lines = [f"{'scheme':<{width}} {'ppl':>10} {'ppl ratio':>10} {'KL':>10} {'seconds':>8}"]
    for r in result["rows"]:
        lines.append(f"{r['scheme']:<{width}} {r['ppl']:>10.4f} {r['ppl_ratio']:>10.4f} {r['kl']:>10.4g} {r['seconds']:>8.1f}")
    lines.append(f"({result['predictions']} predicted tokens, {result['chunks']} chunk(s); KL = mean KL(float || scheme), nats)")
    return "\n".join(lines)
