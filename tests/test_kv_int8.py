"""Issue 24: the int8 KV cache (`--kv-cache int8`, ONNX on CPU with float32 compute).

ONNX Runtime's GroupQueryAttention is checked against our numpy emulation of the cache
(model/reference.int8_kv) at the op level; a tiny bundle built with it passes its own smoke test
against golden data that rounds K/V the same way, and follows the float cache's greedy tokens; the
manifest records it; an artifact.json whose kv_dtype is not its graph's is refused; TVM refuses the
option by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from bundle_helpers import build_json, cli, resign  # noqa: E402
from edgeforge.model.kv_int8 import KvInt8Hook, KvQuant, KvRanges  # noqa: E402
from edgeforge.model.reference import int8_kv  # noqa: E402
from edgeforge.runtime.bundle_errors import BundleError  # noqa: E402
from edgeforge.runtime.onnx_engine import OnnxEngine  # noqa: E402
from onnx_support import compile_onnx  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def _gqa(int8: bool):
    """One GroupQueryAttention (no rotary) over a shared past/present cache, float or int8 with
    PER_CHANNEL scales: the node the ONNX builder emits per layer."""
    cache = TensorProto.INT8 if int8 else TensorProto.FLOAT
    inputs = ["qkv", "", "", "pk", "pv", "seqlens_k", "total", "", "", "", "", ""] + (["ks", "vs"] if int8 else [])
    attrs = {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8} if int8 else {}
    node = helper.make_node("GroupQueryAttention", inputs, ["out", "ck", "cv"], domain="com.microsoft",
                            num_heads=HEADS, kv_num_heads=KV_HEADS, local_window_size=-1, **attrs)
    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    ins = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, None, width]),
           helper.make_tensor_value_info("pk", cache, [1, KV_HEADS, None, HEAD_DIM]),
           helper.make_tensor_value_info("pv", cache, [1, KV_HEADS, None, HEAD_DIM]),
           helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
           helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    ins += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, KV_HEADS, 1, HEAD_DIM]) for n in ("ks", "vs")] if int8 else []
    outs = [helper.make_tensor_value_info(n, t, None) for n, t in (("out", TensorProto.FLOAT), ("ck", cache), ("cv", cache))]
    model = helper.make_model(helper.make_graph([node], "gqa", ins, outs),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _run_steps(session, steps, cache_dtype, scales=None):
    """Feed `steps` (each [1, S, width]) through one shared cache; (outputs per step, key cache, value cache)."""
    pk = np.zeros((1, KV_HEADS, 16, HEAD_DIM), cache_dtype)
    pv = np.zeros_like(pk)
    keys, values = ort.OrtValue.ortvalue_from_numpy(pk), ort.OrtValue.ortvalue_from_numpy(pv)
    outs, total = [], 0
    for x in steps:
        total += x.shape[1]
        io = session.io_binding()
        feed = {"qkv": x, "seqlens_k": np.array([total - 1], np.int32), "total": np.array(total, np.int32)}
        if scales is not None:
            feed.update(ks=scales[0][None, :, None, :], vs=scales[1][None, :, None, :])
        for name, value in feed.items():
            io.bind_cpu_input(name, np.ascontiguousarray(value))
        io.bind_ortvalue_input("pk", keys)
        io.bind_ortvalue_input("pv", values)
        io.bind_ortvalue_output("ck", keys)
        io.bind_ortvalue_output("cv", values)
        io.bind_output("out", "cpu")
        session.run_with_iobinding(io)
        outs.append(io.get_outputs()[2].numpy()[0])
    return outs, pk[0, :, :total], pv[0, :, :total]


def _attention(q, k, v):
    """Causal GQA in float64 over all of k, v ([kv_heads, T, D]) for the last len(q) positions."""
    s, t = q.shape[0], k.shape[1]
    q = q.reshape(s, HEADS, HEAD_DIM)
    out = np.zeros((s, HEADS, HEAD_DIM))
    for h in range(HEADS):
        g = h // (HEADS // KV_HEADS)
        scores = q[:, h] @ k[g].T / np.sqrt(HEAD_DIM)
        for i in range(s):
            row = scores[i, : t - s + i + 1]
            p = np.exp(row - row.max())
            out[i, h] = (p / p.sum()) @ v[g, : t - s + i + 1]
    return out.reshape(s, HEADS * HEAD_DIM)


def test_ort_int8_cache_is_our_numpy_emulation():
    """What the int8 cache stores is rint(x / scale) saturated to [-128, 127] (ties to even), and
    attention, prefill included, reads those values times the scale: the emulation golden data uses."""
    rng = np.random.default_rng(0)
    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    prompt = rng.standard_normal((1, 5, width)).astype(np.float32) * 3
    step = rng.standard_normal((1, 1, width)).astype(np.float32) * 3
    ks = rng.uniform(0.02, 0.05, (KV_HEADS, HEAD_DIM)).astype(np.float32)
    vs = rng.uniform(0.02, 0.05, (KV_HEADS, HEAD_DIM)).astype(np.float32)
    k0 = HEADS * HEAD_DIM  # first key column: KV head 0, channel 0
    prompt[0, 0, k0], prompt[0, 0, k0 + 3] = 100.0, -100.0  # saturate at 127 and -128
    prompt[0, 1, k0 + 2] = 2.5 * ks[0, 2]  # a tie: rounds to 2 (even), not 3
    outs, kq, vq = _run_steps(_gqa(True), [prompt, step], np.int8, (ks, vs))
    float_outs, _, _ = _run_steps(_gqa(False), [prompt, step], np.float32)

    x = np.concatenate([prompt, step], axis=1)[0]
    k = x[:, k0 : k0 + KV_HEADS * HEAD_DIM].reshape(-1, KV_HEADS, HEAD_DIM).transpose(1, 0, 2)
    v = x[:, k0 + KV_HEADS * HEAD_DIM :].reshape(-1, KV_HEADS, HEAD_DIM).transpose(1, 0, 2)
    assert (kq[0, 0, 0], kq[0, 0, 3], kq[0, 1, 2]) == (127, -128, 2)
    np.testing.assert_array_equal(kq.astype(np.float32) * ks[:, None], int8_kv(k, ks))
    np.testing.assert_array_equal(vq.astype(np.float32) * vs[:, None], int8_kv(v, vs))
    kd, vd = int8_kv(k, ks), int8_kv(v, vs)
    q = x[:, :k0]
    np.testing.assert_allclose(outs[0], _attention(q[:5], kd[:, :5], vd[:, :5]), atol=1e-5)
    np.testing.assert_allclose(outs[1], _attention(q[5:], kd, vd), atol=1e-5)
    assert np.abs(outs[1] - float_outs[1]).max() > 1e-2  # the cache's rounding is visible: it is in use


@pytest.mark.parametrize("dim", [16, 64, 48])
def test_the_rotation_is_orthonormal_and_spreads_an_outlier_channel(dim):
    """rotation(d) is orthonormal (Hadamard for powers of two, a fixed random one otherwise), so the
    float model is unchanged; an outlier channel 30x the others is spread over every rotated channel,
    so one scale per head rounds the small channels about sqrt(d) times finer than in the plain basis."""
    from edgeforge.model.kv_int8 import rotation

    r = rotation(dim)
    np.testing.assert_allclose(r @ r.T, np.eye(dim), atol=1e-6)
    np.testing.assert_array_equal(r, rotation(dim))  # the same every compile
    if dim == 16:
        assert np.allclose(np.abs(r), 0.25)  # Hadamard / 4
    rng = np.random.default_rng(3)
    x = rng.standard_normal((KV_HEADS, 256, dim)).astype(np.float32)
    x[..., 5] *= 30
    plain = KvRanges(1, np.eye(dim, dtype=np.float32))
    rotated = KvRanges(1, r)
    for ranges in (plain, rotated):
        ranges(0, x, x)
    small = [c for c in range(dim) if c != 5]
    errors = []
    for ranges in (plain, rotated):
        (ks, vs), = ranges.scales(headroom=1.0)
        assert (ks == ks[:, :1]).all() and (vs == ks).all()  # one scale per KV head
        got, _ = KvInt8Hook(KvQuant(ranges.scales(headroom=1.0), ranges.rotation))(0, x, x)
        errors.append(np.abs(got - x)[..., small].mean())
    # Hadamard: every rotated channel holds 1/sqrt(d) of the outlier (measured ~4x finer at 16, ~8x
    # at 64); a random rotation spreads it less evenly (measured 2.9x at 48)
    assert errors[1] < errors[0] * (2 / np.sqrt(dim) if dim in (16, 64) else 0.5), errors


def test_the_golden_hook_stores_keys_and_values_on_the_rotated_grid():
    """KvInt8Hook: rotated, rounded by the scales as the cache stores them (int8_kv), rotated back;
    graphs from before the rotation (rotation None) round in the plain basis."""
    from edgeforge.model.kv_int8 import rotation

    rng = np.random.default_rng(4)
    r = rotation(HEAD_DIM)
    k, v = (rng.standard_normal((KV_HEADS, 7, HEAD_DIM)).astype(np.float32) for _ in range(2))
    scales = [(np.full((KV_HEADS, HEAD_DIM), 0.04, np.float32), np.full((KV_HEADS, HEAD_DIM), 0.05, np.float32))]  # no saturation
    gk, gv = KvInt8Hook(KvQuant(scales, r))(0, k, v)
    for got, x, step in ((gk, k, 0.04), (gv, v, 0.05)):
        codes = (got @ r) / step
        np.testing.assert_allclose(codes, np.rint(codes), atol=1e-3)  # whole steps in the rotated basis
        np.testing.assert_allclose(got @ r, int8_kv(x @ r, np.full((KV_HEADS, HEAD_DIM), step, np.float32)), atol=1e-6)
        assert 0 < np.abs(got - x).max() and np.abs((got - x) @ r).max() <= step / 2 + 1e-6
    pk, pv = KvInt8Hook(KvQuant(scales, None))(0, k, v)
    np.testing.assert_array_equal(pk, int8_kv(k, scales[0][0]))


@pytest.fixture(scope="module")
def kv_bundles(tiny_model, tmp_path_factory):
    """(float-cache bundle, int8-cache bundle) of llama32 q4f32 for x86-cpu (ONNX), built by the CLI."""
    from edgeforge.cli import main

    out = {}
    for kv in ("float", "int8"):
        dest = tmp_path_factory.mktemp(f"kv-{kv}")
        with pytest.raises(SystemExit) as exit_info:
            main(["build", str(tiny_model("llama32")), "--quant", "q4f32", "--target", "x86-cpu", "--backend", "onnx",
                  "--kv-cache", kv, "-o", str(dest), "-q", "--no-quality", "test speed"])
        assert exit_info.value.code == 0
        (out[kv],) = [p for p in dest.iterdir() if (p / "manifest.json").is_file()]
    return out["float"], out["int8"]


def test_int8_bundle_passes_smoke_and_records_its_cache(kv_bundles, capsys):
    float_bundle, int8_bundle = kv_bundles
    manifest = json.loads((int8_bundle / "manifest.json").read_text())
    golden = json.loads((int8_bundle / "golden.json").read_text())
    artifact = json.loads((int8_bundle / "artifact" / "artifact.json").read_text())
    assert manifest["kv_cache"]["dtype"] == "int8" and manifest["kv_cache"]["calibration"]["tokens"] > 0
    assert manifest["kv_cache"]["rotation"] == "hadamard" and "kv_rotation" in _initializers(int8_bundle)
    assert artifact["onnx"]["kv_dtype"] == "int8"
    assert golden["arithmetic"] == "int8-activations+int8-kv"
    assert json.loads((float_bundle / "manifest.json").read_text())["kv_cache"] == {"dtype": "float32"}
    assert "KV cache: **int8**" in (int8_bundle / "README.md").read_text()
    assert "KV cache" not in (float_bundle / "README.md").read_text()
    code, out, err = cli(capsys, "smoke", int8_bundle, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "PASS" and result["tokens_agree"] >= result["tokens_total"] - 1
    # The golden data follows the int8 cache, up to ONNX Runtime's int8 activations (accuracy_level 4)
    # rounding a value at a near tie the other way than numpy: one step of one activation, which
    # stays in the cache. Since the cache's rotation (Session 18) the graph's o_proj input passes a
    # float32 matmul numpy sums in another order, so such steps are more frequent: measured on
    # this model, one at token 5 of the chat template's prefix that all three prompts share (layer 1's
    # values differ from there on; layer 0's cache matched the emulation code for code), and a near
    # tie of the greedy token on one step of 36. The check is therefore a paired one, the same on
    # any CPU: step by step, the float-cache engine teacher-forced on the same golden data misses it
    # by more (measured: median 0.10 of the tolerance against 0.31; golden data rounding the cache
    # without the rotation, a broken emulation: 0.34, like the float cache).
    errors = [p["max_err"] / p["tol"] for p in result["prompts"]]
    steps_int8 = _step_errors(OnnxEngine(int8_bundle / "artifact"), golden)
    steps_float = _step_errors(OnnxEngine(float_bundle / "artifact"), golden)
    print(f"\nint8 cache vs its golden data: worst {errors}, median step {np.median(steps_int8):.3g}; "
          f"the float cache vs the same: median step {np.median(steps_float):.3g}")
    assert max(errors) < 0.5 and np.median(steps_int8) < np.median(steps_float) / 2


@pytest.mark.parametrize("shape,rotation", [("headdim", "hadamard"), ("headdim48", "random orthogonal (seed 0)")])
def test_int8_cache_on_other_head_sizes(tiny_model, tmp_path, capsys, shape, rotation):
    """A head_dim that is not hidden / heads (32, linear RoPE scaling) and one that is no power of two
    (48: the fixed random rotation): the int8-KV bundle is built, records its rotation and passes
    its smoke test."""
    code, _, err = cli(capsys, "build", tiny_model(shape), "--quant", "q4f32", "--target", "x86-cpu",
                       "--backend", "onnx", "--kv-cache", "int8", "-o", tmp_path / "d", "--no-quality", "test speed")
    assert code == 0, err
    (bundle,) = [p for p in (tmp_path / "d").iterdir() if (p / "manifest.json").is_file()]
    assert json.loads((bundle / "manifest.json").read_text())["kv_cache"]["rotation"] == rotation
    code, out, err = cli(capsys, "smoke", bundle, "--json")
    assert code == 0 and json.loads(out)["status"] == "PASS", err


def _initializers(bundle: Path) -> set[str]:
    import onnx

    return {t.name for t in onnx.load(str(bundle / "artifact" / "model.onnx"), load_external_data=False).graph.initializer}


def _step_errors(engine, golden: dict) -> list[float]:
    """Every step's error, as a fraction of its tolerance, of `engine` teacher-forced on `golden`'s prompts."""
    from edgeforge.runtime.golden_check import teacher_forced_steps

    rel = float(golden["tolerance"]["rel"])
    return [r["err"] / r["tol"] for prompt in golden["prompts"] for r in teacher_forced_steps(engine, prompt, rel)]


def test_int8_cache_follows_the_float_cache_greedily(kv_bundles):
    """Teacher-forced over 16 steps after a short prompt, the logits differ (the int8 cache is in
    effect) by a few percent of their range at most on this random model (measured 1.0-3.4% with the
    Session 10 calibration; 1.2-2.1% before: per-head value scales are coarser on random weights),
    and the argmax differs only where the float cache's top two are closer than that (measured: two
    steps of 17, near ties of 0.15% and 0.03% of the range)."""
    engines = [OnnxEngine(b / "artifact") for b in kv_bundles]
    assert engines[1].kv_dtype == np.int8 and engines[1]._kv[0].dtype == np.int8
    ids = [1, 5, 9, 200, 31, 7, 64, 12]
    rows = [engines[0].prefill(ids)]
    tokens = []
    for _ in range(16):
        tokens.append(int(np.argmax(rows[-1])))
        rows.append(engines[0].decode(tokens[-1]))
    int8_rows = [engines[1].prefill(ids)] + [engines[1].decode(t) for t in tokens]
    same = [int(np.argmax(g)) == int(np.argmax(w)) for w, g in zip(rows, int8_rows)]
    assert sum(same) >= len(same) - 3
    for want, got in zip(rows, int8_rows):
        span = np.ptp(want)
        diff = np.abs(want - got).max() / span
        assert 0 < diff < 0.05
        top2 = np.sort(want)[-2:]
        assert np.argmax(got) == np.argmax(want) or (top2[1] - top2[0]) / span < diff


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


@pytest.mark.parametrize("which,claim", [("int8", "float32"), ("float", "int8"), ("int8", ["int8"]), ("float", "int4")])
def test_artifact_that_misdescribes_its_cache_is_refused(kv_bundles, tmp_path, which, claim):
    """artifact.json's kv_dtype against the graph's own past input type, by name."""
    bundle = kv_bundles[1] if which == "int8" else kv_bundles[0]
    art = shutil.copytree(bundle / "artifact", tmp_path / "artifact")
    _edit_json(art / "artifact.json", lambda a: a["onnx"].update(kv_dtype=claim))
    with pytest.raises(BundleError, match=r"artifact\.json: kv_dtype .*(but the graph's KV cache|is not one of)"):
        OnnxEngine(art)


def test_bundle_whose_manifest_and_artifact_disagree_is_refused(kv_bundles, tmp_path, capsys):
    """A re-signed bundle whose manifest says float while its artifact says int8: exit 2, by name."""
    bundle = shutil.copytree(kv_bundles[1], tmp_path / "b")
    resign(bundle, lambda m: m.update(kv_cache={"dtype": "float32"}))
    code, _, err = cli(capsys, "smoke", bundle)
    assert code == 2 and "kv_cache dtype 'float32'" in err and "Traceback" not in err


def test_tvm_and_float16_graphs_refuse_int8_by_name(tiny_model, tiny_qdir, tmp_path, capsys):
    code, _, err = cli(capsys, "build", tiny_model("llama32"), "--quant", "q4f32", "--target", "x86-cpu",
                       "--backend", "tvm", "--kv-cache", "int8", "-o", tmp_path / "d")
    assert code == 2 and "--kv-cache int8: the tvm backend" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()  # refused before anything was written
    qdir = tiny_qdir("llama32", "q4f16")[0]
    code, _, err = cli(capsys, "compile", qdir, "--target", "rpi5", "--backend", "onnx", "--kv-cache", "int8",
                       "-o", tmp_path / "a")
    assert code == 2 and "needs the CPU execution provider with float32 compute" in err and "float16" in err
    with pytest.raises(Exception, match="kv_cache must be float or int8"):
        compile_onnx(qdir, tmp_path / "b", kv_cache="int4")


def test_run_generates_from_the_int8_bundle(kv_bundles, capsys):
    """`edgeforge run` (like serve and smoke) opens the bundle through runtime/session.py: the same
    engine, int8 buffers included; greedy tokens equal the float bundle's on this short prompt."""
    outs = []
    for bundle in kv_bundles:
        code, out, err = cli(capsys, "run", bundle, "--prompt", "The sea", "-n", "6", "--json")
        assert code == 0, err
        outs.append(json.loads(out))
    assert outs[0]["tokens"] == outs[1]["tokens"] and len(outs[1]["tokens"]) > 0
