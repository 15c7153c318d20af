"""golden.json: what the numpy reference gives on the bundle's own quantized weights.

A few short greedy generations (cheap on purpose: the reference is numpy), with a top-k summary of
the logits at every step and tolerances that depend on the dtype the backend computes in. For
paths whose engine rounds activations to int8, each step also records how much the model moves
when those roundings flip (`spread`, from dithered reference runs), which widens that step's
tolerance within bounds the verifier sets (runtime/manifest_check.TOLERANCES).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..progress import progress
from ..runtime.golden_check import GOLDEN_FORMAT, step_summary
from ..errors import EdgeforgeError
from ..runtime.manifest_check import (FLOAT32, INT8_ACTIVATIONS, INT8_ACTIVATIONS_ARM, INT8_KV, MAX_WIDENED_SHARE, SPREAD_FACTOR,
                                      TOLERANCES, WIDEST, compute_path)
from ..runtime.smoke import encode_prompt

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Describe a cat in one sentence.",
)
DEFAULT_TOKENS = 12
TOP_K = 8
# Reference runs with dithered rounded inputs behind each step's spread (TOLERANCES' dither), side by
# side (reference.Runs: the weights are read once for all). On 72 random outlier models x 3 schemes
# (docs/notes/bundle.md, Session 11) 4 runs still left false FAILs on aarch64 float16; 8 none.
SPREAD_RUNS = 8


# Web bundles: onnxruntime-web's execution providers the page may run, each with its own bound
# (the page picks its EP's; the verifier caps every one by the compute path's row).
WEB_EPS = ("wasm", "webgpu")


def tolerance_for(artifact: dict, arch: str = "x86_64") -> dict:
    """The golden tolerance of one compiled artifact on a target of `arch`: the verifier's own bound
    for its compute path (runtime/manifest_check.TOLERANCES, measured in docs/BUNDLES.md)."""
    path = compute_path(artifact, arch)
    arithmetic, rel, dither = TOLERANCES[path]
    tolerance = {"rel": rel, "why": f"{path} compute, golden data in {arithmetic} arithmetic",
                 "basis": "golden logit range (max - min) per step"}
    if dither is not None:
        tolerance["widening"] = (f"a step whose spread (reference runs with inputs dithered by {dither:g}) is s: "
                                 f"max(rel, min({SPREAD_FACTOR:g} s, {WIDEST:g})); at most {MAX_WIDENED_SHARE:.0%} "
                                 "of the steps widened")
    if artifact.get("device") == "browser":
        tolerance["per_ep"] = {ep: rel for ep in WEB_EPS}
    return tolerance


def golden_kind(artifact: dict, arch: str) -> tuple[str, float | None]:
    """(arithmetic, dither) of the golden data this artifact needs: the arithmetic it must follow
    (FLOAT32, INT8_ACTIVATIONS or INT8_ACTIVATIONS_ARM, each possibly with INT8_KV) and the dither
    its per-step spreads are measured with (None: no spreads)."""
    arithmetic, _, dither = TOLERANCES[compute_path(artifact, arch)]
    return arithmetic, dither


def planned_kind(target, backend: str, model_dtype: str = FLOAT32) -> tuple[str, float | None]:
    """golden_kind of what compiling for (target, backend) will give, before it is compiled (the
    ONNX backend's accuracy_level defaults to 4 and its compute dtype follows the scheme, like its
    compile)."""
    onnx = {}
    if backend == "onnx":
        from ..backends.onnx.compile import compute_dtype

        settings = {"accuracy_level": 4, **(target.onnx or {})}
        ep = settings.get("execution_provider", "CPUExecutionProvider")
        onnx = {**settings, "compute_dtype": compute_dtype(target, ep, model_dtype)}
    return golden_kind({"backend": backend, "onnx": onnx, "model_dtype": model_dtype}, target.arch)


def golden_of(goldens: dict, qdir: Path, artifact: dict, arch: str, artifact_dir: Path | None = None) -> dict:
    """The golden data for a compiled artifact: from `goldens` ({(arithmetic, dither): golden}, or
    one golden), computed here for the same prompts when none is of the artifact's kind (an int8 KV
    cache's never is: it rounds by the scales in the compiled graph at `artifact_dir`)."""
    arithmetic, dither = golden_kind(artifact, arch)
    if goldens.get("format") == GOLDEN_FORMAT:
        goldens = {_kind_of(goldens): goldens}
    if (arithmetic, dither) in goldens:
        return goldens[(arithmetic, dither)]
    any_golden = next(iter(goldens.values()))
    kv_quant = None
    if arithmetic.endswith(INT8_KV):
        from ..backends.onnx.compile import kv_quant_of

        kv_quant = kv_quant_of(Path(artifact_dir))
    return make_golden(qdir, [p["text"] for p in any_golden["prompts"]], any_golden.get("max_tokens", DEFAULT_TOKENS),
                       arithmetic=arithmetic, kv_quant=kv_quant, dither=dither)


