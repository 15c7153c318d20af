"""The layouts the ONNX builder relies on, checked against ONNX Runtime itself: our q4/q8 arrays fed
as is to MatMulNBits and GatherBlockQuantized (default zero points 8 and 128) give exactly the
numpy dequantization of quant/formats.py; and the engine's own embedding lookup
(runtime/embedding.py, which replaced GatherBlockQuantized in the graph) equal to that op."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgeforge.backends.onnx import pack  # noqa: E402
from edgeforge.errors import EdgeforgeError  # noqa: E402
from edgeforge.quant.formats import get_format  # noqa: E402
from edgeforge.runtime.bundle_errors import BundleError  # noqa: E402
from edgeforge.runtime.embedding import EmbeddingTable  # noqa: E402


def run_ops(q: pack.QuantLinear, x: np.ndarray, ids: np.ndarray, dtype, accuracy_level: int = 0):
    """y = MatMulNBits(x, q) and e = GatherBlockQuantized(q, ids), sharing the blob initializer
    (q4a: MatMulNBits gets its zero points; the gather, which the graph no longer uses, does not)."""
    t = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    inits = [numpy_helper.from_array(q.blob, "B"), numpy_helper.from_array(q.scales.reshape(-1), "S"),
             numpy_helper.from_array(q.scales[:, :, None], "S3")]
    mm_inputs = ["x", "B", "S"]
    if q.zero_points is not None:
        inits.append(numpy_helper.from_array(q.zero_points.reshape(-1), "Z"))
        mm_inputs.append("Z")
    nodes = [
        helper.make_node("MatMulNBits", mm_inputs, ["y"], domain="com.microsoft", K=q.k, N=q.n,
                         bits=q.bits, block_size=32, accuracy_level=accuracy_level),
        helper.make_node("GatherBlockQuantized", ["B", "ids", "S3"], ["e"], domain="com.microsoft",
                         bits=q.bits, block_size=32, gather_axis=0, quantize_axis=2),
    ]
    graph = helper.make_graph(nodes, "ops", [helper.make_tensor_value_info("x", t, [1, None, q.k]),
                                             helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("y", t, None), helper.make_tensor_value_info("e", t, None)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, e = sess.run(None, {"x": x.astype(dtype), "ids": ids})
    return y.astype(np.float32), e.reshape(1, ids.shape[1], q.k).astype(np.float32)


@pytest.mark.parametrize("fmt_name,scale_dtype", [("q4", "float32"), ("q4", "float16"), ("q8", "float16"), ("q8", "float32")])
def test_matmulnbits_and_gather_read_our_arrays_exactly(fmt_name, scale_dtype):
    rng = np.random.default_rng(1)
    n, k = 40, 96
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[3, 32:64] = 0.0  # a zero group: scale 0, stored q = 0 (8 for q4)
    fmt = get_format(fmt_name, scale_dtype)
    arrays = fmt.quantize(w, "t.weight")
    expected_w = fmt.dequantize(arrays)
    entry = {"format": fmt_name, "shape": [n, k], "scale_dtype": scale_dtype}
    dtype = np.float32 if scale_dtype == "float32" else np.float16
    q = pack.quant_linear("t.weight", entry, arrays, dtype)
    x = rng.standard_normal((1, 3, k)).astype(np.float32)
    ids = np.array([[0, 3, n - 1, 3]], dtype=np.int64)
    y, e = run_ops(q, x, ids, dtype)
    # Gather is exact up to the rounding of q * scale to the output dtype.
    np.testing.assert_array_equal(e, expected_w[ids[0]][None].astype(dtype).astype(np.float32))
    x_in = x.astype(dtype).astype(np.float32)
    tol = 1e-5 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(y, x_in @ expected_w.T, atol=tol, rtol=tol)


@pytest.mark.parametrize("scale_dtype,level", [("float32", 0), ("float32", 4), ("float16", 0)])
def test_matmulnbits_reads_q4a_with_its_zero_points(scale_dtype, level):
    """Asymmetric q4 (per-group zero points 0..15, packed two a byte, even block low): MatMulNBits'
    output equals x @ the numpy dequantization; an odd number of blocks pads the last byte."""
    rng = np.random.default_rng(3)
    n, k = 24, 96  # 3 blocks: the zero points' last byte holds one
    w = rng.standard_normal((n, k)).astype(np.float32) + rng.standard_normal((n, 1)).astype(np.float32)
    w[5, :32] = 0.0
    fmt = get_format("q4a", scale_dtype)
    arrays = fmt.quantize(w, "t.weight", importance=rng.random(k).astype(np.float32))
    assert len(set(arrays["zeros"].ravel())) > 3  # really asymmetric
    dtype = np.float32 if scale_dtype == "float32" else np.float16
    q = pack.quant_linear("t.weight", {"format": "q4a", "shape": [n, k]}, arrays, dtype)
    assert q.zero_points.shape == (n, 2)
    x = rng.standard_normal((1, 3, k)).astype(np.float32)
    y, _ = run_ops(q, x, np.zeros((1, 1), np.int64), dtype, accuracy_level=level)
    x_in = x.astype(dtype).astype(np.float32)
    tol = {0: 1e-5, 4: 3e-2}[level] if dtype == np.float32 else 2e-2  # level 4 quantizes x to int8
    np.testing.assert_allclose(y, x_in @ fmt.dequantize(arrays).T, atol=tol * np.abs(y).max(), rtol=tol)


def test_bad_arrays_name_the_tensor():
    fmt = get_format("q4", "float32")
    arrays = fmt.quantize(np.ones((8, 64), np.float32), "m.weight")
    entry = {"format": "q4", "shape": [8, 64], "scale_dtype": "float32"}
    with pytest.raises(EdgeforgeError, match="m.weight"):
        pack.quant_linear("m.weight", entry, {**arrays, "qweight": arrays["qweight"].view(np.int32)}, np.float32)
    with pytest.raises(EdgeforgeError, match="m.weight.*scales"):
        pack.quant_linear("m.weight", entry, {**arrays, "scales": arrays["scales"][:, :1]}, np.float32)
    with pytest.raises(EdgeforgeError, match="m.weight.*multiple of 32"):
        pack.quant_linear("m.weight", {**entry, "shape": [8, 60]}, arrays, np.float32)


def _write_table(tmp_path, q: pack.QuantLinear, pad: int = 100) -> dict:
    """blob and float32 scales into one data file at unaligned offsets, as artifact.json describes them."""
    blob, scales = np.ascontiguousarray(q.blob), np.ascontiguousarray(q.scales.astype(np.float32))
    with open(tmp_path / "model.onnx.data", "wb") as f:
        f.write(b"\1" * pad)
        f.write(blob.tobytes())
        f.write(scales.tobytes())
    entry = lambda off, a: {"file": "model.onnx.data", "offset": off, "length": a.nbytes,  # noqa: E731
                            "dtype": a.dtype.name, "shape": list(a.shape)}
    return {"kind": "quantized", "bits": q.bits, "block_size": 32,
            "blob": entry(pad, blob), "scales": entry(pad + blob.nbytes, scales)}


@pytest.mark.parametrize("fmt_name,scale_dtype", [("q4", "float32"), ("q4", "float16"), ("q8", "float16"), ("q8", "float32")])
def test_engine_embedding_rows_equal_gather_block_quantized(tmp_path, fmt_name, scale_dtype):
    rng = np.random.default_rng(2)
    n, k = 40, 96
    w = rng.standard_normal((n, k)).astype(np.float32) * 3
    w[5, :32] = 0.0
    fmt = get_format(fmt_name, scale_dtype)
    arrays = fmt.quantize(w, "model.embed_tokens.weight")
    q = pack.quant_linear("e", {"format": fmt_name, "shape": [n, k], "scale_dtype": scale_dtype}, arrays, np.float32)
    table = EmbeddingTable(tmp_path, _write_table(tmp_path, q), n, k)
    ids = np.array([[0, 5, n - 1, 5, 17]], dtype=np.int64)
    _, e = run_ops(q, rng.standard_normal((1, 1, k)).astype(np.float32), ids, np.float32)
    np.testing.assert_array_equal(table.rows(ids[0]), e[0])  # bit for bit, ONNX Runtime's own op
    np.testing.assert_array_equal(table.rows(ids[0]), fmt.dequantize(arrays)[ids[0]])
    with pytest.raises(BundleError, match="token id 40 is outside"):
        table.rows([1, 40])


def test_engine_embedding_refuses_entries_outside_the_file(tmp_path):
    q = pack.quant_linear("e", {"format": "q8", "shape": [8, 64]}, get_format("q8", "float32").quantize(
        np.ones((8, 64), np.float32), "e"), np.float32)
    spec = _write_table(tmp_path, q)
    for bad, match in ((dict(spec, scales=dict(spec["scales"], offset=10**9)), "not inside the file"),
                       (dict(spec, blob=dict(spec["blob"], file="../x.data")), "must be a file name"),
                       (dict(spec, blob=dict(spec["blob"], dtype="float32")), "dtype"),
                       (dict(spec, bits=3), "bits 3"),
                       ({"kind": "quantized"}, "malformed")):
        with pytest.raises(BundleError, match=match):
            EmbeddingTable(tmp_path, bad, 8, 64)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux only (/proc/self/smaps)")
def test_release_loaded_pages_drops_clean_pages_and_never_written_ones(tmp_path):
    """The engine hands back ONNX Runtime's resident copies of the data file after loading: a clean
    mapping loses its resident pages (and reads back the file's bytes), a mapping with a written
    (copy-on-write) page is left alone, so no write is ever discarded."""
    import mmap

    from edgeforge.runtime.onnx_engine import release_loaded_pages

    path = tmp_path / "model.onnx.data"
    path.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    with open(path, "r+b") as f:
        clean = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        dirty = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    assert sum(clean[i + 1] for i in range(0, len(clean), 4096)) and dirty[1] == 1  # both resident now
    dirty[0] = 7  # copy-on-write: this page exists only in memory
    released = release_loaded_pages([path])
    assert released == len(clean)  # only the clean mapping
    assert dirty[0] == 7 and clean[:256] == bytes(range(256)) and clean[-1] == 255


def _resident_kib(start: int, end: int) -> int:
    """Resident KiB of the mapping that starts at `start` (/proc/self/smaps)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.split(None, 1)[0] == f"{start:x}-{end:x}":
            return next(int(x.split()[1]) for x in lines[i + 1 :] if x.startswith("Rss:"))
    raise AssertionError("mapping not found")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux only (/proc/self/smaps)")
def test_pages_read_while_loading_are_handed_back_and_nothing_is_lost(tmp_path, monkeypatch):
    """PageOutWhileLoading reclaims the data file's pages while ONNX Runtime would be loading: the
    mapping's resident size falls while it is still mapped, its bytes read back from the file, and
    a written (copy-on-write) page and ordinary heap memory keep their contents."""
    import mmap
    import time

    from edgeforge.runtime import onnx_engine

    monkeypatch.setattr(onnx_engine, "PAGEOUT_EVERY_S", 0.02)
    path = tmp_path / "model.onnx.data"
    path.write_bytes(bytes(range(256)) * 16384)  # 4 MiB
    heap = np.arange(1 << 20, dtype=np.int64)
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    view = np.frombuffer(m, np.uint8)
    start = view.ctypes.data
    assert int(view[1::4096].sum()) == len(m) // 4096  # every page read: resident now
    m[4096 * 3] = 99  # one written page
    before = _resident_kib(start, start + len(m))
    assert before >= 1024  # KiB (the kernel may map a read ahead in large folios, or not)
    with onnx_engine.PageOutWhileLoading([path]) as pager:
        deadline = time.monotonic() + 5
        while pager.released == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    if not pager.supported:  # the engine then keeps its release after loading (tested above)
        pytest.skip("this kernel has no MADV_PAGEOUT (Linux < 5.4): nothing is paged out while loading")
    after = _resident_kib(start, start + len(m))
    assert after < before // 2, (before, after)
    assert m[4096 * 3] == 99 and m[: 256] == bytes(range(256)) and m[-1] == 255
    assert (heap == np.arange(1 << 20, dtype=np.int64)).all()
    del view
    m.close()


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux only (/proc/self/smaps)")
def test_a_locked_mapping_is_skipped_and_the_others_still_paged_out(tmp_path, monkeypatch):
    """MADV_PAGEOUT refuses a locked mapping (EINVAL, as an old kernel would refuse any): the pager
    skips that range and goes on with the others instead of stopping for the rest of the load."""
    import ctypes
    import mmap
    import time

    from edgeforge.runtime import onnx_engine

    libc = onnx_engine._libc()  # noqa: SLF001
    if libc is None or not onnx_engine._kernel_pages_out(libc):  # noqa: SLF001
        pytest.skip("this kernel has no MADV_PAGEOUT (Linux < 5.4)")
    monkeypatch.setattr(onnx_engine, "PAGEOUT_EVERY_S", 0.02)
    maps, views = [], []
    for name in ("locked.onnx.data", "model.onnx.data"):
        (tmp_path / name).write_bytes(bytes(range(256)) * 8192)  # 2 MiB
        with open(tmp_path / name, "rb") as f:
            maps.append(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ))
        views.append(np.frombuffer(maps[-1], np.uint8))
        assert int(views[-1][1::4096].sum()) == len(maps[-1]) // 4096  # resident
    locked = views[0].ctypes.data
    libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    if libc.mlock(locked, len(maps[0])) != 0:
        pytest.skip("mlock refused here (RLIMIT_MEMLOCK)")
    try:
        before = [_resident_kib(v.ctypes.data, v.ctypes.data + len(m)) for v, m in zip(views, maps)]
        with onnx_engine.PageOutWhileLoading([tmp_path / "locked.onnx.data", tmp_path / "model.onnx.data"]) as pager:
            deadline = time.monotonic() + 5
            while pager.released < 2 * len(maps[1]) and time.monotonic() < deadline:
                time.sleep(0.01)  # two passes over the unlocked file: the pager kept going after EINVAL
        after = [_resident_kib(v.ctypes.data, v.ctypes.data + len(m)) for v, m in zip(views, maps)]
        assert pager.supported and pager.released >= 2 * len(maps[1])
        assert after[0] == before[0] and after[1] < before[1] // 2, (before, after)
    finally:
        libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.munlock(locked, len(maps[0]))
    del views
    for m in maps:
        m.close()


