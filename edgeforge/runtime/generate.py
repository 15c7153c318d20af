"""The generation loop shared by every engine (numpy reference, TVM, ONNX).

An engine has reset(), prefill(ids) -> logits[vocab], decode(token) -> logits[vocab] and a
`device` string (INTERNALS "Engine"). Sampling happens here, on the host, so every engine
samples identically.
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

    @property
    def decode_tokens_per_second(self) -> float:
        n = max(len(self.tokens) - 1, 0)  # the first token comes from prefill
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    def timings(self) -> dict:
        return {"prefill_seconds": round(self.prefill_seconds, 6), "decode_seconds": round(self.decode_seconds, 6),
                "prefill_tokens_per_second": round(self.prefill_tokens_per_second, 3),
                "decode_tokens_per_second": round(self.decode_tokens_per_second, 3)}


def generate(engine, prompt_ids, max_tokens: int, sampler: Sampler | None = None, stop_ids=(),
             keep_logits: bool = False, on_token=None) -> GenerateResult:
    """Run `prompt_ids` through `engine` then produce up to `max_tokens` tokens.

    Stops after a token in `stop_ids` (which is included in `tokens`). `on_token(id)` is called
    for each token as soon as it exists (streaming); when it returns True, generation ends after
    that token with stopped="stop" (a stop string, a cancelled request). The KV cache is reset first.
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
    engine.reset()
    t0 = time.perf_counter()
    logits = engine.prefill(prompt_ids)
    prefill_seconds = time.perf_counter() - t0
    stopped = "length"
    t1 = time.perf_counter()
    while len(tokens) < max_tokens:
        if kept is not None:
            kept.append(np.array(logits, dtype=np.float32))
        token = sampler.sample(logits)
        tokens.append(token)
        if on_token is not None and on_token(token):
            stopped = "stop"
            break
        if token in stop:
            stopped = "stop"
            break
        if len(tokens) == max_tokens:
            break
        logits = engine.decode(token)
    return GenerateResult(tokens=tokens, prefill_seconds=prefill_seconds,
                          decode_seconds=time.perf_counter() - t1, prompt_tokens=len(prompt_ids),
                          stopped=stopped, logits=kept)
