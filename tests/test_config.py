"""LlamaConfig: HF config.json (transformers 5 and 4.x rope fields), GGUF metadata, rope frequencies
against transformers' own rope initialisation, and the errors for what we do not support."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeforge.errors import EdgeforgeError
from edgeforge.model.config import LlamaConfig

from tiny_gguf import llama3_rope_factors
from edgeforge.testing import SHAPES

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

LLAMA31 = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
               num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=131072,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def hf_config_dict(**kwargs) -> dict:
    """config.json as transformers 5 writes it."""
    return json.loads(transformers.LlamaConfig(vocab_size=1000, **kwargs).to_json_string())


def hf_inv_freq(**kwargs) -> np.ndarray:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(transformers.LlamaConfig(vocab_size=1000, **kwargs)).inv_freq.numpy()


def legacy(d: dict, key: str) -> dict:
    """The same config the 4.x way: rope_theta at the top, rope_scaling with `type` or `rope_type`."""
    d = dict(d)
    rp = dict(d.pop("rope_parameters"))
    d["rope_theta"] = rp.pop("rope_theta")
    kind = rp.pop("rope_type")
    if kind != "default":
        d["rope_scaling"] = {key: kind, **rp}
    return d


@pytest.mark.parametrize("shape", sorted(SHAPES) + ["llama31"])
def test_from_hf_matches_transformers_rope_and_shapes(shape):
    kwargs = LLAMA31 if shape == "llama31" else SHAPES[shape]
    d = hf_config_dict(**kwargs)
    cfg = LlamaConfig.from_hf(d, "config.json")
    assert cfg.num_layers == kwargs["num_hidden_layers"] and cfg.num_kv_heads == kwargs["num_key_value_heads"]
    assert cfg.head_dim == kwargs.get("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    expected = hf_inv_freq(**kwargs)
    got = cfg.rope_inv_freq()
    assert got.dtype == np.float32 and got.shape == (cfg.head_dim // 2,)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
    for key in ("type", "rope_type"):
        assert LlamaConfig.from_hf(legacy(d, key), "config.json") == cfg


def test_round_trip_through_json():
    cfg = LlamaConfig.from_hf(hf_config_dict(**SHAPES["llama32"], eos_token_id=[5, 7]), "config.json")
    assert cfg.eos_token_ids == [5, 7]
    d = json.loads(json.dumps({"format": "edgeforge-config", "version": 1, **cfg.to_dict()}))
    assert LlamaConfig.from_dict(d) == cfg
    np.testing.assert_array_equal(LlamaConfig.from_dict(d).rope_inv_freq(), cfg.rope_inv_freq())
    del d["hidden_size"]
    with pytest.raises(EdgeforgeError, match="qdir/config.json.*hidden_size"):
        LlamaConfig.from_dict(d, "qdir/config.json")


def test_tensor_shapes_and_parameter_count_match_transformers():
    for shape, kwargs in SHAPES.items():
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=300, **kwargs))
        cfg = LlamaConfig.from_hf(json.loads(model.config.to_json_string()), "config.json")
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                    if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
        assert cfg.tensor_shapes() == expected, shape
        assert cfg.num_parameters() == model.num_parameters(), shape


@pytest.mark.parametrize("change, needle", [
    ({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 8}, "MixtralForCausalLM"),
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "GPT2LMHeadModel"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "dynamic"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "factor"),
    ({"num_key_value_heads": 3}, "num_kv_heads"),
])
def test_unsupported_configs_name_the_file(change, needle):
    d = {**hf_config_dict(**SHAPES["llama2"]), "architectures": ["LlamaForCausalLM"], **change}
    with pytest.raises(EdgeforgeError) as err:
        LlamaConfig.from_hf(d, "/m/config.json")
    assert str(err.value).startswith("/m/config.json: ") and needle in str(err.value)


def gguf_meta(**extra) -> dict:
    meta = {"general.architecture": "llama", "llama.embedding_length": 4096, "llama.block_count": 2,
            "llama.feed_forward_length": 14336, "llama.attention.head_count": 32,
            "llama.attention.head_count_kv": 8, "llama.rope.freq_base": 500000.0,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.context_length": 131072,
            "llama.rope.dimension_count": 128, "llama.vocab_size": 1000,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    meta.update(extra)
    return meta


def test_from_gguf_llama3_factors_recover_llama31_parameters():
    """llama.cpp stores Llama 3.1's rope as rope_freqs factors; we get the llama3 parameters back,
    and the frequencies equal transformers' for the original HF config."""
    hf = hf_config_dict(**LLAMA31)
    factors = llama3_rope_factors(hf, 128)
    cfg = LlamaConfig.from_gguf(gguf_meta(), "m.gguf", has_output=True, rope_factors=factors)
    assert cfg.rope_scaling == {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert not cfg.tie_word_embeddings and cfg.eos_token_ids == [2]
    np.testing.assert_allclose(cfg.rope_inv_freq(), hf_inv_freq(**LLAMA31), rtol=1e-6)


def test_from_gguf_arbitrary_factors_are_kept():
    factors = np.linspace(1.0, 3.0, 64).astype(np.float32)  # no llama3 parameters produce this
    cfg = LlamaConfig.from_gguf(gguf_meta(), "m.gguf", has_output=False, rope_factors=factors)
    assert cfg.rope_scaling["type"] == "factors" and cfg.tie_word_embeddings
    base = 1.0 / (500000.0 ** (np.arange(0, 128, 2) / 128))
    np.testing.assert_allclose(cfg.rope_inv_freq(), base / factors, rtol=1e-6)
    assert LlamaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_from_gguf_linear_scaling_and_errors():
    cfg = LlamaConfig.from_gguf(gguf_meta(**{"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}),
                                "m.gguf", has_output=True)
    assert cfg.rope_scaling == {"type": "linear", "factor": 4.0}
    for meta, needle in [(gguf_meta(**{"general.architecture": "gpt2"}), "gpt2"),
                         (gguf_meta(**{"llama.expert_count": 8}), "experts"),
                         (gguf_meta(**{"llama.rope.scaling.type": "yarn"}), "yarn"),
                         (gguf_meta(**{"llama.rope.dimension_count": 64}), "rope dims")]:
        with pytest.raises(EdgeforgeError) as err:
            LlamaConfig.from_gguf(meta, "/x/m.gguf", has_output=True)
        assert str(err.value).startswith("/x/m.gguf: ") and needle in str(err.value)
