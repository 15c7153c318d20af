"""Write a tiny HF Llama folder as a GGUF file the way llama.cpp's convert_hf_to_gguf.py does:
HF names -> GGUF names, Q/K rows permuted, llama3 rope as `rope_freqs.weight`, the tokenizer as
tokenizer.ggml.* metadata. Built from the source files with torch/safetensors/sentencepiece/
tokenizers, independently of edgeforge's loaders, so the loader is checked against them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np

LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")  # model.layers.N.<module...>.weight
    return f"blk.{parts[2]}.{LAYER['.'.join(parts[3:-1])]}.weight"


def llama3_rope_factors(cfg: dict, head_dim: int) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs for rope_type llama3."""
    rp = cfg["rope_parameters"]
    base = rp["rope_theta"]
    factor, low, high = rp["factor"], rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old = rp.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(folder: Path, out: Path, qtype=gguf.GGMLQuantizationType.F32, raw: dict | None = None) -> Path:
    """Convert the HF folder to a GGUF at `out`; 2-D weights stored as `qtype` (F32 where the row
    length is not a multiple of the type's block), norms as F32. `raw` {hf name: (uint8 bytes
    [rows, row bytes], qtype)} stores given bytes instead (for types gguf cannot quantize)."""
    from safetensors.numpy import load_file

    folder, out = Path(folder), Path(out)
    cfg = json.loads((folder / "config.json").read_text())
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(folder.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rp = cfg["rope_parameters"]
    w.add_rope_freq_base(rp["rope_theta"])
    if head_dim != cfg["hidden_size"] // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    if rp.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rp["factor"])
    elif rp.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg, head_dim))
    _add_tokenizer(w, folder, cfg)
    for name, arr in sorted(load_file(str(folder / "model.safetensors")).items()):
        arr = arr.astype(np.float32)
        if name.endswith("q_proj.weight"):
            arr = llama_cpp_permute(arr, heads)
        elif name.endswith("k_proj.weight"):
            arr = llama_cpp_permute(arr, kv)
        if raw and name in raw:
            w.add_tensor(gguf_name(name), raw[name][0], raw_dtype=raw[name][1])
        elif arr.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32 \
                and arr.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _add_tokenizer(w, folder: Path, cfg: dict) -> None:
    T = gguf.TokenType
    if (folder / "tokenizer.model").exists():  # sentencepiece, like llama.cpp's _create_vocab_sentencepiece
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        tokens, scores, types = [], [], []
        for i in range(sp.vocab_size()):
            tokens.append(sp.id_to_piece(i))
            scores.append(sp.get_score(i))
            types.append(T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i)
                         else T.BYTE if sp.is_byte(i) else T.UNUSED if sp.is_unused(i) else T.NORMAL)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(sp.unk_id())
        w.add_add_bos_token(True)
    else:  # byte-level BPE from tokenizer.json, like llama.cpp's _set_vocab_gpt2
        spec = json.loads((folder / "tokenizer.json").read_text())
        vocab = spec["model"]["vocab"]
        specials = {t["content"] for t in spec["added_tokens"] if t.get("special")}
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([T.CONTROL if t in specials else T.NORMAL for t in tokens])
        w.add_token_merges(merges)
        tcfg = json.loads((folder / "tokenizer_config.json").read_text())
        w.add_add_bos_token(bool(tcfg.get("add_bos_token")))
        w.add_chat_template(tcfg["chat_template"])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
