"""The Llama model in tvm.relax.frontend.nn, with parameters in QDIR storage layout.

Entry points (what runtime/tvm_engine.py calls):
  create_paged_kv_cache(max_batch, max_total_seq_len, prefill_chunk, page_size, sliding_window)
  prefill(input_ids int32 [1, s], kv_cache, params) -> (logits float32 [1, 1, vocab], kv_cache)
  decode(input_ids int32 [1, 1], kv_cache, params)  -> (logits float32 [1, 1, vocab], kv_cache)

RoPE is applied here from the config's (scaled) inverse frequencies, the same float32 array the
numpy reference uses; the KV cache runs with RopeMode.NONE so that its own rope formulas (which
differ in details per scaling type) never touch the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tvm import relax as rx
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from ...model.config import LlamaConfig
from .quantized_linear import QEmbedding, QLinear


@dataclass
class ModelSpec:
    """Everything the graph depends on: the normalized config, per-tensor storage formats, dtype."""

    config: LlamaConfig
    model_dtype: str  # float16 | float32
    # HF tensor name -> (storage format, scale dtype or None)
    formats: dict[str, tuple[str, str | None]] = field(default_factory=dict)

    def fmt(self, name: str) -> tuple[str, str | None]:
        return self.formats[name]

    @property
    def inv_freq(self) -> np.ndarray:
        """float32 [head_dim / 2]: the same (scaled) RoPE frequencies the numpy reference uses."""
        return np.asarray(self.config.rope_inv_freq(), dtype=np.float32)


def _linear(spec: ModelSpec, name: str, out_f: int, in_f: int, out_dtype: str | None = None) -> QLinear:
    fmt, scale_dtype = spec.fmt(name)
    return QLinear(fmt, out_f, in_f, scale_dtype, out_dtype or spec.model_dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm computed in float32 whatever the activation dtype (fp16 sums of squares overflow)."""

    def compute(xt, wt):
        b, s, h = xt.shape
        k = te.reduce_axis((0, h), name="k")
        ss = te.compute((b, s), lambda i, j: te.sum(xt[i, j, k].astype("float32") * xt[i, j, k].astype("float32"), axis=k), name="ss")
        return te.compute(
            (b, s, h),
            lambda i, j, c: (xt[i, j, c].astype("float32") * tirx.rsqrt(ss[i, j] / float(int(h)) + eps) * wt[c].astype("float32")).astype(xt.dtype),
            name="rms_norm",
        )

    return op.tensor_expr_op(compute, "rms_norm", [x, weight])


def apply_rope(qkv: Tensor, positions: Tensor, inv_freq: Tensor, rotated_heads: int) -> Tensor:
    """HF-style rotate_half RoPE on the first `rotated_heads` heads of qkv [b, s, heads, d], in float32."""

    def compute(x, pos, freq):
        b, s, heads, d = x.shape
        half = d // 2

        def value(i, j, h, c):
            angle = pos[i * s + j].astype("float32") * freq[c % half]
            cos, sin = tirx.cos(angle), tirx.sin(angle)
            xc = x[i, j, h, c].astype("float32")
            partner = tirx.if_then_else(c < half, -x[i, j, h, c + half], x[i, j, h, c - half]).astype("float32")
            return tirx.if_then_else(h < rotated_heads, xc * cos + partner * sin, xc).astype(x.dtype)

        return te.compute((b, s, heads, d), value, name="rope")

    return op.tensor_expr_op(compute, "rope", [qkv, positions, inv_freq])


# Parameters the module takes as one matrix made of several QDIR tensors (stacked by rows at load
# time, params.json lists the sources): one matmul kernel instead of three. GPU decode is
# launch-bound, and on CPUs one pass over the activations serves all three.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}


def fused_sources(param: str) -> list[str] | None:
    """'model.layers.0.self_attn.qkv_proj.qweight' -> the three HF tensor names it stacks."""
    base = param.rsplit(".", 1)[0]
    prefix, _, leaf = base.rpartition(".")
    if leaf not in FUSED:
        return None
    return [f"{prefix}.{part}.weight" for part in FUSED[leaf]]


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, prefix: str):
        d, h, kv = spec.config.head_dim, spec.config.num_heads, spec.config.num_kv_heads
        hidden = spec.config.hidden_size
        self.spec = spec
        names = [f"{prefix}.{x}_proj.weight" for x in "qkv"]
        # mixed formats cannot share a kernel
        self.fused = "qkv_proj" in FUSED and len({spec.fmt(n) for n in names}) == 1
        if self.fused:
            self.qkv_proj = _linear(spec, names[0], (h + 2 * kv) * d, hidden)
        else:
            self.q_proj = _linear(spec, names[0], h * d, hidden)
            self.k_proj = _linear(spec, names[1], kv * d, hidden)
            self.v_proj = _linear(spec, names[2], kv * d, hidden)
        self.o_proj = _linear(spec, f"{prefix}.o_proj.weight", hidden, h * d)

    def forward(self, x: Tensor, cache: PagedKVCache, layer_id: int, positions: Tensor, inv_freq: Tensor):
        sp = self.spec
        d, h, kv = sp.config.head_dim, sp.config.num_heads, sp.config.num_kv_heads
        b, s, _ = x.shape
        if self.fused:
            qkv = op.reshape(self.qkv_proj(x), (b, s, h + 2 * kv, d))
        else:
            q = op.reshape(self.q_proj(x), (b, s, h, d))
            k = op.reshape(self.k_proj(x), (b, s, kv, d))
            v = op.reshape(self.v_proj(x), (b, s, kv, d))
            qkv = op.concat([q, k, v], dim=2)
        qkv = apply_rope(qkv, positions, inv_freq, h + kv)
        out = cache.attention_with_fused_qkv(layer_id, qkv, h, sm_scale=d**-0.5)
        return self.o_proj(op.reshape(out, (b, s, h * d)))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, prefix: str):
        i, hid = spec.config.intermediate_size, spec.config.hidden_size
        self.gate_proj = _linear(spec, f"{prefix}.gate_proj.weight", i, hid)
        self.up_proj = _linear(spec, f"{prefix}.up_proj.weight", i, hid)
        self.down_proj = _linear(spec, f"{prefix}.down_proj.weight", hid, i)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(op.silu(self.gate_proj(x)) * self.up_proj(x))