def _kind_of(golden: dict) -> tuple[str, float | None]:
    return golden.get("arithmetic", FLOAT32), (golden.get("sensitivity") or {}).get("dither")


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


def make_golden(qdir: Path, prompts=DEFAULT_PROMPTS, max_tokens: int = DEFAULT_TOKENS, arithmetic: str = FLOAT32,
                kv_quant=None, dither: float | None = None) -> dict:
    """Run the numpy reference on the QDIR for each prompt (chat template when the model has one).

    arithmetic: FLOAT32, or INT8_ACTIVATIONS for artifacts whose quantized matmuls round their
    inputs to int8 blocks (ONNX Runtime's CPU kernels at accuracy_level 4): the reference then
    rounds the same inputs the same way, so the golden data follows the engine's arithmetic.
    Either with the INT8_KV suffix: keys and values are also rounded as an int8 KV cache with
    `kv_quant` (model/kv_int8.KvQuant: its rotation and per-layer scales) stores them.
    dither (int8 arithmetics only): each step also gets its `spread`, the largest deviation (fraction
    of the step's logit range, on its top-k ids) of SPREAD_RUNS teacher-forced runs whose rounded
    inputs are first scaled by 1 + dither x uniform(-1, 1) (seeded: the same golden data every
    build). A code an engine's float order flips at a rounding boundary moves the logits by what
    these runs show; the smoke tolerance of that step widens accordingly (manifest_check.step_rel).

    Progress: a "[golden]" bar over every prompt's tokens, each run (a large model's reference takes
    seconds per token), and one DEBUG record per prompt with its tokens."""
    from ..model.loader import load_model
    from ..model.reference import int8_blocks

    base, int8_kv = arithmetic.removesuffix(INT8_KV), arithmetic.endswith(INT8_KV)
    if int8_kv and kv_quant is None:
        raise EdgeforgeError(f"golden data in {arithmetic!r} arithmetic needs the int8 KV cache's scales")
    if dither is not None and base == FLOAT32:
        raise EdgeforgeError("golden data: a dither needs an arithmetic that rounds the matmul inputs")
    model = load_model(Path(qdir))
    tensors, int8_inputs = model.tensors, {}
    if base == INT8_ACTIVATIONS:
        int8_inputs = dict.fromkeys(_block_quantized(model), int8_blocks)
    elif base == INT8_ACTIVATIONS_ARM:
        tensors, int8_inputs = _arm_int8(model)
    engine = _reference(model, tensors, int8_inputs, kv_quant if int8_kv else None)
    dtype = model.source.get("model_dtype") or model_dtype_of(qdir)
    chat = bool(getattr(model.tokenizer, "chat_template", None))
    encoded = [(text, encode_prompt(model.tokenizer, text, chat)) for text in prompts]
    counts = [max(0, min(max_tokens, model.config.context_length - len(ids))) for _, ids in encoded]
    out = []
    with progress(sum(counts) * (1 if dither is None else 2), "[golden]", unit="tokens", logger=logger) as bar:
        for (text, ids), count in zip(encoded, counts):
            done = bar.count

            def step(i, text=text):
                if i:  # token i-1 is done
                    bar.advance(1, repr(text))

            tokens, steps = greedy(engine, ids, count, set(model.tokenizer.eos_token_ids), progress=step)
            bar.advance(done + count - bar.count, repr(text))  # the last token, and those after a stop token
            logger.debug(f"golden: {text!r}: {len(ids)} prompt tokens -> {tokens}")
            out.append({"text": text, "chat": chat, "prompt_ids": ids, "tokens": tokens, "steps": steps})
        if dither is not None:  # SPREAD_RUNS dithered runs side by side: the weights are read once for all
            dithered = {name: _Dithered(fn, dither) for name, fn in int8_inputs.items()}
            runs = _reference(model, tensors, dithered, kv_quant if int8_kv else None,
                              _Dithered(_unrounded, dither, seed=1)).runs(SPREAD_RUNS)
            for prompt, count in zip(out, counts):
                done = bar.count
                _add_spreads(runs, prompt, lambda i, text=prompt["text"]: bar.advance(1, f"{text!r} (spread)"))
                bar.advance(done + count - bar.count, f"{prompt['text']!r} (spread)")
    golden = {"format": GOLDEN_FORMAT, "version": 1, "model_dtype": dtype, "top_k": TOP_K, "arithmetic": arithmetic,
              "max_tokens": max_tokens,
              "tolerance": None,  # set per bundle from its compute path (tolerance_for)
              "reference": "edgeforge numpy reference (float32 on the dequantized QDIR weights"
                           + (", int8-rounded inputs of the quantized matmuls" if base == INT8_ACTIVATIONS else "")
                           + (", inputs of the quantized matmuls rounded as ONNX Runtime's aarch64 int8 kernels do "
                              "(4-bit symmetric: int8 per row, bfloat16 weight scales; others: int8 blocks)"
                              if base == INT8_ACTIVATIONS_ARM else "")
                           + (", keys and values rounded as the int8 KV cache stores them" if int8_kv else "")
                           + "), teacher-forced",
              "prompts": out}
    if dither is not None:
        golden["sensitivity"] = {"dither": dither, "runs": SPREAD_RUNS,
                                 "what": "per step: the largest |logit - golden| / range on the golden top-k ids of "
                                         "teacher-forced runs whose rounded matmul inputs (and int8 KV cache "
                                         "entries) were scaled by 1 + dither x uniform(-1, 1)"}
    return golden


