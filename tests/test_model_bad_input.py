"""Bad model input through the CLI: exit code 2 and one line `error: ...` naming the path/tensor."""

from __future__ import annotations

import json
import shutil

import pytest

from edgeforge.cli import main

from tiny_gguf import write_gguf


def run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed (e.g. transformers' progress bars)
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def assert_error(capsys, args, *needles):
    code, out, err = run_cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def folder(tiny_model, tmp_path):
    """A private copy of the tiny llama32 folder to break."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_model("llama32"), dst)
    return dst


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("command", ["inspect", "generate"])
def test_missing_path(capsys, tmp_path, command):
    missing = tmp_path / "no" / "such-model"
    extra = ["--prompt", "hi"] if command == "generate" else []
    assert_error(capsys, [command, str(missing), *extra], missing)


@pytest.mark.parametrize("command", ["inspect", "generate"])
def test_truncated_safetensors(capsys, folder, command):
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    extra = ["--prompt", "hi"] if command == "generate" else []
    assert_error(capsys, [command, str(folder), *extra], f, "truncated")


def test_tensor_shape_mismatch(capsys, folder):
    edit_config(folder, intermediate_size=200)
    line = assert_error(capsys, ["inspect", str(folder)], folder / "model.safetensors", "mlp.")
    assert "[256, 128]" in line or "[128, 256]" in line  # the shape on disk is named too


def test_missing_tensor(capsys, folder):
    edit_config(folder, num_hidden_layers=3)
    assert_error(capsys, ["generate", str(folder), "-p", "hi"], folder, "model.layers.2.")


@pytest.mark.parametrize("arch, model_type", [("MixtralForCausalLM", "mixtral"), ("GPT2LMHeadModel", "gpt2")])
def test_unknown_architecture(capsys, folder, arch, model_type):
    edit_config(folder, architectures=[arch], model_type=model_type)
    assert_error(capsys, ["inspect", str(folder)], folder / "config.json", arch)


def test_llama_with_biases_is_refused(capsys, folder):
    edit_config(folder, attention_bias=True)
    assert_error(capsys, ["inspect", str(folder)], folder / "config.json", "attention_bias")


def test_unsupported_rope_scaling(capsys, folder):
    edit_config(folder, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    assert_error(capsys, ["inspect", str(folder)], folder / "config.json", "yarn")


def test_missing_tokenizer(capsys, folder):
    (folder / "tokenizer.json").unlink()
    assert_error(capsys, ["generate", str(folder), "-p", "hi"], folder, "tokenizer")


def test_bad_config_json(capsys, folder):
    (folder / "config.json").write_text("{not json")
    assert_error(capsys, ["inspect", str(folder)], folder / "config.json")


def test_gguf_bad_magic(capsys, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(200))
    assert_error(capsys, ["inspect", str(bad)], bad, "magic")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_gguf_truncated(capsys, tiny_model, tmp_path, keep):
    """Cut in the metadata (half) and in the last tensor (almost all)."""
    path = write_gguf(tiny_model("llama32"), tmp_path / "m.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    assert_error(capsys, ["generate", str(path), "-p", "hi"], path)


def test_not_a_model(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert_error(capsys, ["inspect", str(tmp_path / "notes.txt")], tmp_path / "notes.txt")
    assert_error(capsys, ["inspect", str(tmp_path)], tmp_path)


def test_good_model_exits_0_with_json(capsys, tiny_model):
    """The same CLI path succeeds on an intact model (so the errors above come from the damage)."""
    code, out, err = run_cli(capsys, "generate", str(tiny_model("llama32")), "-p", "hello", "-n", "4", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert len(result["tokens"]) <= 4 and result["prompt_tokens"] == len(result["prompt_ids"])
    code, streamed, _ = run_cli(capsys, "generate", str(tiny_model("llama32")), "-p", "hello", "-n", "4")
    assert code == 0 and streamed == result["text"] + "\n"  # streamed text is the decoded whole
    code, out, _ = run_cli(capsys, "inspect", str(tiny_model("llama32")), "--json")
    info = json.loads(out)
    assert code == 0 and info["architecture"] == "LlamaForCausalLM" and info["config"]["num_kv_heads"] == 2


def test_fetch_model_unknown_name(capsys):
    assert_error(capsys, ["fetch-model", "no-such-model-xyz"], "no-such-model-xyz")


def test_generate_chat_without_template(capsys, tiny_model):
    folder = tiny_model("llama2")  # sentencepiece only: no chat template
    assert_error(capsys, ["generate", str(folder), "--chat", "-p", "hi"], "chat template")


def test_generate_dispatches_a_bundle_to_its_engine(capsys, tiny_model, tmp_path):
    """`generate BUNDLE` runs the bundle's compiled engine (ONNX here: quick to build), not the reference."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = str(tiny_model("llama32"))
    code, out, err = run_cli(capsys, "build", model, "--quant", "q4f32", "--target", "x86-cpu", "--backend", "onnx",
                             "-o", str(tmp_path / "dist"), "--json")
    assert code == 0, err
    bundle = next((tmp_path / "dist").iterdir())
    code, out, err = run_cli(capsys, "generate", str(bundle), "-p", "hello there", "-n", "5", "--json")
    assert code == 0, err
    result = json.loads(out)
    code, ref_out, _ = run_cli(capsys, "generate", model, "-p", "hello there", "-n", "5", "--json")
    assert result["engine"] == "bundle" and json.loads(ref_out)["engine"] == "reference"
    assert result["prompt_ids"] == json.loads(ref_out)["prompt_ids"] and len(result["tokens"]) == 5


# ---- issue 21, item 6: refused up front, by name, never coerced ----------------------------------

@pytest.mark.parametrize("changes,needle", [
    ({"tie_word_embeddings": "no"}, "'tie_word_embeddings' must be true or false"),
    ({"tie_word_embeddings": 1}, "'tie_word_embeddings' must be true or false"),
    ({"num_key_value_heads": 2.7}, "'num_key_value_heads' must be an integer"),
    ({"head_dim": "32"}, "'head_dim' must be an integer"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 0, "rope_theta": 1e4}}, "rope scaling factor"),
    ({"rope_parameters": {"rope_type": "linear", "factor": -2.0, "rope_theta": 1e4}}, "rope scaling factor"),
    ({"rope_parameters": {"rope_type": "linear", "factor": "2", "rope_theta": 1e4}}, "rope scaling factor"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": "1e4"}}, "'rope_theta'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64, "rope_theta": 1e4}}, "high_freq_factor"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 6.5, "rope_theta": 1e4}}, "original_max_position_embeddings"),
    ({"rope_parameters": "linear"}, "'rope_parameters' must be an object"),
    ({"rope_parameters": None, "rope_scaling": ["linear"]}, "'rope_scaling' must be an object"),
])
def test_config_types_are_not_coerced(capsys, folder, changes, needle):
    edit_config(folder, **changes)
    assert_error(capsys, ["inspect", str(folder)], "config.json", needle)


