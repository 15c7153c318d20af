"""Prompt prefix reuse (runtime/prefix.py): a prompt that begins like an earlier one prefills only the
rest, on a single ONNX engine (its own buffers) and on the batch decoder (copies of finished prompts),
and the answer is the one a fresh prefill gives, logits equal as floats for the prompts here (in general
only up to float rounding: ORT's attention can round a position otherwise in a call of another shape, see
runtime/prefix.py and tests/test_onnx_batch.py's random traffic). Real ONNX Runtime on the tiny bundle;
the server's side (usage.prompt_tokens_details.cached_tokens, /metrics) with the real client."""

from __future__ import annotations

import concurrent.futures
import threading

import numpy as np
import pytest

from bundle_helpers import assert_same_up_to_rounding, host_bundle  # noqa: F401 - fixture
from edgeforge.runtime.generate import generate
from edgeforge.runtime.prefix import MIN_TAIL, PromptCache, common_prefix, reusable
from edgeforge.runtime.sampling import Sampler
from edgeforge.runtime.session import open_session

SYSTEM = list(range(40, 40 + 30))  # a shared beginning, like a chat template's system prompt


def ask(k: int, n: int = 12) -> list[int]:
    return [(11 * k + j) % 180 + 3 for j in range(n)]


@pytest.fixture(scope="module")
def session(host_bundle):  # noqa: F811
    return open_session(host_bundle[0], max_length=256)


def fresh(session, prompt, n=10, **sampling):
    """What the prompt gives on a new engine, from an empty cache."""
    return generate(session.engine.sibling(), prompt, n, Sampler(**sampling), keep_logits=True)


def assert_same_answer(expected, got, what):
    assert got.tokens == expected.tokens, what
    assert len(got.logits) == len(expected.logits), what
    for step, (a, b) in enumerate(zip(expected.logits, got.logits)):
        np.testing.assert_array_equal(b, a, err_msg=f"{what}, step {step}")


# ---- the rule ------------------------------------------------------------------------------------

def test_reusable_keeps_at_least_two_tokens_to_prefill():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0
    assert reusable([1, 2, 3, 4, 5], [1, 2, 3, 9, 9, 9]) == 3
    assert reusable([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]) == 5 - MIN_TAIL  # the same prompt: its last 2 run again
    assert reusable([1, 2, 3, 4, 5], [1, 2, 3]) == 1
    assert reusable([1, 2], [1, 2]) == 0 and reusable([1], [1, 5]) == 0 and reusable([], [1, 2, 3]) == 0


def test_prompt_cache_is_bounded_and_keeps_the_longest():
    def arrays(n):
        return [np.full((2, n, 4), n, np.float32), np.full((2, n, 4), -n, np.float32)]  # 64 n bytes

    cache = PromptCache(entries=3, max_bytes=64 * 100)
    cache.put([1, 2, 3, 4], lambda: arrays(4))
    cache.put([1, 2, 3, 4, 5, 6], lambda: arrays(6))  # holds the first's positions and more: replaces it
    assert list(cache.items) == [(1, 2, 3, 4, 5, 6)] and cache.bytes == 64 * 6
    cache.put([1, 2, 3], lambda: pytest.fail("already held: not read"))
    cache.put([7, 8, 9], lambda: arrays(3))
    cache.put([5, 5, 5, 5], lambda: arrays(4))
    assert cache.best([1, 2, 3, 4, 5, 9, 9]) == (5, (1, 2, 3, 4, 5, 6))
    assert cache.best([9, 9, 9]) == (0, None)
    cache.put([6, 6, 6], lambda: arrays(3))  # a fourth entry: the least recently used one goes
    assert (1, 2, 3, 4, 5, 6) not in cache.items and len(cache.items) == 3  # best() does not count as a use
    cache.put(list(range(200)), lambda: arrays(200))  # larger than the whole cache: not kept, nothing dropped
    assert len(cache.items) == 3 and cache.bytes <= cache.max_bytes
    cache.put(list(range(90)), lambda: arrays(90))  # fits only when others go
    assert cache.bytes <= cache.max_bytes and tuple(range(90)) in cache.items
    got = cache.take(*reversed(cache.best(list(range(50)))))
    assert cache.hits == 1 and cache.reused_tokens == 48 and got[0].shape == (2, 90, 4)
    off = PromptCache(entries=0, max_bytes=1 << 30)
    off.put([1, 2, 3], lambda: pytest.fail("a cache of no entries keeps nothing"))


# ---- one engine ----------------------------------------------------------------------------------

