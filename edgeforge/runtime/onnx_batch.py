"""Batched decoding: many sequences on one loaded ONNX model, one decode step for all of them per call.

A decode step of a small model on a CPU is dominated by reading the weights; a step over B sequences
reads them once (MatMulNBits with B rows), so B sequences decoded together cost little more than one
(docs/notes/serve.md, Session 9). `BatchDecoder` holds the KV cache of every sequence as rows of one
buffer per layer and kind, [rows, kv_heads, capacity, head_dim]; each sequence (`BatchMember`) owns one
row while it is active.

One thread of the decoder's own makes every token (docs/notes/serve.md, Session 11): a member's
stream() hands it a prompt, a Sampler, the stop ids and max_tokens, then only takes the tokens as they
come. The decoder thread loops:

- prefill: a newcomer's prompt runs alone (batch 1) on its row, in chunks of `prefill_budget` tokens
  counted from where its prefill starts (the last chunk takes what is left), and between two decode
  steps at most that many prompt tokens run, so a long prompt holds the running sequences up for one
  chunk at a time, not for its whole length. The chunks depend on the prompt alone, never on what else
  is running: ONNX Runtime's attention gives a position numbers that can depend on the shape of the call
  that computed it (1e-6 apart in K/V on a head_dim-16 model for some chunkings, none found on SmolLM2;
  Session 14), so a prompt always runs the same calls and gets the same numbers, busy server or idle;
- decode: one call for every sequence past its prefill (rows 0..B-1, each with its own length in
  seqlens_k; the graph's GroupQueryAttention appends each row's key at that row's own position), then
  the decoder samples every row itself (sampling.sample_rows: greedy rows in one argmax), hands each
  member its token and starts the next step. The members' threads turn tokens into text meanwhile: no
  step waits for a reader (Session 10 measured 2-3 ms a step at 16 rows while they took turns);
- a sequence that ends (a stop id, max_tokens, an error, or its reader closing the stream) gives its
  row back and the last row moves into it, so the decoding rows are always 0..B-1 and a step never
  computes a row nobody waits for. A row still in its prefill sits right after them.
- with a prompt cache (runtime/prefix.py), an ending sequence leaves a copy of its prompt's positions,
  and a newcomer whose prompt begins alike starts its prefill from the longest such copy.
- one sequence decoding alone runs a one-row call, and ONNX Runtime has a one-row MatMulNBits kernel of
  its own on some CPUs (MLAS on AVX2, Session 16: 1e-6 apart from the same row in a call of 2 or more
  rows, whose rows never depend on each other; on AVX-512 VNNI the two round alike). There an answer
  under traffic equals its answer alone up to that rounding, which the steps amplify (SmolLM2's logits
  0.76 apart after 10 steps), and greedy text can part at a near tie.
  `invariant=True` (serve --batch-invariant) probes the CPU once (lone_rows_round_alike) and, where they
  differ, runs a lone row next to a scratch row, so every step takes the batch kernel: an answer is then
  the same however busy the decoder is, at the cost of a two-row step for a lone sequence (SmolLM2 on
  2 AVX2 cores: 11.8 ms instead of 8.2 ms).

A failed call fails the sequences it computed (their readers raise), never the thread. The thread ends
when no sequence is left, and the next stream starts another.

The direct calls, `BatchMember.prefill`/`finish` and `BatchDecoder._decode_rows`, are for tests and
bench/serve_batch_step.py, on a decoder with no stream running.

Used by the server (runtime/server.py) for graphs with onnx.batch_decode (backends/onnx/graph.py);
a decode step of two or more rows gives every row the logits it gets in any other such step, bit for
bit, so on an invariant decoder (or a CPU whose lone-row kernel rounds alike) an answer is the one the
same prompt gets alone on the decoder (tests/test_onnx_batch.py checks the logits under random
traffic), and that of a whole-prompt prefill when the prompt fits one chunk. A prompt that starts from
the prompt cache runs other calls than alone, and may differ from its answer alone by that float
rounding (runtime/prefix.py).

Copied into bundles: imports only numpy and this package.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque

import numpy as np

from .bundle_errors import BundleError
from .memory import check_kv_buffers
from .prefix import PromptCache
from .sampling import sample_rows


def can_batch(engine) -> bool:
    """Whether `engine` (an OnnxEngine) has a graph with a free batch dimension and a KV layout this module
    fills: the shared past/present buffers in host memory (CPU)."""
    info = getattr(engine, "info", None)
    return (isinstance(info, dict) and info.get("batch_decode") is True and getattr(engine, "embeddings", None) is not None
            and getattr(engine, "kv_mode", None) == "shared" and getattr(engine, "kv_on_cpu", False) is True)


MAX_BINDINGS = 256  # row ranges with a ready IOBinding (a prefill's row, a decode step's rows)
PREFILL_BUDGET = 128  # prompt tokens between two decode steps (~75 ms for SmolLM2-135M on 2 cores)


def lone_rows_round_alike(engine) -> bool:
    """Whether a one-row decode call of `engine`'s graph gives its row the numbers a two-row call gives
    the same row, bit for bit (two calls on a scratch decoder's buffers: a token at position 0)."""
    probe = BatchDecoder(engine)
    embeds = engine.embeddings.rows([1, 2])[:, None, :]
    lone = probe._run(0, embeds[:1], [1])[0].copy()
    pair = probe._run(0, embeds, [1, 1])[0]
    return bool(np.array_equal(lone, pair))


class BatchDecoder:
    """The rows of one loaded model (an OnnxEngine's session and embedding table; the engine's own
    sequence state is not used). `invariant`: a lone sequence's steps take the kernels of a batch too
    (the module's docstring), so no answer depends on the traffic."""

    def __init__(self, engine, prefill_budget: int = PREFILL_BUDGET, prompt_cache: PromptCache | None = None,
                 invariant: bool = False):
        if not can_batch(engine):
            raise BundleError(f"{engine.artifact_dir}: this graph cannot decode a batch (rebuild the bundle)")
        self.engine = engine
        self.pad_lone_row = invariant and not lone_rows_round_alike(engine)
        # Reused positions must be a prefill's numbers up to float rounding: measured for ORT's CPU kernels alone.
        cpu = getattr(engine, "provider", None) == "CPUExecutionProvider"
        self.prompts = prompt_cache if prompt_cache is not None and cpu else PromptCache(0, 0)
        self.bound: dict[tuple[int, int], tuple] = {}  # (first row, rows) -> an IOBinding with their KV bound
        self.prefill_budget = prefill_budget
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)  # a call on the buffers ended (busy is False, or rows changed)
        self.rows: list[BatchMember] = []      # row i's sequence: past its prefill, decoded every step
        self.filling: BatchMember | None = None  # the sequence in its prefill, on row len(rows)
        self.waiting: deque[BatchMember] = deque()  # streams not yet begun, first come first served
        self.busy = False                       # a call on the buffers is running (outside the lock)
        self.thread: threading.Thread | None = None  # the decoder thread, while there is work
        self.prefilled = 0                      # prompt tokens run since the last decode step
        self.kv: list[np.ndarray] = []          # per layer: key, value
        self.capacity = self.row_capacity = 0
        self.steps = self.stepped_rows = 0      # decode steps run and rows they decoded (mean batch size)

    def members(self, n: int) -> list["BatchMember"]:
        return [BatchMember(self) for _ in range(n)]

    # ---- called by members' threads -------------------------------------------------------------
    def start(self, member: "BatchMember", gen: "_Generation") -> None:
        with self.lock:
            if member.row is not None or member in self.waiting:
                raise BundleError("a batch member runs one sequence at a time")
            member.gen = gen
            self.waiting.append(member)
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="batch-decoder", daemon=True)
                self.thread.start()

    def take(self, gen: "_Generation"):
        """The next (token, logits) of `gen`, waiting for it; None when it has ended."""
        with self.lock:
            while not gen.out and not gen.over:
                gen.ready.wait()
            if not gen.out:
                return None
            item = gen.out.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    def leave(self, member: "BatchMember") -> None:
        """Give the member's row back now (its reader is done with it)."""
        with self.lock:
            if member.gen is not None:
                member.gen.leaving = True  # the decoder thread frees it between two calls
            with contextlib.suppress(ValueError):
                self.waiting.remove(member)
            while self.busy and member.row is not None:
                self.cond.wait()
            self._release(member)
            member.gen = None

    def prefill(self, member: "BatchMember", ids: list[int]) -> np.ndarray:
        """Direct call (no stream running): the member's prompt, or more of it, on its row; its logits."""
        with self.lock:
            while self.busy:
                self.cond.wait()
            self.busy = True
            if member.row is None:
                member.row = len(self.rows)
                self.rows.append(member)
        try:
            return self._prefill(member, ids)[0]
        except BaseException:
            with self.lock:
                self._release(member)
            raise
        finally:
            with self.lock:
                self.busy = False
                self.cond.notify_all()

    # ---- the decoder thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        made = None
        while True:
            with self.lock:
                self.busy = False
                try:
                    if made is not None:
                        self._deliver(*made)
                    work = self._plan()
                except Exception as err:  # noqa: BLE001 - a bug here must reach the readers, not hang them
                    self._fail_all(err)
                    work = None
                self.busy = work is not None
                self.cond.notify_all()
                if work is None:
                    self.thread = None  # nothing left: the next stream starts a new thread
                    return
            made = self._call(*work)

    def _plan(self):
        """The next call (under the lock): a prefill chunk while the budget between two decode steps
        allows, else a decode step of every row; None when no sequence is left."""
        for member in [*self.rows, self.filling]:
            if member is not None and member.gen.leaving:
                self._release(member)
        while self.filling is None and self.waiting:
            member = self.waiting.popleft()
            member.row, member.length, self.filling = len(self.rows), 0, member
            if member.gen.reuse:
                self._reuse(member)
        if self.filling is not None:
            gen = self.filling.gen
            ids = gen.prompt[gen.fed: gen.fed + _chunk(len(gen.prompt) - gen.fed, self.prefill_budget)]
            # The chunk is never cut to the budget's room: its shape would then depend on the traffic.
            if not self.rows or not self.prefilled or self.prefilled + len(ids) <= self.prefill_budget:
                self.prefilled += len(ids)
                return [self.filling], ids
        if self.rows:
            self.prefilled = 0
            return list(self.rows), [m.gen.token for m in self.rows]
        return None

    def _call(self, batch: list["BatchMember"], ids: list[int]):
        """Run one planned call (outside the lock) and sample what it finished: (batch, tokens or
        exceptions, logits); tokens None for a prefill chunk that is not the prompt's last."""
        try:
            if len(batch) == 1 and batch[0] is self.filling:
                gen = batch[0].gen
                logits = self._prefill(batch[0], ids)
                gen.fed += len(ids)
                if gen.fed < len(gen.prompt):
                    return batch, None, None
            else:
                logits = self._decode_rows(batch, ids)
        except Exception as err:  # noqa: BLE001 - the sequences of this call fail, the others go on
            return batch, [err] * len(batch), None
        return batch, sample_rows([m.gen.sampler for m in batch], logits), logits

    def _deliver(self, batch: list["BatchMember"], tokens, logits) -> None:
        """Hand each sequence its token (under the lock); an ended sequence gives its row back."""
        if tokens is None:
            return
        if batch[0] is self.filling:  # the prompt is in: the sequence decodes from the next step on
            self.rows.append(batch[0])
            self.filling = None
        for k, (member, token) in enumerate(zip(batch, tokens)):
            gen = member.gen
            if isinstance(token, BaseException):
                gen.out.append(token)
                gen.over = gen.failed = True
            else:
                gen.out.append((token, logits[k]))
                gen.token, gen.left = token, gen.left - 1
                gen.over = token in gen.stop or gen.left <= 0
            if gen.over or gen.leaving:
                self._release(member)
            gen.ready.notify()

    # ---- under the lock -------------------------------------------------------------------------
    def _fail_all(self, err: Exception) -> None:
        """Every sequence ends with `err` and every row is free."""
        for member in [*self.rows, self.filling, *self.waiting]:
            if member is not None:
                member.gen.out.append(err)
                member.row, member.length = None, 0
                member.gen.over = True
                member.gen.ready.notify()
        self.rows, self.filling = [], None
        self.waiting.clear()

    def _reuse(self, member: "BatchMember") -> None:
        """Start the newcomer's prefill from the prompt cache's longest matching copy, if any."""
        gen = member.gen
        n, key = self.prompts.best(gen.prompt)
        if n == 0:
            return
        try:
            self._ensure(member.row + 1, n)
        except BundleError:
            return  # no room: the prefill from the start says so by itself
        for buf, saved in zip(self.kv, self.prompts.take(key, n)):
            buf[member.row, :, :n] = saved[:, :n]
        member.length = gen.fed = gen.cached = n

    def _save(self, member: "BatchMember") -> None:
        """Copy the prompt positions the member's prefill computed into the prompt cache."""
        gen, row = member.gen, member.row
        n = min(member.length, gen.fed) if gen is not None and row is not None and not gen.failed else 0
        if n:  # put() keeps nothing shorter than MIN_TAIL (a one-token prompt's position is the decode path's)
            self.prompts.put(gen.prompt[:n], lambda: [buf[row, :, :n].copy() for buf in self.kv])

    def _release(self, member: "BatchMember") -> None:
        """Give the member's row back (nobody else is on the buffers): the last row moves into it, and a
        sequence in its prefill moves along to stay right after the decoding rows."""
        self._save(member)  # into the prompt cache, if there is one
        row, member.row, member.length = member.row, None, 0
        if member.gen is not None and not member.gen.over:
            member.gen.over = True
            member.gen.ready.notify()
        if row is None:
            return
        if member is self.filling:
            self.filling = None
            return
        last = self.rows.pop()
        if last is not member:
            self._move(last, row)
            self.rows[row] = last
        if self.filling is not None:
            self._move(self.filling, len(self.rows))

    def _move(self, member: "BatchMember", row: int) -> None:
        # A newcomer whose prefill has not run yet holds no positions, and its row may lie past the buffers
        # (they grow at its first call): nothing to copy (CI, Session 12: an IndexError failed every stream).
        if member.length and row != member.row:
            for buf in self.kv:
                buf[row, :, : member.length] = buf[member.row, :, : member.length]
        member.row = row

    # ---- the calls (busy, outside the lock) -----------------------------------------------------
    def _prefill(self, member: "BatchMember", ids: list[int]) -> np.ndarray:
        embeds = self.engine.embeddings.rows(ids)[None]
        logits = self._run(member.row, embeds, [member.length + len(ids)])
        member.length += len(ids)
        return logits

    def _decode_rows(self, batch: list["BatchMember"], tokens: list[int]) -> np.ndarray:
        """One decode step of rows 0..len(batch)-1; their logits [rows, vocab]."""
        totals = [m.length + 1 for m in batch]
        if self.pad_lone_row and len(batch) == 1:
            # The scratch row is row 1: free, or the prefilling newcomer's, whose next position it writes and
            # whose next chunk writes again before anything reads it.
            scratch = self.filling.length if self.filling is not None and self.filling.row == 1 else 0
            tokens, totals = [tokens[0], tokens[0]], [totals[0], scratch + 1]
        embeds = self.engine.embeddings.rows(tokens)[:, None, :]
        logits = self._run(0, embeds, totals)[: len(batch)]
        for m in batch:
            m.length += 1
        self.steps += 1
        self.stepped_rows += len(batch)
        return logits

    def _run(self, first_row: int, embeds: np.ndarray, totals: list[int]) -> np.ndarray:
        """One call on rows first_row.. (one per entry of totals: each row's length after the call);
        returns float32 logits [rows, vocab]."""
        n = len(totals)
        self._ensure(first_row + n, max(totals))
        ort, io = self.engine.ort, self._binding(first_row, n)
        seqlens = np.asarray(totals, np.int32) - 1
        total = np.asarray(max(totals), np.int32)
        logits = np.empty((n, 1, self.engine.vocab_size), np.float32)
        keep = [np.ascontiguousarray(embeds, np.float32), seqlens, total, logits]  # alive until the call returns
        io.bind_ortvalue_input("inputs_embeds", ort.OrtValue.ortvalue_from_numpy(keep[0]))
        io.bind_ortvalue_input("seqlens_k", ort.OrtValue.ortvalue_from_numpy(seqlens))
        io.bind_ortvalue_input("total_sequence_length", ort.OrtValue.ortvalue_from_numpy(total))
        io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.engine.session.run_with_iobinding(io)
        return logits[:, 0]

    def _binding(self, first_row: int, n: int):
        """An IOBinding with the KV of rows first_row..first_row+n-1 bound as past and present: made once
        per row range and buffer (binding 60 OrtValues took ~0.3 ms, 7% of a SmolLM2 step)."""
        made = self.bound.get((first_row, n))
        if made is None:
            if len(self.bound) >= MAX_BINDINGS:
                self.bound.clear()
            io, keep = self.engine.session.io_binding(), []
            for i in range(self.engine.num_layers):
                for j, kind in enumerate(("key", "value")):
                    view = self.kv[2 * i + j][first_row: first_row + n]  # contiguous: whole rows
                    value = self.engine.ort.OrtValue.ortvalue_from_numpy(view)
                    keep.append((view, value))  # alive as long as the binding: the OrtValue shares its memory
                    io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", value)
                    io.bind_ortvalue_output(f"present.{i}.{kind}", value)
            made = self.bound[(first_row, n)] = (io, keep)
        return made[0]

    def _ensure(self, rows: int, length: int) -> None:
        """Room for `rows` rows of `length` positions: both grow by doubling; rows in use are copied."""
        limit = self.engine.max_length
        if length > limit:
            raise BundleError(f"sequence of {length} tokens exceeds max_length {limit} "
                              f"(context_length {self.engine.info['context_length']})")
        if rows <= self.row_capacity and length <= self.capacity:
            return
        row_capacity, capacity = max(self.row_capacity, 1), max(self.capacity, 64)
        while row_capacity < rows:
            row_capacity *= 2
        while capacity < length:
            capacity *= 2
        capacity = min(capacity, limit)
        info = self.engine.info
        shape = (row_capacity, int(info["num_kv_heads"]), capacity, int(info["head_dim"]))
        check_kv_buffers(f"the KV cache for {row_capacity} sequences of {capacity} positions", shape,
                         self.engine.num_layers, np.dtype(self.engine.kv_dtype).itemsize,
                         "serve fewer sequences at once (--parallel) or a smaller --ctx")
        held = self.rows + [self.filling] * (self.filling is not None)
        used = max((m.length for m in held), default=0)
        old, self.kv = self.kv, []
        self.bound.clear()  # bound to the old buffers
        for buf in old or [None] * (2 * self.engine.num_layers):
            new = np.zeros(shape, self.engine.kv_dtype)
            if buf is not None:  # the rows that hold sequences (a newcomer's row may be past the old buffer)
                rows_held = min(len(held), buf.shape[0])
                new[:rows_held, :, :used] = buf[:rows_held, :, :used]
            self.kv.append(new)
        self.row_capacity, self.capacity = row_capacity, capacity


