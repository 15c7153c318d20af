"""GPTQ (quant/gptq.py): the blocked Cholesky form against a by-hand loop with the explicit inverse
Hessian, its gain over the calibrated search without it, its refusals, and a GPTQ scheme through a QDIR."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeforge.errors import EdgeforgeError
from edgeforge.quant import gptq
from edgeforge.quant.formats import GROUP_SIZE, Q4_LEVELS, get_format, unpack_q4, zeros_width


def correlated_inputs(rng, tokens: int, k: int) -> np.ndarray:
    """Activations with correlated columns of unequal scale, as real ones are (H far from diagonal)."""
    x = rng.standard_normal((tokens, k)) @ (np.eye(k) + 0.5 * rng.standard_normal((k, k)) / np.sqrt(k))
    return (x * rng.gamma(1.0, 1.0, size=k)).astype(np.float32)


def objective(w, deq, h) -> float:
    """The layer's output error on the calibration inputs: sum over rows (w - deq) H (w - deq)^T."""
    d = (np.asarray(w, np.float64) - deq)
    return float(np.einsum("ri,ij,rj->", d, h, d))


def gptq_by_hand(w, h, fmt):
    """GPTQ as first written (OBQ order): quantize column q, add -err / Hinv[q,q] * Hinv[q, :] to the
    columns after it, then eliminate q from the inverse Hessian; no Cholesky, no blocks, float64."""
    w = np.array(w, np.float64)
    hd = np.array(h, np.float64)
    hd[np.diag_indices_from(hd)] += gptq.DAMP * np.mean(np.diag(hd))
    hinv = np.linalg.inv(hd)
    imp = np.diag(h).astype(np.float32)
    rows, cols = w.shape
    deq = np.zeros_like(w)
    for q in range(cols):
        if q % GROUP_SIZE == 0:
            groups = w[:, q : q + GROUP_SIZE].astype(np.float32).reshape(rows, 1, GROUP_SIZE)
            s, z = gptq._group_params(fmt, groups, imp[q : q + GROUP_SIZE].reshape(1, 1, -1), "w")  # noqa: SLF001
        code = gptq._round(w[:, q].astype(np.float32), s, z, fmt)  # noqa: SLF001
        deq[:, q] = (code - z) * s
        err = (w[:, q] - deq[:, q]) / hinv[q, q]
        w[:, q + 1 :] -= np.outer(err, hinv[q, q + 1 :])
        hinv = hinv - np.outer(hinv[:, q], hinv[q, :]) / hinv[q, q]
    return deq


@pytest.mark.parametrize("fmt_name", ["q4a", "q8"])
def test_blocked_gptq_equals_the_by_hand_loop(fmt_name, monkeypatch):
    rng = np.random.default_rng(3)
    k = 160  # five groups; BLOCK = 64 makes the lazy block update cross group boundaries unevenly
    monkeypatch.setattr(gptq, "BLOCK", 64)
    x = correlated_inputs(rng, 400, k)
    h = x.astype(np.float64).T @ x
    w = rng.standard_normal((24, k)).astype(np.float32)
    fmt = get_format(fmt_name, "float32")
    arrays = gptq.gptq_quantize(w, h, fmt, "w")
    deq = fmt.dequantize(arrays)
    by_hand = gptq_by_hand(w, h, fmt)
    # float32 here, float64 there: scales differ in their last bits and a code near a rounding tie
    # may flip, after which later columns differ a little; the result is otherwise the same
    close = np.abs(deq - by_hand) <= 1e-4 * np.abs(w).max()
    assert close.mean() > 0.97
    assert objective(w, deq, h) == pytest.approx(objective(w, by_hand, h), rel=1e-3)


