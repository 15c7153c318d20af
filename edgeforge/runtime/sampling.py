"""Sampler: greedy at temperature 0, else temperature + nucleus (top-p) sampling with a seeded
numpy Generator, so a (seed, logits) sequence always gives the same tokens."""

from __future__ import annotations

import numpy as np


class Sampler:
    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = 0):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, logits: np.ndarray) -> int:
        return self.sample(logits)

    def sample(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        if self.greedy:
            return int(np.argmax(logits))  # first maximum on ties, like torch.argmax
        z = logits / self.temperature
        probs = np.exp(z - np.max(z))
        probs /= probs.sum()
        if self.top_p < 1.0:
            probs = _top_p(probs, self.top_p)
        return int(self.rng.choice(probs.size, p=probs))


def _top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one).

    The tokens in order are those of a stable sort by descending probability (ties: the lowest index
    first), and the kept ones are the first searchsorted(cumsum, top_p) + 1. _head_nucleus finds the same
    tokens from a sort of only the largest probabilities, where it can prove the answer is the same (else
    the full sort below); the output is then built as before (the same array, the same sum), so a seeded
    generator draws the same token from it, bit for bit.
    """
    keep = _head_nucleus(probs, top_p)
    if keep is None:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, top_p)) + 1]
    out = np.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


_HEAD = 256  # tokens in the partial sort: a language model's nucleus is almost always fewer


def _head_nucleus(probs: np.ndarray, top_p: float):
    """The kept tokens of _top_p's full sort from a prefix of its order, or None where not shown equal.

    For any threshold t, the tokens with p >= t come first in the stable order, and a stable sort of them
    from ascending index puts them in that order: a prefix of the full order. So is that prefix cut inside
    the tie at t where only the tie's lowest indices are kept. np.cumsum adds in sequence, so the prefix's
    cumulative sums are the full one's first entries, bit for bit; with every p >= 0 both are
    non-decreasing, so when searchsorted stops strictly inside the prefix (j < its length) the full
    search stops at the same j. Here t is the _HEAD-th largest probability (np.partition). None for small
    vocabularies (the full sort is as fast) and for NaN, inf or negative probabilities.
    """
    n = probs.size
    if probs.ndim != 1 or n <= 4 * _HEAD:
        return None
    if not (probs.min() >= 0 and probs.max() < np.inf):  # NaN fails both
        return None
    t = np.partition(probs, n - _HEAD)[n - _HEAD]  # the _HEAD-th largest value
    head = np.flatnonzero(probs >= t)  # ascending index
    if head.size > _HEAD:  # more ties of t than places left: the stable order takes the lowest indices
        values = probs[head]
        above = head[values > t]
        head = np.concatenate((above, head[values == t][: _HEAD - above.size]))
    return _prefix_nucleus(probs, head, top_p)


def _prefix_nucleus(probs, head, top_p):
    """The kept tokens where `head` (the first tokens of the full order, each tie in ascending index)
    holds them, else None."""
    order = head[np.argsort(-probs[head], kind="stable")]
    cumulative = np.cumsum(probs[order])
    j = int(np.searchsorted(cumulative, top_p))
    return order[: j + 1] if j < order.size else None


def sample_rows(samplers, logits: np.ndarray) -> list:
    """The next token of each row of `logits` [rows, vocab], row i by samplers[i], as Sampler.sample picks
    it; where a sampler raised, the exception instead (it belongs to that row's request alone).

    The greedy rows take one argmax over the batch (float32 to float64 is exact, so the first maximum is
    the one Sampler.sample finds). The other rows go through their own Sampler one by one: each draws
    from its own seeded generator, so a request gets the tokens it gets when it is decoded alone.
    """
    out: list = [None] * len(samplers)
    greedy = [i for i, s in enumerate(samplers) if s.greedy]
    if greedy:
        rows = logits if len(greedy) == len(samplers) else logits[greedy]
        for i, token in zip(greedy, np.argmax(rows, axis=1).tolist()):
            out[i] = token
    for i, sampler in enumerate(samplers):
        if not sampler.greedy:
            try:
                out[i] = sampler.sample(logits[i])
            except Exception as err:  # noqa: BLE001 - e.g. NaN logits: that request fails, not the batch
                out[i] = err
    return out
