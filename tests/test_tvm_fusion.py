"""The dequantize is fused into the matmul: in the lowered (scheduled) TIR for CPU and CUDA, every
kernel that reads packed weights is a reduction (the matmul itself, or the embedding gather), and no
kernel allocates a float buffer the size of a weight matrix (CPU prefill kernels dequantize one
[8, in] tile at a time into a small buffer; GPU and decode kernels dequantize in registers)."""

from __future__ import annotations

import re

import pytest

tvm = pytest.importorskip("tvm")

from edgeforge.model.loader import load_model  # noqa: E402
from edgeforge.quant.qdir import write_qdir  # noqa: E402


@pytest.fixture(scope="module")
def spec(tiny_model, tmp_path_factory):
    from edgeforge.backends.tvm.compile import load_spec

    root = tmp_path_factory.mktemp("fusion")
    write_qdir(load_model(tiny_model("llama32")), "q4f16", root / "qdir")
    return load_spec(root / "qdir")[0]


def lowered_prim_funcs(spec, target_name):
    from edgeforge.backends.tvm.compile import export_module
    from edgeforge.backends.tvm.cpu_schedule import ScheduleQuantizedMatmul
    from edgeforge.backends.tvm.pipeline import lowering_pipeline
    from edgeforge.backends.tvm.targets import tvm_target_for
    from edgeforge.targets import get_target

    tt = tvm_target_for(get_target(target_name))
    target = tt.target()
    with target:
        mod, _ = export_module(spec)
    sched = None if tt.is_gpu else ScheduleQuantizedMatmul(target)
    with target:
        mod = lowering_pipeline(target, sched)(mod)
        # what tvm.build does first: buffers move to where they are used and shrink to that region
        tir = tvm.IRModule({gv: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)})
        tir = tvm.s_tir.transform.LowerInitBlock()(tir)
        tir = tvm.s_tir.transform.PlanAndUpdateBufferAllocationLocation()(tir)
        tir = tvm.s_tir.transform.ConvertBlocksToOpaque()(tir)
        tir = tvm.s_tir.transform.CompactBufferAllocation()(tir)
    # name -> (scheduled TIR, TIR with buffers compacted)
    return {gv.name_hint: (mod[gv.name_hint].script(), f.script()) for gv, f in tir.functions.items()}


def weight_shapes(spec):
    c = spec.config
    h, i, d = c.hidden_size, c.intermediate_size, c.head_dim
    return {(c.num_heads * d, h), (c.num_kv_heads * d, h), (h, c.num_heads * d), (i, h), (h, i), (c.vocab_size, h)}


@pytest.mark.parametrize("target_name", ["x86-cpu", "cuda"])
def test_no_separate_dequantize_kernel(spec, target_name):
    funcs = lowered_prim_funcs(spec, target_name)
    readers = {name: texts for name, texts in funcs.items() if "_qweight" in texts[0]}
    # q/k/v/o, gate/up/down (some fused with their epilogue) + embedding gather + tied head
    assert len(readers) >= 5, sorted(funcs)
    for name, (text, compacted) in readers.items():
        is_reduction = "T.axis.reduce" in text or "T.comm_reducer" in text or '"R' in text
        is_gather = name.startswith("embed")
        assert is_reduction or is_gather, f"{target_name}: {name} reads packed weights but is not the matmul"
        for rows, cols in weight_shapes(spec):
            for alloc in re.findall(r"alloc_buffer\(\((.*?)\)\s*,?\s*\"?(float16|float32)?", compacted):
                dims = [int(x) for x in re.findall(r"\d+", alloc[0].replace("T.int64", ""))]
                assert dims[-2:] != [rows, cols], f"{target_name}: {name} materializes a {rows}x{cols} weight"


def test_cpu_kernels_are_parallel_and_vectorized(spec):
    funcs = lowered_prim_funcs(spec, "x86-cpu")
    matmuls = [t for n, (t, _) in funcs.items() if "_qweight" in t and not n.startswith("embed")]
    assert matmuls
    for text in matmuls:
        assert "T.parallel" in text and "T.vectorized" in text
