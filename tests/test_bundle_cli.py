"""The product commands around bundles: run, bench, targets, doctor, plan, build configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bundle_helpers import cli, host_bundle  # noqa: F401 (fixture)
from edgeforge.bundle.config import make_plan
from edgeforge.errors import EdgeforgeError

ROOT = Path(__file__).resolve().parent.parent


def test_run_greedy_answer_matches_golden(host_bundle, capsys):
    bundle = host_bundle[0]
    prompt = json.loads((bundle / "golden.json").read_text())["prompts"][0]
    n = len(prompt["tokens"])
    code, out, err = cli(capsys, "run", bundle, "--chat", "-p", prompt["text"], "-n", n, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["prompt_ids"] == prompt["prompt_ids"]
    # Same greedy tokens as the golden run, up to a near-tie the int8-activation backend may flip.
    got, want = result["tokens"], prompt["tokens"]
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if i is not None:
        golden = json.loads((bundle / "golden.json").read_text())
        step, tol = prompt["steps"][i], golden["tolerance"]["rel"] * (prompt["steps"][i]["max"] - prompt["steps"][i]["min"])
        assert got[i] in step["top_ids"], (i, got, want)
        gap = step["top_logits"][0] - step["top_logits"][step["top_ids"].index(got[i])]
        assert gap <= tol, (i, gap, tol)
        assert i >= 3, "the first tokens are not near-ties on this model"
    assert result["stopped"] == "stop" or len(result["tokens"]) == n
    code, out, err = cli(capsys, "run", bundle, "--chat", "-p", prompt["text"], "-n", n)
    assert code == 0 and out.strip() and "decode" in err and "tok/s" in err


def test_run_needs_prompt_without_terminal(host_bundle, capsys):
    code, _, err = cli(capsys, "run", host_bundle[0])
    assert code == 2 and "--prompt" in err


def test_bench_llama_bench_vocabulary(host_bundle, capsys):
    code, out, err = cli(capsys, "bench", host_bundle[0], "-p", 64, "-n", 16, "-r", 3, "--json")
    assert code == 0, err
    records = {r["test"]: r for r in json.loads(out)}
    assert set(records) == {"pp64", "tg16"}
    for r in records.values():
        assert r["avg_ts"] > 0 and r["stddev_ts"] >= 0 and len(r["samples_ts"]) == 3
    code, _, err = cli(capsys, "bench", host_bundle[0], "-p", 100000)
    assert code == 2 and "context length" in err


def test_targets_and_doctor_json(capsys):
    code, out, _ = cli(capsys, "targets", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert {"x86-cpu", "rpi5", "cuda", "vulkan", "metal-macos"} <= set(rows)
    assert rows["metal-macos"]["can_run"] is False and rows["metal-macos"]["missing"]
    assert rows["x86-cpu"]["can_run"] is True  # these tests run on x86-64 Linux
    code, out, _ = cli(capsys, "doctor", "--json")
    checks = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and {"nvcc", "qemu-aarch64", "arm64 root", "lavapipe", "CUDA GPU", "onnxruntime"} <= set(checks)
    assert checks["onnxruntime"]["ok"]


@pytest.fixture
def fresh_doctor():
    """Doctor caches each probe for the process; a test that changes the machine starts and ends
    with an empty cache (no answer about its made-up machine outlives it)."""
    from edgeforge.bundle.doctor import check

    check.cache_clear()
    yield check.cache_clear
    check.cache_clear()


def _doctor(capsys, clear) -> dict:
    clear()
    code, out, _ = cli(capsys, "doctor", "--json")
    assert code == 0
    return {r["name"]: r for r in json.loads(out)}


def test_doctor_reports_the_cuda_compilers_it_is_given(tmp_path, monkeypatch, capsys, fresh_doctor):
    """Doctor's CUDA lines follow what is on PATH and in the cache, set here: an nvcc reporting
    CUDA 13 builds `cuda`, nothing builds CUDA 12 (jetson-orin), and without it neither is found."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    nvcc = bin_dir / "nvcc"  # answers --version like nvcc 13.0 (doctor only asks for the version)
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n"
                    "echo 'Build cuda_13.0.r13.0/compiler.36424714_0'\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("EDGEFORGE_CACHE", str(tmp_path / "cache"))  # no CUDA wheels installed
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    checks = _doctor(capsys, fresh_doctor)
    assert checks["nvcc"]["ok"] and checks["nvcc"]["detail"] == f"{nvcc}: Build cuda_13.0.r13.0/compiler.36424714_0"
    assert checks["CUDA 13 compiler"] == {"name": "CUDA 13 compiler", "ok": True, "detail": f"nvcc {nvcc}"}
    assert not checks["CUDA 12 compiler"]["ok"]
    assert "edgeforge toolchains install cuda12" in checks["CUDA 12 compiler"]["detail"]
    monkeypatch.setenv("PATH", "/nonexistent")
    checks = _doctor(capsys, fresh_doctor)
    assert checks["nvcc"] == {"name": "nvcc", "ok": False, "detail": "nvcc not found on PATH"}
    assert not checks["CUDA 13 compiler"]["ok"] and "install cuda" in checks["CUDA 13 compiler"]["detail"]


