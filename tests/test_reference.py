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


# ---- sampling --------------------------------------------------------------------------------------
def test_sampler_greedy_seeded_and_top_p():
    logits = np.array([1.0, 3.0, 2.0, 3.0 - 1e-3, -5.0], dtype=np.float32)
    assert Sampler(0.0).sample(logits) == 1
    a = [Sampler(1.0, 1.0, seed=7).sample(logits) for _ in range(3)]
    s1, s2 = Sampler(1.0, 1.0, seed=7), Sampler(1.0, 1.0, seed=7)
    assert [s1.sample(logits) for _ in range(50)] == [s2.sample(logits) for _ in range(50)]
    assert len(set(a)) == 1  # a fresh sampler with the same seed starts the same way
    # top_p small enough keeps only the most likely token
    assert {Sampler(1.0, 0.01, seed=s).sample(logits) for s in range(20)} == {1}
    # top_p = 0.8 keeps tokens 1, 3 (mass ~0.73) and 2 (next), never 0 or 4
    drawn = {Sampler(1.0, 0.8, seed=s).sample(logits) for s in range(200)}
    assert drawn == {1, 2, 3}


def test_sampler_frequencies_follow_softmax_with_temperature():
    logits = np.array([0.0, 1.0, 2.0], dtype=np.float32)
    s = Sampler(temperature=2.0, seed=0)
    counts = np.bincount([s.sample(logits) for _ in range(6000)], minlength=3) / 6000
    p = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum()
    assert np.abs(counts - p).max() < 0.03


def test_generate_stops_on_stop_id_and_streams(loaded):
    _, _, model, ref = loaded
    ids = model.tokenizer.encode(PROMPT)
    free = generate(ref, ids, 12, Sampler(0.0))
    stop = free.tokens[3]
    seen = []
    stopped = generate(ref, ids, 12, Sampler(0.0), stop_ids=[stop], on_token=seen.append, keep_logits=True)
    first = free.tokens.index(stop)
    assert stopped.tokens == free.tokens[: first + 1] and stopped.stopped == "stop"
    assert seen == stopped.tokens and len(stopped.logits) == len(stopped.tokens)
    assert free.stopped == "length" and len(free.tokens) == 12
    assert stopped.prefill_seconds > 0 and stopped.prompt_tokens == len(ids)
