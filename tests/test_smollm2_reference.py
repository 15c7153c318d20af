"""The real SmolLM2-135M-Instruct Q4_1 GGUF: `edgeforge generate --chat` (numpy reference) gives the
same greedy tokens as transformers on the same file, and the tokenizers agree."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeforge.cli import main
from edgeforge.model.loader import load_model

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers:  2, 3 and\n 5 ... 1234567 ünïcödé 🙂",
]


@pytest.fixture(scope="module")
def hf(smollm2_gguf):
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    return tok, model


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return load_model(smollm2_gguf)


def chat(text):
    return [{"role": "user", "content": text}]


def test_config_of_the_gguf(ours):
    c = ours.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (30, 576, 9, 3, 64, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.rope_scaling is None


def test_tokenizer_ids_equal_transformers(hf, ours):
    tok, _ = hf
    for text in PROMPTS:
        assert ours.tokenizer.encode(text) == tok(text)["input_ids"], text
        assert ours.tokenizer.apply_chat_template(chat(text)) == tok.apply_chat_template(
            chat(text), add_generation_prompt=True, tokenize=False)
        expected = list(tok.apply_chat_template(chat(text), add_generation_prompt=True, tokenize=True, return_dict=False))
        assert ours.tokenizer.encode_chat(chat(text)) == expected, text


def test_dequantized_weights_equal_transformers(hf, ours):
    """Same dequantization and Q/K order as transformers' GGUF loader (a Q4_1 and the Q8_0 embedding)."""
    _, model = hf
    sd = model.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.3.self_attn.q_proj.weight",
                 "model.layers.3.self_attn.k_proj.weight", "model.layers.29.mlp.down_proj.weight"):
        np.testing.assert_allclose(ours.tensors.get(name), sd[name].numpy(), rtol=0, atol=1e-6, err_msg=name)


def test_generate_chat_greedy_equals_transformers(hf, ours, smollm2_gguf, capsys):
    _, model = hf
    for text in PROMPTS:
        ids = ours.tokenizer.encode_chat(chat(text))
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=24, do_sample=False)
        expected = out[0, len(ids):].tolist()
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(["generate", str(smollm2_gguf), "--chat", "--prompt", text, "--max-tokens", "24", "--json"])
        result = json.loads(capsys.readouterr().out)
        assert exc.value.code == 0
        assert result["prompt_ids"] == ids
        assert result["tokens"] == expected, (text, result["text"])
        if text == PROMPTS[0]:
            assert "Paris" in result["text"]
