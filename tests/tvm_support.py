"""Helpers for the TVM backend tests: a plain numpy Llama forward over dequantized weights.

Used only until/unless edgeforge.model.reference is importable; it is written from the Llama
equations (HF modeling_llama semantics), not from the TVM backend's code.
"""

from __future__ import annotations

import numpy as np


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, pos, inv_freq):
    # x [s, heads, d]; HF rotate_half convention
    ang = pos[:, None].astype(np.float64) * inv_freq[None, :].astype(np.float64)
    cos = np.cos(np.concatenate([ang, ang], -1))[:, None, :]
    sin = np.sin(np.concatenate([ang, ang], -1))[:, None, :]
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return (x * cos + rot * sin).astype(np.float32)


def numpy_logits(cfg, get, ids):
    """float32 logits [len(ids), vocab] of a causal forward over the whole sequence.

    cfg: edgeforge LlamaConfig; get(name) -> float32 weight (dequantized)."""
    h, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    inv_freq = cfg.rope_inv_freq()
    ids = np.asarray(ids)
    s = len(ids)
    pos = np.arange(s)
    x = get("model.embed_tokens.weight")[ids].astype(np.float32)
    mask = np.triu(np.full((s, s), -np.inf, dtype=np.float32), 1)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        a = _rms(x, get(f"{p}.input_layernorm.weight"), cfg.rms_norm_eps)
        q = _rope((a @ get(f"{p}.self_attn.q_proj.weight").T).reshape(s, h, d), pos, inv_freq)
        k = _rope((a @ get(f"{p}.self_attn.k_proj.weight").T).reshape(s, kvh, d), pos, inv_freq)
        v = (a @ get(f"{p}.self_attn.v_proj.weight").T).reshape(s, kvh, d)
        rep = h // kvh
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", att, v).reshape(s, h * d)
        x = x + o @ get(f"{p}.self_attn.o_proj.weight").T
        m = _rms(x, get(f"{p}.post_attention_layernorm.weight"), cfg.rms_norm_eps)
        g = m @ get(f"{p}.mlp.gate_proj.weight").T
        u = m @ get(f"{p}.mlp.up_proj.weight").T
        x = x + (g / (1 + np.exp(-g)) * u) @ get(f"{p}.mlp.down_proj.weight").T
    x = _rms(x, get("model.norm.weight"), cfg.rms_norm_eps)
    head = get("model.embed_tokens.weight") if cfg.tie_word_embeddings else get("lm_head.weight")
    return (x @ head.T).astype(np.float32)
