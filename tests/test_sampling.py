"""runtime/sampling.py's top-p against the full stable sort it replaced: the same array, bit for bit, for
random logits of many shapes (peaked, long-tailed, flat, heavy ties, ties across the partition boundary,
zeros, NaN/inf), and a seeded Sampler draws the same tokens as one using the full sort."""

import numpy as np
import pytest

from edgeforge.runtime import sampling
from edgeforge.runtime.sampling import Sampler, _head_nucleus, _top_p


def reference_top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    """_top_p as it was before Session 12: a stable argsort of the whole vocabulary."""
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, top_p)) + 1]
    out = np.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


def softmax(logits, temperature):
    """Sampler.sample's probabilities."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1) / temperature
    probs = np.exp(z - np.max(z))
    probs /= probs.sum()
    return probs


def logits_of(shape: str, n: int, rng) -> np.ndarray:
    if shape == "peaked":  # a few high logits over a long normal tail, like a language model's
        x = rng.standard_normal(n) * 2.5
        x[rng.choice(n, min(n, 5), replace=False)] += rng.uniform(4, 14, min(n, 5))
    elif shape == "tail":  # no clear winner: a nucleus of hundreds to thousands
        x = rng.standard_normal(n) * rng.uniform(1, 4)
    elif shape == "zipf":  # logit falls with log rank
        x = -1.1 * np.log1p(rng.permutation(n)) + rng.standard_normal(n) * 0.3
    elif shape == "flat":
        x = np.zeros(n)
    elif shape == "near_flat":
        x = rng.standard_normal(n) * 0.01
    elif shape == "rounded":  # heavy ties everywhere
        x = np.round(rng.standard_normal(n) * 3, int(rng.integers(0, 2)))
    elif shape == "few_levels":  # a handful of values: ties of hundreds at every level
        x = rng.integers(0, 6, n).astype(np.float64) * 2
    elif shape == "boundary_ties":  # the 256th largest is inside a group of hundreds of equal logits
        x = rng.standard_normal(n) - 10
        top = rng.choice(n, min(n // 2, 200 + int(rng.integers(0, 120))), replace=False)
        x[top] = rng.uniform(0, 3, top.size)
        rest = np.setdiff1d(np.arange(n), top)
        x[rng.choice(rest, min(rest.size, 500), replace=False)] = -0.5
    elif shape == "masked":  # most of the vocabulary at -inf: zero probabilities
        x = np.full(n, -np.inf)
        live = rng.choice(n, min(n, int(rng.integers(1, 300))), replace=False)
        x[live] = rng.standard_normal(live.size) * 2
    elif shape == "one_hot":  # everything else underflows to 0
        x = np.full(n, -1e4)
        x[rng.integers(n)] = 0.0
    else:
        raise ValueError(shape)
    return x.astype(np.float32)  # the engines' logits


SHAPES = ["peaked", "tail", "zipf", "flat", "near_flat", "rounded", "few_levels", "boundary_ties", "masked",
          "one_hot"]
TOP_PS = [1e-12, 0.01, 0.1, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1 - 1e-12, 1.0]


def assert_same(probs, top_p):
    got, want = _top_p(probs, top_p), reference_top_p(probs, top_p)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want, equal_nan=True), (top_p, np.flatnonzero(got != want)[:10])
    assert got.tobytes() == want.tobytes()  # bit for bit (the sign of a zero, NaN payloads)
    return got


@pytest.mark.parametrize("n", [1, 5, 300, 1025, 1100, 3000, 49152])
def test_top_p_equals_the_full_sort(n):
    rng = np.random.default_rng(n)
    fast = 0  # answers from the partial sort
    rounds = 3 if n == 49152 else 6
    for shape in SHAPES:
        for _ in range(rounds):
            logits = logits_of(shape, n, rng)
            temperature = float(rng.choice([0.3, 0.7, 0.8, 1.0, 1.5]))
            probs = softmax(logits, temperature)
            full = np.cumsum(probs[np.argsort(-probs, kind="stable")])
            # the listed values, random ones, and the cumulative sums themselves (searchsorted's edge) and
            # their neighbours, early in the order and near the partition's edge
            edges = [full[i] for i in (0, 1, min(n - 1, 200), min(n - 1, 255), min(n - 1, 256)) if i < n]
            top_ps = TOP_PS + list(rng.uniform(0, 1, 3)) + edges + [np.nextafter(e, 2) for e in edges] \
                + [np.nextafter(e, -1) for e in edges]
            for top_p in top_ps:
                top_p = float(top_p)
                if 0 < top_p <= 1:
                    assert_same(probs, top_p)
                    fast += _head_nucleus(probs, top_p) is not None
            assert_same(probs.astype(np.float32), 0.9)  # another dtype: the same operations in float32
    if n > 4 * sampling._HEAD:  # the partial sort was taken, not only the full one
        assert fast > 0


def test_top_p_ties_across_the_partition_boundary_take_the_lowest_indices():
    """Equal probabilities straddle the k-th largest; the nucleus ends among them: only the lowest
    indices of the tie may be kept, whichever ones the partition picked."""
    rng = np.random.default_rng(1)
    n, k = 49152, sampling._HEAD
    hits = 0
    for _ in range(20):
        probs = np.full(n, 1e-9)
        high = rng.choice(n, k - 40, replace=False)
        probs[high] = rng.uniform(0.001, 0.002, high.size)
        tie = rng.choice(np.setdiff1d(np.arange(n), high), 400, replace=False)
        probs[tie] = 0.0005
        probs /= probs.sum()
        full = np.cumsum(probs[np.argsort(-probs, kind="stable")])
        for i in (k - 40, k - 20, k - 2, k - 1, k, k + 5):  # the nucleus ends inside the tie
            top_p = float(full[i])
            assert_same(probs, top_p)
            assert_same(probs, float(np.nextafter(top_p, 0)))
            hits += _head_nucleus(probs, top_p) is not None
    assert hits > 0


def test_top_p_unusual_probabilities_give_the_full_sort_answer():
    rng = np.random.default_rng(2)
    n = 5000
    probs = rng.random(n)
    probs /= probs.sum()
    i = np.arange(n)
    cases = [np.full(n, np.nan), np.where(rng.random(n) < 0.01, np.nan, probs), np.where(i == 7, np.inf, probs),
             -probs, np.where(i % 3 == 0, -probs, probs), np.zeros(n), np.where(probs > 3e-4, probs, -0.0),
             probs * 0.5, probs * 1e-300, np.zeros(0)]
    with np.errstate(all="ignore"):
        for case in cases:
            for top_p in (0.1, 0.9, 1.0):
                assert_same(case, top_p)


@pytest.mark.parametrize("temperature,top_p", [(0.8, 0.9), (0.8, 0.95), (1.0, 0.5), (1.3, 0.99), (0.6, 0.3)])
def test_seeded_sampler_draws_the_full_sort_tokens(monkeypatch, temperature, top_p):
    rng = np.random.default_rng(int(temperature * 100 + top_p * 1000))
    steps = [logits_of(shape, 49152, rng) for shape in ("peaked", "tail", "zipf", "rounded", "boundary_ties",
                                                         "masked", "flat")] * 3
    for seed in (0, 1, 12345):
        new = Sampler(temperature, top_p, seed=seed)
        got = [new.sample(x) for x in steps]
        monkeypatch.setattr(sampling, "_top_p", reference_top_p)
        old = Sampler(temperature, top_p, seed=seed)
        want = [old.sample(x) for x in steps]
        monkeypatch.undo()
        assert got == want


def test_sample_rows_top_p_rows_are_sampler_sample_and_the_full_sort(monkeypatch):
    """The batch decoder's sample_rows at a real vocabulary size: row by row what each row's Sampler gives
    alone, and what it gave with the full sort."""
    from edgeforge.runtime.sampling import sample_rows

    rng = np.random.default_rng(5)
    shapes = ["peaked", "tail", "zipf", "rounded", "boundary_ties", "near_flat", "peaked", "peaked"]
    logits = np.stack([logits_of(shape, 49152, rng) for shape in shapes])
    logits[7, 100] = np.nan  # that request fails alone
    params = [dict(temperature=0.8, top_p=0.9, seed=1), dict(temperature=0.8, top_p=0.95, seed=2),
              dict(temperature=1.0, top_p=0.5, seed=3), dict(temperature=0.7, top_p=0.9, seed=4),
              dict(temperature=1.0, top_p=0.8, seed=5), dict(temperature=0.8, top_p=0.95, seed=6),
              dict(temperature=0.0), dict(temperature=0.8, top_p=0.9, seed=7)]
    batched = [Sampler(**p) for p in params]
    alone, old = [Sampler(**p) for p in params], [Sampler(**p) for p in params]
    for _ in range(3):  # the generators advance identically
        got = sample_rows(batched, logits)
        want = [s.sample(row) if i != 7 else None for i, (s, row) in enumerate(zip(alone, logits))]
        monkeypatch.setattr(sampling, "_top_p", reference_top_p)
        before = sample_rows(old, logits)
        monkeypatch.undo()
        assert got[:7] == want[:7] == before[:7]
        assert isinstance(got[7], ValueError) and isinstance(before[7], ValueError)
