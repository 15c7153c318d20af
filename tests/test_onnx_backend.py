"""ONNX backend on the tiny models: the compiled graph run by ONNX Runtime (CPU) against the numpy
reference of the same quantized weights, errors named, and GPU targets refusing to run on a CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx_support import PROMPTS, compile_onnx, record  # noqa: E402

from edgeforge.testing import greedy, relative_errors, step_logits  # noqa: E402

from edgeforge.errors import EdgeforgeError  # noqa: E402
from edgeforge.runtime.bundle_errors import BundleError, CannotRunHere  # noqa: E402
from edgeforge.runtime.loader import open_engine  # noqa: E402
from edgeforge.runtime.onnx_engine import OnnxEngine  # noqa: E402

# (shape, scheme): every tiny shape at q4f32 and q8f16, the other schemes on the GQA+tied shape.
CASES = [("llama2", "q4f32"), ("llama32", "q4f32"), ("headdim", "q4f32"),
         ("llama2", "q8f16"), ("llama32", "q8f16"), ("headdim", "q8f16"),
         ("llama32", "q4f16"), ("llama32", "q4f16_m"), ("llama32", "q4f16_rtn"), ("llama32", "q0f32"),
         ("headdim", "q0f16"), ("llama2", "q4f16_m")]
GREEDY_TOKENS = 32


@pytest.fixture(scope="module")
def built(tiny_qdir):
    """(shape, scheme) -> (loaded QDIR model, reference engine, {accuracy level: artifact dir})."""
    cache = {}

    def get(shape, scheme):
        if (shape, scheme) not in cache:
            qdir, model, ref = tiny_qdir(shape, scheme)
            # next to the QDIR: tests reach it as arts[level].parent / "qdir"
            arts = {lvl: compile_onnx(qdir, qdir.parent / f"onnx-art{lvl}", accuracy_level=lvl) for lvl in (0, 4)}
            cache[(shape, scheme)] = (model, ref, arts)
        return cache[(shape, scheme)]

    return get


@pytest.mark.parametrize("shape,scheme", CASES)
def test_logits_and_greedy_tokens_match_reference(built, shape, scheme):
    model, ref, arts = built(shape, scheme)
    engine = open_engine(arts[0])
    assert isinstance(engine, OnnxEngine) and engine.device == "cpu"
    for prompt in PROMPTS:
        ids = model.tokenizer.encode(prompt)
        expected_tokens = greedy(ref, ids, GREEDY_TOKENS)
        # Teacher-forced on the reference's tokens, so every step compares the same sequence.
        expected = step_logits(ref, ids, 8, feed=expected_tokens)
        got = step_logits(engine, ids, 8, feed=expected_tokens)
        errs = relative_errors(got, expected)
        assert max(errs) <= 1e-3, f"{shape} {scheme} '{prompt}': max abs error / logit range per step {errs}"
        assert all(g.dtype == np.float32 and g.shape == (model.config.vocab_size,) for g in got)
        assert greedy(engine, ids, GREEDY_TOKENS) == expected_tokens, f"{shape} {scheme} '{prompt}'"


@pytest.mark.parametrize("shape,scheme", [("llama32", "q8f16"), ("headdim", "q4f16")])
def test_float16_compute_graph(built, shape, scheme, tmp_path):
    """compute_dtype float16 (what GPU and ARM targets get for *f16 schemes), run on the CPU here.

    float16 activations round every matmul input and output (~2.4e-4 relative each), so the
    bound is 3e-3 of the logit range instead of 1e-3, and the argmax must agree wherever the
    reference's top-2 gap is larger than that bound (a random tiny model has near ties).
    """
    model, ref, arts = built(shape, scheme)
    art = compile_onnx(arts[0].parent / "qdir", tmp_path / "f16", accuracy_level=0, compute_dtype="float16")
    assert json.loads((art / "artifact.json").read_text())["onnx"]["kv_dtype"] == "float16"
    engine = OnnxEngine(art)
    for prompt in PROMPTS:
        ids = model.tokenizer.encode(prompt)
        expected_tokens = greedy(ref, ids, GREEDY_TOKENS)
        got = step_logits(engine, ids, 16, feed=expected_tokens)
        want = step_logits(ref, ids, 16, feed=expected_tokens)
        errs = relative_errors(got, want)
        print(f"float16 compute {shape} {scheme}: max error / logit range {max(errs):.2e}")
        assert max(errs) <= 3e-3, errs
        for step, (g, w) in enumerate(zip(got, want)):
            top2 = np.sort(w)[-2:]
            if top2[1] - top2[0] > 2 * 3e-3 * np.ptp(w):  # each of the two may be off by the bound
                assert np.argmax(g) == np.argmax(w), f"step {step}"


@pytest.mark.parametrize("shape,scheme", [("llama32", "q4f32"), ("headdim", "q8f16")])
def test_accuracy_level_4_reported(built, shape, scheme, tmp_path_factory):
    """int8 activations: not exact; the error and greedy agreement are recorded, with a loose bound."""
    model, ref, arts = built(shape, scheme)
    engine = OnnxEngine(arts[4])
    report = tmp_path_factory.getbasetemp() / "onnx-accuracy-level-4.jsonl"
    for prompt in PROMPTS:
        ids = model.tokenizer.encode(prompt)
        expected_tokens = greedy(ref, ids, GREEDY_TOKENS)
        errs = relative_errors(step_logits(engine, ids, 8, feed=expected_tokens),
                               step_logits(ref, ids, 8, feed=expected_tokens))
        got_tokens = greedy(engine, ids, GREEDY_TOKENS)
        agree = next((i for i, (a, b) in enumerate(zip(got_tokens, expected_tokens)) if a != b), GREEDY_TOKENS)
        entry = {"shape": shape, "scheme": scheme, "prompt": prompt, "max_rel_err": max(errs), "greedy_agree": agree}
        record(report, entry)
        print("accuracy_level 4:", json.dumps(entry))
        assert max(errs) < 0.05, entry


def test_kv_buffer_growth_keeps_the_sequence(built, monkeypatch):
    """The CPU KV buffer starts small and doubles; rows written before a growth must survive it."""
    from edgeforge.runtime import onnx_engine

    model, ref, arts = built("llama32", "q4f32")
    monkeypatch.setattr(onnx_engine, "FIRST_CAPACITY", 4)
    engine = OnnxEngine(arts[0])
    ids = model.tokenizer.encode(PROMPTS[1])
    feed = greedy(ref, ids, 20)
    errs = relative_errors(step_logits(engine, ids, 20, feed=feed), step_logits(ref, ids, 20, feed=feed))
    assert engine.capacity >= len(ids) + 20 and engine.capacity < 256
    assert max(errs) <= 1e-3, errs
    short = OnnxEngine(arts[0], max_length=len(ids) + 2)
    short.prefill(ids)
    short.decode(feed[0])
    short.decode(feed[1])
    with pytest.raises(BundleError, match="max_length"):
        short.decode(feed[2])


def test_copy_kv_mode_gives_the_same_logits(built):
    """kv_mode copy (what WebGPU uses: exact-length past, new present per step), checked on the CPU."""
    model, ref, arts = built("headdim", "q4f32")
    ids = model.tokenizer.encode(PROMPTS[2])
    feed = greedy(ref, ids, 12)
    shared = step_logits(OnnxEngine(arts[0], kv_mode="shared"), ids, 12, feed=feed)
    copy_engine = OnnxEngine(arts[0], kv_mode="copy")
    step_logits(copy_engine, ids[:3], 4)  # a previous sequence: reset() must drop it
    copy = step_logits(copy_engine, ids, 12, feed=feed)
    assert max(relative_errors(copy, shared)) <= 1e-6
    assert max(relative_errors(copy, step_logits(ref, ids, 12, feed=feed))) <= 1e-3


def test_artifact_is_self_describing_and_checker_clean(built):
    _, _, arts = built("llama32", "q4f32")
    art = json.loads((arts[4] / "artifact.json").read_text())
    assert art["backend"] == "onnx" and art["needs_weights"] is False
    assert art["onnx"]["accuracy_level"] == 4 and art["onnx"]["execution_provider"] == "CPUExecutionProvider"
    assert sorted(p.name for p in arts[4].iterdir()) == sorted(art["files"] + ["artifact.json"])
    onnx.checker.check_model(str(arts[4] / "model.onnx"))
    graph = onnx.load(str(arts[4] / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in graph.graph.node}
    assert {"MatMulNBits", "GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    assert graph.ir_version == 10 and {o.domain: o.version for o in graph.opset_import}[""] == 21
    # The engine looks the embedding rows up itself: no gather in the graph, inputs_embeds in.
    assert not ops & {"Gather", "GatherBlockQuantized"}
    assert graph.graph.input[0].name == "inputs_embeds" == art["onnx"]["input"]
    # Tied embeddings: the head reads the very bytes the engine's rows come from (one copy).
    head = next(n for n in graph.graph.node if n.name == "lm_head")
    assert list(head.input[1:3]) == ["model.embed_tokens.qweight.0", "model.embed_tokens.scales.0"]
    where = {t.name: {e.key: e.value for e in t.external_data} for t in graph.graph.initializer}
    emb = art["onnx"]["embedding"]
    assert emb["kind"] == "quantized" and emb["bits"] == 8  # q4f32 keeps the embedding at 8 bits
    for role, init in (("blob", head.input[1]), ("scales", head.input[2])):
        assert (str(emb[role]["offset"]), str(emb[role]["length"])) == (where[init]["offset"], where[init]["length"])


@pytest.mark.parametrize("shape", ["llama32", "llama2"])  # tied (chunks = the engine's table) and untied
def test_a_head_split_in_chunks_gives_the_same_logits(built, shape, tmp_path, monkeypatch):
    """Big heads become several MatMulNBits over row ranges (bounding ONNX Runtime's prepacking
    peak); forced here on a tiny model with small pages: same logits, and a tied table still one
    contiguous range that the engine reads its rows from."""
    from edgeforge.backends.onnx import graph as onnx_graph

    _, ref, arts = built(shape, "q4f32")
    monkeypatch.setattr(onnx_graph, "PAGE", 256)
    monkeypatch.setattr(onnx_graph, "HEAD_CHUNK_BYTES", 4096)
    art = compile_onnx(arts[0].parent / "qdir", tmp_path / "chunked", accuracy_level=0)
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    heads = [n for n in model.graph.node if n.name.startswith("lm_head.")]
    assert len(heads) > 3 and all(n.op_type == "MatMulNBits" for n in heads)
    assert sum(int(next(a.i for a in n.attribute if a.name == "N")) for n in heads) == ref.config.vocab_size
    a, b = OnnxEngine(arts[0]), OnnxEngine(art)
    ids = [1, 5, 9, 200, 3]
    np.testing.assert_array_equal(a.prefill(ids), b.prefill(ids))
    np.testing.assert_array_equal(a.decode(7), b.decode(7))
    assert (arts[4] / "model.onnx").stat().st_size < 200_000  # weights live in the data file


def test_mixed_bits_fuse_what_shares_a_width(built):
    """q4f16 keeps v_proj at 8 bits: q and k (4-bit) still share one node, v gets its own, and their
    outputs are concatenated in q, k, v order; gate/up stay one node (the logits test above checks the
    numbers). At accuracy_level 4 on x86 these are edgeforge.MatMulQ (tests/test_onnx_kernels.py), at 0
    MatMulNBits."""
    _, _, arts = built("llama32", "q4f16")
    graph = onnx.load(str(arts[4] / "model.onnx"), load_external_data=False)
    nodes = {n.name: n for n in graph.graph.node}
    layer = "model.layers.0"
    qk, v = nodes[f"{layer}.self_attn.qkv_proj.0"], nodes[f"{layer}.self_attn.qkv_proj.1"]
    attrs = {n.name: {a.name: a.i for a in n.attribute} for n in (qk, v)}
    assert qk.op_type == v.op_type == "MatMulQ" and attrs[qk.name]["N"] == 128 + 32  # q: 8 heads x 16, k: 2 x 16
    assert attrs[qk.name]["bits"] == 4 and attrs[v.name]["bits"] == 8
    level0 = {n.name: n for n in onnx.load(str(arts[0] / "model.onnx"), load_external_data=False).graph.node}
    assert {level0[n.name].op_type for n in (qk, v)} == {"MatMulNBits"}
    assert f"{layer}.self_attn.qkv_proj.2" not in nodes
    concat = nodes[f"{layer}.self_attn.qkv_proj.concat"]
    assert list(concat.input) == [qk.output[0], v.output[0]]
    per_layer = [n for n in graph.graph.node if n.op_type == "MatMulQ" and n.name.startswith(layer + ".")]
    assert len(per_layer) == 5, [n.name for n in per_layer]  # q+k, v, o, gate+up, down


def test_build_is_reproducible(built, tmp_path):
    _, _, arts = built("headdim", "q8f16")
    again = compile_onnx(arts[4].parent / "qdir", tmp_path / "art4", accuracy_level=4)
    for name in ("model.onnx", "model.onnx.data"):
        assert (again / name).read_bytes() == (arts[4] / name).read_bytes(), name


@pytest.mark.parametrize("provider", ["CUDAExecutionProvider", "WebGpuExecutionProvider"])
def test_gpu_target_without_its_provider_fails_loudly(built, tmp_path, provider):
    if provider in ort.get_available_providers():
        pytest.skip(f"{provider} is installed here: the provider-unavailable case needs a machine without it")
    _, _, arts = built("llama32", "q4f32")
    art = compile_onnx(arts[0].parent / "qdir", tmp_path / "gpu", provider=provider, accuracy_level=0)
    with pytest.raises(CannotRunHere, match=provider):
        open_engine(art)
    # Asked explicitly for the CPU, the same artifact runs there.
    assert OnnxEngine(art, device="cpu").device == "cpu"


def test_bad_target_and_qdir_errors_name_the_culprit(built, tmp_path):
    from onnx_support import target_file

    from edgeforge.backends import compile_qdir

    _, _, arts = built("llama32", "q4f32")
    qdir = arts[0].parent / "qdir"
    bad = target_file(tmp_path, "bad", "NoSuchExecutionProvider", 0)
    with pytest.raises(EdgeforgeError, match="execution_provider"):
        compile_qdir(qdir, str(bad), "onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    broken = tmp_path / "qdir"
    broken.mkdir()
    for f in qdir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    quant = json.loads((broken / "quantization.json").read_text())
    del quant["tensors"]["model.layers.1.mlp.down_proj.weight"]
    (broken / "quantization.json").write_text(json.dumps(quant))
    with pytest.raises(EdgeforgeError, match="model.layers.1.mlp.down_proj.weight"):
        compile_qdir(broken, str(target_file(tmp_path, "ok", "CPUExecutionProvider", 0)), "onnx", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_cli_compile_json(built, tmp_path, capsys):
    from edgeforge.cli import main

    _, _, arts = built("llama32", "q4f32")
    with pytest.raises(SystemExit) as exit_info:
        main(["compile", str(arts[0].parent / "qdir"), "--target", "x86-cpu", "--backend", "onnx",
              "-o", str(tmp_path / "out"), "--json"])
    assert exit_info.value.code == 0
    art = json.loads(capsys.readouterr().out)
    assert art["backend"] == "onnx" and art["target"] == "x86-cpu" and art["onnx"]["compute_dtype"] == "float32"
    assert OnnxEngine(tmp_path / "out").prefill([1, 2, 3]).shape == (art["onnx"]["vocab_size"],)