def _chunk(left: int, budget: int) -> int:
    """How many of a prompt's `left` tokens the next chunk runs: the budget, but never one token after the
    first chunk, as one token on top of a cache takes the graph's decode path, whose logits are far from
    those of the same token inside a longer prefill (Session 11: 0.7 apart on SmolLM2)."""
    n = min(left, max(budget, 2))
    return left if left - n == 1 else n


class _Generation:
    """What one stream asked for, and the tokens made for it that its reader has not taken yet."""

    def __init__(self, lock, prompt: list[int], max_tokens: int, sampler, stop, reuse: bool = False):
        self.prompt, self.left, self.sampler, self.stop = prompt, max_tokens, sampler, stop
        self.reuse = reuse      # may start from the prompt cache
        self.cached = 0         # prompt positions that came from it
        self.fed = 0            # prompt tokens prefilled so far (the cached ones included)
        self.token = None       # the last token made: the next decode step's input
        self.out: deque = deque()  # (token, logits) or an exception, in order
        self.over = False       # no more tokens will be made
        self.failed = False     # it ended with an error (its positions are not kept)
        self.leaving = False    # the reader is gone: free the row between two calls
        self.ready = threading.Condition(lock)  # out grew or over was set


class BatchMember:
    """One sequence at a time of a BatchDecoder: stream() is generate()'s token source."""

    def __init__(self, decoder: BatchDecoder):
        self.decoder = decoder  # shared by the members (the server reads its step counts)
        engine = decoder.engine
        self.device, self.vocab_size = engine.device, engine.vocab_size
        self.max_length = self.context_length = engine.max_length
        self.row: int | None = None
        self.length = 0
        self.gen: _Generation | None = None
        self.cached_tokens = 0  # the last stream's prompt positions from the prompt cache

    def stream(self, prompt_ids: list[int], max_tokens: int, sampler, stop: set[int], reuse_prefix: bool = False):
        """(token, logits it was sampled from), made by the decoder thread, until a stop id or max_tokens
        (runtime/generate.py's engine_tokens, batched). Closing it ends the sequence."""
        self.cached_tokens = 0
        if max_tokens <= 0:
            return
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise BundleError("prefill needs at least one token")
        gen = _Generation(self.decoder.lock, ids, max_tokens, sampler, stop, reuse_prefix)
        self.decoder.start(self, gen)
        try:
            while (item := self.decoder.take(gen)) is not None:
                yield item
        finally:
            self.decoder.leave(self)
            self.cached_tokens = gen.cached

    def prefill(self, ids) -> np.ndarray:
        ids = [int(i) for i in ids]
        if not ids:
            raise BundleError("prefill needs at least one token")
        return self.decoder.prefill(self, ids)

    def finish(self) -> None:
        """Free the row now (the others stop waiting for this sequence)."""
        self.decoder.leave(self)
