"""The numpy float32 reference of the Llama forward pass, written to be read.

It is the yardstick for everything else: golden tokens in bundles, quantization error, and the
TVM/ONNX engines are all compared against it. It follows transformers' LlamaForCausalLM exactly
(RMSNorm in float32, RoPE with rotate_half on HF-ordered Q/K, GQA, SwiGLU), and implements the
Engine interface (reset/prefill/decode) with a KV cache.
"""

from __future__ import annotations

import os

import numpy as np

from .config import LlamaConfig


class KVCache:
    """Per layer K and V as [kv_heads, positions, head_dim], grown by doubling."""

    def __init__(self, config: LlamaConfig):
        self.layers = [[None, None] for _ in range(config.num_layers)]
        self.length = 0

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store k, v ([kv_heads, T, head_dim]) at positions length..length+T; return all so far."""
        start, t = self.length, k.shape[1]
        entry = self.layers[layer]
        if entry[0] is None or entry[0].shape[1] < start + t:
            cap = max(64, 2 * (start + t))
            for i, new in enumerate((k, v)):
                grown = np.zeros((new.shape[0], cap, new.shape[2]), dtype=np.float32)
                if entry[i] is not None:
                    grown[:, :start] = entry[i][:, :start]
                entry[i] = grown
        entry[0][:, start : start + t] = k
        entry[1][:, start : start + t] = v
        return entry[0][:, : start + t], entry[1][:, : start + t]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(variance + np.float32(eps))) * weight


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x: [heads, T, head_dim]; cos/sin: [T, head_dim]."""
    return x * cos + rotate_half(x) * sin


PREFILL_CHUNK = 256  # prompt tokens per reference step (ReferenceModel.prefill)
INT8_BLOCK = 32  # MatMulNBits' block_size: the weights' group size, which it also quantizes inputs by


