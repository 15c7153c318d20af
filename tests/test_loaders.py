"""Loaders: safetensors reader/writer, HF folders, GGUF files (F32 and quantized), tokenizers."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest

from edgeforge.model.loader import load_model
from edgeforge.model.reference import ReferenceModel
from edgeforge.runtime import safetensors as st
from edgeforge.runtime.tokenizer import Tokenizer
from edgeforge.testing import f32_to_bf16

from tiny_gguf import write_gguf

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing  ",
    "Numbers 1234567 and symbols #@$%^&*() ünïcödé 🙂 日本語",
    "line one\nline two\n\n\ttabbed",
    "",
]


# ---- safetensors --------------------------------------------------------------------------------
def test_safetensors_reader_matches_reference_library(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, generator=g).to(torch.float16),
        "f32": torch.randn(2, 3, 4, generator=g),
        "f64": torch.randn(3, generator=g, dtype=torch.float64),
        "i8": torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (4,), generator=g, dtype=torch.uint8),
        "i32": torch.randint(-1000, 1000, (2, 2), generator=g, dtype=torch.int32),
        "i64": torch.arange(5, dtype=torch.int64),
        "u32": torch.tensor([0, 1, 2**32 - 1], dtype=torch.uint32),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, tmp_path / "x.safetensors", metadata={"k": "v"})
    f = st.SafetensorsFile(tmp_path / "x.safetensors")
    assert sorted(f.keys()) == sorted(tensors) and f.metadata == {"k": "v"}
    for name, t in tensors.items():
        expected = t.float().numpy() if name == "bf16" else t.numpy()
        got = f.get(name)
        assert got.shape == tuple(t.shape) and got.dtype == expected.dtype, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
    assert f.dtype("bf16") == "BF16" and f.get_raw("bf16").dtype == np.uint16


def test_safetensors_writer_is_deterministic_aligned_and_readable(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((4, 8)).astype(np.float32), "q": np.arange(10, dtype=np.int8),
              "s": np.ones(3, np.float16), "u": np.arange(4, dtype=np.uint32),
              "bf": ("BF16", f32_to_bf16(np.array([1.5, -2.25, 3.14159], np.float32)))}
    st.write_safetensors(tmp_path / "a.safetensors", arrays, {"m": "1"})
    st.write_safetensors(tmp_path / "b.safetensors", dict(reversed(list(arrays.items()))), {"m": "1"})
    a, b = (tmp_path / "a.safetensors").read_bytes(), (tmp_path / "b.safetensors").read_bytes()
    assert a == b
    n = int.from_bytes(a[:8], "little")
    assert (8 + n) % 8 == 0
    header = json.loads(a[8 : 8 + n])
    assert list(header) == sorted(header) and header["__metadata__"] == {"format": "pt", "m": "1"}
    for e in header.values():  # every tensor starts aligned to its item size
        if "data_offsets" in e:
            assert e["data_offsets"][0] % np.dtype(st.DTYPES[e["dtype"]]).itemsize == 0
    back = load_file(tmp_path / "a.safetensors")  # the reference implementation reads it
    for k, v in arrays.items():
        if k != "bf":
            np.testing.assert_array_equal(back[k].numpy(), v)
    bf = back["bf"]
    assert bf.dtype == torch.bfloat16 and bf.float().tolist() == [1.5, -2.25, 3.140625]


def test_bf16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal(10000).astype(np.float32) * 100
    expected = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(f32_to_bf16(x), expected)
    np.testing.assert_array_equal(st.bf16_to_f32(expected), torch.from_numpy(x).to(torch.bfloat16).float().numpy())


def test_sharded_folder_reads_like_single_file(tmp_path, tiny_model):
    src = tiny_model("llama32")
    single = st.SafetensorsFile(src / "model.safetensors")
    names = sorted(single.keys())
    shard = tmp_path / "sharded"
    shutil.copytree(src, shard)
    (shard / "model.safetensors").unlink()
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in halves.items():
        st.write_safetensors(shard / fname, {k: np.array(single.get(k)) for k in keys})
        weight_map.update({k: fname for k in keys})
    (shard / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, b = load_model(src), load_model(shard)
    assert a.tensors.names() == b.tensors.names()
    for n in a.tensors.names():
        np.testing.assert_array_equal(a.tensors.get(n), b.tensors.get(n))
    assert a.source["sha256"] != b.source["sha256"] and len(b.source["sha256"]) == 64


# ---- HF folders -----------------------------------------------------------------------------------
def test_hf_folder_loads_config_tensors_and_tokenizer(tiny_shape):
    name, folder = tiny_shape
    m = load_model(folder)
    hf = json.loads((folder / "config.json").read_text())
    assert m.config.num_layers == hf["num_hidden_layers"] and m.config.vocab_size == hf["vocab_size"]
    assert m.config.tie_word_embeddings == hf["tie_word_embeddings"]
    assert ("lm_head.weight" in m.tensors.names()) != m.config.tie_word_embeddings
    w = m.tensors.get("model.layers.0.self_attn.k_proj.weight")
    assert w.dtype == np.float32 and w.shape == (m.config.num_kv_heads * m.config.head_dim, m.config.hidden_size)
    assert m.source["format"] == "hf" and len(m.source["sha256"]) == 64
    assert m.tokenizer.bos_token_id == hf["bos_token_id"] and m.tokenizer.eos_token_ids == [hf["eos_token_id"]]


def test_tokenizer_ids_match_transformers(tiny_shape):
    """Text ids and decoding equal transformers'. BOS is checked separately: transformers 5.23
    adds none for these folders (add_bos_token ignored), while tokenizer_config.json (llama32,
    headdim) and the Llama-2 sentencepiece convention (llama2) say to add it, as llama.cpp does.
    For a bare tokenizer.model we compare with LlamaTokenizer: 5.23's AutoTokenizer converts it
    generically and drops sentencepiece's dummy prefix ("The" -> "T"+"he" instead of "▁The")."""
    transformers = pytest.importorskip("transformers")
    name, folder = tiny_shape
    ours = load_model(folder).tokenizer
    if (folder / "tokenizer.model").exists():
        theirs = transformers.LlamaTokenizer.from_pretrained(folder)
    else:
        theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        ids = ours.encode(text, add_bos=False)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"], (name, text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), (name, text)
        assert ours.encode(text) == [ours.bos_token_id] + ids
    assert ours.add_bos_token and ours.bos_token == theirs.bos_token