def test_gptq_beats_the_calibrated_search_and_stores_valid_arrays():
    rng = np.random.default_rng(5)
    k = 256
    x = correlated_inputs(rng, 512, k)
    h = x.astype(np.float64).T @ x
    w = (rng.standard_normal((64, k)) * rng.gamma(2.0, 0.5, size=(64, 1))).astype(np.float32)
    fmt = get_format("q4a", "float16")
    arrays = gptq.gptq_quantize(w, h, fmt, "w")
    assert set(arrays) == {"qweight", "scales", "zeros"}
    assert arrays["qweight"].dtype == np.uint32 and arrays["scales"].dtype == np.float16
    assert arrays["zeros"].dtype == np.uint8 and arrays["zeros"].shape == (64, zeros_width(k // GROUP_SIZE))
    assert unpack_q4(arrays["qweight"]).max() <= Q4_LEVELS
    searched = fmt.dequantize(fmt.quantize(w, "w", importance=np.diag(h).astype(np.float32) / len(x)))
    rtn = fmt.dequantize(fmt.quantize(w, "w"))
    e_gptq, e_search, e_rtn = (objective(w, d, h) for d in (fmt.dequantize(arrays), searched, rtn))
    assert e_gptq < 0.9 * e_search and e_search < e_rtn  # measured: 0.81x the search here


def test_gptq_refuses_what_it_cannot_store():
    w = np.ones((4, 64), np.float32)
    with pytest.raises(EdgeforgeError, match="tensor 'x.weight': GPTQ stores q4a or q8, not q4"):
        gptq.gptq_quantize(w, np.eye(64), get_format("q4", "float16"), "x.weight")
    with pytest.raises(EdgeforgeError, match=r"tensor 'x.weight': Hessian is \[32, 32\], the weight has 64"):
        gptq.gptq_quantize(w, np.eye(32), get_format("q4a", "float16"), "x.weight")
    with pytest.raises(EdgeforgeError, match="not divisible by the group size"):
        gptq.gptq_quantize(np.ones((4, 48), np.float32), np.eye(48), get_format("q4a", "float16"), "x.weight")


def test_a_column_no_input_reaches_is_stored_as_zero():
    rng = np.random.default_rng(7)
    x = correlated_inputs(rng, 128, 64)
    x[:, 5] = 0.0  # a dead input channel: H has a zero row and column
    h = x.astype(np.float64).T @ x
    w = rng.standard_normal((8, 64)).astype(np.float32)
    fmt = get_format("q4a", "float32")
    deq = fmt.dequantize(gptq.gptq_quantize(w, h, fmt, "w"))
    assert np.isfinite(deq).all() and (deq[:, 5] == 0).all()


def test_gptq_scheme_writes_a_qdir_that_says_so(tiny_model, tmp_path):
    from edgeforge.model.loader import load_model
    from edgeforge.quant.qdir import load_qdir, write_qdir

    model = load_model(tiny_model("llama32"))
    summary = write_qdir(model, "q4f16_m", tmp_path / "q")
    quant = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert summary["calibration"]["method"] == "gptq" and quant["calibration"]["method"] == "gptq"
    assert quant["calibration"]["tokens"] > 0 and len(quant["calibration"]["sha256"]) == 64
    tensors = quant["tensors"]
    solved = {n for n, e in tensors.items() if e.get("scales") == "gptq"}
    # every q4a and q8 matrix of the layers is solved by GPTQ; the embedding (q8) is not
    assert solved == {n for n, e in tensors.items() if e["format"] in ("q4a", "q8") and ".layers." in n}
    assert tensors["model.embed_tokens.weight"]["format"] == "q8" and "scales" not in tensors["model.embed_tokens.weight"]
    assert not [p for p in (tmp_path / "q").rglob("*") if "gptq" in p.name]  # the spill folder is gone
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # and nothing was left beside the QDIR
    back = load_qdir(tmp_path / "q")
    for name in solved:
        assert np.isfinite(back.tensors.get(name)).all()


def test_gptq_that_cannot_fit_says_so_before_it_starts(tiny_model, tmp_path, monkeypatch):
    from edgeforge import hostmem
    from edgeforge.model.loader import load_model
    from edgeforge.quant.qdir import write_qdir

    # Llama-3-8B's widest matrix (down_proj, 4096 x 14336) measured 8.2 GiB at its peak
    needed = gptq.memory_needed([(4096, 4096), (14336, 4096), (4096, 14336)])
    assert 8 * 2**30 < needed < 12 * 2**30
    monkeypatch.setattr(hostmem, "mem_available", lambda: 1 << 20)
    with pytest.raises(EdgeforgeError, match=r"GPTQ calibration of q4f16_m needs about .* GiB .*q4f16"):
        write_qdir(load_model(tiny_model("llama32")), "q4f16_m", tmp_path / "q")
    assert not list(tmp_path.iterdir())


def test_eval_spill_goes_to_the_cache_and_orphans_are_removed(tmp_path, monkeypatch):
    """`edgeforge eval` spills GPTQ's arrays to the edgeforge cache (disk), not the system temp folder
    (often tmpfs: RAM). A folder whose lock nobody holds (a killed run) is removed; one whose lock is
    held (a live run, maybe in another container sharing the cache) is not, nor anything else."""
    import fcntl
    import gc
    import os
    import time

    from edgeforge.cache import ABANDONED_AFTER_S, SCRATCH_LOCK
    from edgeforge.quant.calibrate import GptqStore

    monkeypatch.setenv("EDGEFORGE_CACHE", str(tmp_path / "cache"))
    scratch = tmp_path / "cache" / "tmp"
    orphan, live = scratch / ".gptq.scratch-dead", scratch / ".gptq.scratch-live"
    fresh, old, other = scratch / ".gptq.scratch-new", scratch / ".gptq.scratch-old", scratch / "gptq-notes"
    for folder in (orphan, live, fresh, old, other):
        folder.mkdir(parents=True)
        (folder / "0.qweight.npy").write_bytes(b"kept?")
    (orphan / SCRATCH_LOCK).write_text("")  # nobody holds it
    (live / SCRATCH_LOCK).write_text("")
    holder = open(live / SCRATCH_LOCK)  # its own open file: a lock another process would hold
    fcntl.flock(holder, fcntl.LOCK_EX)
    long_ago = time.time() - ABANDONED_AFTER_S - 60
    os.utime(old, (long_ago, long_ago))  # no lock file, a day old: its creator died at once
    store = GptqStore()
    assert store.folder.parent == scratch and store.folder.name.startswith(".gptq.scratch-")
    assert not orphan.exists() and not old.exists()
    assert live.exists() and fresh.exists() and other.exists()
    holder.close()
    store.put("w", {"qweight": np.arange(4, dtype=np.int8)})
    np.testing.assert_array_equal(store.get("w")["qweight"], np.arange(4))
    second = GptqStore()  # a second run beside this one leaves its folder alone
    assert store.folder.exists() and second.folder != store.folder
    folder = store.folder
    del store
    gc.collect()
    assert not folder.exists()
    # a cache that cannot be written: the system temp folder instead
    monkeypatch.setenv("EDGEFORGE_CACHE", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("not a folder")
    store = GptqStore()
    assert store.folder.name.startswith("edgeforge-gptq-") and store.folder.is_dir()