class Norm(nn.Module):
    def __init__(self, spec: ModelSpec, name: str):
        fmt, _ = spec.fmt(name)
        self.weight = nn.Parameter((spec.config.hidden_size,), "float32" if fmt == "f32" else "float16")
        self.eps = spec.config.rms_norm_eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, i: int):
        p = f"model.layers.{i}"
        self.input_layernorm = Norm(spec, f"{p}.input_layernorm.weight")
        self.self_attn = Attention(spec, f"{p}.self_attn")
        self.post_attention_layernorm = Norm(spec, f"{p}.post_attention_layernorm.weight")
        self.mlp = MLP(spec, f"{p}.mlp")

    def forward(self, x, cache, layer_id, positions, inv_freq):
        x = x + self.self_attn(self.input_layernorm(x), cache, layer_id, positions, inv_freq)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, spec: ModelSpec):
        fmt, scale_dtype = spec.fmt("model.embed_tokens.weight")
        self.embed_tokens = QEmbedding(fmt, spec.config.vocab_size, spec.config.hidden_size, scale_dtype, spec.model_dtype)
        self.layers = nn.ModuleList([DecoderLayer(spec, i) for i in range(spec.config.num_layers)])
        self.norm = Norm(spec, "model.norm.weight")


class LlamaForCausalLM(nn.Module):
    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.model = Body(spec)
        if not spec.config.tie_word_embeddings:
            self.lm_head = _linear(spec, "lm_head.weight", spec.config.vocab_size, spec.config.hidden_size, "float32")

    def _forward(self, input_ids: Tensor, cache: PagedKVCache, last_only: bool) -> Tensor:
        b, s = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        positions = cache.get_query_positions(b * s)
        # A graph constant, not a weight: it is a function of the config only.
        inv_freq = op.wrap_nested(rx.const(self.spec.inv_freq.astype("float32")), "inv_freq")
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cache, i, positions, inv_freq)
        if last_only:  # only the last position's logits are needed: skip the vocab matmul for the rest
            x = op.tensor_expr_op(lambda t: te.compute((t.shape[0], 1, t.shape[2]), lambda i, _, c: t[i, t.shape[1] - 1, c], name="last"), "last_token", [x])
        x = self.model.norm(x)
        if self.spec.config.tie_word_embeddings:
            return self.model.embed_tokens.head(x)
        return self.lm_head(x)

    def prefill(self, input_ids: Tensor, cache: PagedKVCache):
        return self._forward(input_ids, cache, last_only=True), cache

    def decode(self, input_ids: Tensor, cache: PagedKVCache):
        return self._forward(input_ids, cache, last_only=False), cache

    def create_paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size, support_sliding_window):
        sp = self.spec
        return TIRPagedKVCache(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr([0, sp.config.num_layers]),
            num_hidden_layers=sp.config.num_layers,
            num_attention_heads=sp.config.num_heads,
            num_key_value_heads=sp.config.num_kv_heads,
            qk_head_dim=sp.config.head_dim,
            v_head_dim=sp.config.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NONE,
            rope_scale=1,
            rope_theta=10000,
            rope_scaling={},
            rope_ext_factors=rx.prim_value(0),  # a tensor here would switch the cache to longrope
            rotary_dim=sp.config.head_dim,
            enable_disaggregation=False,
            dtype=sp.model_dtype,
            target=_current_target(),
        )

    def get_default_spec(self):
        return nn.spec.ModuleSpec.from_raw(
            {
                "prefill": {
                    "input_ids": nn.spec.Tensor([1, "seq_len"], "int32"),
                    "cache": nn.spec.Object(object_type=PagedKVCache),
                    "$": {"param_mode": "packed", "effect_mode": "none"},
                },
                "decode": {
                    "input_ids": nn.spec.Tensor([1, 1], "int32"),
                    "cache": nn.spec.Object(object_type=PagedKVCache),
                    "$": {"param_mode": "packed", "effect_mode": "none"},
                },
                "create_paged_kv_cache": {
                    "max_batch_size": int,
                    "max_total_seq_len": int,
                    "prefill_chunk_size": int,
                    "page_size": int,
                    "support_sliding_window": int,
                    "$": {"param_mode": "none", "effect_mode": "none"},
                },
            },
            self,
        )


def _current_target():
    from tvm.target import Target

    target = Target.current(allow_none=True)
    if target is None:
        raise RuntimeError("build the KV cache inside `with target:`")
    return target
