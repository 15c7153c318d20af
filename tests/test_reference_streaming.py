"""Issue 10: the numpy reference reads each weight from the model's storage when it is used, so its
memory is the quantized weights plus a working set, with the same numbers as before."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeforge.model.reference import ReferenceModel

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("scheme", ["q4f32", "q8f16", "q0f32"])
def test_streamed_equals_kept_bit_for_bit(tiny_shape, tiny_qdir, scheme):
    """Budget 0 (every weight dequantized per use) against everything kept: identical bits, since
    each matrix is the same float32 array either way and the matmuls are the same calls."""
    shape, _ = tiny_shape
    _, model, _ = tiny_qdir(shape, scheme)
    ids = list(range(3, 40))
    kept = ReferenceModel(model, cache_bytes=1 << 40)
    streamed = ReferenceModel(model, cache_bytes=0)
    np.testing.assert_array_equal(kept.forward(ids), streamed.forward(ids))
    assert streamed.w.used == 0 and kept.w.used > 0
    for engine in (kept, streamed):
        engine.reset()
    a = [kept.prefill(ids[:5])] + [kept.decode(t) for t in (7, 9, 11)]
    b = [streamed.prefill(ids[:5])] + [streamed.decode(t) for t in (7, 9, 11)]
    np.testing.assert_array_equal(np.stack(a), np.stack(b))


def test_row_blocks_match_within_float32_rounding(tiny_qdir):
    """Large matrices go in row blocks: every logit is the same dot product, so the difference is
    at most float32 summation-order rounding (BLAS may block the k loop differently)."""
    _, model, _ = tiny_qdir("llama32", "q4f32")
    ids = list(range(3, 30))
    whole = ReferenceModel(model, cache_bytes=0).forward(ids)
    blocked = ReferenceModel(model, cache_bytes=0)
    blocked.w.block_bytes = 1024  # every matrix in blocks of a few rows
    got = blocked.forward(ids)
    np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-5 * float(np.abs(whole).max()))
    assert np.array_equal(np.argmax(got, -1), np.argmax(whole, -1))


GOLDEN_PEAK = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
import numpy as np
from edgeforge.model.loader import load_model
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
from edgeforge.bundle.golden import make_golden
model = load_model(sys.argv[1])          # memory-mapped: nothing read yet
base = status("VmRSS")  # resident now; the peak below is the high-water mark of what follows
make_golden(sys.argv[1], ("one two three",), 3)
print(json.dumps({"base": base, "peak": status("VmHWM")}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM (Linux)")
def test_golden_memory_stays_near_the_quantized_size(tmp_path):
    """A model whose embedding is 410 MB in float32 and 58 MB in q4: golden's peak grows by about
    the quantized size plus one block, not by the float size (it used to convert every weight)."""
    sys.path.insert(0, str(BENCH))
    import gpu

    gpu.SHAPES["bigvocab"] = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=400_000, tie_word_embeddings=True,
                                  rope_theta=10000.0, max_position_embeddings=256)
    qdir = gpu.synth_qdir(tmp_path / "q", "bigvocab", scheme="q4f16_rtn", log=lambda m: None)  # a 4-bit embedding
    float_bytes = 400_000 * 256 * 4
    q_bytes = sum(p.stat().st_size for p in qdir.glob("*.safetensors"))

    def grow(env):
        out = subprocess.run([sys.executable, "-c", GOLDEN_PEAK, str(qdir), str(BENCH.parent)], capture_output=True,
                             text=True, env={**__import__("os").environ, **env}, timeout=300)
        assert out.returncode == 0, out.stderr
        r = json.loads(out.stdout.strip().splitlines()[-1])
        return r["peak"] - r["base"]

    streamed = grow({"EDGEFORGE_REFERENCE_CACHE_MB": "0", "EDGEFORGE_REFERENCE_BLOCK_MB": "8"})
    kept = grow({"EDGEFORGE_REFERENCE_CACHE_MB": "4096"})
    print(f"\ngolden peak growth: streamed {streamed / 2**20:.0f} MiB, kept {kept / 2**20:.0f} MiB; "
          f"float embedding {float_bytes / 2**20:.0f} MiB, quantized model {q_bytes / 2**20:.0f} MiB")
    assert streamed < q_bytes + 96 * 2**20 < float_bytes / 2  # the quantized size plus a working set
    assert kept > 0.9 * float_bytes  # the old behaviour, for contrast


def test_prefill_in_chunks_is_the_same_and_bounded(tiny_qdir):
    """Prompt processing in chunks (issue 21, item 4): the logits equal one whole step's, and the
    largest attention score array is [heads, chunk, length], not [heads, prompt, prompt]."""
    import numpy as np

    from edgeforge.model import reference
    from edgeforge.model.reference import ReferenceModel

    _, model, _ = tiny_qdir("llama32", "q8f16")
    ids = [(7 * i) % 300 + 3 for i in range(300)]
    whole = ReferenceModel(model, chunk=None)
    chunked = ReferenceModel(model, chunk=64)
    np.testing.assert_allclose(chunked.prefill(ids), whole.prefill(ids), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(chunked.decode(5), whole.decode(5), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(chunked.forward(ids[:100]), whole.forward(ids[:100]), rtol=1e-4, atol=1e-4)
    largest = []
    real_softmax = reference.softmax

    def spy(x):
        largest.append(x.size)
        return real_softmax(x)

    reference.softmax = spy
    try:
        ReferenceModel(model, chunk=64).prefill(ids)
    finally:
        reference.softmax = real_softmax
    c = model.config
    assert max(largest) <= c.num_heads * 64 * len(ids)