def test_plan_github_matrix(capsys):
    code, out, _ = cli(capsys, "plan", ROOT / "examples" / "smollm2.toml", "--matrix", "github")
    assert code == 0
    jobs = {j["target"]: j for j in json.loads(out)["include"]}
    assert set(jobs) == {"x86-cpu", "rpi5", "cuda", "jetson-orin", "vulkan", "metal-macos"}
    assert jobs["rpi5"]["smoke"] == "emulate" and jobs["x86-cpu"]["backends"] == "tvm onnx"


def test_build_config_and_options(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('model = "m.gguf"\nquant = "q4f16"\n[targets]\nx86-cpu = ["tvm", "onnx"]\nrpi5 = "auto"\n')
    plan = make_plan(str(cfg), None, ("rpi5",), "auto", None)
    assert [(t.name, b) for t, b in plan.jobs] == [("rpi5", "onnx")] and plan.output == tmp_path / "dist"  # relative to the config
    plan = make_plan(str(cfg), "q8f16", (), "onnx", tmp_path / "o")
    assert [(t.name, b) for t, b in plan.jobs] == [("x86-cpu", "onnx"), ("rpi5", "onnx")] and plan.quant == "q8f16"
    with pytest.raises(EdgeforgeError, match="--target cuda: not in build config"):
        make_plan(str(cfg), None, ("cuda",), "auto", None)
    cfg.write_text('model = "m"\nquant = "q4f16"\ntargets = ["x86-cpu"]\nbogus = 1\n')
    with pytest.raises(EdgeforgeError, match="unknown key"):
        make_plan(str(cfg), None, (), "auto", None)
    with pytest.raises(EdgeforgeError, match="vulkan.*cannot be built with --backend tvm"):
        make_plan("model", "q4f16", ("vulkan",), "tvm", tmp_path)


def test_generate_on_a_bundle_matches_run_and_verifies(host_bundle, tmp_path, capsys):
    from bundle_helpers import copy_bundle

    prompt = json.loads((host_bundle[0] / "golden.json").read_text())["prompts"][1]
    args = ["--chat", "-p", prompt["text"], "-n", 8, "--json"]
    code, out, err = cli(capsys, "generate", host_bundle[0], *args)
    assert code == 0, err
    code, out2, err = cli(capsys, "run", host_bundle[0], *args)
    assert code == 0, err
    assert json.loads(out)["tokens"] == json.loads(out2)["tokens"]
    bundle = copy_bundle(host_bundle[0], tmp_path / "b")
    with open(bundle / "artifact" / "model.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    code, _, err = cli(capsys, "generate", bundle, *args)
    assert code == 2 and "model.onnx" in err


def test_run_ctx_sizes_the_cache_and_bench_sizes_it_to_the_test(host_bundle, capsys):
    """--ctx caps a conversation (a clear error past it, exit 2); a length past the model's context is refused."""
    bundle = host_bundle[0]
    code, out, err = cli(capsys, "run", bundle, "-p", "one two three four five six", "-n", 4, "--ctx", 6, "--json")
    assert code == 2 and out == "" and "context holds 6" in err
    code, out, err = cli(capsys, "run", bundle, "-p", "hello", "-n", 4, "--ctx", 64, "--json")
    assert code == 0, err
    assert len(json.loads(out)["tokens"]) == 4
    code, _, err = cli(capsys, "run", bundle, "-p", "hello", "--ctx", 10**6)
    assert code == 2 and "exceeds the model's context length" in err
