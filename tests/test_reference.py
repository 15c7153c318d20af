"""The numpy reference against transformers' LlamaForCausalLM (fp32, eager attention) on the tiny
models: logits of a prefill and 8 decode steps, and 24 greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgeforge.model.loader import load_model  # noqa: E402
from edgeforge.model.reference import ReferenceModel  # noqa: E402
from edgeforge.runtime.generate import generate  # noqa: E402
from edgeforge.runtime.sampling import Sampler  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog. Numbers: 12345"


def hf_model(folder):
    m = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return m.eval()


def hf_steps(model, ids, steps):
    """Prefill `ids`, then feed the greedy token `steps` times; logits of every step (torch, KV cache)."""
    out, logits = None, []
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        logits.append(out.logits[0, -1].numpy())
        for _ in range(steps):
            token = int(np.argmax(logits[-1]))
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[0, -1].numpy())
    return logits


@pytest.fixture(scope="module")
def loaded(tiny_shape):
    name, folder = tiny_shape
    model = load_model(folder)
    return name, folder, model, ReferenceModel(model)


def test_prefill_and_decode_logits_match_transformers(loaded):
    name, folder, model, ref = loaded
    ids = model.tokenizer.encode(PROMPT)
    assert len(ids) > 8
    expected = hf_steps(hf_model(folder), ids, 8)
    ref.reset()
    got = [ref.prefill(ids)]
    for _ in range(8):
        got.append(ref.decode(int(np.argmax(got[-1]))))
    for step, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == np.float32 and g.shape == e.shape
        err = float(np.max(np.abs(g - e)))
        assert err < 1e-4, f"{name} step {step}: max abs error {err}"


def test_forward_all_positions_match_transformers(loaded):
    name, folder, model, ref = loaded
    ids = model.tokenizer.encode(PROMPT)
    with torch.no_grad():
        expected = hf_model(folder)(torch.tensor([ids])).logits[0].numpy()
    got = ref.forward(ids)
    assert got.shape == expected.shape
    assert float(np.max(np.abs(got - expected))) < 1e-4


def test_greedy_24_tokens_identical(loaded):
    name, folder, model, ref = loaded
    ids = model.tokenizer.encode(PROMPT)
    hf = hf_model(folder)
    expected, seq = [], list(ids)
    with torch.no_grad():  # plain greedy without stop tokens (random weights may emit EOS early)
        out = hf(torch.tensor([seq]), use_cache=True)
        for _ in range(24):
            token = int(torch.argmax(out.logits[0, -1]))
            expected.append(token)
            out = hf(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    result = generate(ref, ids, 24, Sampler(temperature=0.0), stop_ids=())
    assert result.tokens == expected
    assert len(set(expected)) > 1  # the check means something only if the model does not repeat one token


def test_prefill_in_pieces_equals_one_prefill(loaded):
    """The KV cache: prefilling a prompt in two calls gives the same logits as one call."""
    _, _, model, ref = loaded
    ids = model.tokenizer.encode(PROMPT)
    ref.reset()
    whole = ref.prefill(ids)
    ref.reset()
    ref.prefill(ids[:5])
    pieces = ref.prefill(ids[5:])
    np.testing.assert_allclose(pieces, whole, atol=1e-5)