def test_a_single_engine_reuses_only_what_a_prefill_computed(session):
    """One engine answers a scripted conversation with reuse on; every answer equals a fresh engine's
    (tokens and logits as floats), and the positions kept are exactly the earlier prompts' shared
    beginning: never an answer's positions (the decode path's numbers), never a lone token's."""
    engine = session.engine.sibling()
    first = SYSTEM + ask(1)
    answer = generate(engine, first, 8, Sampler(), reuse_prefix=True).tokens
    script = [  # (prompt, the positions it may keep)
        (SYSTEM + ask(2), len(SYSTEM)),                            # the same system prompt, another question
        (SYSTEM + ask(2), len(SYSTEM) + 12 - MIN_TAIL),            # the same prompt again
        (SYSTEM + ask(2)[:5], len(SYSTEM) + 5 - MIN_TAIL),         # a shorter prompt inside the last one
        (SYSTEM + ask(2)[:5] + ask(3), len(SYSTEM) + 5),           # grows past it
        ([7], 0),                                                  # one token: runs the decode path
        ([7, 9, 11], 0),                                           # ... so its position is not kept
        ([7, 9, 11, 13], 2),
    ]
    for k, (prompt, kept) in enumerate(script):
        got = generate(engine, prompt, 10, Sampler(), keep_logits=True, reuse_prefix=True)
        assert got.cached_tokens == kept, k
        assert_same_answer(fresh(session, prompt), got, f"prompt {k}")
    # A second turn holds the first turn's answer: its positions came from decode steps, not kept.
    engine = session.engine.sibling()
    generate(engine, first, 8, Sampler(), reuse_prefix=True)
    turn = first + answer + ask(4)
    got = generate(engine, turn, 10, Sampler(), keep_logits=True, reuse_prefix=True)
    assert got.cached_tokens == len(first)
    assert_same_answer(fresh(session, turn), got, "second turn")


@pytest.mark.parametrize("seed", range(1, 7))
def test_a_single_engine_under_random_conversations(session, seed):
    """Attack (Session 14): 40 random prompts on one engine with reuse, sharing random beginnings, some one
    token long, some the same as the last, some past the first buffers, and generations of random length
    (their decode positions stay in the buffers as stale rows). A prompt keeps at most what it shares with
    the last one, never one token of it to prefill, nothing after a one-token prompt; its answer is a fresh
    engine's up to the rounding a reused position may carry, and bit for bit when nothing was reused."""
    import random

    rng = random.Random(seed)
    engine = session.engine.sibling()
    stems = [[rng.randrange(3, 250) for _ in range(rng.randrange(2, 90))] for _ in range(3)]
    last: list[int] = []
    reused = 0
    for k in range(40):
        prompt = rng.choice(stems)[: rng.randrange(0, 90)] + [rng.randrange(3, 250) for _ in range(rng.randrange(0, 40))]
        prompt = rng.choice([prompt or [9], last or [9], [rng.randrange(3, 250)]]) if k % 7 == 6 else prompt or [9]
        n = rng.randrange(1, 12)
        got = generate(engine, prompt, n, Sampler(), keep_logits=True, reuse_prefix=True)
        want = fresh(session, prompt, n)
        where = f"prompt {k} ({len(prompt)} tokens, {got.cached_tokens} reused)"
        assert got.cached_tokens <= max(0, min(common_prefix(last, prompt), len(prompt) - MIN_TAIL)), where
        if len(last) < MIN_TAIL:
            assert got.cached_tokens == 0, where
        pairs = list(zip(got.tokens, got.logits)), list(zip(want.tokens, want.logits))
        if got.cached_tokens:
            assert_same_up_to_rounding(pairs[1], pairs[0], where)
        else:
            assert_same_answer(want, got, where)
        last, reused = prompt, reused + got.cached_tokens
    assert reused > 0


def test_reuse_is_off_unless_asked_and_works_in_grown_buffers(session):
    engine = session.engine.sibling()
    generate(engine, SYSTEM + ask(5), 4, Sampler(), reuse_prefix=True)
    assert generate(engine, SYSTEM + ask(6), 4, Sampler()).cached_tokens == 0  # smoke, bench, run: no reuse
    long_prompt = SYSTEM + ask(7, 100)  # past the first 64-position buffers: they grow and are copied
    generate(engine, long_prompt, 4, Sampler(), reuse_prefix=True)
    assert engine.capacity >= len(long_prompt)
    generate(engine, [3, 4, 5], 2, Sampler(), reuse_prefix=True)  # a short prompt between: positions stay
    again = long_prompt[:-20] + ask(8)
    got = generate(engine, again, 10, Sampler(), keep_logits=True, reuse_prefix=True)
    assert got.cached_tokens == 0  # [3, 4, 5] overwrote position 0..2: nothing of long_prompt is whole
    got = generate(engine, again, 10, Sampler(), keep_logits=True, reuse_prefix=True)
    assert got.cached_tokens == len(again) - MIN_TAIL
    assert_same_answer(fresh(session, again), got, "after growing")


