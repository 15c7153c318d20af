"""bench/: the smoke run of the harness end to end, and the pieces it trusts (F32 GGUF writer, ratios)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Run `python bench/run.py --smoke` once; return (result dict, markdown text)."""
    out = tmp_path_factory.mktemp("bench")
    md, js = out / "BENCHMARKS.md", out / "latest.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--out", str(md),
                           "--json-out", str(js)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(js.read_text()), md.read_text()


def test_smoke_times_both_edgeforge_backends(smoke):
    result, _ = smoke
    assert result["mode"] == "smoke" and result["machine"]["cores"] >= 1
    rows = {r["engine"]: r for r in result["speed"]}
    for engine in ("edgeforge tvm q4f16", "edgeforge onnx q4f16"):
        row = rows[engine]
        assert row["error"] is None and row["reps"] == 1
        assert row["pp_ts"] > 0 and row["tg_ts"] > 0
        # tok/s must be consistent with the run: n tokens over a positive time, not a placeholder
        assert row["pp_samples"] == [row["pp_ts"]] and row["tg_samples"] == [row["tg_ts"]]


def test_smoke_memory_and_quality_are_measured(smoke):
    result, _ = smoke
    for row in result["memory"]:
        assert row["peak_rss"] > 0 and row["weight_bytes"] > 0, row
        if row["family"] == "edgeforge":
            # the process held at least its weights (and a Python interpreter: far more than 1 MiB)
            assert row["peak_rss"] > max(row["weight_bytes"], 2**20)
    q = {r["scheme"]: r for r in result["quality"]["edgeforge"]["rows"]}
    assert q["float"]["ppl"] > 1 and q["float"]["kl"] == 0
    assert q["q4f16"]["ppl"] > 1 and q["q4f16"]["kl"] > 0


def test_smoke_markdown_matches_json(smoke):
    result, md = smoke
    for heading in ("# edgeforge benchmarks", "## CPU speed", "## Quality", "## Memory", "## GPU",
                    "## Exact commands"):
        assert heading in md
    # the GPU section comes from the recorded device runs (bench/results/gpu-*.json), never invented
    import report

    gpu_files = sorted(report.GPU_RESULTS.glob("gpu-*.json"))
    if gpu_files:
        g = json.loads(gpu_files[0].read_text())
        assert f"Measured on {g['gpu']}" in md
        tg = g["steps"]["bench-smollm2"]["tg_ts"]
        assert f"{tg:.1f} ±" in md
    else:
        assert "Not measured" in md
    assert result["machine"]["cpu"] in md
    for row in result["speed"]:
        if row["reps"]:
            assert f"| {row['engine']} | {row['model']} | {row['pp_ts']:.1f} | {row['tg_ts']:.1f} |" in md
    # a peer that is not installed is named as skipped, never silently missing
    names = {r["family"] for r in result["speed"]}
    for family, word in (("llama.cpp", "llama.cpp"), ("ort-genai", "ORT GenAI")):
        if family not in names:
            assert any(n.startswith(word) and "skipped" in n for n in result["notes"]), result["notes"]


def test_smoke_names_each_peer_when_the_smollm2_gguf_is_not_cached(tmp_path):
    """On a fresh machine (CI's) no SmolLM2 GGUF is cached when the smoke run starts: both peers are
    still named as skipped, with the command that fetches the file, and the run succeeds."""
    import os

    md, js = tmp_path / "BENCHMARKS.md", tmp_path / "latest.json"
    env = {**os.environ, "EDGEFORGE_CACHE": str(tmp_path / "empty-cache")}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--backends", "onnx",
                           "--no-quality", "--out", str(md), "--json-out", str(js)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(js.read_text())
    for word in ("llama.cpp", "ORT GenAI"):
        assert any(n.startswith(word) and "not cached" in n and "fetch-model smollm2-135m" in n and "skipped" in n
                   for n in result["notes"]), result["notes"]
    assert {r["family"] for r in result["speed"]} == {"edgeforge"}


def _row(engine, family, threads, pp, tg, model="smollm2-135m"):
    return {"engine": engine, "family": family, "threads": threads, "pp_ts": pp, "tg_ts": tg, "model": model,
            "reps": 1, "n_prompt": 512, "n_gen": 128}


