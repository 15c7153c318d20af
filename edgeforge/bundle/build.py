"""`edgeforge build`: quantize once, compute the golden data once, then compile and bundle per target.

Stages (each logged as progress, edgeforge.progress): fetch/load -> quantize (QDIR in a private temp folder) -> golden
(numpy reference on that QDIR) -> per (target, backend): compile + bundle (+ archive) -> the bundle's
own smoke test on this machine, where it can run here (--no-smoke skips it).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from ..errors import EdgeforgeError
from ..fsutil import clean_stale_temps, owned_temp_dir
from ..hostmem import check_memory
from ..progress import prefixed
from ..runtime.backends import BACKENDS
from ..runtime.bundle_errors import BundleError
from . import archive
from .config import BuildPlan
from .pack import bundle_name, make_bundle

logger = logging.getLogger(__name__)


def model_slug(spec: str) -> str:
    """A short file-name-safe model name: registry name, or the folder/file stem."""
    p = Path(spec)
    name = p.stem if p.suffix in (".gguf", ".toml") else p.name if p.exists() else spec.split("/")[-1]
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "model"


def _one(args) -> dict:
    """One (target, backend): compile and bundle. Runs in a worker process when --jobs > 1."""
    dest, qdir, target, backend, golden, make_archive, sign_key, quality, kv_cache = args
    # In a worker process (--jobs > 1) logging is not configured: only warnings reach stderr.
    start = time.perf_counter()
    try:
        with prefixed(f"  [{target.name}/{backend}] "):
            manifest = make_bundle(dest, qdir, target, backend, golden, sign_key=sign_key, quality=quality,
                                   kv_cache=kv_cache)
    except (EdgeforgeError, BundleError) as err:  # bad input (golden data refused, say): exit 2, not a bug
        return {"target": target.name, "backend": backend, "ok": False, "error": str(err)}
    except Exception as err:  # noqa: BLE001 - one broken backend must not stop the other targets
        if os.environ.get("EDGEFORGE_DEBUG") == "1":  # --debug (set for worker processes too)
            traceback.print_exc(file=sys.stderr)
        return {"target": target.name, "backend": backend, "ok": False, "internal": True,
                "error": f"internal error in the {backend} backend: {type(err).__name__}: {err}"}
    result = {"target": target.name, "backend": backend, "ok": True, "path": str(dest),
              "files": len(manifest["files"]), "bytes": sum(f["size"] for f in manifest["files"].values()),
              "seconds": round(time.perf_counter() - start, 1)}
    result["manifest_sha256"] = manifest.get("manifest_sha256")
    if make_archive:
        from ..runtime.files import sha256_file

        with prefixed(f"  [{target.name}/{backend}] "):
            logger.info(f"[archive] {dest.name}{archive.SUFFIX}")
        packed = archive.pack(dest)
        result.update(archive=str(packed), archive_bytes=packed.stat().st_size, archive_sha256=sha256_file(packed))
    return result


def run_build(plan: BuildPlan, jobs: int = 1, make_archive: bool = False) -> dict:
    """Build every (target, backend) of `plan`; progress goes to `logging` (stderr in the CLI)."""
    from ..model.loader import load_model
    from ..models import resolve_model_path
    from ..quant.qdir import write_qdir
    from .golden import model_dtype_of, make_golden, planned_kind

    t0 = time.perf_counter()
    slug = model_slug(plan.model)
    path = resolve_model_path(plan.model)
    logger.info(f"[load] {plan.model} ({path})")
    model = load_model(path)
    plan.output.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(plan.output)  # what a killed build left behind
    with owned_temp_dir(f".edgeforge-build.tmp-{os.getpid()}-", plan.output) as work:
        qdir = Path(work) / "qdir"
        logger.info(f"[quantize] {plan.quant}")
        summary = write_qdir(model, plan.quant, qdir, embed_bits=plan.embed_bits)
        logger.info(f"[quantize] {summary['tensors']} tensors, {summary['bytes'] / 1e6:.1f} MB in {summary['seconds']} s")
        check_memory("golden, compile and smoke", memory_needed(summary["bytes"], model.config, plan))
        logger.info(f"[golden] {len(plan.prompts)} prompts x {plan.golden_tokens} tokens on the numpy reference")
        # once per arithmetic the bundles compute in (ONNX Runtime's x86 int8 kernels: their own) and
        # dither their spreads are measured with
        dtype = model_dtype_of(qdir)
        kinds = {planned_kind(t, b, dtype) for t, b in plan.jobs}
        golden = {(a, d): make_golden(qdir, plan.prompts, plan.golden_tokens, arithmetic=a, dither=d)
                  for a, d in sorted(kinds, key=repr)}
        quality = _quality(model, qdir, plan)
        tasks = [(plan.output / bundle_name(slug, plan.quant, t.name, b), qdir, t, b, golden, make_archive, plan.sign_key,
                  quality, plan.kv_cache) for t, b in plan.jobs]
        results = _run_tasks(tasks, jobs)
    if plan.smoke:
        for result in results:
            if result["ok"]:
                _smoke_here(result)
    return {"model": plan.model, "quant": plan.quant, "output": str(plan.output),
            "seconds": round(time.perf_counter() - t0, 1), "bundles": results}


def _quality(model, qdir: Path, plan) -> dict:
    """quality.json for every bundle of this build: measured once on the QDIR they all share."""
    from ..quant import quality

    if plan.quality_skip:
        logger.info(f"[quality] skipped: {plan.quality_skip}")
        return quality.skipped(plan.quality_skip)
    if (getattr(model, "source", None) or {}).get("format") == "qdir":
        return quality.skipped("the build started from a quantized model folder: no source weights to compare with")
    return quality.measure(model, qdir, plan.quality_tokens)


def _run_tasks(tasks, jobs: int) -> list[dict]:
    results = []
    if jobs <= 1:
        for i, task in enumerate(tasks, 1):
            logger.info(f"[{i}/{len(tasks)}] {task[2].name} with {task[3]} -> {task[0]}")
            results.append(_report(_one(task)))
        return results
    logger.info(f"[compile] {len(tasks)} bundles, {jobs} at a time")
    # spawn: forking a process that has loaded TVM/ONNX Runtime threads is not safe
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_signals)
    try:
        for result in pool.map(_one, tasks):
            results.append(_report(result))
    except BaseException:  # SIGTERM (SystemExit), Ctrl-C, a failure: stop the workers, do not wait
        _stop_workers(pool)
        raise
    pool.shutdown()
    return results


def _worker_signals() -> None:
    """In each --jobs worker: SIGTERM unwinds like in the parent (cli._terminate), so a worker that
    is stopped removes its temporary folder and never renames a half-built bundle into place."""
    import signal

    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def _stop_workers(pool) -> None:
    """SIGTERM every worker, drop queued tasks and wait for them to unwind. (The executor has no
    public way to stop running tasks; its process table is the documented-by-use way.)"""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        if process.is_alive():
            process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def memory_needed(qbytes: int, config, plan) -> int:
    """Peak memory of the stages after quantization, from what they hold (measured on an 8B model,
    docs/notes/models-memory.md): the golden reference maps the quantized weights and keeps up to its
    cache budget in float32; the ONNX export holds the packed weights once more as initializers; a
    smoke test's engine copies the weights into its runtime while they are still mapped."""
    from ..model.reference import cache_budget_bytes

    floats = 4 * config.num_parameters()
    golden = qbytes + min(cache_budget_bytes(), floats) + (512 << 20)
    copies = 2 * qbytes + (512 << 20) if (plan.smoke or any(BACKENDS[b].weights_in_artifact for _, b in plan.jobs)) else 0
    return max(golden, copies)


