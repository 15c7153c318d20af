"""Issue 10: Llama 3.1's llama3 RoPE scaling past the original 8k context. A tiny model whose
original context is 8192 (scaled x8 to 16384) gets a prompt of 8300 tokens; TVM and ONNX logits at
positions past 8192 must match the numpy reference (itself checked against transformers on the same
shape, at those positions)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeforge.model.loader import load_model
from edgeforge.model.reference import ReferenceModel
from edgeforge.quant.qdir import load_qdir, write_qdir
from edgeforge.runtime.loader import open_engine

PROMPT = 8300  # past original_max_position_embeddings (8192)
STEPS = 3


@pytest.fixture(scope="module")
def long_model(tiny_model):
    return tiny_model("llama31long")


@pytest.fixture(scope="module")
def prompt_ids(long_model):
    vocab = load_model(long_model).config.vocab_size
    return [int(i) for i in np.random.default_rng(3).integers(4, vocab, PROMPT)]


def _reference_steps(engine, ids, feed):
    engine.reset()
    for start in range(0, len(ids) - 1, 1024):  # chunks keep the reference's T x T scores small
        engine.prefill(ids[start:min(start + 1024, len(ids) - 1)])
    out = [engine.prefill(ids[-1:])]
    for t in feed:
        out.append(engine.decode(t))
    return out


def test_reference_matches_transformers_past_8k(long_model, prompt_ids):
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(long_model, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([prompt_ids])).logits[0, -1].numpy()
    ref = ReferenceModel(load_model(long_model))
    got = _reference_steps(ref, prompt_ids, [])[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.ptp(want)))


@pytest.fixture(scope="module")
def qdir(long_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("long") / "qdir"
    write_qdir(load_model(long_model), "q4f32", out)
    return out


@pytest.mark.parametrize("backend", ["tvm", "onnx"])
def test_backends_match_reference_past_8k(qdir, prompt_ids, tmp_path, backend):
    from edgeforge.backends import compile_qdir

    if backend == "tvm":
        pytest.importorskip("tvm")
        art = compile_qdir(qdir, "x86-cpu", "tvm", tmp_path / "art") and tmp_path / "art"
        engine = open_engine(art, qdir, max_length=PROMPT + STEPS + 1)
    else:
        pytest.importorskip("onnxruntime")
        from onnx_support import compile_onnx

        art = compile_onnx(qdir, tmp_path / "art", accuracy_level=0, name="long")
        engine = open_engine(art, max_length=PROMPT + STEPS + 1)
    feed = [5, 9, 13]
    want = _reference_steps(ReferenceModel(load_qdir(qdir)), prompt_ids, feed)
    engine.reset()
    got = [engine.prefill(prompt_ids)] + [engine.decode(t) for t in feed]
    for pos, (g, w) in enumerate(zip(got, want), start=PROMPT):
        assert pos > 8192
        err = float(np.max(np.abs(g - w)) / np.ptp(w))
        assert err < 2e-3, f"{backend}: position {pos}: relative logit error {err:.2e}"
        assert int(np.argmax(g)) == int(np.argmax(w))
