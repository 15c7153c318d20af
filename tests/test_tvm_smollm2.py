"""TVM backend on the real SmolLM2-135M-Instruct (slow): x86 logits and greedy tokens against the numpy
reference on the same quantized weights, and the rpi5 build under qemu with a runtime-only TVM."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

pytest.importorskip("tvm")

from tvm_support import BUILD_TIMES, TOLERANCE, compile_tvm  # noqa: E402

from edgeforge.testing import copy_runtime, greedy, relative_errors, run_under_qemu, step_logits  # noqa: E402

from edgeforge.model.loader import load_model  # noqa: E402
from edgeforge.model.reference import ReferenceModel  # noqa: E402
from edgeforge.quant.qdir import load_qdir, write_qdir  # noqa: E402
from edgeforge.runtime.loader import open_engine  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # SmolLM2 TVM builds and an emulated run (subprocess limit 1800 s)

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers:"]
GREEDY_TOKENS = 32


def chat_ids(model, text):
    return model.tokenizer.encode_chat([{"role": "user", "content": text}])


@pytest.fixture(scope="session")
def smol(smollm2_gguf, tmp_path_factory):
    """scheme -> (QDIR path, loaded QDIR, reference); target artifacts cached in 'arts'."""
    source = load_model(smollm2_gguf)
    cache, arts = {}, {}
    root = tmp_path_factory.mktemp("tvm-smol")

    def qdir(scheme):
        if scheme not in cache:
            write_qdir(source, scheme, root / f"qdir-{scheme}")
            model = load_qdir(root / f"qdir-{scheme}")
            cache[scheme] = (root / f"qdir-{scheme}", model, ReferenceModel(model))
        return cache[scheme]

    def artifact(scheme, target):
        if (scheme, target) not in arts:
            arts[(scheme, target)] = compile_tvm(qdir(scheme)[0], target, root / f"art-{scheme}-{target}")
            print(f"build {target} {scheme}: {BUILD_TIMES[f'{target}:qdir-{scheme}']} s")
        return arts[(scheme, target)]

    return qdir, artifact


@pytest.mark.parametrize("scheme", ["q0f32", "q4f32", "q4f16", "q8f16"])
def test_x86_logits_match_reference(smol, scheme):
    qdir, artifact = smol
    path, model, ref = qdir(scheme)
    engine = open_engine(artifact(scheme, "x86-cpu"), path)
    bound = TOLERANCE["float16" if scheme.endswith("f16") else "float32"]
    ids = chat_ids(model, PROMPTS[0])
    feed = greedy(ref, ids, 4)
    errs = relative_errors(step_logits(engine, ids, 4, feed), step_logits(ref, ids, 4, feed))
    assert max(errs) <= bound, f"{scheme}: error / logit range per step {errs}"


def test_x86_q4f32_greedy_tokens_equal_reference(smol):
    qdir, artifact = smol
    path, model, ref = qdir("q4f32")
    engine = open_engine(artifact("q4f32", "x86-cpu"), path)
    for text in PROMPTS:
        ids = chat_ids(model, text)
        assert greedy(engine, ids, GREEDY_TOKENS) == greedy(ref, ids, GREEDY_TOKENS), text


@pytest.mark.arm
def test_rpi5_q4f16_under_qemu_reproduces_reference_tokens(smol, tmp_path):
    from edgeforge.toolchains import ensure_arm64

    ensure_arm64()  # builds the arm64 root if it is missing: a missing toolchain fails, never skips
    qdir, artifact = smol
    path, model, ref = qdir("q4f16")
    art = artifact("q4f16", "rpi5")
    ids = chat_ids(model, PROMPTS[0])
    n = 8  # ~10 s per emulated token: keep the CI time down
    expected = greedy(ref, ids, n)
    rt = copy_runtime(tmp_path / "rt", tvm_arch="aarch64")
    script = tmp_path / "run.py"
    script.write_text(
        "import json, os, sys, time\n"
        "os.environ.setdefault('TVM_NUM_THREADS', '1')  # emulated threads only contend\n"
        "from edgeforge_runtime.tvm_engine import TvmEngine, compiler_loaded\n"
        "from edgeforge_runtime.generate import generate\n"
        "from edgeforge_runtime.sampling import Sampler\n"
        "t = time.time()\n"
        f"e = TvmEngine({str(art)!r}, {str(path)!r})\n"
        f"r = generate(e, {ids!r}, {n}, Sampler(temperature=0.0))\n"
        "print(json.dumps({'tokens': r.tokens, 'compiler': compiler_loaded(), 'seconds': time.time() - t,\n"
        "                  'decode_tok_s': len(r.tokens) / max(r.decode_seconds, 1e-9)}))\n"
    )
    start = time.time()
    proc = run_under_qemu([script], extra_pythonpath=[rt], timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"qemu rpi5 q4f16: {out} (wall {time.time() - start:.0f} s)")
    assert out["compiler"] is False
    assert out["tokens"] == expected
    np.testing.assert_equal(len(out["tokens"]), n)