def _smoke_here(result: dict) -> None:
    """Run the new bundle's own smoke test on this machine when it can run here (CPU targets of this
    machine's architecture, CUDA with a GPU). A FAIL makes the build fail: a bundle that cannot
    reproduce its own golden outputs is never reported as built."""
    from .smoke_run import verified

    bundle = Path(result["path"])
    with verified(bundle) as (manifest, copy):
        _smoke_copy(result, bundle, manifest, copy)


def _smoke_copy(result: dict, bundle: Path, manifest: dict, copy: Path) -> None:
    from .smoke_run import run_local

    run = manifest["target"].get("run", "host")
    try:
        from ..runtime.hostcheck import check_can_run

        if run not in ("host", "cuda"):
            raise BundleError(f"its target runs under {run} (`edgeforge smoke` runs it there)")
        check_can_run(manifest)
    except BundleError as err:
        result["smoke"] = f"not run here: {err}"
        logger.info(f"  smoke {result['target']}/{result['backend']}: not run here ({err})")
        return
    code, out = run_local(copy, [sys.executable], dict(os.environ), "this machine")
    result["smoke"] = out.get("status", "ERROR")
    result["smoke_result"] = {k: out.get(k) for k in ("max_logit_err", "tolerance", "tokens_agree", "tokens_total")}
    line = (f"  smoke {result['target']}/{result['backend']}: {result['smoke']} "
            f"(max logit err {out.get('max_logit_err')}, tokens {out.get('tokens_agree')}/{out.get('tokens_total')})")
    logger.log(logging.INFO if code == 0 else logging.WARNING, line)  # a FAIL shows with -q too
    if code != 0:
        result.update(ok=False, error=f"its own smoke test on this machine: {out.get('status')} "
                                      f"({out.get('error') or 'outputs disagree with golden.json'}); bundle at {bundle}")


def _report(result: dict) -> dict:
    if result["ok"]:
        logger.info(f"  ok {result['target']}/{result['backend']}: {result['files']} files, "
                    f"{result['bytes'] / 1e6:.1f} MB, {result['seconds']} s -> {result['path']}")
    else:
        logger.warning(f"  FAILED {result['target']}/{result['backend']}: {result['error']}")
    return result