@pytest.mark.parametrize("option", [["--temperature", "nan"], ["--temperature", "inf"], ["--top-p", "nan"],
                                    ["--temperature", "1", "--top-p", "-inf"]])
def test_sampling_values_must_be_finite(capsys, tiny_model, option):
    assert_error(capsys, ["generate", str(tiny_model("llama32")), "-p", "hi", *option], option[-2])


def test_unknown_quant_is_refused_before_the_model_loads(capsys, tmp_path, monkeypatch):
    import edgeforge.model.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *_: pytest.fail("the model was loaded"))
    assert_error(capsys, ["build", str(tmp_path), "--quant", "q5f16", "--target", "x86-cpu", "-o", str(tmp_path / "o")],
                 "--quant", "q5f16")


def test_fetch_model_refuses_a_folder_that_is_no_model(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    assert_error(capsys, ["fetch-model", str(tmp_path)], str(tmp_path), "not a model")


def _header(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(path, header, data):
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


@pytest.mark.parametrize("shard", ["../elsewhere.safetensors", "/etc/passwd", "sub/../../x.safetensors", ".."])
def test_index_shards_must_stay_in_the_model_folder(capsys, folder, tmp_path, shard):
    header, _ = _header(folder / "model.safetensors")
    (folder / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    index = {"metadata": {}, "weight_map": {name: shard for name in header if name != "__metadata__"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_error(capsys, ["inspect", str(folder)], "model.safetensors.index.json", "not a file name in the model's folder")


def test_overlapping_tensors_are_refused(capsys, folder):
    """A header whose tensors share bytes (same shape: the aliasing would otherwise load silently)."""
    path = folder / "model.safetensors"
    header, data = _header(path)
    same = {}
    for name, entry in header.items():
        if name != "__metadata__":
            same.setdefault(tuple(entry["shape"]), []).append(name)
    a, b = next(names for names in same.values() if len(names) > 1)[:2]
    header[b]["data_offsets"] = header[a]["data_offsets"]
    _write_header(path, header, data)
    for command in (["inspect", str(folder)], ["quantize", str(folder), "--quant", "q8f16", "-o", str(folder.parent / "q")]):
        assert_error(capsys, command, "model.safetensors", "overlap")
