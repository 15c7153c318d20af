"""ONNX backend end to end on the real SmolLM2-135M (slow): x86 CPU against the numpy reference of
the same quantized weights, the rpi5 build under qemu (arm) and the vulkan build on lavapipe (vulkan).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from onnx_support import compile_onnx, record  # noqa: E402

from edgeforge.backends import compile_qdir  # noqa: E402
from edgeforge.model.loader import load_model  # noqa: E402
from edgeforge.model.reference import ReferenceModel  # noqa: E402
from edgeforge.quant.qdir import load_qdir, write_qdir  # noqa: E402
from edgeforge.runtime.generate import generate  # noqa: E402
from edgeforge.runtime.onnx_engine import OnnxEngine  # noqa: E402
from edgeforge.runtime.sampling import Sampler  # noqa: E402
from edgeforge.testing import copy_runtime, relative_errors, run_under_qemu, step_logits  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # SmolLM2 quantize + golden, then emulated and lavapipe runs (subprocess limits up to 1200 s)
TOKENS = 32
DEVICE_RUN = Path(__file__).resolve().parent / "onnx_device_run.py"


def prompts(tok) -> list[list[int]]:
    return [tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}]),
            tok.encode("The quick brown fox jumps over the lazy dog. Then the fox"),
            tok.encode_chat([{"role": "user", "content": "Write a haiku about the sea."}])]


@pytest.fixture(scope="module")
def smol(smollm2_gguf, tmp_path_factory):
    """smol(scheme, golden=True) -> (QDIR path, prompts, [(reference greedy tokens, their logits)] or None)."""
    loaded, qdirs, goldens = load_model(smollm2_gguf), {}, {}

    def get(scheme, golden=True):
        if scheme not in qdirs:
            qdir = tmp_path_factory.mktemp(f"smol-{scheme}") / "qdir"
            write_qdir(loaded, scheme, qdir)
            qdirs[scheme] = (qdir, prompts(loaded.tokenizer))
        qdir, ids = qdirs[scheme]
        if golden and scheme not in goldens:
            ref = ReferenceModel(load_qdir(qdir))  # float32 numpy on the dequantized QDIR
            runs = [generate(ref, p, TOKENS, Sampler(temperature=0.0), keep_logits=True) for p in ids]
            goldens[scheme] = [(r.tokens, r.logits) for r in runs]
        return qdir, ids, goldens.get(scheme)

    return get


@pytest.mark.parametrize("scheme", ["q4f32", "q8f16"])
def test_x86_level0_matches_reference(smol, scheme, tmp_path):
    qdir, ids, golden = smol(scheme)
    engine = OnnxEngine(compile_onnx(qdir, tmp_path / "art0", accuracy_level=0), threads=2)
    for p, (tokens, logits) in zip(ids, golden):
        got = step_logits(engine, p, TOKENS - 1, feed=tokens)
        errs = relative_errors(got, logits)
        print(f"{scheme} level 0: max error / logit range {max(errs):.2e}")
        assert max(errs) <= 1e-3, errs
        engine.reset()
        assert generate(engine, p, TOKENS, Sampler(temperature=0.0)).tokens == tokens


@pytest.mark.parametrize("scheme", ["q4f32", "q8f16"])
def test_x86_level4_reported(smol, scheme, tmp_path, tmp_path_factory):
    qdir, ids, golden = smol(scheme)
    engine = OnnxEngine(compile_onnx(qdir, tmp_path / "art4", accuracy_level=4), threads=2)
    for p, (tokens, logits) in zip(ids, golden):
        errs = relative_errors(step_logits(engine, p, TOKENS - 1, feed=tokens), logits)
        got = generate(engine, p, TOKENS, Sampler(temperature=0.0)).tokens
        agree = next((i for i, (a, b) in enumerate(zip(got, tokens)) if a != b), TOKENS)
        entry = {"model": "smollm2-135m", "scheme": scheme, "accuracy_level": 4, "prompt_tokens": len(p),
                 "max_rel_err": round(max(errs), 5), "greedy_agree": agree, "of": TOKENS}
        record(tmp_path_factory.getbasetemp() / "onnx-accuracy-level-4.jsonl", entry)
        print("accuracy_level 4:", json.dumps(entry))
        assert max(errs) < 0.1, entry  # int8 activations: a few % of the range, not garbage
        if agree < TOKENS:
            # Where the greedy runs first part (same history so far), int8 activations may only have
            # flipped a near-tie: every logit is within max(errs) x range of the reference, so the
            # two picks' reference logits are at most twice that apart. A defect parts clearly.
            ref = logits[agree]
            gap = float(ref[tokens[agree]] - ref[got[agree]])
            assert gap <= 2 * max(errs) * float(np.ptp(ref)), (entry, agree, gap)


@pytest.mark.arm
def test_rpi5_build_under_qemu(smol, tmp_path):
    from edgeforge.toolchains import ensure_arm64

    ensure_arm64()  # builds the arm64 root if it is missing: a missing toolchain fails, never skips
    qdir, ids, golden = smol("q4f32")
    art = tmp_path / "rpi5"
    artifact = compile_qdir(qdir, "rpi5", "onnx", art)
    assert artifact["target"] == "rpi5" and artifact["onnx"]["accuracy_level"] == 4
    n = 8
    proc = run_under_qemu([DEVICE_RUN, art, tmp_path / "arm.npz", "--ids", ",".join(map(str, ids[0])),
                           "--tokens", n, "--threads", 2], extra_pythonpath=[copy_runtime(tmp_path)], timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    print("rpi5 under qemu:", info)
    assert info["machine"] == "aarch64" and info["providers"][0] == "CPUExecutionProvider"
    assert info["tokens"] == golden[0][0][:n]  # the numpy reference's greedy tokens
    # Level 4 quantizes activations to int8 with different kernels on ARM and x86 (they differ
    # from each other by ~8% of the range), so compare each with the reference, not with each other.
    arm_err = max(relative_errors(list(np.load(tmp_path / "arm.npz")["logits"]), golden[0][1][:n]))
    host = step_logits(OnnxEngine(art), ids[0], n - 1, feed=info["tokens"])
    x86_err = max(relative_errors(host, golden[0][1][:n]))
    print(f"rpi5 level 4, max error / logit range vs reference: aarch64 {arm_err:.3f}, x86 {x86_err:.3f}")
    assert arm_err < 0.15 and x86_err < 0.1

    # The same graph at accuracy level 0 on aarch64 is exact up to float32 rounding.
    toml = tmp_path / "arm-level0.toml"
    toml.write_text('name = "arm-level0"\nbackends = ["onnx"]\nrun = "qemu"\nos = "linux"\narch = "aarch64"\n'
                    '[onnx]\nexecution_provider = "CPUExecutionProvider"\naccuracy_level = 0\n')
    compile_qdir(qdir, str(toml), "onnx", tmp_path / "arm0")
    n0 = 4
    proc = run_under_qemu([DEVICE_RUN, tmp_path / "arm0", tmp_path / "arm0.npz", "--ids", ",".join(map(str, ids[1])),
                           "--tokens", n0, "--threads", 2], extra_pythonpath=[tmp_path], timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["tokens"] == golden[1][0][:n0]
    errs = relative_errors(list(np.load(tmp_path / "arm0.npz")["logits"]), golden[1][1][:n0])
    print(f"aarch64 level 0: max error / logit range {max(errs):.2e}")
    assert max(errs) <= 1e-3, errs


@pytest.mark.vulkan
def test_vulkan_build_on_lavapipe(smol, tmp_path):
    from edgeforge.toolchains import ensure_vulkan

    python, env = ensure_vulkan()  # sets lavapipe up if it is missing: like the ARM test, fails, never skips
    qdir, ids, _ = smol("q4f16", golden=False)
    art = tmp_path / "vulkan"
    compile_qdir(qdir, "vulkan", "onnx", art)
    n = 8
    env = dict(env, PYTHONPATH=str(copy_runtime(tmp_path)))
    # The first run compiles the WebGPU shaders (~50 s on an idle machine), then ~2 tok/s.
    proc = subprocess.run([str(python), str(DEVICE_RUN), str(art), str(tmp_path / "vk.npz"),
                           "--ids", ",".join(map(str, ids[0])), "--tokens", str(n)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    print("vulkan on lavapipe:", info)
    assert info["providers"][0] == "WebGpuExecutionProvider" and info["device"].startswith("webgpu")
    cpu = OnnxEngine(art, device="cpu")  # the same float16 graph on ONNX Runtime's CPU provider
    cpu_run = generate(cpu, ids[0], n, Sampler(temperature=0.0), keep_logits=True)
    gpu_tokens, cpu_tokens = info["tokens"], cpu_run.tokens
    # Greedy runs on two float16 implementations agree until a near-tie, if any: where they first
    # differ (same history so far), the CPU's logits of the two picks are within WebGPU's float16
    # tolerance of each other. A real defect shows as an early, clear disagreement.
    from edgeforge.bundle.golden import WEBGPU_F16_REL_TOL

    first = next((i for i, (a, b) in enumerate(zip(gpu_tokens, cpu_tokens)) if a != b), None)
    if first is not None:
        assert first >= 3, (gpu_tokens, cpu_tokens)
        logits = cpu_run.logits[first]
        gap = abs(float(logits[gpu_tokens[first]] - logits[cpu_tokens[first]]))
        assert gap <= WEBGPU_F16_REL_TOL * float(np.ptp(logits)), (first, gap, gpu_tokens, cpu_tokens)
