"""edgeforge's own quantized matmul kernels (backends/onnx/kernels, the ONNX Runtime custom op edgeforge.MatMulQ):
built with the host's gcc, loaded by the real onnxruntime, checked against their numpy reference and
against MatMulNBits (same arithmetic), on both instruction sets this CPU can run, and wired into the
x86 graphs, artifacts, bundles and engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from onnx_support import PROMPTS, compile_onnx  # noqa: E402

from edgeforge.backends.onnx import kernels  # noqa: E402
from edgeforge.errors import EdgeforgeError  # noqa: E402
from edgeforge.runtime import hostcheck  # noqa: E402
from edgeforge.runtime.bundle_errors import CannotRunHere  # noqa: E402
from edgeforge.runtime.onnx_engine import OnnxEngine  # noqa: E402
from edgeforge.testing import greedy, relative_errors, step_logits  # noqa: E402

pytestmark = pytest.mark.skipif(kernels.find_compiler() is None or hostcheck.host_arch() != "x86_64"
                                or not {"avx2", "fma", "f16c"} <= (hostcheck.cpu_flags() or set()),
                                reason="needs an x86-64 CPU with AVX2/FMA/F16C and a C compiler")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return kernels.build_library(tmp_path_factory.mktemp("kernlib"))


def _weight(rng, n, k, bits=4):
    """A random MatMulNBits blob (every byte value: 4-bit codes 0-15, 8-bit 0-255) and fp16 scales."""
    blob = rng.integers(0, 256, (n, k // 32, 32 * bits // 8), dtype=np.uint8)
    scales = (rng.random((n, k // 32)) * 0.02 + 0.001).astype(np.float16)
    return blob, scales


def _model(n, k, packed, bits=4, op_k=None):
    node = helper.make_node(kernels.OP, ["x", "w"], ["y"], domain=kernels.DOMAIN, K=op_k or k, N=n, bits=bits)
    graph = helper.make_graph([node], "matmulq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(packed, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)],
                             ir_version=9).SerializeToString()


def _session(library, model, threads=2):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.register_custom_ops_library(str(library))
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _activations(rng, shape, k):
    """Normal values with a few outlier channels (13x), as real activations have."""
    return (rng.standard_normal(shape + (k,)) * np.where(rng.random(k) < 0.03, 13.0, 1.0)).astype(np.float32)


# (N, K): one block, odd block counts (K 96, 160, 576), rows that are no multiple of 8
SHAPES = [(8, 32), (5, 576), (13, 1536), (64, 2048), (7, 160), (1, 96), (130, 256), (17, 8192)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k", SHAPES)
def test_matches_its_reference(library, n, k, bits):
    rng = np.random.default_rng(n * 1000 + k + bits)
    blob, scales = _weight(rng, n, k, bits)
    session = _session(library, _model(n, k, kernels.pack_blocks(blob, scales, bits), bits))
    for m in (1, 2, 3, 5, 17, 64):
        x = _activations(rng, (m,), k)
        got = session.run(None, {"x": x})[0]
        want = kernels.reference(x, blob, scales, bits)
        assert got.shape == (m, n) and got.dtype == np.float32
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 1e-5, (n, k, m, err)  # float32 sums in another order (a layout slip is O(1))
    # a batch of sequences ([B, S, K]) is rows too
    x = _activations(rng, (2, 3), k)
    want = kernels.reference(x.reshape(6, k), blob, scales, bits).reshape(2, 3, n)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], want, rtol=0, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("bits", [4, 8])
def test_same_arithmetic_as_matmul_nbits_accuracy_level_4(library, bits):
    """Both quantize the input to int8 per block of 32 and sum exactly per block: they differ by float
    summation order only (~1e-7), where a float32 product differs by far more."""
    rng = np.random.default_rng(7)
    n, k = 96, 1024
    blob, scales = _weight(rng, n, k, bits)
    ours = _session(library, _model(n, k, kernels.pack_blocks(blob, scales, bits), bits))
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=32, accuracy_level=4)
    graph = helper.make_graph([node], "nbits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(blob, "b"),
                               numpy_helper.from_array(scales.astype(np.float32).reshape(-1), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=9)
    mlas = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = _activations(rng, (9,), k)
    a, b = ours.run(None, {"x": x})[0], mlas.run(None, {"x": x})[0]
    w = (kernels.codes_of(blob, bits).astype(np.float32) - kernels.ZERO_POINT[bits]) * scales.astype(np.float32)[..., None]
    unrounded = x @ w.reshape(n, k).T
    scale = np.abs(b).max()
    assert np.abs(a - b).max() / scale < 2e-6
    assert np.abs(unrounded - b).max() / scale > 1e-3  # the int8 rounding is what both share


@pytest.mark.parametrize("bits", [4, 8])
def test_a_flipped_code_moves_only_its_row(library, bits):
    rng = np.random.default_rng(3)
    n, k = 9, 576
    blob, scales = _weight(rng, n, k, bits)
    x = _activations(rng, (4,), k)
    before = _session(library, _model(n, k, kernels.pack_blocks(blob, scales, bits), bits)).run(None, {"x": x})[0]
    for row, block, byte in ((5, 17, 9), (8, 0, 0), (0, 16, 15)):
        flipped = blob.copy()
        flipped[row, block, byte] ^= 0x10  # one code of that block, +-1 step (4-bit) or +-16 (8-bit)
        after = _session(library, _model(n, k, kernels.pack_blocks(flipped, scales, bits), bits)).run(None, {"x": x})[0]
        moved = np.flatnonzero(np.abs(after - before).max(axis=0) > 0)
        assert moved.tolist() == [row]
        np.testing.assert_allclose(after, kernels.reference(x, flipped, scales, bits), rtol=0,
                                   atol=2e-6 * np.abs(after).max())


def test_zero_rows_and_threads(library):
    """An all-zero input row gives zeros (no 0/0), and 1 or 2 threads give the same bits (each output
    is one thread's sum: the split never changes a sum's order)."""
    rng = np.random.default_rng(11)
    n, k = 40, 512
    blob, scales = _weight(rng, n, k)
    model = _model(n, k, kernels.pack_blocks(blob, scales, 4))
    x = _activations(rng, (6,), k)
    x[2] = 0
    one, two = (_session(library, model, t).run(None, {"x": x})[0] for t in (1, 2))
    assert np.array_equal(one, two)
    assert not np.any(one[2]) and np.isfinite(one).all()


def test_bad_inputs_are_named(library):
    rng = np.random.default_rng(5)
    blob, scales = _weight(rng, 8, 128)
    packed = kernels.pack_blocks(blob, scales, 4)
    with pytest.raises(Exception, match="edgeforge.MatMulQ: W has 576 bytes, the packed weight needs 1152"):
        _session(library, _model(8, 256, packed)).run(None, {"x": np.zeros((1, 256), np.float32)})
    with pytest.raises(Exception, match="W has 576 bytes, the packed weight needs 1088"):  # the 8-bit size
        _session(library, _model(8, 128, packed, bits=8)).run(None, {"x": np.zeros((1, 128), np.float32)})
    with pytest.raises(Exception, match="X's last dimension is 64, K is 128"):
        _session(library, _model(8, 128, packed)).run(None, {"x": np.zeros((1, 64), np.float32)})
    with pytest.raises(Exception, match="K = 100 must be a positive multiple of 32"):
        _session(library, _model(8, 128, packed, op_k=100))
    with pytest.raises(Exception, match="bits = 3, only 4 or 8"):
        _session(library, _model(8, 128, packed, bits=3))
    with pytest.raises(EdgeforgeError, match="are not one 4-bit weight"):
        kernels.pack_blocks(blob[:, :3], scales[:, :2], 4)


@pytest.mark.parametrize("isa", ["avx2", "avx512vnni"])
def test_each_instruction_set(tmp_path, isa):
    """Both kernel sets, whichever this CPU would pick (EDGEFORGE_KERNELS_ISA=avx2 holds a VNNI CPU to
    the AVX2 kernels), each in a child process: the library's choice is made once per process."""
    if isa == "avx512vnni" and "avx512_vnni" not in (hostcheck.cpu_flags() or set()):
        pytest.skip("AVX-512 VNNI unavailable on this CPU")
    child = f"""
import ctypes, sys, numpy as np
sys.path.insert(0, {str(os.path.dirname(__file__))!r})
import test_onnx_kernels as t
from edgeforge.backends.onnx import kernels
lib = kernels.build_library({str(tmp_path)!r})
picked = ctypes.CDLL(str(lib)).edgeforge_kernels_isa
picked.restype = ctypes.c_char_p
print(picked().decode())
rng = np.random.default_rng(1)
for (n, k), bits in [(s, b) for s in t.SHAPES for b in (4, 8)]:
    blob, scales = t._weight(rng, n, k, bits)
    s = t._session(lib, t._model(n, k, kernels.pack_blocks(blob, scales, bits), bits))
    for m in (1, 7, 33):
        x = t._activations(rng, (m,), k)
        want = kernels.reference(x, blob, scales, bits)
        err = np.abs(s.run(None, {{"x": x}})[0] - want).max() / np.abs(want).max()
        assert err < 1e-5, (n, k, m, err)
print("ok")
"""
    env = dict(os.environ)
    env.pop("EDGEFORGE_KERNELS_ISA", None)
    if isa == "avx2":
        env["EDGEFORGE_KERNELS_ISA"] = "avx2"
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.split()
    assert lines[-1] == "ok" and lines[0] == isa


