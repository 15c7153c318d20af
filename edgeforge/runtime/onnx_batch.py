"""Batched decoding: many sequences on one loaded ONNX model, one decode step for all of them per call.

A decode step of a small model on a CPU is dominated by reading the weights; a step over B sequences
reads them once (MatMulNBits with B rows), so B sequences decoded together cost little more than one
(docs/notes/serve.md, Session 9). `BatchDecoder` holds the KV cache of every sequence as rows of one
buffer per layer and kind, [rows, kv_heads, capacity, head_dim]; each sequence (`BatchMember`, an
engine with reset/prefill/decode like OnnxEngine) owns one row while it is active:

- prefill runs alone (batch 1) on the member's row: the buffer's row is contiguous, so a view of it is
  bound as that layer's past and present, exactly as OnnxEngine binds its own buffer;
- decode waits until every active member has asked for its next token, then one call decodes them
  all (batch B = active members, rows 0..B-1, each with its own length in seqlens_k; the graph's
  GroupQueryAttention appends each row's key at that row's own position). The member whose request
  completes the set runs the step; the others wait for their logits;
- a member that finishes (or resets) gives its row back, and the last row moves into it, so the active
  rows are always 0..B-1 and a step never computes a row nobody waits for.

Used by the server (runtime/server.py) for graphs with onnx.batch_decode (backends/onnx/graph.py);
greedy answers are those of the sequence decoded alone (tests/test_onnx_batch.py checks the logits).

Copied into bundles: imports only numpy and this package.
"""

from __future__ import annotations

import threading

import numpy as np

from .bundle_errors import BundleError
from .memory import check_kv_buffers


def can_batch(engine) -> bool:
    """Whether `engine` (an OnnxEngine) has a graph with a free batch dimension and a KV layout this module
    fills: the shared past/present buffers in host memory (CPU)."""
    info = getattr(engine, "info", None)
    return (isinstance(info, dict) and info.get("batch_decode") is True and getattr(engine, "embeddings", None) is not None
            and getattr(engine, "kv_mode", None) == "shared" and getattr(engine, "kv_on_cpu", False) is True)