def test_ratios_use_the_best_peer_at_the_same_thread_count():
    import report
    from run import add_ratios

    rows = [_row("edgeforge tvm q4f16", "edgeforge", 2, 100.0, 50.0),
            _row("llama.cpp Q4_0", "llama.cpp", 2, 400.0, 40.0),
            _row("ORT GenAI int4", "ort-genai", 2, 200.0, 100.0),
            _row("llama.cpp Q4_0", "llama.cpp", 4, 1000.0, 1000.0)]
    add_ratios(rows)
    assert rows[0]["pp_vs_best"] == pytest.approx(0.25) and rows[0]["pp_best_peer"] == "llama.cpp Q4_0"
    assert rows[0]["tg_vs_best"] == pytest.approx(0.5) and rows[0]["tg_best_peer"] == "ORT GenAI int4"
    text = report._behind({"speed": rows, "n_prompt": 512, "n_gen": 128})
    assert "prefill (pp512) is 4.0x slower than llama.cpp Q4_0 (100.0 vs 400.0 tok/s)" in text
    assert "decode (tg128) is 2.0x slower than ORT GenAI int4" in text


def test_goals_table_says_met_or_not_met():
    import report

    rows = [_row("edgeforge onnx q4f16", "edgeforge", 2, 480.0, 130.0),
            _row("ORT GenAI int4", "ort-genai", 2, 380.0, 120.0),
            _row("llama.cpp Q4_1", "llama.cpp", 2, 370.0, 110.0)]
    text = report._goals({"speed": rows})
    assert "| edgeforge onnx q4f16 vs ORT GenAI int4 | 130.0 / 120.0 | 1.08x | >= 1.0x | met |" in text
    assert "| edgeforge onnx q4f16 vs llama.cpp Q4_1 | 130.0 / 110.0 | 1.18x | >= 1.3x | NOT met |" in text
    assert report._goals({"speed": rows[:1]}) == ""  # no peer in the run: no verdict


def test_ratios_are_not_made_across_different_models():
    from run import add_ratios

    rows = [_row("edgeforge tvm q4f16", "edgeforge", 2, 100.0, 50.0, model="tiny-llama32"),
            _row("llama.cpp Q4_0", "llama.cpp", 2, 400.0, 40.0)]
    add_ratios(rows)
    assert "pp_vs_best" not in rows[0]