def test_sentencepiece_conversion_matches_sentencepiece(tiny_model):
    import sentencepiece as spm

    folder = tiny_model("llama2")
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    ours = load_model(folder).tokenizer
    from edgeforge.testing import EVAL_TEXT

    # This tiny model was trained with sentencepiece's default normalizer, which collapses runs of
    # whitespace; transformers (and Llama-2's own model, which turns that off) do not. Compare on
    # text that normalization leaves alone.
    lines = [ln for ln in EVAL_TEXT.read_text().splitlines() + TEXTS if ln and " ".join(ln.split()) == ln]
    assert len(lines) >= 10
    for line in lines:
        assert ours.encode(line, add_bos=False) == sp.encode(line), line


def test_chat_template_renders_like_transformers(tiny_model):
    transformers = pytest.importorskip("transformers")
    folder = tiny_model("llama32")
    ours = load_model(folder).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    text = theirs.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(msgs) == text
    assert ours.encode_chat(msgs) == list(theirs.apply_chat_template(msgs, add_generation_prompt=True,
                                                                      tokenize=True, return_dict=False))


def test_tokenizer_save_load_round_trip(tmp_path, tiny_shape):
    _, folder = tiny_shape
    tok = load_model(folder).tokenizer
    tok.save(tmp_path / "a")
    back = Tokenizer.load(tmp_path / "a")
    back.save(tmp_path / "b")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert back.config_dict() == tok.config_dict()
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text)


# ---- GGUF -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_pair(tiny_shape, tmp_path_factory):
    name, folder = tiny_shape
    path = write_gguf(folder, tmp_path_factory.mktemp(f"gguf-{name}") / f"{name}-f32.gguf")
    return name, folder, path


def test_f32_gguf_gives_identical_logits_to_safetensors(gguf_pair):
    name, folder, path = gguf_pair
    a, b = load_model(folder), load_model(path)
    assert b.source["format"] == "gguf"
    assert a.config.tensor_shapes() == b.config.tensor_shapes()
    assert a.config.rope_scaling == b.config.rope_scaling, name  # llama3 recovered from rope_freqs
    np.testing.assert_array_equal(a.config.rope_inv_freq(), b.config.rope_inv_freq())
    for n in a.tensors.names():  # Q/K un-permuted back to HF order, exactly
        np.testing.assert_array_equal(a.tensors.get(n), b.tensors.get(n), err_msg=n)
    ids = a.tokenizer.encode(TEXTS[0])
    np.testing.assert_array_equal(ReferenceModel(a).forward(ids), ReferenceModel(b).forward(ids))


def test_gguf_tokenizer_matches_hf_tokenizer(gguf_pair):
    name, folder, path = gguf_pair
    a, b = load_model(folder).tokenizer, load_model(path).tokenizer
    for text in TEXTS:
        assert b.encode(text) == a.encode(text), (name, text)
        assert b.decode(a.encode(text)) == a.decode(a.encode(text)), (name, text)
    assert (b.bos_token_id, b.eos_token_ids, b.add_bos_token) == (a.bos_token_id, a.eos_token_ids, a.add_bos_token)


@pytest.mark.parametrize("qtype, bound", [
    (gguf.GGMLQuantizationType.F16, 1e-3), (gguf.GGMLQuantizationType.BF16, 1e-2),
    (gguf.GGMLQuantizationType.Q8_0, 0.01), (gguf.GGMLQuantizationType.Q4_0, 0.15),
    (gguf.GGMLQuantizationType.Q4_1, 0.1),
])
def test_quantized_gguf_dequantizes_close_to_source(tiny_model, tmp_path, qtype, bound):
    """Each type through gguf's quantizer and our loader: weights in HF order within the type's error
    (relative to the row's max |w|); a wrong un-permutation or layout would be off by O(1)."""
    folder = tiny_model("headdim")  # row lengths 96, 128 and 192: multiples of the 32-wide blocks
    path = write_gguf(folder, tmp_path / "q.gguf", qtype=qtype)
    a, b = load_model(folder), load_model(path)
    checked = 0
    for n in a.tensors.names():
        wa = a.tensors.get(n)
        if wa.ndim != 2 or wa.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            continue
        assert b.tensors.dtype(n) == qtype.name
        err = np.abs(b.tensors.get(n) - wa).max(axis=1) / np.abs(wa).max(axis=1)
        assert err.max() < bound, (n, float(err.max()))
        checked += 1
    assert checked >= 4


K_QUANT_HALVES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}  # byte offsets of fp16 scales in a block


@pytest.mark.parametrize("type_name", sorted(K_QUANT_HALVES))
def test_k_quants_dequantize_like_transformers(tiny_model, tmp_path, type_name):
    """gguf cannot quantize K-quants, so store random blocks (with sane fp16 scales) and compare our
    loader with transformers' independent GGUF dequantizer on the same bytes."""
    torch = pytest.importorskip("torch")
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    qtype = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    folder = tiny_model("llama32")  # down_proj rows are 256 wide: one K-quant block per row
    rng = np.random.default_rng(0)
    raw = {}
    for layer in range(2):
        data = rng.integers(0, 256, (128, 256 // block * size), dtype=np.uint8)
        for off in K_QUANT_HALVES[type_name]:
            scales = rng.uniform(1e-3, 1e-2, (128, 1)).astype(np.float16)
            data[:, off : off + 2] = scales.view(np.uint8)
        raw[f"model.layers.{layer}.mlp.down_proj.weight"] = (data, qtype)
    b = load_model(write_gguf(folder, tmp_path / "k.gguf", raw=raw))
    for name, (data, _) in raw.items():
        assert b.tensors.dtype(name) == type_name
        expected = hf_dequantize(torch.from_numpy(data.reshape(-1)), int(qtype)).numpy().reshape(128, 256)
        np.testing.assert_allclose(b.tensors.get(name), expected, rtol=1e-6, atol=1e-7, err_msg=name)
        assert np.abs(expected).max() > 0