# ---- in the graph, the artifact and the engine ----------------------------------------------------

def _artifacts(tiny_qdir, tmp_path_factory, shape):
    qdir, model, _ = tiny_qdir(shape, "q4f16")
    root = tmp_path_factory.mktemp(f"kart-{shape}")
    ours = compile_onnx(qdir, root / "ours", accuracy_level=4, kernels="edgeforge")
    mlas = compile_onnx(qdir, root / "mlas", accuracy_level=4, kernels="onnxruntime")
    return model, ours, mlas


@pytest.mark.parametrize("shape", ["llama32", "llama2", "headdim"])
def test_graph_engine_and_artifact(tiny_qdir, tmp_path_factory, shape):
    """Every linear runs MatMulQ: q4f16's 4-bit ones and its 8-bit v_proj and head (tied: one packed
    copy the engine also reads embedding rows from). The engine's logits match the MatMulNBits
    graph's within the int8 path's rounding flips."""
    import onnx

    model, ours, mlas = _artifacts(tiny_qdir, tmp_path_factory, shape)
    art = json.loads((ours / "artifact.json").read_text())
    assert kernels.LIBRARY in art["files"] and (ours / kernels.LIBRARY).is_file()
    custom = art["onnx"]["custom_ops"]
    assert custom["library"] == kernels.LIBRARY and custom["source_sha256"] == kernels.source_digest()
    assert art["device_requirements"]["cpu_features"] == ["avx2", "fma", "f16c"] and art["toolchain"]["cc"]
    ops = [n.op_type for n in onnx.load(str(ours / "model.onnx"), load_external_data=False).graph.node]
    layers = model.config.num_layers
    assert ops.count(kernels.OP) == 5 * layers + 1 == custom["count"] and "MatMulNBits" not in ops
    tied = model.config.tie_word_embeddings
    assert json.loads((ours / "artifact.json").read_text())["onnx"]["embedding"].get("layout") == (
        "edgeforge-q8" if tied else None)
    assert "custom_ops" not in json.loads((mlas / "artifact.json").read_text())["onnx"]
    a, b = OnnxEngine(ours), OnnxEngine(mlas)
    np.testing.assert_array_equal(a.embeddings.rows(list(range(40))), b.embeddings.rows(list(range(40))))
    for prompt in PROMPTS:
        ids = model.tokenizer.encode(prompt)
        feed = greedy(b, ids, 8)  # both fed the same tokens (a tiny random model has near ties)
        errs = relative_errors(step_logits(a, ids, 8, feed=feed), step_logits(b, ids, 8, feed=feed))
        assert max(errs) < 0.05, errs