class BatchDecoder:
    """The rows of one loaded model (an OnnxEngine's session and embedding table; the engine's own
    sequence state is not used)."""

    def __init__(self, engine):
        if not can_batch(engine):
            raise BundleError(f"{engine.artifact_dir}: this graph cannot decode a batch (rebuild the bundle)")
        self.engine = engine
        self.io = engine.session.io_binding()
        self.cond = threading.Condition()
        self.rows: list[BatchMember] = []      # row i's sequence
        self.pending: dict[BatchMember, int] = {}  # members waiting for a decode step -> their token
        self.results: dict[BatchMember, object] = {}  # logits (or the step's exception) not yet collected
        self.busy = False                       # a call on the buffers is running (outside the lock)
        self.kv: list[np.ndarray] = []          # per layer: key, value
        self.capacity = self.row_capacity = 0
        self.steps = self.stepped_rows = 0      # decode steps run and rows they decoded (mean batch size)

    def members(self, n: int) -> list["BatchMember"]:
        return [BatchMember(self) for _ in range(n)]

    # ---- called by members ------------------------------------------------------------------------
    def prefill(self, member: "BatchMember", ids: list[int]) -> np.ndarray:
        with self.cond:
            while self.busy:
                self.cond.wait()
            self.busy = True
            if member.row is None:  # a new sequence takes the next row; a prefill after a prefill continues it
                member.row = len(self.rows)
                self.rows.append(member)
        try:
            embeds = self.engine.embeddings.rows(ids)[None]
            logits = self._run(member.row, embeds, [member.length + len(ids)])
            member.length += len(ids)
            return logits[0]
        except BaseException:
            with self.cond:
                self.busy = False
                self._leave(member)
            raise
        finally:
            with self.cond:
                self.busy = False
                self.cond.notify_all()

    def decode(self, member: "BatchMember", token: int) -> np.ndarray:
        if member.row is None:
            raise BundleError("decode before prefill")
        with self.cond:
            self.pending[member] = int(token)
            self.cond.notify_all()
            while member not in self.results and not self._ready():
                self.cond.wait()
            if member in self.results:
                return self._collect(member)
            batch = list(self.rows)  # rows 0..B-1 in order, all pending (_ready)
            tokens = [self.pending.pop(m) for m in batch]
            self.busy = True
        try:
            out = self._decode_rows(batch, tokens)
        except BaseException as err:  # every waiting member gets the error, not a hang
            out = [err] * len(batch)
        with self.cond:
            self.busy = False
            self.results.update(zip(batch, out))
            self.cond.notify_all()
            return self._collect(member)

    def leave(self, member: "BatchMember") -> None:
        with self.cond:
            while self.busy:
                self.cond.wait()
            self._leave(member)
            self.cond.notify_all()  # the others may all be pending now

    # ---- under the lock -------------------------------------------------------------------------
    def _ready(self) -> bool:
        return not self.busy and bool(self.rows) and all(m in self.pending for m in self.rows)

    def _collect(self, member: "BatchMember") -> np.ndarray:
        out = self.results.pop(member)
        if isinstance(out, BaseException):
            raise out
        return out

    def _leave(self, member: "BatchMember") -> None:
        """Give the member's row back: the last row moves into it (the caller is the only one on the buffers)."""
        self.pending.pop(member, None)
        row = member.row
        member.row, member.length = None, 0
        if row is None:
            return
        last = self.rows.pop()
        if last is not member:
            for buf in self.kv:
                buf[row, :, : last.length] = buf[last.row, :, : last.length]
            self.rows[row], last.row = last, row

    # ---- the calls (busy, outside the lock) -----------------------------------------------------
    def _decode_rows(self, batch: list["BatchMember"], tokens: list[int]) -> list[np.ndarray]:
        embeds = self.engine.embeddings.rows(tokens)[:, None, :]
        logits = self._run(0, embeds, [m.length + 1 for m in batch])
        for m in batch:
            m.length += 1
        self.steps += 1
        self.stepped_rows += len(batch)
        return list(logits)

    def _run(self, first_row: int, embeds: np.ndarray, totals: list[int]) -> np.ndarray:
        """One call on rows first_row.. (one per entry of totals: each row's length after the call);
        returns float32 logits [rows, vocab]."""
        n = len(totals)
        self._ensure(first_row + n, max(totals))
        ort, io = self.engine.ort, self.io
        seqlens = np.asarray(totals, np.int32) - 1
        total = np.asarray(max(totals), np.int32)
        logits = np.empty((n, 1, self.engine.vocab_size), np.float32)
        keep = [np.ascontiguousarray(embeds, np.float32), seqlens, total, logits]  # alive until the call returns
        io.bind_ortvalue_input("inputs_embeds", ort.OrtValue.ortvalue_from_numpy(keep[0]))
        io.bind_ortvalue_input("seqlens_k", ort.OrtValue.ortvalue_from_numpy(seqlens))
        io.bind_ortvalue_input("total_sequence_length", ort.OrtValue.ortvalue_from_numpy(total))
        io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        for i in range(self.engine.num_layers):
            for j, kind in enumerate(("key", "value")):
                view = self.kv[2 * i + j][first_row: first_row + n]  # contiguous: whole rows
                value = ort.OrtValue.ortvalue_from_numpy(view)
                keep.append(view)
                io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", value)
                io.bind_ortvalue_output(f"present.{i}.{kind}", value)
        self.engine.session.run_with_iobinding(io)
        return logits[:, 0]

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
        used = max((m.length for m in self.rows), default=0)
        old, self.kv = self.kv, []
        for buf in old or [None] * (2 * self.engine.num_layers):
            new = np.zeros(shape, self.engine.kv_dtype)
            if buf is not None:  # the rows that hold sequences (a newcomer's row may be past the old buffer)
                rows_held = min(len(self.rows), buf.shape[0])
                new[:rows_held, :, :used] = buf[:rows_held, :, :used]
            self.kv.append(new)
        self.row_capacity, self.capacity = row_capacity, capacity


class BatchMember:
    """One sequence of a BatchDecoder, with the Engine interface (reset / prefill / decode) and finish()."""

    def __init__(self, decoder: BatchDecoder):
        self.decoder = decoder  # shared by the members (the server reads its step counts)
        engine = decoder.engine
        self.device, self.vocab_size = engine.device, engine.vocab_size
        self.max_length = self.context_length = engine.max_length
        self.row: int | None = None
        self.length = 0

    def reset(self) -> None:
        self.decoder.leave(self)

    def prefill(self, ids) -> np.ndarray:
        ids = [int(i) for i in ids]
        if not ids:
            raise BundleError("prefill needs at least one token")
        return self.decoder.prefill(self, ids)

    def decode(self, token: int) -> np.ndarray:
        return self.decoder.decode(self, int(token))

    def finish(self) -> None:
        """The generation ended: free the row now (the others stop waiting for this sequence)."""
        self.decoder.leave(self)
