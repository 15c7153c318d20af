"""`compile_qdir()` and the compiler side of the backend registry (runtime/backends.py). Each
backend's compile module exposes `compile_model(qdir, target, out) -> dict` (progress goes to `logging`).

Backends import their compiler (apache-tvm, onnx) only when asked for, so a machine with one of
them installed can still use the other.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import time
from pathlib import Path

from ..errors import EdgeforgeError
from ..fsutil import atomic_output_dir, is_json_of_format
from ..runtime.backends import BACKENDS
from ..targets import get_target

logger = logging.getLogger(__name__)

def get_backend(name: str):
    if name not in BACKENDS:
        raise EdgeforgeError(f"unknown backend '{name}'; known backends: {', '.join(BACKENDS)}")
    entry = BACKENDS[name]
    extra = entry.compile_extra
    try:
        return importlib.import_module(entry.compile_module)
    except ImportError as err:
        if err.name and err.name.startswith("edgeforge"):
            raise
        raise EdgeforgeError(f"backend '{name}' needs {extra}: pip install '{extra.split()[0]}' ({err})") from err


def is_artifact(path: Path) -> bool:
    """A folder `edgeforge compile` wrote (what a new compile may replace)."""
    return is_json_of_format(Path(path) / "artifact.json", "edgeforge-artifact")


KV_CACHES = ("float", "int8")


def with_kv_cache(target, backend: str, kv_cache: str | None):
    """`target` with `--kv-cache` applied ([onnx] kv_cache); None leaves the target file's choice.
    TVM refuses int8 by name: its paged KV cache (tvm.relax.frontend.nn.llm TIRPagedKVCache) stores
    K/V in the model's dtype and its attention kernels read that dtype (docs/notes/kv-cache.md)."""
    if kv_cache is None:
        return target
    if kv_cache not in KV_CACHES:
        raise EdgeforgeError(f"--kv-cache must be one of {', '.join(KV_CACHES)}, got {kv_cache!r}")
    if backend != "onnx":
        if kv_cache == "int8":
            raise EdgeforgeError(f"--kv-cache int8: the {backend} backend (target '{target.name}') has no int8 KV "
                                 "cache (TVM's paged KV cache stores the model's dtype); use --backend onnx")
        return target
    return dataclasses.replace(target, onnx={**(target.onnx or {}), "kv_cache": kv_cache})


def compile_qdir(qdir: Path, target_name: str, backend: str, out: Path, kv_cache: str | None = None) -> dict:
    """Compile a QDIR for a target into `out` (written atomically). Returns artifact.json's content.
    `kv_cache`: "float" or "int8" (`--kv-cache`; with_kv_cache), None: the target file's choice."""
    qdir = Path(qdir)
    if not (qdir / "quantization.json").is_file():
        raise EdgeforgeError(f"{qdir}: not a quantized model folder (no quantization.json); run `edgeforge quantize` first")
    target = get_target(target_name)
    backend = target.pick_backend(backend)
    target = with_kv_cache(target, backend, kv_cache)
    module = get_backend(backend)
    start = time.time()
    logger.debug("compile: %s for %s with %s -> %s", qdir, target.name, backend, out)
    with atomic_output_dir(out, is_artifact, "compiled artifact") as tmp:
        artifact = module.compile_model(qdir, target, Path(tmp))
        if not (Path(tmp) / "artifact.json").is_file():
            (Path(tmp) / "artifact.json").write_text(json.dumps(artifact, indent=1, sort_keys=True))
    artifact = dict(artifact, compile_seconds=round(time.time() - start, 1))
    return artifact
