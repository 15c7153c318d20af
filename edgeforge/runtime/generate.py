"""The generation loop shared by every engine (numpy reference, TVM, ONNX).

An engine has reset(), prefill(ids) -> logits[vocab], decode(token) -> logits[vocab] and a
`device` string (INTERNALS "Engine"). Sampling happens on the host with the same Sampler, so every
engine samples identically. An engine that decodes many sequences together (runtime/onnx_batch.py)
instead has stream(...): it makes the tokens itself, with the same Sampler and the same stops, in a
thread of its own, and this loop only takes them (so a slow reader never holds up the other sequences).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .bundle_errors import BundleError
from .sampling import Sampler


@dataclass
class GenerateResult:
    tokens: list[int]                      # generated ids (the stop token included if one was hit)
    prefill_seconds: float
    decode_seconds: float
    prompt_tokens: int
    stopped: str                           # "stop" (a stop id was generated) or "length"
    logits: list[np.ndarray] | None = field(default=None, repr=False)  # per generated token, if kept
    cached_tokens: int = 0                 # prompt tokens whose KV positions came from an earlier prompt

    @property
    def decode_tokens_per_second(self) -> float:
        n = max(len(self.tokens) - 1, 0)  # the first token comes from prefill
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        """Prompt tokens actually prefilled a second (those reused from an earlier prompt not counted)."""
        done = self.prompt_tokens - self.cached_tokens
        return done / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    def timings(self) -> dict:
        return {"prefill_seconds": round(self.prefill_seconds, 6), "decode_seconds": round(self.decode_seconds, 6),
                "prefill_tokens_per_second": round(self.prefill_tokens_per_second, 3),
                "decode_tokens_per_second": round(self.decode_tokens_per_second, 3)}


def generate(engine, prompt_ids, max_tokens: int, sampler: Sampler | None = None, stop_ids=(),
             keep_logits: bool = False, on_token=None, reuse_prefix: bool = False) -> GenerateResult:
    """Run `prompt_ids` through `engine` then produce up to `max_tokens` tokens.

    Stops after a token in `stop_ids` (which is included in `tokens`). `on_token(id)` is called
    for each token as soon as it exists (streaming); when it returns True, generation ends after
    that token with stopped="stop" (a stop string, a cancelled request). The KV cache is reset first;
    with `reuse_prefix`, an engine that can (runtime/prefix.py) keeps the positions an earlier prompt with
    the same beginning computed, which changes no number, only the time to the first token.
    """
    prompt_ids = [int(i) for i in prompt_ids]
    if not prompt_ids:
        raise BundleError("the prompt is empty (no tokens): give some text")
    # A prompt past the context would make an engine allocate for it (the numpy reference's
    # attention is T x T per head): refuse it up front, and stop generating at the context's end.
    limit = getattr(engine, "context_length", None)
    if limit:
        if len(prompt_ids) >= limit:
            raise BundleError(f"the prompt has {len(prompt_ids)} tokens and the context holds {limit}: "
                              "use a shorter prompt (or --ctx, where the model allows a longer context)")
        max_tokens = min(max_tokens, limit - len(prompt_ids))
    sampler = sampler or Sampler()
    stop = {int(s) for s in stop_ids}
    tokens, kept = [], [] if keep_logits else None
    stream = getattr(engine, "stream", None) or (lambda *args: engine_tokens(engine, *args))
    source = stream(prompt_ids, max_tokens, sampler, stop, reuse_prefix)
    stopped, prefill_seconds = "length", 0.0
    t0 = t1 = time.perf_counter()
    try:
        for token, logits in source:
            if not tokens:  # the first token comes from the prefill
                t1 = time.perf_counter()
                prefill_seconds = t1 - t0
            if kept is not None:
                kept.append(np.array(logits, dtype=np.float32))
            tokens.append(token)
            if (on_token is not None and on_token(token)) or token in stop:
                stopped = "stop"
                break
    finally:
        source.close()  # a batched sequence gives its row back now
    return GenerateResult(tokens=tokens, prefill_seconds=prefill_seconds,
                          decode_seconds=time.perf_counter() - t1, prompt_tokens=len(prompt_ids),
                          stopped=stopped, logits=kept, cached_tokens=getattr(engine, "cached_tokens", 0))


def engine_tokens(engine, prompt_ids: list[int], max_tokens: int, sampler: Sampler, stop: set[int],
                  reuse_prefix: bool = False):
    """(token, logits it was sampled from) of one sequence on its own engine: a prefill, then a decode step
    per token, until a stop id or max_tokens. Sets engine.cached_tokens: the prompt positions reused."""
    engine.reset()
    reuse = getattr(engine, "reuse_prefix", None) if reuse_prefix else None
    kept = reuse(prompt_ids) if reuse is not None else 0
    engine.cached_tokens = kept
    logits = engine.prefill(prompt_ids[kept:])
    for made in range(1, max_tokens + 1):
        token = sampler.sample(logits)
        yield token, logits
        if token in stop or made == max_tokens:
            return
        logits = engine.decode(token)
