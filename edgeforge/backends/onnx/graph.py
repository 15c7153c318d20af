"""Build the ONNX graph of a Llama decoder from a QDIR, with ONNX Runtime's contrib ops.

One graph serves prefill and decode:

  inputs   inputs_embeds float32 [B, S, hidden], seqlens_k int32 [B] (= each sequence's total length - 1),
           total_sequence_length int32 [] (the longest), past_key_values.{i}.key/.value T [B, kv_heads, P, head_dim]
  outputs  logits float32 [B, 1, vocab] (last position only), present.{i}.key/.value

B (batch_size) is 1 for a prefill and for one sequence's decode; a server decodes its active
sequences in one call with B of them (S = 1, each with its own length in seqlens_k: GroupQueryAttention
appends each row's new key at its own position and attends to its own first seqlens_k + 1 rows; see
runtime/onnx_batch.py). Artifacts say so with onnx.batch_decode = true (older graphs fixed B at 1).

The engine binds past and present to the *same* buffer (max length P): GroupQueryAttention then
appends the new keys in place and reads only the first `total_sequence_length` rows.

The embedding table is not looked up in the graph: the engine reads the rows it needs from the data
file (runtime/embedding.py, at the offsets artifact.json's `embedding` gives) and feeds
inputs_embeds. In a graph, ONNX Runtime keeps the whole table resident (a 1B model's q8 table is
~270 MB of its ~930 MB of weights) although a step reads one row; read row by row from the file,
nothing of it stays resident. A tied head's MatMulNBits still reads the same bytes (one copy
on disk); an untied table is written to the data file outside the graph.

Ops: MatMulNBits (q/k/v fused
into one, gate/up fused into one), GroupQueryAttention with rotary from cos/sin caches computed from
LlamaConfig.rope_inv_freq(), SkipSimplifiedLayerNormalization between blocks. T (activations,
KV cache) is the compute dtype chosen by compile.py: the scheme's model dtype, except float32 on
x86 CPUs (see compile.py). The residual stream, the norms and the head are float32 always.

With `kv_quant` (the int8 KV cache, compile.py's [onnx] kv_cache = "int8"), past/present are int8
and every GroupQueryAttention gets its layer's static per-channel scales as initializers
(k_scale/v_scale [1, kv_heads, 1, head_dim], model/kv_int8.py); ONNX Runtime's CPU kernel takes an
int8 cache only with float32 Q/K/V, so compile.py allows it with float32 compute only. Its keys and
values are rotated per head by the orthonormal KV_ROTATION before they are stored, so RoPE runs
before that (RotaryEmbedding, at positions computed from seqlens_k as GroupQueryAttention numbers
them), queries get the same rotation and the attention output its transpose (model/kv_int8.py).

With `kernels` (compile.py's [onnx] kernels, x86 CPUs), every 4- or 8-bit linear without zero points
whose scales float16 holds exactly is edgeforge.MatMulQ instead of MatMulNBits: our own kernels
(backends/onnx/kernels), which read the weight in the layout the data file holds (4.5 or 8.5 bits a
weight) with MatMulNBits' accuracy_level-4 arithmetic; a tied head in that layout is also the
embedding table (artifact.json's embedding.layout). Other linears stay MatMulNBits.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...errors import EdgeforgeError
from ...model.config import LlamaConfig
from . import kernels, pack
from .qdir import QdirWeights

OPSET = 21  # ai.onnx; ONNX Runtime >= 1.20 and onnxruntime-webgpu 1.27 run it
MS_OPSET = 1  # com.microsoft
IR_VERSION = 10
MS = "com.microsoft"
EDGEFORGE_DOMAIN = "edgeforge"  # custom ops of libedgeforge_kernels.so (backends/onnx/kernels)
ONNX_DTYPE = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def kv_names(layer: int) -> tuple[str, str, str, str]:
    """(past key, past value, present key, present value) graph names of one layer."""
    return (f"past_key_values.{layer}.key", f"past_key_values.{layer}.value",
            f"present.{layer}.key", f"present.{layer}.value")


BATCH = "batch_size"  # the graph's symbolic batch dimension (see the module doc)
EXTERNAL_MIN_BYTES = 1024  # smaller initializers stay inside model.onnx
PAGE = 4096  # large tensors start on a page: ONNX Runtime can map them instead of copying
KV_ROTATION = "kv_rotation"  # the int8 KV cache's rotation [head_dim, head_dim] (an initializer)
HEAD_CHUNK_BYTES = 32 << 20  # the output head is split into MatMulNBits of at most this (head_chunks)


class _Graph:
    """Nodes and initializers with unique names; the small helpers keep the model code readable.

    With `data` (an open binary file and the name the graph refers to it by), every initializer of
    EXTERNAL_MIN_BYTES or more goes straight to that file as it is made, and the graph keeps only a
    reference: the export's memory is one tensor at a time, not the whole model (an 8B model's
    export peaked at 17 GB when the protobuf held every weight before onnx wrote them out)."""

    def __init__(self, data=None):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0
        self.data = data  # (file object, location) or None
        self.locations: dict[str, dict] = {}  # name -> where its bytes are in the data file

    def init(self, name: str, array: np.ndarray, external: bool = False) -> str:
        """An initializer; in the data file when it is large (or `external`: its location is needed)."""
        array = np.ascontiguousarray(array)
        if self.data is None or (array.nbytes < EXTERNAL_MIN_BYTES and not external):
            self.inits.append(numpy_helper.from_array(array, name))
        else:
            self.inits.append(self._external(name, array))
        return name

    def raw(self, name: str, array: np.ndarray) -> dict:
        """Write `array` to the data file without making it an initializer (read by the engine, not
        by the graph); returns where it is: {file, offset, length, dtype, shape}."""
        if self.data is None:
            raise EdgeforgeError(f"tensor '{name}': the graph has no external data file to hold it")
        self._write(name, np.ascontiguousarray(array))
        return self.locations[name]

    def _write(self, name: str, array: np.ndarray) -> int:
        f, location = self.data
        offset = f.tell()
        if array.nbytes >= PAGE:
            pad = -offset % PAGE
            f.write(b"\0" * pad)
            offset += pad
        f.write(memoryview(array.astype(array.dtype.newbyteorder("<"), copy=False).reshape(-1)).cast("B"))
        self.locations[name] = {"file": location, "offset": offset, "length": int(array.nbytes),
                                "dtype": array.dtype.name, "shape": [int(d) for d in array.shape]}
        return offset

    def _external(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        location = self.data[1]
        offset = self._write(name, array)
        t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                             dims=list(array.shape), data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t

    def const(self, values, dtype=np.int64) -> str:
        self._count += 1
        return self.init(f"const_{self._count}", np.asarray(values, dtype=dtype))

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "", **attrs):
        """Add a node called `name`; returns its output name (or list of names when several)."""
        outs = outputs if isinstance(outputs, list) else [f"{name}/out{i}" if outputs > 1 else f"{name}/out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs


class LlamaOnnxBuilder:
    def __init__(self, weights: QdirWeights, accuracy_level: int, compute_dtype=None, data=None, kv_quant=None,
                 use_kernels: bool = False):
        self.w = weights
        self.cfg = LlamaConfig.from_dict(weights.config, source=str(weights.qdir / "config.json"))
        if self.cfg.head_dim % 16:  # refused at run time otherwise ("head_size shall be a multiple of 16")
            raise EdgeforgeError(f"{weights.qdir / 'config.json'}: head_dim {self.cfg.head_dim} is not a multiple of 16, "
                                 "which ONNX Runtime's GroupQueryAttention needs; use --backend tvm for this model")
        # Activations, scales and KV cache; widening float16 scales/weights to float32 is exact.
        self.dtype = np.dtype(compute_dtype or weights.model_dtype).type
        self.accuracy_level = int(accuracy_level)
        self.kv_quant = kv_quant  # model/kv_int8.KvQuant, or None: float cache
        self.use_kernels = bool(use_kernels)  # quantized linears as edgeforge.MatMulQ (x86 CPUs)
        self.kernel_ops = 0  # how many are
        self.positions: str | None = None  # [batch, sequence] int64 when RoPE runs outside attention (build())
        self.g = _Graph(data)
        self.embedding: dict | None = None  # where the engine finds the embedding rows (build())
        self.tied_head: tuple | None = None  # (chunk initializers, K, bits) of a tied quantized head
        self.kernel_head: tuple | None = None  # (packed initializer, K, N, bits) of a head that runs MatMulQ

    # ---- weights ------------------------------------------------------------------------------
    def _entry(self, name: str):
        return self.w.entry(name), self.w.arrays(name)

    def _is_quant(self, name: str) -> bool:
        return self.w.entry(name)["format"] in pack.QUANT_BITS

    def _dense(self, name: str) -> np.ndarray:
        entry, arrays = self._entry(name)
        return pack.dense(name, entry, arrays, self.dtype)

    def _quant(self, name: str) -> pack.QuantLinear:
        entry, arrays = self._entry(name)
        return pack.quant_linear(name, entry, arrays, self.dtype)

    # ---- building blocks ----------------------------------------------------------------------
    def linear(self, x: str, weight_names: list[str], name: str) -> str:
        """x @ concat(weights).T; one MatMulNBits (or MatMul for f32/f16 weights) for all of them.
        Weights of different bit widths (a mixed scheme's 8-bit v_proj next to 4-bit q/k) cannot
        share a MatMulNBits: each run of neighbours with the same width gets one (q+k, then v), and
        the outputs are concatenated in order."""
        if all(self._is_quant(n) for n in weight_names):
            quants = [self._quant(n) for n in weight_names]
            runs: list[list] = []
            for q in quants:  # neighbours that one MatMulNBits can hold: same bits, zero points or none
                if runs and (runs[-1][0].bits, runs[-1][0].zero_points is None) == (q.bits, q.zero_points is None):
                    runs[-1].append(q)
                else:
                    runs.append([q])
            if len(runs) > 1:
                parts = [self._matmul_nbits(x, pack.concat_rows(run), f"{name}.{i}") for i, run in enumerate(runs)]
                return self.g.op("Concat", parts, f"{name}.concat", axis=-1)
            return self._matmul_nbits(x, pack.concat_rows(quants), name)
        w = np.concatenate([self._dense(n) for n in weight_names], axis=0)
        return self.g.op("MatMul", [x, self.g.init(f"{name}.weight_t", w.T)], name)

    def _matmul_nbits(self, x: str, q: pack.QuantLinear, name: str, blob: str | None = None) -> str:
        if blob is None and self._takes_kernels(q):
            return self._matmul_q(x, self._packed(f"{name}.packed", q), q.k, q.n, q.bits, name)
        blob = blob or self.g.init(f"{name}.qweight", q.blob)
        inputs = [x, blob, self.g.init(f"{name}.scales", q.scales.reshape(-1))]
        if q.zero_points is not None:
            inputs.append(self.g.init(f"{name}.zero_points", q.zero_points.reshape(-1)))
        return self.g.op("MatMulNBits", inputs, name, domain=MS, K=q.k, N=q.n, bits=q.bits,
                         block_size=pack.GROUP, accuracy_level=self.accuracy_level)

    def _takes_kernels(self, q: pack.QuantLinear) -> bool:
        """4 or 8 bits, no zero points, float32 activations, and scales that float16 holds exactly
        (the *f16 schemes': the kernels read fp16 scales; rounding others would change the weights)."""
        if not (self.use_kernels and q.zero_points is None and self.dtype == np.float32
                and kernels.supported(q.n, q.k, q.bits)):
            return False
        return bool(np.array_equal(q.scales.astype(np.float16).astype(q.scales.dtype), q.scales))

    def _packed(self, name: str, q: pack.QuantLinear, external: bool = False) -> str:
        return self.g.init(name, kernels.pack_blocks(q.blob, q.scales.astype(np.float16), q.bits), external=external)

    def _matmul_q(self, x: str, packed: str, k: int, n: int, bits: int, name: str) -> str:
        self.kernel_ops += 1
        return self.g.op(kernels.OP, [x, packed], name, domain=EDGEFORGE_DOMAIN, K=k, N=n, bits=bits)

    def to_compute(self, x: str, name: str) -> str:
        """float32 -> the graph's compute dtype (matmul/attention inputs)."""
        return self.g.op("Cast", [x], name, to=TensorProto.FLOAT16) if self.dtype == np.float16 else x

    def to_f32(self, x: str, name: str) -> str:
        return self.g.op("Cast", [x], name, to=TensorProto.FLOAT) if self.dtype == np.float16 else x

    def rms_norm_first(self, x: str, weight: str) -> str:
        """The first RMSNorm (no residual yet) from standard ops, in float32.

        SimplifiedLayerNormalization would do, but it is not an ONNX op (onnx.checker rejects it);
        later norms use SkipSimplifiedLayerNormalization (com.microsoft, which the checker skips).
        """
        g, eps = self.g, self.cfg.rms_norm_eps
        ms = g.op("ReduceMean", [g.op("Mul", [x, x], "norm0/sq"), g.const([-1])], "norm0/mean", keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, g.const(eps, np.float32)], "norm0/eps")], "norm0/sqrt")], "norm0/inv")
        w32 = g.init(weight, self._dense(weight).astype(np.float32))
        y = g.op("Mul", [g.op("Mul", [x, inv], "norm0/scale"), w32], "norm0/out")
        return self.to_compute(y, "norm0/cast")

    def skip_norm(self, x: str, residual: str, weight: str, name: str) -> tuple[str, str]:
        """(RMSNorm(x + residual) * weight in the compute dtype, x + residual in float32).

        The residual stream and the norms stay float32 in float16 graphs too, so 2 x layers sums
        never round to float16 (cheap: elementwise on [S, hidden]).
        """
        w = self.g.init(weight, self._dense(weight).astype(np.float32))
        out, total = f"{name}/out", f"{name}/sum"
        self.g.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [self.to_f32(x, f"{name}/cast_in"), residual, w],
                                             [out, "", "", total], name=name, domain=MS,
                                             epsilon=float(self.cfg.rms_norm_eps)))
        return self.to_compute(out, f"{name}/cast_out"), total

    def _tied(self) -> bool:
        return self.cfg.tie_word_embeddings or not self.w.has("lm_head.weight")

    def embedding_table(self) -> dict:
        """Store the embedding table for the engine (see the module doc); returns artifact.json's
        `embedding`: {kind: quantized, bits, block_size, blob, scales} or {kind: dense, table}, each
        tensor as {file, offset, length, dtype, shape}; rows are float32 [hidden] either way.

        Quantized: MatMulNBits' layout as is (blob uint8 [vocab, H/32, 32*bits/8], default zero
        point, float32 scales [vocab, H/32]). Tied, the head's MatMulNBits chunks (head_chunks) are
        the same bytes: each chunk a run of whole pages, written back to back, so the table is one
        contiguous range for the engine. Dense: the table in the graph's dtype (a tied head
        transposes it at load time)."""
        name = "model.embed_tokens.weight"
        g, tied = self.g, self._tied()
        if not self._is_quant(name):
            table = g.locations[g.init(name, self._dense(name), external=True)] if tied else g.raw(name, self._dense(name))
            return {"kind": "dense", "table": table}
        q = self._table_quant(name, "embedding table")
        spec = {"kind": "quantized", "bits": q.bits, "block_size": pack.GROUP}
        if tied and self._takes_kernels(q):  # one copy in the kernels' layout, rows read from it too
            packed = self._packed("model.embed_tokens.packed", q, external=True)
            self.kernel_head = (packed, q.k, q.n, q.bits)
            shape = [-(-q.n // kernels.GROUP_ROWS), q.k // pack.GROUP * kernels.kernel_block_bytes(q.bits)]
            return {**spec, "layout": kernels.layout(q.bits), "packed": {**g.locations[packed], "shape": shape}}
        if not tied:
            return {**spec, "blob": g.raw("model.embed_tokens.qweight", q.blob),
                    "scales": g.raw("model.embed_tokens.scales", q.scales)}
        self.tied_head = (self._store_chunks("model.embed_tokens", q), q.k, q.bits)
        for role, array in (("blob", q.blob), ("scales", q.scales)):
            names = [part[role] for part in self.tied_head[0]]
            first = g.locations[names[0]]
            spec[role] = {**first, "length": int(array.nbytes), "shape": [int(d) for d in array.shape]}
            if sum(g.locations[n]["length"] for n in names) != array.nbytes or any(
                    g.locations[b]["offset"] != g.locations[a]["offset"] + g.locations[a]["length"]
                    for a, b in zip(names, names[1:])):
                raise EdgeforgeError(f"{name}: the head's chunks are not contiguous in the data file (a builder bug)")
        return spec

    def _table_quant(self, name: str, what: str) -> pack.QuantLinear:
        """A vocabulary-sized quantized weight in MatMulNBits' layout with float32 scales (float32
        rows and logits); without zero points, which neither the engine's rows nor the head take."""
        entry, arrays = self._entry(name)
        q = pack.quant_linear(name, entry, arrays, np.float32)
        if q.zero_points is not None:
            raise EdgeforgeError(f"{name}: a {entry['format']} {what} is not supported (q8 or q4 only)")
        return q

    def head_chunks(self, rows: int, blob_row: int, scale_row: int) -> list[tuple[int, int]]:
        """Row ranges of the output head, each about HEAD_CHUNK_BYTES, each a whole number of pages of
        blob and of scales (so chunks stored back to back stay page-aligned and contiguous). ONNX
        Runtime holds a MatMulNBits weight twice while it prepacks it (mapped original + packed
        copy): one 270 MB head (a 1B model's q8 vocabulary) put the load-time peak 260 MB above the
        steady state; chunks bound that extra to one chunk."""
        step = math.lcm(PAGE // math.gcd(PAGE, blob_row), PAGE // math.gcd(PAGE, scale_row))
        per = max(step, -(-HEAD_CHUNK_BYTES // (blob_row + scale_row)) // step * step)
        return [(a, min(a + per, rows)) for a in range(0, rows, per)]

    def _store_chunks(self, prefix: str, q: pack.QuantLinear) -> list[dict]:
        """The head's chunk initializers, all blobs first, then all scales (each run contiguous)."""
        chunks = self.head_chunks(q.n, q.blob[0].nbytes, q.scales[0].nbytes)
        blobs = [self.g.init(f"{prefix}.qweight.{i}", q.blob[a:b], external=True) for i, (a, b) in enumerate(chunks)]
        scales = [self.g.init(f"{prefix}.scales.{i}", q.scales[a:b].reshape(-1), external=True)
                  for i, (a, b) in enumerate(chunks)]
        return [{"rows": (a, b), "blob": bl, "scales": sc} for (a, b), bl, sc in zip(chunks, blobs, scales)]

    def lm_head(self, x: str) -> str:
        """float32 logits from a float32 `x` (the head's scales or weights in float32)."""
        tied = self._tied()
        name = "model.embed_tokens.weight" if tied else "lm_head.weight"
        if self._is_quant(name):
            if not tied and self._takes_kernels(q := self._table_quant(name, "output head")):
                self.kernel_head = (self._packed("lm_head.packed", q, external=True), q.k, q.n, q.bits)
            if self.kernel_head is not None:  # no chunks: the kernels read the weight in place, no packed copy
                packed, k, n, bits = self.kernel_head
                return self._matmul_q(x, packed, k, n, bits, "lm_head")
            if tied:  # the embedding's chunk initializers (embedding_table ran first)
                parts, k, bits = self.tied_head
            else:
                parts, k, bits = self._store_chunks("lm_head", q), q.k, q.bits
            outs = [self.g.op("MatMulNBits", [x, p["blob"], p["scales"]], f"lm_head.{i}" if len(parts) > 1 else "lm_head",
                              domain=MS, K=k, N=p["rows"][1] - p["rows"][0], bits=bits, block_size=pack.GROUP,
                              accuracy_level=self.accuracy_level) for i, p in enumerate(parts)]
            return outs[0] if len(outs) == 1 else self.g.op("Concat", outs, "lm_head", axis=-1)
        if tied:  # the table transposed at load time (constant folding), not stored twice
            table = name if self.dtype == np.float32 else self.g.op("Cast", [name], "lm_head/cast", to=TensorProto.FLOAT)
            return self.g.op("MatMul", [x, self.g.op("Transpose", [table], "lm_head/transpose", perm=[1, 0])], "lm_head")
        w = pack.dense(name, *self._entry(name), np.float32)
        return self.g.op("MatMul", [x, self.g.init("lm_head.weight_t", w.T)], "lm_head")

    def rotary_caches(self) -> tuple[str, str]:
        from ...hostmem import check_memory

        # [context, head_dim/2] angles in float64 plus cos and sin: sized by the config's context
        # length, which a config may set to anything: checked before anything is allocated
        half = self.cfg.head_dim // 2
        check_memory(f"ONNX rotary tables for a context of {self.cfg.context_length} tokens (config.json "
                     "max_position_embeddings)", 4 * 8 * self.cfg.context_length * half,
                     advice="a smaller max_position_embeddings in the model's config.json")
        inv = self.cfg.rope_inv_freq().astype(np.float64)
        angles = np.outer(np.arange(self.cfg.context_length, dtype=np.float64), inv)
        cos = self.g.init("cos_cache", np.cos(angles).astype(self.dtype))
        sin = self.g.init("sin_cache", np.sin(angles).astype(self.dtype))
        return cos, sin

    def attention(self, x: str, i: int, cos: str, sin: str) -> str:
        c, p = self.cfg, f"model.layers.{i}.self_attn"
        qkv = self.linear(x, [f"{p}.{n}_proj.weight" for n in "qkv"], f"{p}.qkv_proj")
        past_k, past_v, present_k, present_v = kv_names(i)
        qkv_in, tail = [qkv, "", ""], [cos, sin]  # tail: the inputs after total_sequence_length
        quant = {}
        if self.kv_quant is not None:
            qkv_in, tail = self.rotated_qkv(qkv, p, cos, sin), ["", ""]
            shape = (1, c.num_kv_heads, 1, c.head_dim)  # after position_ids, attention_bias, head_sink (absent)
            tail += ["", "", ""] + [self.g.init(f"{p}.{kind}_scale", scale.reshape(shape).astype(np.float32))
                                    for kind, scale in zip(("k", "v"), self.kv_quant.scales[i])]
            quant = {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8}
        inputs = qkv_in + [past_k, past_v, "seqlens_k", "total_sequence_length"] + tail
        attn, _, _ = self.g.op("GroupQueryAttention", inputs,
                         f"{p}.attn", outputs=[f"{p}.attn/out", present_k, present_v], domain=MS,
                         num_heads=c.num_heads, kv_num_heads=c.num_kv_heads, do_rotary=int(self.kv_quant is None),
                         rotary_interleaved=0, scale=float(1.0 / np.sqrt(c.head_dim)), local_window_size=-1, **quant)
        if self.kv_quant is not None:  # back from the rotated basis: p @ (V R) R^T = p @ V
            attn = self.per_head(attn, c.num_heads, KV_ROTATION + "_t", f"{p}.attn/unrotate")
        return self.linear(attn, [f"{p}.o_proj.weight"], f"{p}.o_proj")

    def rotated_qkv(self, qkv: str, p: str, cos: str, sin: str) -> list[str]:
        """GroupQueryAttention's packed [query, key, value] inputs for an int8 cache: RoPE on queries and
        keys (one node: they share positions), then every head of all three times KV_ROTATION
        (q.k = qR.kR; model/kv_int8.py)."""
        c, d = self.cfg, self.cfg.head_dim
        qk_heads = c.num_heads + c.num_kv_heads
        qk, v = self.g.op("Split", [qkv, self.g.const([qk_heads * d, c.num_kv_heads * d])], f"{p}.qkv_split",
                          outputs=2, axis=-1)
        qk = self.g.op("RotaryEmbedding", [qk, self.positions, cos, sin], f"{p}.qk_rope", domain=MS,
                       interleaved=0, num_heads=qk_heads)
        packed = self.g.op("Concat", [qk, v], f"{p}.qkv_rope", axis=-1)
        return [self.per_head(packed, qk_heads + c.num_kv_heads, KV_ROTATION, f"{p}.qkv_rotate"), "", ""]

    def per_head(self, x: str, heads: int, matrix: str, name: str) -> str:
        """x [batch, sequence, heads * head_dim] with each head times `matrix` [head_dim, head_dim]."""
        d = self.cfg.head_dim
        split = self.g.op("Reshape", [x, self.g.const([0, 0, heads, d])], f"{name}/heads")
        return self.g.op("Reshape", [self.g.op("MatMul", [split, matrix], name), self.g.const([0, 0, heads * d])],
                         f"{name}/flat")

    def rope_positions(self) -> str:
        """Each row's positions [batch, sequence] (int64) as GroupQueryAttention numbers them: a call of
        S tokens on a row whose total length is seqlens_k + 1 holds positions seqlens_k + 1 - S .. seqlens_k
        (a first prompt 0 .. S-1, a decode step seqlens_k)."""
        g = self.g
        length = g.op("Gather", [g.op("Shape", ["inputs_embeds"], "positions/shape"), g.const(1)], "positions/length")
        first = g.op("Sub", [g.op("Cast", ["seqlens_k"], "positions/seqlens", to=TensorProto.INT64),
                             g.op("Sub", [length, g.const(1)], "positions/length_1")], "positions/first")
        steps = g.op("Range", [g.const(0), length, g.const(1)], "positions/range")
        return g.op("Add", [g.op("Unsqueeze", [first, g.const([1])], "positions/column"), steps], "positions")

    def mlp(self, x: str, i: int) -> str:
        p = f"model.layers.{i}.mlp"
        gate_up = self.linear(x, [f"{p}.gate_proj.weight", f"{p}.up_proj.weight"], f"{p}.gate_up_proj")
        gate, up = self.g.op("Split", [gate_up], f"{p}.split", outputs=2, axis=-1, num_outputs=2)
        silu = self.g.op("Mul", [gate, self.g.op("Sigmoid", [gate], f"{p}.sigmoid")], f"{p}.silu")
        return self.linear(self.g.op("Mul", [silu, up], f"{p}.swiglu"), [f"{p}.down_proj.weight"], f"{p}.down_proj")

    # ---- the model ----------------------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        c, g = self.cfg, self.g
        cos, sin = self.rotary_caches()
        if self.kv_quant is not None:  # shared by every layer's rotated_qkv
            self.positions = self.rope_positions()
            g.init(KV_ROTATION, self.kv_quant.rotation.astype(np.float32))
            g.init(KV_ROTATION + "_t", np.ascontiguousarray(self.kv_quant.rotation.T, np.float32))
        self.embedding = self.embedding_table()
        residual = "inputs_embeds"
        x = self.rms_norm_first(residual, "model.layers.0.input_layernorm.weight")
        for i in range(c.num_layers):
            p = f"model.layers.{i}"
            x, residual = self.skip_norm(self.attention(x, i, cos, sin), residual,
                                         f"{p}.post_attention_layernorm.weight", f"{p}.post_attention_norm")
            next_norm = f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < c.num_layers else "model.norm.weight"
            x, residual = self.skip_norm(self.mlp(x, i), residual, next_norm, f"{p}.mlp_residual_norm")
        residual_norm = f"{p}.mlp_residual_norm/out"  # the final norm's output before its cast
        # Only the last position's logits are needed (prefill returns them): skip the head for the rest.
        # The final norm's float32 output feeds a float32 head: one position, so it costs little.
        last = g.op("Slice", [residual_norm, g.const([-1]), g.const([np.iinfo(np.int64).max]), g.const([1])], "last_position")
        logits = self.lm_head(last)
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))
        return self._model()

    def _model(self) -> onnx.ModelProto:
        c = self.cfg
        t = TensorProto.INT8 if self.kv_quant is not None else ONNX_DTYPE[self.dtype]
        kv_shape = lambda dim: [BATCH, c.num_kv_heads, dim, c.head_dim]  # noqa: E731
        inputs = [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, [BATCH, "sequence_length", c.hidden_size]),
                  helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [BATCH]),
                  helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [BATCH, 1, c.vocab_size])]
        for i in range(c.num_layers):
            pk, pv, ck, cv = kv_names(i)
            inputs += [helper.make_tensor_value_info(n, t, kv_shape("past_sequence_length")) for n in (pk, pv)]
            outputs += [helper.make_tensor_value_info(n, t, kv_shape("present_sequence_length")) for n in (ck, cv)]
        graph = helper.make_graph(self.g.nodes, "edgeforge_llama", inputs, outputs, self.g.inits)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, MS_OPSET)]
        if self.kernel_ops:
            opsets.append(helper.make_opsetid(EDGEFORGE_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="edgeforge")
        return model


def build_model(weights: QdirWeights, accuracy_level: int, compute_dtype, data, kv_quant=None,
                use_kernels: bool = False) -> tuple[onnx.ModelProto, dict, int]:
    """(the graph, where its embedding table is, how many linears are edgeforge.MatMulQ); `data` =
    (binary file, its name): large initializers and the embedding table are streamed into it.
    `kv_quant`: an int8 KV cache (model/kv_int8.KvQuant). `use_kernels`: edgeforge's kernels."""
    builder = LlamaOnnxBuilder(weights, accuracy_level, compute_dtype, data, kv_quant, use_kernels)
    return builder.build(), builder.embedding, builder.kernel_ops
