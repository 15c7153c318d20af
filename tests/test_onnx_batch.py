"""Batched decoding on the ONNX graph (runtime/onnx_batch.py), with real ONNX Runtime on a tiny bundle:
one call over sequences of different lengths gives each sequence the logits it gets decoded alone,
rows freed mid-way and taken again keep that true, and concurrent generations through the server's
path (Session.batched, one thread each) give the single answers while actually sharing steps."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from bundle_helpers import host_bundle  # noqa: F401 - fixture
from edgeforge.runtime.onnx_batch import BatchDecoder, can_batch
from edgeforge.runtime.onnx_engine import OnnxEngine
from edgeforge.runtime.session import open_session

PROMPTS = [list(range(5, 5 + n)) for n in (3, 17, 70, 9)]  # different lengths: different rows of the cache
STEPS = 40


def forced_tokens(k: int) -> list[int]:
    return [(7 * k + j) % 200 + 3 for j in range(STEPS)]


@pytest.fixture(scope="module")
def session(host_bundle):  # noqa: F811
    return open_session(host_bundle[0], max_length=256)


def alone(engine: OnnxEngine, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    """Logits of one sequence on its own engine (batch 1): after the prompt, then after each token."""
    twin = engine.sibling()
    twin.reset()
    return [twin.prefill(prompt)] + [twin.decode(t) for t in tokens]


def assert_same(expected: list[np.ndarray], got: list[np.ndarray]) -> None:
    assert len(expected) == len(got)
    for step, (a, b) in enumerate(zip(expected, got)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4, err_msg=f"step {step}")
        assert int(np.argmax(a)) == int(np.argmax(b)), f"step {step}"


def test_graph_has_a_free_batch_dimension(host_bundle):  # noqa: F811
    import onnx

    art = host_bundle[0] / "artifact"
    graph = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
    dims = {v.name: v.type.tensor_type.shape.dim[0].dim_param for v in [*graph.input, *graph.output]
            if v.name != "total_sequence_length"}  # a scalar: the longest sequence of the batch
    assert set(dims.values()) == {"batch_size"}, dims  # every other input and output, the KV caches included
    assert json.loads((art / "artifact.json").read_text())["onnx"]["batch_decode"] is True


def test_one_step_over_different_lengths_equals_each_alone(session):
    engine = session.engine
    expected = [alone(engine, p, forced_tokens(k)) for k, p in enumerate(PROMPTS)]
    decoder = BatchDecoder(engine)
    members = decoder.members(len(PROMPTS))
    got = [[m.prefill(p)] for m, p in zip(members, PROMPTS)]
    for j in range(STEPS):
        rows = list(decoder.rows)
        out = decoder._decode_rows(rows, [forced_tokens(members.index(m))[j] for m in rows])
        for m, logits in zip(rows, out):
            got[members.index(m)].append(logits)
    assert decoder.steps == STEPS and decoder.stepped_rows == STEPS * len(PROMPTS)  # one call a step for all
    for e, g in zip(expected, got):
        assert_same(e, g)


def test_rows_freed_mid_way_keep_every_sequence_right(session):
    """The first sequence leaves after 5 steps (the last row moves into its place) and a new one joins
    after 10: every sequence still gets its own logits, and the cache grows past its first capacity."""
    engine = session.engine
    long_prompt = list(range(20, 20 + 90))  # 90 + STEPS positions: past the first 64-position capacity
    prompts = PROMPTS[:3] + [long_prompt]
    expected = {k: alone(engine, p, forced_tokens(k)) for k, p in enumerate(prompts)}
    decoder = BatchDecoder(engine)
    members = decoder.members(4)
    got = {k: [members[k].prefill(prompts[k])] for k in range(3)}
    for j in range(STEPS):
        if j == 5:
            members[0].finish()
        if j == 10:
            got[3] = [members[3].prefill(prompts[3])]
        rows = list(decoder.rows)
        step = {k: j - (10 if k == 3 else 0) for k in range(4)}
        out = decoder._decode_rows(rows, [forced_tokens(members.index(m))[step[members.index(m)]] for m in rows])
        for m, logits in zip(rows, out):
            got[members.index(m)].append(logits)
    assert_same(expected[0][:6], got[0])
    for k in (1, 2):
        assert_same(expected[k], got[k])
    assert_same(expected[3][: STEPS - 10 + 1], got[3])
    assert decoder.capacity >= 90 + STEPS - 10


def test_concurrent_generations_share_steps_and_give_the_single_answers(session):
    prompts = [session.encode(text) for text in ("Tell me about the sea.", "Hi", "One two three four five six",
                                                 "What is a tree?")]
    single = [session.generate(ids, 24).ids for ids in prompts]
    sessions = session.batched(len(prompts))
    assert sessions is not None
    decoder = sessions[0].engine.decoder
    answers: dict[int, list[int]] = {}
    start, prefilled = threading.Barrier(len(prompts)), threading.Barrier(len(prompts), timeout=60)

    def run(k: int) -> None:
        # Every sequence is prefilled before any decodes: on a loaded machine one thread could
        # otherwise finish alone before the others begin, and the step sharing asserted below is
        # about the decoder, not about the scheduler.
        engine = sessions[k].engine
        prefill = engine.prefill
        engine.prefill = lambda ids: (prefill(ids), prefilled.wait())[0]
        start.wait()
        answers[k] = sessions[k].generate(prompts[k], 24).ids

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [answers.get(k) for k in range(len(prompts))] == single
    decoded = sum(len(a) - 1 for a in single)  # the first token of each comes from its prefill
    assert decoder.stepped_rows == decoded
    assert decoder.steps < decoded / 1.5, (decoder.steps, decoded)  # most steps decoded several sequences
    assert decoder.rows == []  # every finished generation gave its row back


def test_a_failed_step_reaches_every_waiting_member_and_frees_the_rows(session):
    decoder = BatchDecoder(session.engine)
    members = decoder.members(2)
    for m, p in zip(members, PROMPTS):
        m.prefill(p)
    errors: dict[int, str] = {}

    def decode(k: int, token: int) -> None:
        try:
            members[k].decode(token)
        except Exception as err:  # noqa: BLE001 - the test looks at it
            errors[k] = str(err)
        finally:
            members[k].finish()

    # a token id past the vocabulary makes the step's embedding lookup fail: one row poisons the call
    threads = [threading.Thread(target=decode, args=(0, 7)),
               threading.Thread(target=decode, args=(1, session.engine.vocab_size + 5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a member hung after a failed step"
    assert set(errors) == {0, 1} and all("outside the vocabulary" in e for e in errors.values()), errors
    assert decoder.rows == [] and not decoder.busy


def test_older_graphs_are_not_batched(host_bundle, tmp_path):  # noqa: F811
    art = tmp_path / "artifact"
    shutil.copytree(host_bundle[0] / "artifact", art)
    meta = json.loads((art / "artifact.json").read_text())
    del meta["onnx"]["batch_decode"]  # an artifact built before the batch dimension
    (art / "artifact.json").write_text(json.dumps(meta))
    engine = OnnxEngine(art)
    assert not can_batch(engine)
    with pytest.raises(Exception, match="cannot decode a batch"):
        BatchDecoder(engine)


def test_an_int8_kv_cache_is_batched_too(tiny_model, tmp_path):
    """An int8-KV bundle (`--kv-cache int8`) keeps its rows in int8 buffers: one batched step still
    gives each sequence what it gets alone, bit for bit in the logits' argmax and within 1e-4."""
    from edgeforge.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["build", str(tiny_model("llama32")), "--quant", "q4f32", "--target", "x86-cpu", "--backend", "onnx",
              "--kv-cache", "int8", "-o", str(tmp_path), "-q", "--no-quality", "test speed", "--no-smoke"])
    assert exit_info.value.code == 0
    (bundle,) = [p for p in tmp_path.iterdir() if (p / "manifest.json").is_file()]
    engine = open_session(bundle, max_length=256).engine
    assert engine.kv_dtype == np.int8 and can_batch(engine)
    expected = [alone(engine, p, forced_tokens(k)[:8]) for k, p in enumerate(PROMPTS)]
    decoder = BatchDecoder(engine)
    members = decoder.members(len(PROMPTS))
    got = [[m.prefill(p)] for m, p in zip(members, PROMPTS)]
    for j in range(8):
        rows = list(decoder.rows)
        for m, logits in zip(rows, decoder._decode_rows(rows, [forced_tokens(members.index(m))[j] for m in rows])):
            got[members.index(m)].append(logits)
    assert decoder.kv and all(buf.dtype == np.int8 for buf in decoder.kv)  # the rows stay int8
    for e, g in zip(expected, got):
        assert_same(e, g)
