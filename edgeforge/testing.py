"""Helpers the test suite and bench/ share (one public module instead of private copies in each).

- Tiny random Llama checkpoints made in code (`make_tiny_llama`, shapes in SHAPES / EXTRA_SHAPES):
  real HF folders written by transformers, so loaders see exactly what they would see from the hub.
  Needs the dev extra (torch, transformers, sentencepiece); imported only when a model is made.
- Engine comparisons against the numpy reference (`step_logits`, `relative_errors`, `greedy`).
- `copy_runtime`: edgeforge/runtime as a bundle carries it, for interpreters other than this one.
- `run_under_qemu`: a Python script in the arm64 root under qemu, output captured.
- `f32_to_bf16`: bfloat16 test data (the runtime only ever reads bf16).

Not used by edgeforge itself (the CLI, the builder and the bundle runtime never import it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np

from .runtime.generate import generate
from .toolchains import qemu_python_command
from .runtime.sampling import Sampler

# Text the tiny tokenizers are trained on, and the tests' evaluation text
EVAL_TEXT = Path(__file__).parent / "data" / "tiny-text.txt"

LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# name -> LlamaConfig keyword arguments (vocab_size is filled from the tokenizer)
SHAPES = {
    # Llama-2 style: multi-head attention, untied head, sentencepiece tokenizer.model
    "llama2": dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5,
        max_position_embeddings=256,
    ),
    # Llama-3.2 style: GQA 4:1, tied embeddings, llama3 rope scaling, byte-level BPE tokenizer.json
    "llama32": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5,
        max_position_embeddings=512,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    # head_dim (32) different from hidden / heads (96 / 4 = 24), GQA 2:1, linear rope scaling
    "headdim": dict(
        hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, rope_theta=10000.0,
        rms_norm_eps=1e-6, max_position_embeddings=256,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
}

# Shapes tested on their own (not in every shape-parametrized test)
EXTRA_SHAPES = {
    # Llama 3.1: llama3 rope scaling past an 8k original context, GQA 4:1, untied head
    "llama31long": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, tie_word_embeddings=False, rope_theta=500000.0, rms_norm_eps=1e-5,
        max_position_embeddings=16384,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
    # head_dim 48: a multiple of 16 (ONNX Runtime's attention) that is no power of two (the int8 KV
    # cache's rotation is then a fixed random orthogonal matrix, not a Hadamard one)
    "headdim48": dict(
        hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=48, tie_word_embeddings=True, rope_theta=10000.0,
        rms_norm_eps=1e-5, max_position_embeddings=256,
    ),
}


def train_bpe_tokenizer(out: Path) -> int:
    """Byte-level BPE (Llama-3 style) trained on the eval text; writes tokenizer.json + config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([str(EVAL_TEXT)], trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True,
        "chat_template": LLAMA3_CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast",
    }, indent=1))
    return tok.get_vocab_size()


def train_sentencepiece(out: Path) -> int:
    """Llama-2 style sentencepiece BPE with byte fallback; writes tokenizer.model only."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=str(EVAL_TEXT), model_prefix=str(out / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2, num_threads=1,
    )
    (out / "tokenizer.vocab").unlink()
    return spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).vocab_size()


def make_tiny_llama(out: Path, shape: str, seed: int = 0) -> Path:
    """Write a tiny random Llama of `shape` (a SHAPES key) as an HF folder at `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if shape == "llama2":
        vocab = train_sentencepiece(out)
        bos, eos = 1, 2
    else:
        vocab = train_bpe_tokenizer(out)
        bos, eos = 0, 1  # <|begin_of_text|>, <|eot_id|>
    cfg = LlamaConfig(vocab_size=vocab, bos_token_id=bos, eos_token_id=eos,
                      initializer_range=0.08, **(SHAPES.get(shape) or EXTRA_SHAPES[shape]))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    # Random norms (not all ones) so that a loader that drops or mixes them up is caught.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    return out


# ---- comparing engines --------------------------------------------------------------------------


def step_logits(engine, ids, steps: int, feed=None) -> list[np.ndarray]:
    """Logits of a prefill and `steps` decodes; fed tokens come from `feed` (teacher forcing), else
    the engine's own argmax."""
    engine.reset()
    out = [engine.prefill(ids)]
    for i in range(steps):
        token = feed[i] if feed is not None else int(np.argmax(out[-1]))
        out.append(engine.decode(token))
    return out


def relative_errors(got, expected) -> list[float]:
    """max |got - expected| / (max - min of expected), per step."""
    return [float(np.max(np.abs(g - e)) / np.ptp(e)) for g, e in zip(got, expected)]


def greedy(engine, ids, n: int) -> list[int]:
    return generate(engine, ids, n, Sampler(temperature=0.0)).tokens


def copy_runtime(dest: Path, tvm_arch: str | None = None) -> Path:
    """edgeforge/runtime copied as the stand-alone package `edgeforge_runtime` into `dest`, as bundles
    ship it; with `tvm_arch` also the runtime-only TVM a bundle for that CPU carries (the arm64 root
    has none). Returns `dest`, the folder to put on the interpreter's path."""
    pkg = Path(dest) / "edgeforge_runtime"
    shutil.copytree(Path(__file__).parent / "runtime", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    if tvm_arch:
        import tvm  # the compiler's version names the runtime to carry

        from .backends.tvm.device_runtime import copy_runtime as copy_tvm

        copy_tvm({"package": "tvm", "version": tvm.__version__, "arch": tvm_arch, "libs": ["tvm_runtime"]}, dest)
    return Path(dest)


def run_under_qemu(args, extra_pythonpath=(), timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the arm64 root's Python on `args` under qemu (the root must be built); text output captured,
    the caller checks the return code."""
    cmd, env = qemu_python_command([str(a) for a in args], extra_pythonpath=extra_pythonpath)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bit patterns (uint16), round-to-nearest-even like torch."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if np.any(nan):  # keep NaNs NaN (rounding could carry them into infinity)
        out[nan] = 0x7FC0
    return out
