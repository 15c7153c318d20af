"""TVM backend on x86 with the tiny random Llamas: the compiled module (real TVM build, real runtime)
against the numpy reference on the same quantized weights; runtime-only loading; bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tvm")

from tvm_support import PROMPTS, TOLERANCE, compile_tvm  # noqa: E402

from edgeforge.testing import copy_runtime, greedy, relative_errors, step_logits  # noqa: E402

from edgeforge.errors import EdgeforgeError  # noqa: E402
from edgeforge.runtime.bundle_errors import BundleError  # noqa: E402
from edgeforge.runtime.loader import open_engine  # noqa: E402
from edgeforge.runtime.tvm_engine import TvmEngine  # noqa: E402

# Every tiny shape at q4f32; every scheme on the GQA + tied + llama3-rope shape; q8f16 also on
# the head_dim != hidden/heads shape (untied head, linear rope).
CASES = [("llama2", "q4f32"), ("llama32", "q4f32"), ("headdim", "q4f32"),
         ("llama32", "q0f32"), ("llama32", "q4f16"), ("llama32", "q8f16"), ("headdim", "q8f16"),
         ("llama32", "q4f16_m"), ("llama2", "q4f16_m")]
STEPS = 8


@pytest.fixture(scope="session")
def tvm_built(tiny_qdir, tmp_path_factory):
    """(shape, scheme) -> (QDIR path, loaded QDIR model, reference engine, x86 artifact dir)."""
    cache = {}

    def get(shape, scheme):
        if (shape, scheme) not in cache:
            qdir, model, ref = tiny_qdir(shape, scheme)
            art = compile_tvm(qdir, "x86-cpu", tmp_path_factory.mktemp(f"tvm-{shape}-{scheme}") / "art")
            cache[(shape, scheme)] = (qdir, model, ref, art)
        return cache[(shape, scheme)]

    return get


@pytest.mark.parametrize("shape,scheme", CASES)
def test_logits_match_reference(tvm_built, shape, scheme):
    qdir, model, ref, art = tvm_built(shape, scheme)
    engine = open_engine(art, qdir)
    assert isinstance(engine, TvmEngine) and engine.device == "cpu"
    dtype = json.loads((art / "artifact.json").read_text())["model_dtype"]
    bound = TOLERANCE[dtype]
    for prompt in PROMPTS:
        ids = model.tokenizer.encode(prompt)
        feed = greedy(ref, ids, STEPS)
        expected = step_logits(ref, ids, STEPS, feed)
        got = step_logits(engine, ids, STEPS, feed)
        assert all(g.dtype == np.float32 and g.shape == (model.config.vocab_size,) for g in got)
        errs = relative_errors(got, expected)
        assert max(errs) <= bound, f"{shape} {scheme} '{prompt}': error / logit range per step {errs}"
        if dtype == "float32":
            assert greedy(engine, ids, 16) == greedy(ref, ids, 16), f"{shape} {scheme} '{prompt}'"


def test_long_prompt_is_chunked_and_cache_resets(tvm_built, monkeypatch):
    """A prompt longer than one prefill chunk, then reset(): same logits as the reference both times."""
    import edgeforge.runtime.tvm_engine as te

    qdir, model, ref, art = tvm_built("llama32", "q4f32")
    monkeypatch.setattr(te, "PREFILL_CHUNK", 7)  # chunk boundaries inside the prompt
    engine = TvmEngine(art, qdir)
    ids = model.tokenizer.encode(" ".join(PROMPTS))
    assert len(ids) > 14
    for _ in range(2):
        engine.reset()
        ref.reset()
        err = relative_errors([engine.prefill(ids)], [ref.prefill(ids)])[0]
        assert err <= TOLERANCE["float32"]


def test_runtime_only_tvm_in_a_fresh_process(tvm_built, tmp_path):
    """The runtime copied alone (as in bundles) loads the module without libtvm_compiler."""
    qdir, model, ref, art = tvm_built("llama32", "q4f32")
    rt = copy_runtime(tmp_path / "rt")
    ids = model.tokenizer.encode(PROMPTS[0])
    script = (
        "import json, sys\n"
        "from edgeforge_runtime.tvm_engine import TvmEngine, compiler_loaded\n"
        f"e = TvmEngine({str(art)!r}, {str(qdir)!r})\n"
        f"print(json.dumps({{'compiler': compiler_loaded(), 'logits': e.prefill({ids!r}).tolist(),\n"
        "                  'edgeforge': any(m == 'edgeforge' or m.startswith('edgeforge.') for m in sys.modules)}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=rt, timeout=300,
                          env={"PYTHONPATH": str(rt), "PATH": "/usr/bin:/bin", "TVM_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["compiler"] is False and out["edgeforge"] is False
    ref.reset()
    assert relative_errors([np.array(out["logits"], dtype=np.float32)], [ref.prefill(ids)])[0] <= 1e-3


def test_weights_that_do_not_match_the_module_are_refused(tvm_built):
    """An engine given another scheme's QDIR names the array and says to recompile."""
    q4_qdir, *_ = tvm_built("llama32", "q4f32")
    _, _, _, q8_art = tvm_built("llama32", "q8f16")
    with pytest.raises(BundleError, match=r"array .* the module was compiled for .*recompile"):
        TvmEngine(q8_art, q4_qdir)


