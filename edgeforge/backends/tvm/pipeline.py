"""The relax pass pipeline: the stock lowering plus our schedules.

CPU: our fused dequantize-matmul kernels get the hand-written schedule of cpu_schedule.py (parallel
over output rows, vectorized); everything else keeps TVM's default CPU lowering.
GPU: the dequantize stage inlined into the matmul, then dlight's default rules minus the
tensor-core rules that segfault in this wheel (tests/test_tvm_tensorize.py tells when they stop).
"""

from __future__ import annotations

import contextlib

import tvm
from tvm import relax


def gpu_rules(target: tvm.target.Target):
    """dlight rules for GPU targets. Matmul is the plain rule: its tensorized variants
    (MatmulTensorization for fp16 on sm >= 70, MetalMatmul) segfault in `sch.tensorize` in
    apache-tvm 0.27.0.post1; tests/test_tvm_tensorize.py tells when that is fixed."""
    from tvm.s_tir import dlight as dl

    return [
        _PlainMatmul(),
        dl.gpu.GEMV(),
        dl.gpu.LowBatchGEMV(),
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
        dl.gpu.RMSNorm(),
        dl.gpu.Fallback(),
    ]


def _PlainMatmul():
    """dlight's Matmul rule with its tensor-core sub-rules answering "not applicable".

    Matmul.apply calls MatmulTensorization / MatmulInt8Tensorization (cuda sm >= 70) and
    MetalMatmul (metal) by module-level name; while our apply runs they return None, so
    Matmul falls through to its plain (SIMT) schedule."""
    from tvm.s_tir.dlight.gpu import matmul

    class PlainMatmul(matmul.Matmul):
        def apply(self, func, target, tunable):
            with _tensorize_rules_disabled(matmul):
                return super().apply(func, target, tunable)

    return PlainMatmul()


TENSORIZE_RULES = ("MatmulTensorization", "MatmulInt8Tensorization", "MetalMatmul")


@contextlib.contextmanager
def _tensorize_rules_disabled(matmul_module):
    saved = {name: getattr(matmul_module, name).apply for name in TENSORIZE_RULES}
    try:
        for name in TENSORIZE_RULES:
            getattr(matmul_module, name).apply = lambda self, func, target, tunable: None
        yield
    finally:
        for name, fn in saved.items():
            getattr(matmul_module, name).apply = fn


def InlineDequantize():  # noqa: N802 - a pass factory, named like TVM's
    """Inline our kernels' dequantize stage into the matmul reduction, so dlight's GEMV/Matmul
    rules see one block reading the packed weights (they then schedule it like any matmul)."""
    from tvm import s_tir, tirx

    from .quantized_linear import DEQ_BLOCK

    @tvm.transform.module_pass(opt_level=0, name="edgeforge_inline_dequantize")
    def _pass(mod, _ctx):
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, tirx.PrimFunc):
                continue
            sch = s_tir.Schedule(func)
            try:
                block = sch.get_sblock(DEQ_BLOCK)
            except Exception:  # noqa: BLE001 - not one of our kernels
                continue
            sch.compute_inline(block)
            mod[gv] = sch.mod["main"]
        return mod

    return _pass


def lowering_pipeline(target: tvm.target.Target, cpu_schedule=None):
    """A module pass: legalize, fuse, schedule, lower to VM code for `target`."""
    from tvm.s_tir import dlight as dl

    is_gpu = target.kind.name != "llvm"
    passes = [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    if is_gpu:
        passes.append(InlineDequantize())
        passes.append(dl.ApplyDefaultSchedule(*gpu_rules(target)))
    elif cpu_schedule is not None:
        passes.append(cpu_schedule)
    passes += [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
    ]
    if target.kind.name == "cuda":
        passes.append(relax.transform.RewriteCUDAGraph())
    passes += [
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]

    @tvm.transform.module_pass(opt_level=0, name="edgeforge_lowering")
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline
