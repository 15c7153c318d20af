"""QDIR writing and reading on the tiny models: every scheme, determinism, sharding, atomicity,
and the numpy reference on the dequantized weights against the float model."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from edgeforge.cli import main
from edgeforge.errors import EdgeforgeError
from edgeforge.quant.formats import GROUP_SIZE
from edgeforge.quant.qdir import load_qdir, quantize_in_memory, write_qdir
from edgeforge.quant.schemes import SCHEMES, get_scheme
from edgeforge.runtime.safetensors import SafetensorsFile
from edgeforge.runtime.weights import QdirWeights

STORED_DTYPES = {"f32": {"weight": "float32"}, "f16": {"weight": "float16"},
                 "q8": {"qweight": "int8", "scales": None}, "q4": {"qweight": "uint32", "scales": None},
                 "q4a": {"qweight": "uint32", "scales": None, "zeros": "uint8"}}


@pytest.fixture(scope="module")
def loaded(tiny_model):
    from edgeforge.model.loader import load_model

    cache = {}

    def get(shape):
        if shape not in cache:
            cache[shape] = load_model(tiny_model(shape))
        return cache[shape]

    return get


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_quantize_every_scheme_every_shape(tiny_shape, loaded, scheme, tmp_path, caplog):
    shape, _ = tiny_shape
    model = loaded(shape)
    out = tmp_path / "q"
    caplog.set_level(logging.DEBUG, logger="edgeforge")
    summary = write_qdir(model, scheme, out)
    messages = [r.getMessage() for r in caplog.records]
    calibration = [m for m in messages if m.startswith(("[calibrate]", "[gptq]"))]
    assert bool(calibration) == get_scheme(scheme).calibrated  # calibrated schemes measure (or solve) first
    lines = [m for m in messages if re.match(r"\[\d+/\d+\] ", m)]  # one DEBUG record per tensor
    assert summary["tensors"] == len(model.tensors.names()) == len(lines)
    assert lines[-1].startswith(f"[{len(lines)}/{len(lines)}] ")
    n = len(lines)  # and about ten INFO progress lines, the last one complete
    progress = [m for m in messages if m.startswith("[quantize] ")]
    assert 1 <= len(progress) <= 11 and progress[-1].startswith(f"[quantize] {n}/{n} tensors (")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["config.json", "quantization.json", "model-00001-of-00001.safetensors",
                            "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"])
    assert [p.name for p in out.parent.iterdir()] == ["q"]  # no temporary folder left behind

    s = get_scheme(scheme)
    quant = json.loads((out / "quantization.json").read_text())
    assert (quant["format"], quant["version"], quant["scheme"], quant["model_dtype"], quant["group_size"]) == (
        "edgeforge-quant", 1, scheme, s.model_dtype, GROUP_SIZE)
    assert quant["embed_format"] == s.embed_format()
    if s.calibrated:
        assert quant["calibration"]["tokens"] > 0 and len(quant["calibration"]["sha256"]) == 64
        assert any(t.get("scales") == ("gptq" if s.gptq else "searched") for t in quant["tensors"].values())
    else:
        assert quant["calibration"] is None
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "edgeforge-config" and cfg["version"] == 1
    assert {k: cfg[k] for k in model.config.to_dict()} == json.loads(json.dumps(model.config.to_dict()))

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = SafetensorsFile(out / "model-00001-of-00001.safetensors")
    assert sorted(index["weight_map"]) == sorted(shard.keys())
    assert index["metadata"]["total_size"] == sum(shard.get_raw(k).nbytes for k in shard.keys())
    assert set(quant["tensors"]) == set(model.tensors.names())
    for name, entry in quant["tensors"].items():
        expected = s.format_name(name, entry["shape"], None, model.config.num_layers)
        assert entry["format"] == expected, name
        assert entry["shape"] == list(model.tensors.shape(name))
        for role, dtype in STORED_DTYPES[entry["format"]].items():
            key = entry["arrays"][role]
            assert key in index["weight_map"]
            assert str(shard.get_raw(key).dtype) == (dtype or s.scale_dtype)
        if entry["format"] in ("q8", "q4", "q4a"):
            assert entry["scale_dtype"] == s.scale_dtype
            assert entry["arrays"]["scales"] == name[: -len("weight")] + "scales"

    # load_qdir returns exactly the dequantized weights and the same config and tokenizer
    back = load_qdir(out)
    assert back.config.to_dict() == model.config.to_dict()
    assert back.source["format"] == "qdir" and back.source["scheme"] == scheme
    mem = quantize_in_memory(model, scheme)
    for name in model.tensors.names():
        w = back.tensors.get(name)
        assert w.dtype == np.float32 and w.shape == tuple(model.tensors.shape(name))
        np.testing.assert_array_equal(w, mem.tensors.get(name), err_msg=name)
    text = "Maria ran the small library near the church."
    assert list(back.tokenizer.encode(text)) == list(model.tokenizer.encode(text))


def test_embed_bits_8_keeps_embeddings_q8(loaded, tmp_path):
    model = loaded("llama2")  # untied: embed_tokens and lm_head both present
    write_qdir(model, "q4f16", tmp_path / "q", embed_bits=8)
    quant = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert quant["embed_format"] == "q8"
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert quant["tensors"][name]["format"] == "q8"
        assert quant["tensors"][name]["scale_dtype"] == "float16"
    assert quant["tensors"]["model.layers.0.mlp.up_proj.weight"]["format"] == "q4"


@pytest.mark.parametrize("scheme,embed_bits", [("q4f16", None), ("q4f16_m", None), ("q8f16", 8), ("q0f16", None)])
def test_same_input_gives_byte_identical_files(loaded, tmp_path, scheme, embed_bits):
    model = loaded("llama32")
    write_qdir(model, scheme, tmp_path / "a", embed_bits=embed_bits)
    write_qdir(model, scheme, tmp_path / "b", embed_bits=embed_bits)
    a, b = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], name


def test_sharding_splits_and_reads_back_the_same(loaded, tmp_path):
    model = loaded("headdim")
    write_qdir(model, "q4f32", tmp_path / "one")
    write_qdir(model, "q4f32", tmp_path / "many", max_shard_bytes=20_000)
    shards = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    n = len(shards)
    assert n > 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for p in (tmp_path / "many").glob("*.safetensors"):
        f = SafetensorsFile(p)
        size = sum(f.get_raw(k).nbytes for k in f.keys())
        assert size <= 20_000 or len(f.keys()) <= 2  # a tensor bigger than the limit sits alone
    one, many = load_qdir(tmp_path / "one"), load_qdir(tmp_path / "many")
    for name in model.tensors.names():
        np.testing.assert_array_equal(one.tensors.get(name), many.tensors.get(name))
    # the raw arrays are the same too, via the numpy-only runtime reader
    w1, wn = QdirWeights(tmp_path / "one"), QdirWeights(tmp_path / "many")
    for name in w1.names():
        for role, arr in w1.arrays(name).items():
            np.testing.assert_array_equal(arr, wn.arrays(name)[role])


class _BrokenSource:
    """Wraps a TensorSource: adds a tensor or fails on one get(), to test errors mid-write."""

    def __init__(self, inner, extra=None, fail_on=None):
        self.inner, self.extra, self.fail_on = inner, extra or {}, fail_on

    def names(self):
        return self.inner.names() + list(self.extra)

    def shape(self, name):
        return self.extra[name].shape if name in self.extra else self.inner.shape(name)

    def get(self, name):
        if name == self.fail_on:
            raise EdgeforgeError(f"tensor '{name}': simulated read error")
        return self.extra[name] if name in self.extra else self.inner.get(name)


def test_width_not_divisible_names_tensor_and_leaves_nothing(loaded, tmp_path):
    import dataclasses

    model = loaded("llama2")
    bad = dataclasses.replace(model, tensors=_BrokenSource(
        model.tensors, extra={"model.layers.1.mlp.odd_proj.weight": np.ones((8, 40), np.float32)}))
    with pytest.raises(EdgeforgeError, match=r"model\.layers\.1\.mlp\.odd_proj\.weight.*width 40"):
        write_qdir(bad, "q4f16", tmp_path / "q")
    assert list(tmp_path.iterdir()) == []
    write_qdir(bad, "q0f16", tmp_path / "f16")  # f16 has no groups: any width is fine


def test_error_mid_write_leaves_old_output_untouched(loaded, tmp_path):
    import dataclasses

    model = loaded("llama2")
    out = tmp_path / "q"
    write_qdir(model, "q8f16", out)
    before = files_of(out)
    broken = dataclasses.replace(model, tensors=_BrokenSource(model.tensors, fail_on="model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(EdgeforgeError, match="simulated"):
        write_qdir(broken, "q4f16", out)
    assert files_of(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


def test_refuses_to_replace_something_that_is_not_a_qdir(loaded, tmp_path):
    model = loaded("llama2")
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(EdgeforgeError, match="not an edgeforge QDIR.*refusing"):
        write_qdir(model, "q8f16", precious)
    (tmp_path / "file").write_text("x")
    with pytest.raises(EdgeforgeError, match="not a folder"):
        write_qdir(model, "q8f16", tmp_path / "file")
    assert (precious / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "home"]
    (tmp_path / "empty").mkdir()
    write_qdir(model, "q8f16", tmp_path / "empty")  # an empty folder or an old QDIR is fine
    write_qdir(model, "q4f16", tmp_path / "empty")
    assert QdirWeights(tmp_path / "empty").scheme == "q4f16"


def test_inconsistent_qdir_is_refused_with_the_file_named(loaded, tmp_path):
    from edgeforge.runtime.bundle_errors import BundleError

    out = tmp_path / "q"
    write_qdir(loaded("llama2"), "q4f16", out)
    quant_path = out / "quantization.json"
    quant = json.loads(quant_path.read_text())
    quant["tensors"]["model.layers.0.mlp.up_proj.weight"]["scale_dtype"] = "float32"
    quant_path.write_text(json.dumps(quant))
    with pytest.raises(BundleError, match=r"model\.layers\.0\.mlp\.up_proj\.scales.*float16, expected float32"):
        QdirWeights(out).arrays("model.layers.0.mlp.up_proj.weight")
    with pytest.raises(EdgeforgeError, match="up_proj"):
        load_qdir(out).tensors.get("model.layers.0.mlp.up_proj.weight")
    (out / "model-00001-of-00001.safetensors").unlink()
    with pytest.raises(EdgeforgeError, match="model-00001-of-00001.safetensors"):
        load_qdir(out)
    (out / "config.json").write_text('{"format": "something-else"}')
    with pytest.raises(EdgeforgeError, match=r"config\.json.*edgeforge-config"):
        load_qdir(out)


def test_a_qdir_from_before_packed_zero_points_is_refused_with_advice(loaded, tmp_path, capsys):
    """q4a zero points became two a byte (2026-11-27): a QDIR with the old one-a-byte arrays is
    refused by name with what to do, by the reader every consumer uses and by both compilers
    before they build anything (TVM compiles from quantization.json: it checks the shard headers)."""
    from safetensors.numpy import load_file, save_file

    from edgeforge.quant.formats import unpack_zeros

    out = tmp_path / "q"
    write_qdir(loaded("llama2"), "q4f16_m", out)
    shard = out / "model-00001-of-00001.safetensors"
    arrays = load_file(shard)
    name = "model.layers.0.self_attn.q_proj.zeros"
    arrays[name] = unpack_zeros(arrays[name], 64 // GROUP_SIZE)
    save_file(arrays, shard)
    with pytest.raises(EdgeforgeError, match=r"q_proj\.zeros' of tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' has "
                       r"shape \[64, 2\], expected \[64, 1\] \(q4a zero points one a byte: .*quantize the model again\)"):
        load_qdir(out).tensors.get("model.layers.0.self_attn.q_proj.weight")
    for backend in ("tvm", "onnx"):
        code, _, err = run_cli(["compile", str(out), "--target", "x86-cpu", "--backend", backend,
                                "-o", str(tmp_path / backend)], capsys)
        assert code == 2 and "q_proj.zeros" in err and "quantize the model again" in err, (backend, err)
        assert not (tmp_path / backend).exists()


# Bound on the relative RMS error of the logits of the reference run on the dequantized weights
# (||got - float|| / ||float||). Measured on the tiny random models (docs/notes/quant.md):
# q0f32 0, q0f16 <= 8e-4, q8f16 <= 0.022, q4 <= 0.38 (random weights are near-Gaussian, so q4's
# ~10% per-weight noise compounds over the layers); the bounds leave ~1.5-4x margin.
LOGIT_BOUNDS = {"q0f32": 1e-7, "q0f16": 3e-3, "q8f16": 0.06, "q4f16": 0.6, "q4f32": 0.6, "q4f16_m": 0.6,
                "q4f16_rtn": 0.6, "q4f32_rtn": 0.6}


def test_reference_on_qdir_is_close_to_float(tiny_shape, loaded, tmp_path):
    from edgeforge.model.reference import ReferenceModel

    shape, _ = tiny_shape
    model = loaded(shape)
    ids = list(model.tokenizer.encode("The harbor town woke slowly on winter mornings."))[:24]
    ref = ReferenceModel(model).forward(ids)
    errors = {}
    for scheme in sorted(SCHEMES):
        write_qdir(model, scheme, tmp_path / scheme)
        got = ReferenceModel(load_qdir(tmp_path / scheme)).forward(ids)
        errors[scheme] = float(np.sqrt(((got - ref) ** 2).mean() / (ref**2).mean()))
    print(shape, errors)
    for scheme, err in errors.items():
        assert err <= LOGIT_BOUNDS[scheme], (scheme, err)
    # more bits, less error; and q8 vs q4 in the ratio of their steps (127/7 ~ 18): a format that
    # silently dropped precision (or a bound too loose to notice) would break this
    assert errors["q0f16"] < errors["q8f16"] < errors["q4f16"]
    assert 5 < errors["q4f16"] / errors["q8f16"] < 40
    # the calibrated search (with 8-bit embeddings and v) beats round-to-nearest by a margin
    assert errors["q4f16"] < 0.9 * errors["q4f16_rtn"] and errors["q4f32"] < 0.9 * errors["q4f32_rtn"]


# ---- CLI ----------------------------------------------------------------------------------

def test_cli_quantize_json(tiny_model, tmp_path, capsys):
    out = tmp_path / "q"
    code, stdout, stderr = run_cli(["quantize", str(tiny_model("llama32")), "--quant", "q4f16", "-o", str(out), "--json"], capsys)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["scheme"] == "q4f16" and summary["shards"] == 1 and Path(summary["path"]) == out
    n = summary["tensors"]
    assert f"[quantize] {n}/{n} tensors (" in stderr  # progress on stderr (about every 10%)
    assert "model.layers.1.mlp.down_proj.weight" not in stderr  # per tensor only with -v
    assert QdirWeights(out).scheme == "q4f16"


@pytest.mark.parametrize("args,message", [
    (["--quant", "q3f16"], "unknown quantization scheme 'q3f16' (known: q0f32, q0f16, q8f16, q4f16, q4f32, "
                           "q4f16_m, q4f16_rtn, q4f32_rtn)"),
    (["--quant", "q4f16", "--embed-bits", "6"], "--embed-bits"),
])
def test_cli_quantize_bad_options_exit_2_and_write_nothing(tiny_model, tmp_path, capsys, args, message):
    out = tmp_path / "q"
    code, stdout, stderr = run_cli(["quantize", str(tiny_model("llama2")), *args, "-o", str(out)], capsys)
    assert code == 2
    assert stderr.strip().splitlines()[-1] == f"error: {message}" or message in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_quantize_help_has_an_example(capsys):
    code, stdout, _ = run_cli(["quantize", "--help"], capsys)
    assert code == 0 and "Example:" in stdout and "edgeforge quantize" in stdout


@pytest.mark.slow
@pytest.mark.parametrize("scheme,bits", [("q4f16", (5.2, 5.6)), ("q4f16_m", (6.0, 6.3))])
def test_smollm2_qdir_still_answers(smollm2_gguf, tmp_path, capsys, scheme, bits):
    """The real model through `edgeforge quantize` and back: the size is what the scheme's formats
    say (q4: nibbles + one fp16 scale per 32; q4a: + a 4-bit zero point per 32; q8: a byte + one
    scale per 32), and the reference on the dequantized QDIR still answers the chat question like
    the float model (q4f16_m: after GPTQ on the calibration text)."""
    from edgeforge.model.reference import ReferenceModel

    out = tmp_path / "s"
    code, stdout, stderr = run_cli(["quantize", str(smollm2_gguf), "--quant", scheme, "-o", str(out), "--json"], capsys)
    assert code == 0, stderr
    summary = json.loads(stdout)
    model = load_qdir(out)
    params = sum(int(np.prod(model.tensors.shape(n))) for n in model.tensors.names())
    assert 134e6 < params < 136e6
    quant = json.loads((out / "quantization.json").read_text())
    per_weight = {"q4": 0.5 + 2 / 32, "q4a": 0.5 + 2 / 32 + 0.5 / 32, "q8": 1 + 2 / 32, "f32": 4}
    expected = sum(np.prod(t["shape"]) * per_weight[t["format"]] for t in quant["tensors"].values())
    assert abs(summary["bytes"] - expected) < 0.01 * expected
    assert bits[0] < summary["bits_per_weight"] < bits[1]  # SmolLM2: a large embedding share at 8 bits
    engine = ReferenceModel(model)
    ids = model.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    tokens, logits = [], engine.prefill(ids)
    for _ in range(6):
        tokens.append(int(np.argmax(logits)))
        logits = engine.decode(tokens[-1])
    assert model.tokenizer.decode(tokens).startswith("The capital of France is Paris")
