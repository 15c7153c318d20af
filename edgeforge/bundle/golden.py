"""golden.json: what the numpy reference gives on the bundle's own quantized weights.

A few short greedy generations (cheap on purpose: the reference is numpy), with a top-k summary of
the logits at every step and tolerances that depend on the dtype the backend computes in.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..progress import progress
from ..runtime.golden_check import GOLDEN_FORMAT, step_summary
from ..runtime.smoke import encode_prompt

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Describe a cat in one sentence.",
)
DEFAULT_TOKENS = 12
TOP_K = 8
# Relative to the golden logit range at each step (max - min): the reference runs in float32 on the
# dequantized weights, backends in model_dtype.
REL_TOL = {"float32": 1e-3, "float16": 2e-2}
# ONNX MatMulNBits accuracy_level 4 quantizes activations to int8 per block (~5e-3 relative per
# matmul, PLATFORM-NOTES); over the layers that measured 1-2% of the logit range on tiny models.
INT8_ACT_REL_TOL = 4e-2
# ONNX Runtime's aarch64 int8 kernels round activations differently from its x86 ones: SmolLM2
# q4f16 rpi5 under qemu measured 7.1e-2 and 8.2e-2 of the range (docs/notes/bundle.md, onnx.md)
# while x86 measured 3.0e-2 to 3.5e-2, with the same greedy tokens.
INT8_ACT_AARCH64_REL_TOL = 1.2e-1
# WebGPU's float16 kernels (Dawn on lavapipe) measured 1.99e-2 of the range on SmolLM2 q4f16,
# at the edge of the generic float16 bound; they accumulate in float16.
WEBGPU_F16_REL_TOL = 4e-2


# Web bundles (float32 graph, MatMulNBits accuracy_level 0), one bound per onnxruntime-web execution
# provider (the page picks its EP's). Measured: WASM 3.8e-5 absolute on SmolLM2 q4f16 (~1e-6 of the
# range), WebGPU on SwiftShader 2e-6 on the tiny models (docs/notes/web.md): the float32 bound holds.
WEB_REL_TOL = {"wasm": REL_TOL["float32"], "webgpu": REL_TOL["float32"]}


def tolerance_for(artifact: dict, arch: str = "x86_64") -> dict:
    """The golden tolerance for one compiled artifact on a target of `arch`: by compute dtype, wider
    for int8 activations and for WebGPU's float16 kernels (each bound measured, see above)."""
    dtype = (artifact.get("onnx") or {}).get("compute_dtype") or artifact.get("model_dtype", "float32")
    if artifact.get("device") == "browser":
        return {"rel": max(WEB_REL_TOL.values()), "per_ep": dict(WEB_REL_TOL),
                "why": "onnxruntime-web: per execution provider, measured", "basis": "golden logit range (max - min) per step"}
    rel, why = REL_TOL.get(dtype, 2e-2), f"{dtype} compute"
    if (artifact.get("onnx") or {}).get("accuracy_level") == 4:
        bound = INT8_ACT_AARCH64_REL_TOL if arch == "aarch64" else INT8_ACT_REL_TOL
        rel, why = max(rel, bound), f"{dtype} compute with int8 activations (MatMulNBits accuracy_level 4) on {arch}"
    elif artifact.get("device", "").startswith("webgpu") and dtype == "float16":
        rel, why = max(rel, WEBGPU_F16_REL_TOL), "float16 compute in WebGPU kernels"
    return {"rel": rel, "why": why, "basis": "golden logit range (max - min) per step"}


def greedy(engine, prompt_ids: list[int], max_tokens: int, stop_ids=(), top_k: int = TOP_K,
           progress=None) -> tuple[list[int], list[dict]]:
    """Greedy tokens and per-step summaries; stops after a stop token (positions past the end of an
    answer are never used and their logits are unusually sensitive to rounding). `progress(i)` is
    called after each step (a large model's reference takes seconds per token)."""
    engine.reset()
    logits = engine.prefill(prompt_ids)
    tokens, steps = [], []
    for i in range(max_tokens):
        if progress is not None:
            progress(i)
        steps.append(step_summary(logits, top_k))
        tokens.append(int(np.argmax(logits)))
        if tokens[-1] in stop_ids or i + 1 == max_tokens:
            break
        logits = engine.decode(tokens[-1])
    return tokens, steps


def make_golden(qdir: Path, prompts=DEFAULT_PROMPTS, max_tokens: int = DEFAULT_TOKENS) -> dict:
    """Run the numpy reference on the QDIR for each prompt (chat template when the model has one).

    Progress: a "[golden]" bar over every prompt's tokens (a large model's reference takes seconds
    per token) and one DEBUG record per prompt with its tokens."""
    from ..model.loader import load_model
    from ..model.reference import ReferenceModel

    model = load_model(Path(qdir))
    engine = ReferenceModel(model)
    dtype = model.source.get("model_dtype") or _model_dtype(qdir)
    chat = bool(getattr(model.tokenizer, "chat_template", None))
    encoded = [(text, encode_prompt(model.tokenizer, text, chat)) for text in prompts]
    counts = [max(0, min(max_tokens, model.config.context_length - len(ids))) for _, ids in encoded]
    out = []
    with progress(sum(counts), "[golden]", unit="tokens", logger=logger) as bar:
        for (text, ids), count in zip(encoded, counts):
            done = bar.count

            def step(i, text=text):
                if i:  # token i-1 is done
                    bar.advance(1, repr(text))

            tokens, steps = greedy(engine, ids, count, set(model.tokenizer.eos_token_ids), progress=step)
            bar.advance(done + count - bar.count, repr(text))  # the last token, and those after a stop token
            logger.debug(f"golden: {text!r}: {len(ids)} prompt tokens -> {tokens}")
            out.append({"text": text, "chat": chat, "prompt_ids": ids, "tokens": tokens, "steps": steps})
    return {"format": GOLDEN_FORMAT, "version": 1, "model_dtype": dtype, "top_k": TOP_K,
            "tolerance": {"rel": REL_TOL.get(dtype, 2e-2), "why": f"{dtype} compute",
                          "basis": "golden logit range (max - min) per step"},
            "reference": "edgeforge numpy reference (float32 on the dequantized QDIR weights), teacher-forced",
            "prompts": out}


def _model_dtype(qdir: Path) -> str:
    from ..runtime.files import read_json

    return read_json(Path(qdir) / "quantization.json").get("model_dtype", "float32")
