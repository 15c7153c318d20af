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
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, top_p)) + 1]
    out = np.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


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
