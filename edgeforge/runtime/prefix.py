"""Prompt prefix reuse: a new prompt that begins like an earlier one keeps the earlier one's KV positions
and prefills only the rest, as llama-server does with its slots. A chat's system prompt, and every earlier
turn of a conversation, is then computed once instead of on every request.

Only positions that a prefill computed are kept, and the prefill that follows runs at least MIN_TAIL
tokens: one token on top of a cache takes the graph's decode path, whose numbers are far from a
prefill's (onnx_batch._chunk), so positions made by decode steps (an answer) are never reused, and a
reusing prefill is never one token. What is left is float rounding: ONNX Runtime's attention gives a
position numbers that can depend on the shape of the call that computed it (Session 14: bit for bit on
SmolLM2 in 52 random chunkings; 1e-6 apart in K/V for some chunkings on a head_dim-16 random model,
which moved its logits by up to 1e-2). So an answer that starts from the cache is the fresh answer up to
that rounding, as with llama-server's cache_prompt, and can pick another token only where two were
tied that closely; `--prompt-cache 0` (with `--batch-invariant`: runtime/onnx_batch.py) gives the same answer to
the same prompt every time, bit for bit.

`PromptCache` keeps copies of finished sequences' prompt positions for the batch decoder, whose rows move
when a sequence ends (runtime/onnx_batch.py); a single engine keeps its own buffers between sequences and
needs no copy (OnnxEngine.reuse_prefix).

Copied into bundles: standard library and numpy only.
"""

from __future__ import annotations

from collections import OrderedDict

from .memory import mem_available

MIN_TAIL = 2  # prompt tokens a reusing prefill still runs (never the one-token decode path)


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def reusable(cached, prompt) -> int:
    """How many leading positions of a cache holding `cached` (prefill-computed positions) `prompt` keeps."""
    return max(0, min(common_prefix(cached, prompt), len(prompt) - MIN_TAIL))


class PromptCache:
    """Copies of prompt KV positions, newest last: at most `entries` of them and `max_bytes` together, and
    none that would take over a quarter of the memory still free. An entry is (token ids, one array per KV buffer [kv_heads, positions, head_dim])."""

    def __init__(self, entries: int, max_bytes: int):
        self.entries, self.max_bytes = max(0, int(entries)), max(0, int(max_bytes))
        self.items: OrderedDict[tuple, list] = OrderedDict()
        self.bytes = 0
        self.hits = self.reused_tokens = 0  # for /metrics

    @property
    def enabled(self) -> bool:
        return self.entries > 0 and self.max_bytes > 0

    def best(self, prompt) -> tuple[int, tuple | None]:
        """(positions the best entry gives `prompt`, its key); (0, None) when none helps."""
        found, key = 0, None
        for ids in self.items:
            n = reusable(ids, prompt)
            if n > found:
                found, key = n, ids
        return found, key

    def take(self, key: tuple, n: int) -> list:
        """The arrays of entry `key`, which is now the newest; the caller copies its first n positions."""
        self.items.move_to_end(key)
        self.hits += 1
        self.reused_tokens += n
        return self.items[key]

    def put(self, ids, read) -> None:
        """Keep the positions of `ids`; read() gives the arrays (called only when they will be kept)."""
        ids = tuple(int(i) for i in ids)
        if len(ids) < MIN_TAIL or not self.enabled:
            return
        for old in list(self.items):
            if old[: len(ids)] == ids:  # an entry already holds these positions (and perhaps more)
                self.items.move_to_end(old)
                return
            if ids[: len(old)] == old:  # the new entry holds all of this one's
                self._drop(old)
        arrays = read()
        size = sum(a.nbytes for a in arrays)
        free = mem_available()
        if size > self.max_bytes or (free is not None and size > free // 4):  # never what the engines need
            return
        while self.items and (len(self.items) >= self.entries or self.bytes + size > self.max_bytes):
            self._drop(next(iter(self.items)))
        self.items[ids] = arrays
        self.bytes += size

    def clear(self) -> None:
        self.items.clear()
        self.bytes = 0

    def _drop(self, key: tuple) -> None:
        self.bytes -= sum(a.nbytes for a in self.items.pop(key))