def _page_states(path) -> tuple[int, int] | None:
    """(dirty, under writeback) page counts of a file's page-cache pages, from /proc/self/pagemap and
    /proc/kpageflags (root only: None when page frame numbers are hidden from this process)."""
    import mmap
    import struct

    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    try:
        view = np.frombuffer(m, np.uint8)
        int(view[:: mmap.PAGESIZE].sum())  # map every page (reads them from the page cache)
        first = view.ctypes.data // mmap.PAGESIZE
        pages = len(m) // mmap.PAGESIZE
        try:
            with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
                pm.seek(first * 8)
                entries = struct.unpack(f"{pages}Q", pm.read(pages * 8))
                dirty = writeback = 0
                for e in entries:
                    pfn = e & ((1 << 55) - 1)
                    if not (e >> 63) or pfn == 0:
                        return None  # not present, or PFNs hidden (not root)
                    kf.seek(pfn * 8)
                    flags = struct.unpack("Q", kf.read(8))[0]
                    dirty += bool(flags & (1 << 4))
                    writeback += bool(flags & (1 << 8))
        except OSError:
            return None
        del view
        return dirty, writeback
    finally:
        m.close()


@pytest.mark.skipif(not Path("/proc/kpageflags").exists(), reason="Linux with /proc/kpageflags only")
def test_a_verified_copy_is_written_back_at_once_so_loading_can_hand_its_pages_back(tmp_path, monkeypatch):
    """The verified copy's pages must be clean by the time ONNX Runtime maps them: PageOutWhileLoading can
    give back only what the kernel may drop, and a fresh copy stays dirty for ~30 s. Without the
    writeback hint the 1B q4f16 bundle peaked at 1212 MiB decoding (ratio 1.34), with it 1154 (1.27)."""
    import io
    import time

    from edgeforge.runtime import manifest_check

    data = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
    monkeypatch.setattr(manifest_check, "start_writeback", lambda fd: None)
    manifest_check._hash_and_copy(io.BytesIO(data), tmp_path / "plain", 0o644)
    states = _page_states(tmp_path / "plain")
    if states is None:
        pytest.skip("page flags are not readable here (needs root)")
    if (tmp_path / "plain").stat().st_dev == os.stat("/dev/shm").st_dev or states[0] == 0:
        pytest.skip("this file system keeps no dirty pages to see (tmpfs, or written through)")
    assert states[0] > (8 << 20) // 4096 // 2  # a fresh copy without the hint: dirty
    monkeypatch.undo()
    manifest_check._hash_and_copy(io.BytesIO(data), tmp_path / "hinted", 0o644)
    deadline = time.monotonic() + 10
    while (states := _page_states(tmp_path / "hinted")) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert states == (0, 0), states
    assert (tmp_path / "hinted").read_bytes() == data
