"""LlamaConfig: the one normalized model config, from an HF config.json or from GGUF metadata.

Everything downstream (reference, quantizer, TVM and ONNX backends, bundles) reads this and never
the source formats, so the odd corners of each source (transformers 4 vs 5 rope fields, GGUF key
names, llama3 rope stored as per-frequency factors) are handled here once.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, asdict, dataclass, field, fields

import numpy as np

from ..errors import EdgeforgeError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    # None, {"type": "linear", "factor"}, {"type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}, or (GGUF only, when its
    # rope_freqs factors match no llama3 parameters) {"type": "factors", "factors": [head_dim/2]}.
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    context_length: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    # ---- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "LlamaConfig":
        """Inverse of to_dict(); extra keys (e.g. a QDIR's "format"/"version") are ignored."""
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(n for n in required if n not in d)
        if missing:
            raise EdgeforgeError(f"{source}: config is missing {', '.join(missing)}")
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        cfg.eos_token_ids = [int(e) for e in cfg.eos_token_ids or []]
        cfg.validate(source)
        return cfg

    # ---- derived values -------------------------------------------------------------------------
    @property
    def kv_group(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def architecture(self) -> str:
        return "LlamaForCausalLM"

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse frequencies float32 [head_dim/2], scaling applied; every engine uses these."""
        d = self.head_dim
        inv = 1.0 / (float(self.rope_theta) ** (np.arange(0, d, 2, dtype=np.float64) / d))
        s = self.rope_scaling
        if s is None:
            pass
        elif s["type"] == "linear":
            inv = inv / float(s["factor"])
        elif s["type"] == "llama3":
            inv = _llama3_inv_freq(inv, s)
        elif s["type"] == "factors":
            inv = inv / np.asarray(s["factors"], dtype=np.float64)
        return inv.astype(np.float32)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight the model has (HF names, INTERNALS "Tensor names") and its shape."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shapes = {"model.embed_tokens.weight": (v, h)}
        for n in range(self.num_layers):
            p = f"model.layers.{n}."
            shapes.update({
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            })
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (v, h)
        return shapes

    def num_parameters(self) -> int:
        return sum(int(np.prod(s)) for s in self.tensor_shapes().values())

    def validate(self, source: str) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise EdgeforgeError(f"{source}: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise EdgeforgeError(
                f"{source}: num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise EdgeforgeError(f"{source}: head_dim must be even for rotary embeddings, got {self.head_dim}")
        # Values that build a model whose every output is NaN or empty: refused by name, not shipped.
        if not (np.isfinite(self.rms_norm_eps) and 0 < self.rms_norm_eps < 1):
            raise EdgeforgeError(f"{source}: rms_norm_eps must be a small positive number, got {self.rms_norm_eps!r}")
        if not (np.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise EdgeforgeError(f"{source}: rope_theta must be positive, got {self.rope_theta!r}")
        if not isinstance(self.context_length, (int, np.integer)) or self.context_length < 2:
            raise EdgeforgeError(f"{source}: the context length (max_position_embeddings) must be at least 2, "
                                 f"got {self.context_length!r}")
        s = self.rope_scaling
        if s is not None and s.get("type") not in ("linear", "llama3", "factors"):
            raise EdgeforgeError(f"{source}: unsupported rope scaling {s.get('type')!r}")
        if s is not None and s["type"] == "factors" and len(s["factors"]) != self.head_dim // 2:
            raise EdgeforgeError(f"{source}: rope factors must have head_dim/2 = {self.head_dim // 2} entries")
        if s is not None:
            _check_rope_scaling(s, source)

    # ---- sources --------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "LlamaConfig":
        """From a transformers config.json dict; `source` (the file) is named in every error."""
        _check_hf_architecture(hf, source)
        heads = _int(hf, "num_attention_heads", source)
        hidden = _int(hf, "hidden_size", source)
        eos = hf.get("eos_token_id")
        cfg = cls(
            vocab_size=_int(hf, "vocab_size", source),
            hidden_size=hidden,
            num_layers=_int(hf, "num_hidden_layers", source),
            num_heads=heads,
            num_kv_heads=_int(hf, "num_key_value_heads", source, heads),
            head_dim=_int(hf, "head_dim", source, hidden // heads if heads > 0 else 0),
            intermediate_size=_int(hf, "intermediate_size", source),
            rms_norm_eps=_float(hf, "rms_norm_eps", source, 1e-6),
            rope_theta=0.0,
            tie_word_embeddings=_bool(hf, "tie_word_embeddings", source, False),
            context_length=_int(hf, "max_position_embeddings", source, 2048),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=[] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])],
        )
        cfg.rope_theta, cfg.rope_scaling = _hf_rope(hf, source)
        cfg.validate(source)
        return cfg

    @classmethod
    def from_gguf(cls, meta: dict, source: str, has_output: bool, rope_factors: np.ndarray | None = None,
                  vocab_size: int | None = None) -> "LlamaConfig":
        """From GGUF metadata (key -> python value). `has_output`: the file has an `output.weight`
        (untied head). `rope_factors`: the `rope_freqs.weight` tensor if present (llama3 rope)."""
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise EdgeforgeError(f"{source}: unsupported architecture '{arch}' (supported: llama)")
        if int(meta.get("llama.expert_count", 0) or 0) > 0:
            raise EdgeforgeError(
                f"{source}: unsupported architecture 'llama' with {meta['llama.expert_count']} experts "
                "(mixture of experts, e.g. Mixtral)"
            )

        def need(key):
            if key not in meta:
                raise EdgeforgeError(f"{source}: GGUF metadata has no '{key}'")
            return meta[key]

        heads = int(need("llama.attention.head_count"))
        hidden = int(need("llama.embedding_length"))
        head_dim = int(meta.get("llama.attention.key_length") or hidden // heads)
        rot = meta.get("llama.rope.dimension_count")
        if rot is not None and int(rot) != head_dim:
            raise EdgeforgeError(f"{source}: partial rotary embeddings (rope dims {rot} != head_dim {head_dim})")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eot = meta.get("tokenizer.ggml.eot_token_id")
        eos_ids = [int(e) for e in (eos, eot) if e is not None]
        cfg = cls(
            vocab_size=int(vocab_size or meta.get("llama.vocab_size") or len(need("tokenizer.ggml.tokens"))),
            hidden_size=hidden,
            num_layers=int(need("llama.block_count")),
            num_heads=heads,
            num_kv_heads=int(meta.get("llama.attention.head_count_kv") or heads),
            head_dim=head_dim,
            intermediate_size=int(need("llama.feed_forward_length")),
            rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            tie_word_embeddings=not has_output,
            context_length=int(meta.get("llama.context_length") or 2048),
            bos_token_id=None if meta.get("tokenizer.ggml.bos_token_id") is None
            else int(meta["tokenizer.ggml.bos_token_id"]),
            eos_token_ids=list(dict.fromkeys(eos_ids)),
        )
        cfg.rope_scaling = _gguf_rope(meta, source, cfg, rope_factors)
        cfg.validate(source)
        return cfg


_REQUIRED = object()


def _float(d: dict, key: str, source: str, default: float) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EdgeforgeError(f"{source}: '{key}' must be a number, got {value!r}")
    return float(value)


def _bool(d: dict, key: str, source: str, default: bool) -> bool:
    """A JSON true/false: "no", 0 or 1 are a broken config, not something to guess the truth of."""
    value = d.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise EdgeforgeError(f"{source}: '{key}' must be true or false, got {value!r}")
    return value


def _number(value, what: str, source: str, positive: bool = True) -> float:
    """A finite JSON number (not a string, not a bool), > 0 when `positive`; else an error naming it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise EdgeforgeError(f"{source}: {what} must be a {'positive ' if positive else ''}finite number, got {value!r}")
    return float(value)


def _check_rope_scaling(s: dict, source: str) -> None:
    """Scaling parameters that would divide by zero, flip or NaN every rotary frequency: refused."""
    if s["type"] in ("linear", "llama3"):
        _number(s.get("factor"), "rope scaling factor", source)
    if s["type"] == "llama3":
        low = _number(s.get("low_freq_factor"), "rope low_freq_factor", source)
        high = _number(s.get("high_freq_factor"), "rope high_freq_factor", source)
        if high <= low:
            raise EdgeforgeError(f"{source}: rope high_freq_factor ({high:g}) must be larger than low_freq_factor ({low:g})")
        old = s.get("original_max_position_embeddings")
        if isinstance(old, (bool, np.bool_)) or not isinstance(old, numbers.Integral) or old < 1:
            raise EdgeforgeError(f"{source}: rope original_max_position_embeddings must be a positive integer, got {old!r}")
    if s["type"] == "factors":
        for f in s["factors"]:
            _number(f, "every rope factor", source)


def _int(d: dict, key: str, source: str, default=_REQUIRED) -> int:
    """An integer field: missing -> `default` (or an error); present but not an integer -> an error
    naming the key (a float or string count is a broken config, not something to round)."""
    value = d.get(key)
    if value is None:
        if default is _REQUIRED:
            raise EdgeforgeError(f"{source}: missing '{key}'")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise EdgeforgeError(f"{source}: '{key}' must be an integer, got {value!r}")
    return int(value)


def _check_hf_architecture(hf: dict, source: str) -> None:
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    name = archs[0] if archs else model_type
    if not (set(archs) & set(SUPPORTED_ARCHITECTURES) or (not archs and model_type == "llama")):
        raise EdgeforgeError(
            f"{source}: unsupported architecture '{name}' (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    # Llama variants this compiler does not implement: say which feature, not just "unsupported".
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise EdgeforgeError(f"{source}: unsupported architecture '{name}' with {key}=true")
    if hf.get("hidden_act", "silu") != "silu":
        raise EdgeforgeError(f"{source}: unsupported architecture '{name}' with hidden_act={hf['hidden_act']}")
    if (hf.get("num_local_experts") or 0) > 0:
        raise EdgeforgeError(f"{source}: unsupported architecture '{name}' with experts (mixture of experts)")
    if float(hf.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise EdgeforgeError(f"{source}: unsupported architecture '{name}' with partial_rotary_factor")


def _hf_rope(hf: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from transformers 5 `rope_parameters` or 4.x `rope_theta`+`rope_scaling`."""
    params = hf.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise EdgeforgeError(f"{source}: 'rope_parameters' must be an object, got {params!r}")
    if isinstance(params, dict):
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = params
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = hf.get("rope_scaling")
    theta = _number(theta, "'rope_theta'", source)
    if not scaling:
        return theta, None
    if not isinstance(scaling, dict):
        raise EdgeforgeError(f"{source}: 'rope_scaling' must be an object, got {scaling!r}")
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    try:
        if kind == "default":
            return theta, None
        if kind == "linear":
            return theta, {"type": "linear", "factor": _number(scaling["factor"], "rope scaling factor", source)}
        if kind == "llama3":
            return theta, {  # checked as they are (no coercion of strings); validate() checks them again
                "type": "llama3",
                "factor": _number(scaling["factor"], "rope scaling factor", source),
                "low_freq_factor": _number(scaling["low_freq_factor"], "rope low_freq_factor", source),
                "high_freq_factor": _number(scaling["high_freq_factor"], "rope high_freq_factor", source),
                "original_max_position_embeddings": _int(scaling, "original_max_position_embeddings", source),
            }
    except KeyError as err:
        raise EdgeforgeError(f"{source}: rope scaling '{kind}' is missing {err.args[0]}") from None
    raise EdgeforgeError(f"{source}: unsupported rope scaling type '{kind}' (supported: {', '.join(ROPE_TYPES)})")


def _llama3_inv_freq(inv: np.ndarray, s: dict) -> np.ndarray:
    """Llama 3.1 frequency-dependent scaling (same formula as transformers' _compute_llama3_parameters)."""
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled)


def _gguf_rope(meta: dict, source: str, cfg: LlamaConfig, factors: np.ndarray | None) -> dict | None:
    kind = meta.get("llama.rope.scaling.type") or "none"
    if factors is not None:
        return _llama3_from_factors(cfg, np.asarray(factors, dtype=np.float64).reshape(-1), source)
    if kind == "none":
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(meta.get("llama.rope.scaling.factor", 1.0))}
    raise EdgeforgeError(f"{source}: unsupported rope scaling type '{kind}' (supported: none, linear, llama3)")


def _llama3_from_factors(cfg: LlamaConfig, factors: np.ndarray, source: str) -> dict:
    """llama.cpp stores llama3 rope as per-frequency divisors (`rope_freqs.weight`). Recover llama3
    parameters that reproduce them exactly (so backends with a native llama3 rope mode can use
    them); if none do, keep the factors themselves ({"type": "factors"}).

    Only the factors matter for the math; when they are ambiguous (few medium frequencies) any
    parameters reproducing them are equivalent. Llama 3.x uses low=1, high=4; try that first.
    """
    half = cfg.head_dim // 2
    if factors.shape != (half,):
        raise EdgeforgeError(f"{source}: rope_freqs.weight has {factors.size} entries, expected head_dim/2 = {half}")
    base = 1.0 / (float(cfg.rope_theta) ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    factor = float(factors.max())
    wavelen = 2 * math.pi / base
    medium = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0)):
        for old in _old_context_candidates(factors, factor, wavelen, medium, low, high, cfg.context_length):
            cand = {"type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": int(old)}
            if np.allclose(_llama3_inv_freq(base, cand), base / factors, rtol=1e-5, atol=0):
                return cand
    return {"type": "factors", "factors": [float(f) for f in factors]}


def _old_context_candidates(factors, factor, wavelen, medium, low, high, context_length):
    """Candidate original context lengths: from the medium frequencies (inverting the smooth
    interpolation), else common values and powers of two."""
    out = []
    if factor > 1 and medium.any():
        smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
        out += sorted({int(round(v)) for v in wavelen[medium] * (smooth * (high - low) + low)})
    out += [8192, 4096, 2048, 16384, 32768, 65536, 131072, context_length]
    out += [2**k for k in range(4, 21)]
    return list(dict.fromkeys(o for o in out if o > 0))