def test_missing_tensor_in_qdir_is_named(tvm_built, tmp_path):
    import shutil

    from edgeforge.backends.tvm.compile import load_spec

    qdir, *_ = tvm_built("llama32", "q4f32")
    bad = tmp_path / "qdir"
    shutil.copytree(qdir, bad)
    quant = json.loads((bad / "quantization.json").read_text())
    del quant["tensors"]["model.layers.1.mlp.up_proj.weight"]
    (bad / "quantization.json").write_text(json.dumps(quant))
    with pytest.raises(EdgeforgeError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_spec(bad)


def test_bad_tvm_target_tables_are_named(tmp_path):
    from edgeforge.backends.tvm.targets import tvm_target_for
    from edgeforge.targets import get_target

    base = get_target("cuda")
    for table, pattern in [({"host": {"kind": "c"}}, "host"),
                           ({"host": base.tvm["host"], "device": {"kind": "vulkan"}}, "vulkan"),
                           ({"host": base.tvm["host"], "device": {"kind": "cuda"}, "arches": ["90"]}, "arches"),
                           ({"host": base.tvm["host"], "export": "zip"}, "export")]:
        fake = type("T", (), {"name": "bad", "path": tmp_path / "bad.toml", "os": "linux", "tvm": table})()
        with pytest.raises(EdgeforgeError, match=pattern):
            tvm_target_for(fake)


def test_missing_cross_compiler_is_named(tvm_built, tmp_path, monkeypatch):
    import shutil

    from edgeforge.backends.tvm import targets as tt

    qdir, *_ = tvm_built("llama2", "q4f32")
    real_which = shutil.which
    monkeypatch.setattr(tt.shutil, "which", lambda name: None if "aarch64" in name else real_which(name))
    with pytest.raises(EdgeforgeError, match="aarch64-linux-gnu-g\\+\\+"):
        compile_tvm(qdir, "rpi4", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_max_length_sizes_the_kv_cache(tvm_built):
    """open_engine(max_length=N): the paged KV cache holds N tokens; longer sequences are refused, by name."""
    qdir, model, ref, art = tvm_built("llama32", "q4f32")
    engine = open_engine(art, qdir, max_length=16)
    assert engine.max_seq_len == 16
    ids = list(range(3, 15))
    np.testing.assert_allclose(engine.prefill(ids), ref.forward(ids)[-1], atol=1e-3 * np.ptp(ref.forward(ids)[-1]))
    with pytest.raises(BundleError, match="exceeds the context of 16"):
        engine.prefill(list(range(3, 8)))
    with pytest.raises(BundleError, match="exceeds the model's context length"):
        open_engine(art, qdir, max_length=10**6)