def test_f32_gguf_holds_the_dequantized_source(tmp_path):
    """The llama.cpp peers start from bench/float_gguf.py's output: it must equal gguf's dequantization."""
    import gguf
    from float_gguf import write_f32_gguf

    rng = np.random.default_rng(0)
    src = tmp_path / "src.gguf"
    w = gguf.GGUFWriter(str(src), "llama")
    w.add_block_count(1)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    weight = rng.standard_normal((8, 64)).astype(np.float32)
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("output_norm.weight", rng.standard_normal(64).astype(np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()

    out = write_f32_gguf(src, tmp_path / "f32.gguf")
    r_src, r_out = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    assert r_out.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert r_out.fields["general.file_type"].contents() == int(gguf.LlamaFileType.ALL_F32)
    by_name = {t.name: t for t in r_out.tensors}
    for t in r_src.tensors:
        got = by_name[t.name]
        assert got.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(got.shape) == list(t.shape)
        expect = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_array_equal(np.asarray(got.data).reshape(expect.shape), expect)
    # Q8_0 is lossy: the F32 file holds the dequantized values, not the original floats
    assert not np.array_equal(np.asarray(by_name["blk.0.attn_q.weight"].data).reshape(8, 64), weight)


def test_quality_leaves_out_the_source_files_own_quant_type():
    """Requantizing dequantized Q4_1 weights to Q4_1 is lossless: that row would claim KL 0."""
    from run import LLAMA_QUANTS, quality_quants

    notes = []
    assert quality_quants(Path("SmolLM2-135M-Instruct.Q4_1.gguf"), notes) == [q for q in LLAMA_QUANTS if q != "Q4_1"]
    assert "Q4_1 left out" in notes[0]
    assert quality_quants(Path("model-f16.gguf"), []) == LLAMA_QUANTS


def test_a_peer_that_cannot_be_converted_here_is_named_with_the_reason(tmp_path):
    """8B: ORT GenAI's builder needs ~3.2x the checkpoint in memory. scale.py skips it with the numbers,
    and the report says so instead of leaving the row out silently."""
    import scale

    small, big = tmp_path / "small", tmp_path / "big"
    for folder, size in ((small, 1 << 20), (big, 1 << 42)):  # 1 MiB and a 4 TiB sparse checkpoint
        folder.mkdir()
        with open(folder / "model-00001-of-00001.safetensors", "wb") as f:
            f.truncate(size)
    assert scale._genai_cannot_fit(small) is None
    why = scale._genai_cannot_fit(big)
    assert why and "13107 GiB" in why and "4096.0 GiB checkpoint" in why and "available here" in why


def test_the_scaling_table_names_a_skipped_peer(tmp_path, monkeypatch):
    import report

    rows = [_row("edgeforge onnx q4f16", "edgeforge", 2, 20.0, 5.0), _row("llama.cpp Q4_0", "llama.cpp", 2, 22.0, 6.0)]
    result = {"model": "/x/llama3-8b", "threads": 2, "reps": 3, "speed": rows, "memory": [], "command": "c",
              "peer_convert_s": {"ORT GenAI int4 skipped": "its builder needs about 51 GiB"},
              "note": "Built with a float32 target file."}
    (tmp_path / "peers-llama3-8b.json").write_text(json.dumps(result))
    monkeypatch.setattr(report, "GPU_RESULTS", tmp_path)
    text = report._scaling_peers()
    assert "## llama3-8b: speed and decode memory" in text
    assert "ORT GenAI is not in this table: its builder needs about 51 GiB." in text
    assert "Built with a float32 target file." in text
    assert "tg128 >= 1.0x (llama.cpp Q4_0): 0.83x: **NOT met**" in text
    # the same shape measured on two hosts: each table says which CPU features it ran with
    for simd, name in ((["avx2", "avx512f", "avx512_vnni"], "vnni"), (["avx2", "fma"], "avx2")):
        (tmp_path / f"peers-llama3-8b-{name}.json").write_text(json.dumps({**result, "machine": {"simd": simd}}))
    text = report._scaling_peers()
    assert "## llama3-8b (AVX-512 VNNI host): speed" in text and "## llama3-8b (AVX2 host): speed" in text


def test_each_goal_line_says_the_weight_bytes_against_the_peer_it_is_measured_against(tmp_path, monkeypatch):
    """Issue 24 compares at equal bytes or says the difference: a faster row with more bytes must say so,
    and an artifact row (no golden data) is named as such in the table's heading."""
    import report

    rows = [_row("edgeforge onnx q4f16 (artifact, no golden data)", "edgeforge", 2, 30.0, 9.0),
            _row("llama.cpp Q4_0", "llama.cpp", 2, 20.0, 6.0)]
    memory = [{"engine": rows[0]["engine"], "weight_bytes": 5_150_000_000, "kv_bytes": 1, "peak_rss": 1, "ratio": 0.9},
              {"engine": "llama.cpp Q4_0", "weight_bytes": 4_660_000_000, "kv_bytes": 1, "peak_rss": 1, "ratio": 1.8}]
    result = {"model": "/x/llama3-8b", "threads": 2, "reps": 5, "speed": rows, "memory": memory, "command": "c"}
    (tmp_path / "peers-llama3-8b.json").write_text(json.dumps(result))
    monkeypatch.setattr(report, "GPU_RESULTS", tmp_path)
    text = report._scaling_peers()
    assert "tg128 >= 1.0x (llama.cpp Q4_0): 1.50x: **met**, with 1.11x llama.cpp Q4_0's weight bytes." in text
    assert "(a row marked artifact: an `edgeforge compile` folder, no golden data)" in text
    # without weight bytes the line makes no claim about them
    (tmp_path / "peers-llama3-8b.json").write_text(json.dumps({**result, "memory": []}))
    assert "weight bytes." not in report._scaling_peers()


@pytest.mark.skipif(not __import__("q4_gemv").avx2_here(), reason="bench/q4_gemv.c needs x86 AVX2/FMA/F16C")
def test_the_q4_decode_kernel_lab_matches_its_numpy_reference_and_onnx_runtime():
    """bench/q4_gemv.py times ONNX Runtime's MatMulNBits against bench/q4_gemv.c: the kernel must compute
    what its numpy reference says (int8 activations per block of 32, zero point 8, fp16 scales), on rows
    that cover every lane of a 4-row tile and blocks that cover every pair of an 8-block tile, and land
    where MatMulNBits at accuracy_level 4 lands on the same weights."""
    import q4_gemv

    kernel = q4_gemv.Kernel(q4_gemv.build_kernel())
    rng = np.random.default_rng(7)
    n, k = 12, 512
    blob = rng.integers(0, 256, (n, k // 32, 16), dtype=np.uint8)
    scales16 = (rng.random((n, k // 32), dtype=np.float32) * 0.05).astype(np.float16)
    x = rng.standard_normal(k).astype(np.float32)
    x[32:64] = 0.0  # an all-zero block: scale 0, no division by zero
    packed = kernel.pack(blob, scales16)
    assert packed.nbytes == n * k // 32 * 18  # the bundle's 4.5 bits a weight, nothing added
    for threads in (1, 2):
        y = kernel.gemv(packed, n, x, np.full(n, np.nan, np.float32), threads)
        ref = q4_gemv.reference(blob, scales16, x)
        assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max(), (y, ref)
    # one flipped code in the last row's last block moves exactly that row
    blob2 = blob.copy()
    blob2[-1, -1, -1] ^= 0xF0
    y2 = kernel.gemv(kernel.pack(blob2, scales16), n, x, np.empty(n, np.float32), 1)
    moved = np.abs(y2 - kernel.gemv(packed, n, x, np.empty(n, np.float32), 1)) > 1e-6
    assert moved.tolist() == [False] * (n - 1) + [True]
    sess, _ = q4_gemv.mlas_session([("m", n, k, blob, scales16)], 1)
    mlas = sess.run(None, {f"x{k}": x.reshape(1, 1, k)})[0].reshape(-1)
    assert np.abs(mlas - ref).max() <= 1e-3 * np.abs(ref).max()
    with pytest.raises(ValueError, match="multiple of 4"):
        kernel.pack(blob[:6], scales16[:6])


def test_scaled_residual_shrinks_only_the_matrices_that_write_the_residual(tmp_path, monkeypatch):
    """`scale.py model --scaled-residual`: o_proj and down_proj at 1/sqrt(2 x layers) of the others'
    spread (GPT-2's initialisation); the plain model keeps one spread."""
    import scale

    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True, rope_theta=10000.0,
                max_position_embeddings=256)
    monkeypatch.setitem(scale.SHAPES, "tiny", tiny)
    stds = {}
    for scaled in (False, True):
        out = scale.write_model("tiny", tmp_path / str(scaled), log=lambda *_: None, scaled_residual=scaled)
        stds[scaled] = {}
        for f in out.glob("*.safetensors"):
            raw = f.read_bytes()
            n = int.from_bytes(raw[:8], "little")
            for name, meta in json.loads(raw[8:8 + n]).items():
                lo, hi = meta["data_offsets"]
                bits = np.frombuffer(raw[8 + n + lo:8 + n + hi], np.uint16).astype(np.uint32) << 16
                stds[scaled][name] = float(bits.view(np.float32).std())
    plain, deep = stds[False], stds[True]
    for layer in range(8):
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            key = f"model.layers.{layer}.{name}.weight"
            assert plain[key] == pytest.approx(0.02, rel=0.1)
            assert deep[key] == pytest.approx(0.02 / 4, rel=0.1)  # 1/sqrt(2 x 8)
        for name in ("self_attn.q_proj", "mlp.up_proj"):
            key = f"model.layers.{layer}.{name}.weight"
            assert deep[key] == plain[key]
    assert deep["model.embed_tokens.weight"] == plain["model.embed_tokens.weight"]


def test_an_artifact_outside_a_bundle_is_timed_like_a_bundle_and_named_so(tiny_qdir, tmp_path):
    """bench/artifact_bench.py: an `edgeforge compile` ONNX folder (no golden data) timed by
    `edgeforge bench`'s own run_bench; scale.py's row for it says it is not a bundle."""
    import run
    import scale
    from edgeforge.backends import compile_qdir

    qdir, _, _ = tiny_qdir("llama32", "q4f16")
    art = tmp_path / "x86"
    compile_qdir(qdir, "x86-cpu", "onnx", art)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "artifact_bench.py"), str(art), "-p", "8", "-n", "4",
                           "-r", "2", "--json"], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "EDGEFORGE_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = {r["test"]: r for r in json.loads(proc.stdout)}
    assert set(records) == {"pp8", "tg4"}
    assert all(r["avg_ts"] > 0 and len(r["samples_ts"]) == 2 for r in records.values())
    assert records["pp8"]["bundle"] == "x86 (artifact, no golden data)"
    engine = scale._artifact_engine(run, art, Path("/m/tiny"))
    assert "(artifact, no golden data)" in engine.name and engine.weight_bytes > 0
    # a TVM folder is not timed here
    (tmp_path / "tvm").mkdir()
    (tmp_path / "tvm" / "artifact.json").write_text(json.dumps({"backend": "tvm"}))
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "artifact_bench.py"), str(tmp_path / "tvm")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "only ONNX artifacts" in bad.stderr and "Traceback" not in bad.stderr
    # a folder that is not an artifact at all: one line naming the file, exit 2
    wrong = subprocess.run([sys.executable, str(ROOT / "bench" / "artifact_bench.py"), str(tmp_path / "nothing")],
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "nothing/artifact.json: not an `edgeforge compile` folder" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    # scale.py peers refuses a wrong --artifact before converting any peer (minutes at 8B)
    for folder, why in ((tmp_path / "nothing", "no readable artifact.json"), (tmp_path / "tvm", "backend 'tvm'")):
        refused = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "peers", str(tmp_path / "model"),
                                  "--dist", str(tmp_path), "--artifact", str(folder), "-o", str(tmp_path / "p.json")],
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and why in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "model-peers").exists()