def int8_blocks(x: np.ndarray, block: int = INT8_BLOCK) -> np.ndarray:
    """x rounded as ONNX Runtime's CPU MatMulNBits with accuracy_level 4 rounds its input before its
    int8 kernels: each run of `block` values along the last axis to the nearest multiple of
    max|run| / 127. Measured against onnxruntime 1.32 on x86 (4- and 8-bit weights, outliers of 13x
    the typical value): max abs difference 8e-6 where the unrounded product differs by 0.46."""
    shape = x.shape
    runs = x.reshape(*shape[:-1], shape[-1] // block, block)
    scale = np.abs(runs).max(axis=-1, keepdims=True) / np.float32(127)
    safe = np.where(scale == 0, np.float32(1), scale)
    return (np.rint(runs / safe) * scale).astype(np.float32).reshape(shape)


def int8_rows(x: np.ndarray) -> np.ndarray:
    """x rounded as ONNX Runtime 1.32's KleidiAI kernels on aarch64 CPUs with the dot-product
    extension round the input of a symmetric 4-bit MatMulNBits at accuracy_level 4
    (kai_lhs_quant_pack_qai8dxp_f32: one asymmetric int8 scale and zero point per row, over the
    whole row, the range widened to include 0): scale = 255 / (max - min), zero point from the end
    with the smaller error, q = clip(rint(x * scale) + zp, -128, 127), read back as (q - zp) / scale.
    Measured against onnxruntime 1.32 under qemu (cortex-a76), with bf16_truncate on the weight
    scales: 3.6e-8 of the output (docs/notes/bundle.md, Session 10)."""
    f = np.float32
    lo = np.minimum(f(0), x.min(axis=-1, keepdims=True)).astype(f)
    hi = np.maximum(f(0), x.max(axis=-1, keepdims=True)).astype(f)
    scale = np.where(hi == lo, f(1), f(255) / np.where(hi == lo, f(1), hi - lo)).astype(f)
    recip = (f(1) / scale).astype(f)
    dlo, dhi = (lo * scale).astype(f), (hi * scale).astype(f)
    zp = np.where((f(-128) + dlo) + (f(127) + dhi) > 0, f(-128) - dlo, f(127) - dhi)
    zp = np.rint(np.clip(zp, -128, 127)).astype(f)
    q = np.clip(np.rint((x * scale).astype(f)) + zp, -128, 127)
    return ((q - zp) * recip).astype(f)


def bf16_truncate(x: np.ndarray) -> np.ndarray:
    """float32 values cut to bfloat16 by dropping the low 16 bits (toward zero): how ONNX Runtime
    1.32's KleidiAI path stores a 4-bit MatMulNBits' scales (qnbitgemm_kleidiai.cpp, `bits >> 16`)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
    return bits.view(np.float32)


def int8_kv(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """x ([kv_heads, T, head_dim]) as an int8 KV cache holds it: the nearest multiple of its channel's
    static scale ([kv_heads, head_dim]), at most 127 and at least -128 steps (ONNX Runtime 1.32's CPU
    GroupQueryAttention with k/v_quant_type PER_CHANNEL: x / scale rounded half to even, saturated;
    its attention then reads these values, the new rows included; docs/notes/kv-cache.md)."""
    s = scale[:, None, :].astype(np.float32)
    return (np.clip(np.rint(x / s), -128, 127) * s).astype(np.float32)


def silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for x < -88: x / inf is the right -0
        return x / (np.float32(1) + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def cache_budget_bytes() -> int:
    """How much of the dequantized float32 weights the reference keeps (EDGEFORGE_REFERENCE_CACHE_MB,
    default 1024): a 135M model stays whole (as fast as ever), an 8B one streams."""
    return int(float(os.environ.get("EDGEFORGE_REFERENCE_CACHE_MB", "1024")) * (1 << 20))


class Weights:
    """name -> float32 weight, from the model's own storage (a memory-mapped QDIR, safetensors or
    GGUF) when it is used. The first weights that fit the budget are kept (decoding walks the layers
    in the same order every step, so "first come, kept" beats LRU, which would evict each weight just
    before it is needed again); the others are dequantized for one use and dropped. Memory is then
    the stored weights (mapped, paged in and out by the OS) plus the budget plus one matrix."""

    def __init__(self, tensors, shapes: dict, budget: int, block_bytes: int | None = None, observe=None,
                 int8_inputs=frozenset()):
        self.tensors, self.shapes, self.kept, self.budget, self.used = tensors, shapes, {}, budget, 0
        self.observe = observe  # observe(name, x) before each x @ W.T (calibration statistics)
        # weights whose input is rounded first: a set of names (int8_blocks) or {name: rounding function}
        self.int8_inputs = dict(int8_inputs) if isinstance(int8_inputs, dict) else dict.fromkeys(int8_inputs, int8_blocks)
        # x @ W.T over a weight larger than this goes in row blocks, so the working set stays one
        # block (the tied 128k-vocab head is 2 GB in float32); each output is the same dot product.
        self.block_bytes = block_bytes or int(float(os.environ.get("EDGEFORGE_REFERENCE_BLOCK_MB", "64")) * (1 << 20))

    def __getitem__(self, name: str) -> np.ndarray:
        w = self.kept.get(name)
        if w is None:
            w = np.ascontiguousarray(self.tensors.get(name), dtype=np.float32)
            if self.used + w.nbytes <= self.budget:
                self.kept[name] = w
                self.used += w.nbytes
            else:
                self._release(name)
        return w

    def _release(self, name: str) -> None:
        """Done with a streamed weight: let a memory-mapped source drop its pages (they would
        otherwise stay resident, growing to the whole checkpoint)."""
        release = getattr(self.tensors, "release", None)
        if release is not None:
            release(name)

    def rows(self, name: str, index) -> np.ndarray:
        w = self.kept.get(name)
        if w is not None:
            return w[index]
        read = getattr(self.tensors, "rows", None)  # sources without partial reads give the whole tensor
        rows = read(name, index) if read is not None else self.tensors.get(name)[index]
        return np.asarray(rows, dtype=np.float32)

    def matmul_t(self, x: np.ndarray, name: str) -> np.ndarray:
        """x @ W.T, W [out, in], in row blocks when W is large and not kept."""
        if self.observe is not None:
            self.observe(name, x)
        rounding = self.int8_inputs.get(name)
        if rounding is not None:
            x = rounding(x)
        out_f, in_f = self.shapes[name]
        size = out_f * in_f * 4
        if name in self.kept or size <= self.block_bytes or self.used + size <= self.budget:
            return x @ self[name].T
        step = max(1, self.block_bytes // (in_f * 4))
        y = np.empty((x.shape[0], out_f), dtype=np.float32)
        for start in range(0, out_f, step):
            block = self.rows(name, slice(start, start + step))
            y[:, start : start + step] = x @ block.T
        self._release(name)
        return y


class ReferenceModel:
    """Engine over a LoadedModel (or a config + a TensorSource): float32 numpy on the CPU.

    Weights come from the model's storage as they are used (class Weights): the float32 model is
    never held whole unless it fits the cache budget, so the reference of an 8B model runs in the
    memory of its quantized weights plus a working set."""

    device = "cpu (numpy reference)"

    def __init__(self, model=None, *, config: LlamaConfig | None = None, tensors=None, cache_bytes: int | None = None,
                 observe=None, int8_inputs=frozenset(), chunk: int | None = PREFILL_CHUNK, kv_hook=None):
        """`int8_inputs`: weight names whose matmul input is rounded like ONNX Runtime's int8 kernels
        round it (int8_blocks), or {name: rounding function} (int8_rows on aarch64): the golden data
        of a bundle that computes that way (bundle/golden.py).
        `chunk`: prompts are processed this many tokens at a time (None: all at once, for GPTQ,
        whose observe() must see a matrix's whole input in one call).
        `kv_hook(layer, k, v) -> (k, v)`: sees each step's new keys (after RoPE) and values
        ([kv_heads, T, head_dim]) before they enter the cache, and returns what is stored: the
        int8 KV cache's calibration records them, its golden data rounds them (KvInt8Hook)."""
        self.chunk = chunk
        self.kv_hook = kv_hook
        self.config = config if config is not None else model.config
        tensors = tensors if tensors is not None else model.tensors
        self.w = Weights(tensors, self.config.tensor_shapes(),
                         cache_budget_bytes() if cache_bytes is None else cache_bytes, observe=observe,
                         int8_inputs=int8_inputs)
        self.head = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        self.inv_freq = self.config.rope_inv_freq()
        self.reset()

    # ---- Engine interface --------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        """The most tokens a sequence may hold (generate() refuses longer prompts)."""
        return self.config.context_length

    def reset(self) -> None:
        self.cache = KVCache(self.config)

    def prefill(self, ids) -> np.ndarray:
        """Append `ids` to the sequence; float32 logits [vocab] of the last one. In chunks: memory and
        time per step stay bounded by the chunk (attention scores [heads, chunk, length], activations,
        and the output head only for the last position), not by the prompt."""
        ids = list(ids)
        observed = self.w.observe is not None  # calibration sees the head's input for every position
        for part in self._chunks(ids):
            logits = self._step(part, self.cache, last_only=not observed)
        return logits[-1]

    def decode(self, token: int) -> np.ndarray:
        return self._step([int(token)], self.cache)[-1]

    def forward(self, ids) -> np.ndarray:
        """Logits [len(ids), vocab] of a fresh sequence; the engine's own cache is left alone."""
        cache = KVCache(self.config)
        parts = [self._step(part, cache) for part in self._chunks(list(ids))]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _chunks(self, ids: list[int]) -> list[list[int]]:
        if not ids:
            raise ValueError("no tokens to process")
        step = self.chunk or len(ids)
        return [ids[start : start + step] for start in range(0, len(ids), step)]

    # ---- the model ---------------------------------------------------------------------------------
    def _step(self, ids: list[int], cache: KVCache, last_only: bool = False) -> np.ndarray:
        return self._steps(ids, [cache], last_only)

    def _steps(self, ids: list[int], caches: list, last_only: bool = False) -> np.ndarray:
        """`ids` appended to each of len(caches) sequences that hold the same tokens (they differ only
        by how their matmul inputs were rounded: Runs). Their rows go through each matmul together, so
        the weights are read once for all. Logits [n x len(ids) (1 if last_only), vocab], sequence-major."""
        c, n = self.config, len(caches)
        if not ids:
            raise ValueError("no tokens to process")
        if min(ids) < 0 or max(ids) >= c.vocab_size:
            raise ValueError(f"token id out of range [0, {c.vocab_size})")
        positions = np.arange(caches[0].length, caches[0].length + len(ids))
        cos, sin = self._rope_tables(positions)
        x = self.w.rows("model.embed_tokens.weight", np.asarray(ids))
        if n > 1:
            x = np.tile(x, (n, 1))
        for layer in range(c.num_layers):
            x = x + self._attention(layer, x, cos, sin, caches, positions)
            x = x + self._mlp(layer, x)
        for cache in caches:
            cache.length += len(ids)
        if last_only:
            x = x.reshape(n, len(ids), -1)[:, -1]
        x = rms_norm(x, self.w["model.norm.weight"], c.rms_norm_eps)
        return self.w.matmul_t(x, self.head)

    def runs(self, n: int) -> "Runs":
        return Runs(self, n)

    def _rope_tables(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # float32 products like transformers (inv_freq @ positions in float32), then cat(freqs, freqs)
        freqs = positions.astype(np.float32)[:, None] * self.inv_freq[None, :]
        emb = np.concatenate([freqs, freqs], axis=-1)
        return np.cos(emb), np.sin(emb)

    def _attention(self, layer, x, cos, sin, caches: list, positions) -> np.ndarray:
        """Self-attention of the rows of len(caches) sequences (x: [n x T, hidden]); projections for
        all rows at once, scores per sequence against its own cache."""
        c, p = self.config, f"model.layers.{layer}."
        t, hd = len(positions), c.head_dim
        h = rms_norm(x, self.w[p + "input_layernorm.weight"], c.rms_norm_eps)
        q = self.w.matmul_t(h, p + "self_attn.q_proj.weight").reshape(-1, t, c.num_heads, hd).transpose(0, 2, 1, 3)
        k = self.w.matmul_t(h, p + "self_attn.k_proj.weight").reshape(-1, t, c.num_kv_heads, hd).transpose(0, 2, 1, 3)
        v = self.w.matmul_t(h, p + "self_attn.v_proj.weight").reshape(-1, t, c.num_kv_heads, hd).transpose(0, 2, 1, 3)
        out = [self._attend(layer, q[i], k[i], v[i], cos, sin, cache, positions) for i, cache in enumerate(caches)]
        return self.w.matmul_t(out[0] if len(out) == 1 else np.concatenate(out), p + "self_attn.o_proj.weight")

    def _attend(self, layer, q, k, v, cos, sin, cache: KVCache, positions) -> np.ndarray:
        """q [heads, T, hd], k and v [kv_heads, T, hd] of one sequence -> its attention output [T, heads x hd]."""
        c, t, hd = self.config, len(positions), self.config.head_dim
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_hook is not None:
            k, v = self.kv_hook(layer, k, v)
        keys, values = cache.append(layer, k, v)  # [kv_heads, S, hd]
        # GQA: query heads g*group .. g*group+group-1 share KV head g.
        qg = q.reshape(c.num_kv_heads, c.kv_group * t, hd)
        scores = (qg @ keys.transpose(0, 2, 1)) / np.float32(np.sqrt(hd))  # [kv, group*T, S]
        scores = scores.reshape(c.num_kv_heads, c.kv_group, t, -1)
        causal = np.arange(keys.shape[1])[None, :] > positions[:, None]  # key after query: masked
        scores = np.where(causal, np.float32(-np.inf), scores)
        out = softmax(scores).reshape(c.num_kv_heads, c.kv_group * t, -1) @ values  # [kv, group*T, hd]
        return out.reshape(c.num_heads, t, hd).transpose(1, 0, 2).reshape(t, c.num_heads * hd)

    def _mlp(self, layer, x) -> np.ndarray:
        c, p = self.config, f"model.layers.{layer}."
        h = rms_norm(x, self.w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
        gate = self.w.matmul_t(h, p + "mlp.gate_proj.weight")
        up = self.w.matmul_t(h, p + "mlp.up_proj.weight")
        return self.w.matmul_t(silu(gate) * up, p + "mlp.down_proj.weight")


class Runs:
    """n sequences of the same tokens on one ReferenceModel, in step: each matmul takes all n rows at
    once (the weights are read once, which is what a large model's reference spends its time on).
    They differ only where a rounding function draws noise (golden.json's spreads: bundle/golden.py).
    prefill and decode return logits [n, vocab]."""

    def __init__(self, model: ReferenceModel, n: int):
        self.model, self.n = model, n
        self.reset()

    def reset(self) -> None:
        self.caches = [KVCache(self.model.config) for _ in range(self.n)]

    def prefill(self, ids) -> np.ndarray:
        for part in self.model._chunks(list(ids)):
            logits = self.model._steps(part, self.caches, last_only=True)
        return logits

    def decode(self, token: int) -> np.ndarray:
        return self.model._steps([int(token)], self.caches)