def test_targets_refuse_or_fall_back(tiny_qdir, tmp_path, monkeypatch, caplog):
    # float32 scales (q4f32) would be rounded to the kernels' fp16: MatMulNBits keeps them
    q4f32, _, _ = tiny_qdir("llama32", "q4f32")
    art = compile_onnx(q4f32, tmp_path / "q4f32", accuracy_level=4, kernels="edgeforge")
    assert "custom_ops" not in json.loads((art / "artifact.json").read_text())["onnx"]
    qdir, _, _ = tiny_qdir("llama32", "q4f16")
    with pytest.raises(EdgeforgeError, match="kernels must be one of auto, onnxruntime, edgeforge"):
        compile_onnx(qdir, tmp_path / "bad", accuracy_level=4, kernels="mlas")
    with pytest.raises(EdgeforgeError, match="needs an x86_64 CPU target with float32 compute and accuracy_level 4"):
        compile_onnx(qdir, tmp_path / "lvl0", accuracy_level=0, kernels="edgeforge")
    # auto: the kernels where they fit; at accuracy_level 0, MatMulNBits without a word
    auto = compile_onnx(qdir, tmp_path / "auto", accuracy_level=4)
    assert "custom_ops" in json.loads((auto / "artifact.json").read_text())["onnx"]
    lvl0 = compile_onnx(qdir, tmp_path / "auto0", accuracy_level=0)
    assert "custom_ops" not in json.loads((lvl0 / "artifact.json").read_text())["onnx"]
    # no C compiler: auto warns and falls back; an explicit "edgeforge" is an error that says what to do
    monkeypatch.setattr(kernels, "find_compiler", lambda: None)
    with caplog.at_level("WARNING"):
        plain = compile_onnx(qdir, tmp_path / "nocc", accuracy_level=4)
    assert "custom_ops" not in json.loads((plain / "artifact.json").read_text())["onnx"]
    assert "no C compiler" in caplog.text
    with pytest.raises(EdgeforgeError, match="needs a C compiler"):
        compile_onnx(qdir, tmp_path / "nocc2", accuracy_level=4, kernels="edgeforge")