def test_sampled_answers_do_not_change(session):
    engine = session.engine.sibling()
    generate(engine, SYSTEM + ask(9), 4, Sampler(), reuse_prefix=True)
    prompt = SYSTEM + ask(10)
    got = generate(engine, prompt, 12, Sampler(0.9, 0.95, 7), keep_logits=True, reuse_prefix=True)
    assert got.cached_tokens == len(SYSTEM)
    assert_same_answer(fresh(session, prompt, 12, temperature=0.9, top_p=0.95, seed=7), got, "sampled")


# ---- the batch decoder ---------------------------------------------------------------------------

def test_the_batch_decoder_reuses_finished_prompts(session):
    members = session.batched(3, prompt_cache_bytes=64 << 20)
    decoder = members[0].engine.decoder
    generate(members[0].engine, SYSTEM + ask(11), 6, Sampler(), reuse_prefix=True)
    assert len(decoder.prompts.items) == 1  # the finished prompt's positions, copied out of its row
    for k, member in enumerate(members):
        prompt = SYSTEM + ask(12 + k)
        got = generate(member.engine, prompt, 10, Sampler(), keep_logits=True, reuse_prefix=True)
        assert got.cached_tokens == len(SYSTEM), k
        assert_same_answer(fresh(session, prompt), got, f"member {k}")
    assert decoder.prompts.hits == 3 and decoder.prompts.reused_tokens == 3 * len(SYSTEM)
    assert decoder.rows == [] and decoder.filling is None


def test_concurrent_requests_with_a_shared_beginning_get_their_answers_alone(session):
    """Six requests at once, three waves of the same system prompt: the later ones start from the
    earlier ones' copies while other rows decode, rows move as sequences end; each answer is the one
    it gets alone, bit for bit, with a small prefill budget that cuts the prompts in chunks."""
    from edgeforge.runtime.onnx_batch import BatchDecoder

    decoder = BatchDecoder(session.engine, prefill_budget=8, prompt_cache=PromptCache(8, 64 << 20))
    members = decoder.members(3)
    prompts = [SYSTEM + ask(20 + k, 6 + 3 * k) for k in range(6)]
    lengths = [5, 17, 9, 30, 12, 21]
    expected = [fresh(session, p, n) for p, n in zip(prompts, lengths)]
    got, start = {}, threading.Barrier(3)

    def client(i: int) -> None:
        start.wait()
        for k in range(i, 6, 3):
            got[k] = generate(members[i], prompts[k], lengths[k], Sampler(), keep_logits=True, reuse_prefix=True)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        list(pool.map(client, range(3)))
    for k in range(6):
        assert_same_answer(expected[k], got[k], f"request {k}")
    assert sum(got[k].cached_tokens for k in range(3, 6)) >= 3 * len(SYSTEM)  # the second wave reused
    assert decoder.stepped_rows > decoder.steps  # and the sequences shared steps


def test_no_reuse_without_a_cache_or_when_not_asked(session):
    members = session.batched(2)  # prompt_cache_bytes 0
    generate(members[0].engine, SYSTEM + ask(30), 4, Sampler(), reuse_prefix=True)
    assert generate(members[1].engine, SYSTEM + ask(31), 4, Sampler(), reuse_prefix=True).cached_tokens == 0
    members = session.batched(2, prompt_cache_bytes=64 << 20)
    generate(members[0].engine, SYSTEM + ask(30), 4, Sampler(), reuse_prefix=True)
    assert generate(members[1].engine, SYSTEM + ask(31), 4, Sampler()).cached_tokens == 0


def test_a_failed_sequence_leaves_nothing_in_the_cache(session):
    members = session.batched(2, prompt_cache_bytes=64 << 20)
    decoder = members[0].engine.decoder
    bad = Sampler(0.5, seed=1)
    bad.sample = lambda logits: (_ for _ in ()).throw(ValueError("sampling failed"))
    with pytest.raises(ValueError):
        generate(members[0].engine, SYSTEM + ask(32), 4, bad, reuse_prefix=True)
    assert not decoder.prompts.items