def _reference(model, tensors, int8_inputs, kv_quant, kv_perturb=None):
    from ..model.kv_int8 import KvInt8Hook
    from ..model.reference import ReferenceModel

    return ReferenceModel(model, tensors=tensors, int8_inputs=int8_inputs,
                          kv_hook=KvInt8Hook(kv_quant, kv_perturb) if kv_quant is not None else None)


def _unrounded(x: np.ndarray) -> np.ndarray:
    return x


class _Dithered:
    """A rounding function whose input is first scaled by 1 + dither x uniform(-1, 1) (a seeded
    stream: the same golden data every build): values within that of a rounding boundary may round
    the other way, as in an engine whose float order differs from the reference's by that much."""

    def __init__(self, rounding, dither: float, seed: int = 0):
        self.rounding, self.dither = rounding, np.float32(dither)
        self.rng = np.random.default_rng(seed)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        noise = self.rng.uniform(-1.0, 1.0, x.shape).astype(np.float32)
        return self.rounding((x * (np.float32(1) + self.dither * noise)).astype(np.float32))


def _add_spreads(runs, prompt: dict, progress) -> None:
    """Run the reference `runs` (reference.Runs) teacher-forced on the prompt's golden tokens; each
    step's `spread` is the largest deviation of a run from the golden logits (fraction of the step's
    range, on its top-k ids)."""
    runs.reset()
    logits = runs.prefill(prompt["prompt_ids"])  # [runs, vocab]
    for i, golden_step in enumerate(prompt["steps"]):
        if i:
            progress(i)
            logits = runs.decode(prompt["tokens"][i - 1])
        span = golden_step["max"] - golden_step["min"]
        err = np.abs(logits[:, golden_step["top_ids"]] - np.asarray(golden_step["top_logits"], np.float32)).max()
        golden_step["spread"] = float(err / span) if span > 0 else 0.0


def _block_quantized(model) -> set[str]:
    """The QDIR's block-quantized weights (q4, q4a, q8): what ONNX Runtime runs as MatMulNBits."""
    weights = model.tensors.weights
    return {name for name in weights.names() if weights.info(name)["format"] in ("q4", "q4a", "q8")}


def _arm_int8(model):
    """(tensors, int8_inputs) of the INT8_ACTIVATIONS_ARM arithmetic (ONNX Runtime 1.32 on aarch64 with
    the dot-product extension, MatMulNBits accuracy_level 4; docs/notes/bundle.md, Session 10): a
    4-bit weight without zero points (q4) runs on KleidiAI, which rounds its input to int8 per row
    (reference.int8_rows) and keeps its scales as bfloat16 cut from float32 (reference.bf16_truncate);
    4-bit with zero points (q4a) and 8-bit (q8) run on MLAS's int8 blocks, as on x86 (int8_blocks)."""
    from ..model.reference import int8_blocks, int8_rows

    weights = model.tensors.weights
    kleidi = {name for name in _block_quantized(model) if weights.info(name)["format"] == "q4"}
    rounding = {name: int8_rows if name in kleidi else int8_blocks for name in _block_quantized(model)}
    return Bf16Scales(model.tensors, kleidi), rounding


class Bf16Scales:
    """A QDIR TensorSource whose `names` dequantize with their scales cut to bfloat16 (what KleidiAI
    multiplies by); every other tensor and attribute is the source's."""

    def __init__(self, tensors, names):
        self.tensors, self.cut = tensors, frozenset(names)

    def __getattr__(self, attr):
        return getattr(self.tensors, attr)

    def _arrays(self, name, arrays):
        from ..model.reference import bf16_truncate

        return {**arrays, "scales": bf16_truncate(np.asarray(arrays["scales"]).astype(np.float32))}

    def get(self, name: str) -> np.ndarray:
        if name not in self.cut:
            return self.tensors.get(name)
        return self.tensors.format(name).dequantize(self._arrays(name, self.tensors.arrays(name)))

    def rows(self, name: str, index) -> np.ndarray:
        if name not in self.cut:
            return self.tensors.rows(name, index)
        arrays = {role: np.asarray(a[index]) if a.ndim == 2 else a for role, a in self.tensors.arrays(name).items()}
        return self.tensors.format(name).dequantize(self._arrays(name, arrays))


def model_dtype_of(qdir: Path) -> str:
    from ..runtime.files import read_json

    return read_json(Path(qdir) / "quantization.json").get("model_dtype", "float32")


WEBGPU_F16_REL_TOL = TOLERANCES["webgpu-float16"][1]  # tests/test_onnx_smollm2.py compares CPU and GPU with it