def test_engine_refuses_a_cpu_without_the_features(tiny_qdir, tmp_path_factory, monkeypatch):
    _, ours, _ = _artifacts(tiny_qdir, tmp_path_factory, "llama32")
    monkeypatch.setattr(hostcheck, "cpu_flags", lambda: {"sse2", "avx"})
    with pytest.raises(CannotRunHere, match="lacks avx2, fma, f16c"):
        OnnxEngine(ours)
    manifest = {"target": {"name": "x86-cpu", "os": hostcheck.host_os(), "arch": "x86_64"},
                "device_requirements": {"cpu_features": ["avx2", "fma", "f16c"]}}
    with pytest.raises(CannotRunHere, match="cannot run here: target 'x86-cpu' runs kernels that need"):
        hostcheck.check_can_run(manifest)


@pytest.mark.parametrize("bits", [4, 8])
def test_embedding_rows_read_from_the_kernels_layout(tmp_path, bits):
    """A tied head in the kernels' layout is also the embedding table: rows picked out of their group
    of 8 equal the dequantized weight, for every lane and a vocabulary that is no multiple of 8."""
    from edgeforge.runtime.embedding import EmbeddingTable

    rng = np.random.default_rng(21)
    vocab, hidden = 29, 96
    blob, scales = _weight(rng, vocab, hidden, bits)
    packed = kernels.pack_blocks(blob, scales, bits)
    (tmp_path / "data.bin").write_bytes(b"\0" * 100 + packed.tobytes())
    groups = -(-vocab // 8)
    spec = {"kind": "quantized", "bits": bits, "block_size": 32, "layout": kernels.layout(bits),
            "packed": {"file": "data.bin", "offset": 100, "length": int(packed.size), "dtype": "uint8",
                       "shape": [groups, hidden // 32 * kernels.kernel_block_bytes(bits)]}}
    table = EmbeddingTable(tmp_path, spec, vocab, hidden)
    want = (kernels.codes_of(blob, bits).astype(np.float32) - kernels.ZERO_POINT[bits]) * scales.astype(np.float32)[..., None]
    ids = [0, 7, 8, 28, 13, 13, 1]
    np.testing.assert_array_equal(table.rows(ids), want.reshape(vocab, hidden)[ids])
    table.close()
    with pytest.raises(Exception, match=f"an edgeforge-q{bits} embedding must be {bits}-bit in blocks of 32"):
        EmbeddingTable(tmp_path, {**spec, "bits": 12 - bits}, vocab, hidden)
    with pytest.raises(Exception, match="embedding layout 'other' is not one this runtime reads"):
        EmbeddingTable(tmp_path, {**spec, "layout": "other"}, vocab, hidden)


@pytest.mark.parametrize("shape", ["llama32", "llama2"])
def test_a_4bit_head_runs_the_kernels(tiny_model, tmp_path, shape):
    """--embed-bits 4: the head is a 4-bit MatMulQ (tied: one packed copy that the engine also reads its
    embedding rows from, layout edgeforge-q4; untied: the head packed, the table as before), and the
    engine matches the MatMulNBits graph of the same QDIR."""
    import onnx

    from edgeforge.model.loader import load_model
    from edgeforge.quant.qdir import write_qdir

    model = load_model(tiny_model(shape))
    qdir = tmp_path / "qdir"
    write_qdir(model, "q4f16", qdir, embed_bits=4)
    ours = compile_onnx(qdir, tmp_path / "ours", accuracy_level=4, kernels="edgeforge")
    mlas = compile_onnx(qdir, tmp_path / "mlas", accuracy_level=4, kernels="onnxruntime")
    art = json.loads((ours / "artifact.json").read_text())["onnx"]
    nodes = onnx.load(str(ours / "model.onnx"), load_external_data=False).graph.node
    head = [n for n in nodes if n.name == "lm_head"]
    assert len(head) == 1 and head[0].op_type == kernels.OP
    tied = shape == "llama32"
    assert art["embedding"].get("layout") == ("edgeforge-q4" if tied else None)
    assert {a.name: a.i for a in head[0].attribute}["bits"] == 4
    a, b = OnnxEngine(ours), OnnxEngine(mlas)
    np.testing.assert_array_equal(a.embeddings.rows(list(range(40))), b.embeddings.rows(list(range(40))))
    for prompt in PROMPTS:
        ids = model.tokenizer.encode(prompt)
        feed = greedy(b, ids, 6)
        errs = relative_errors(step_logits(a, ids, 6, feed=feed), step_logits(b, ids, 6, feed=feed))
        assert max(errs) < 0.05, errs


def test_an_artifact_cannot_name_another_library(tiny_qdir, tmp_path_factory, tmp_path):
    """artifact.json picks which native library the runner loads: anything but our one file name in
    the artifact folder is refused before onnxruntime sees it."""
    import shutil

    from edgeforge.runtime.bundle_errors import BundleError

    _, ours, _ = _artifacts(tiny_qdir, tmp_path_factory, "llama32")
    for bad in ("../libedgeforge_kernels.so", "/usr/lib/x86_64-linux-gnu/libm.so.6", "model.onnx", None):
        art = tmp_path / f"a{abs(hash(bad))}"
        shutil.copytree(ours, art)
        info = json.loads((art / "artifact.json").read_text())
        info["onnx"]["custom_ops"]["library"] = bad
        (art / "artifact.json").write_text(json.dumps(info))
        with pytest.raises(BundleError, match="onnx.custom_ops must name libedgeforge_kernels.so"):
            OnnxEngine(art)
    gone = tmp_path / "gone"
    shutil.copytree(ours, gone)
    (gone / kernels.LIBRARY).unlink()
    with pytest.raises(BundleError, match="missing"):
        OnnxEngine(gone)
