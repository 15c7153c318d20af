"""Build the content of a bundle's manifest.json (the writer/verifier is edgeforge.runtime.manifest_check).

No timestamps or host paths go in: two builds from the same inputs give the same manifest, apart from
compiled files whose bytes the compiler does not keep stable.
"""

from __future__ import annotations

import platform
from pathlib import Path

from .. import __version__
from ..runtime.files import read_json
from ..runtime.manifest_check import read_manifest, verify_bundle, write_manifest  # noqa: F401  (re-exported)


def kv_cache(artifact: dict) -> dict:
    """What the bundle keeps its KV cache in: {"dtype"} (the compute dtype), or for an int8 cache
    also how its scales were made (artifact.json's onnx.kv_cache)."""
    onnx = artifact.get("onnx") or {}
    return onnx.get("kv_cache") or {"dtype": onnx.get("kv_dtype") or artifact.get("model_dtype")}


def manifest_data(name: str, qdir: Path, target, artifact: dict, requirements: dict, has_weights: bool) -> dict:
    quant = read_json(qdir / "quantization.json")
    config = {k: v for k, v in read_json(qdir / "config.json").items() if k not in ("format", "version")}
    source = quant.get("source", {})
    requirements_dev = dict(artifact.get("device_requirements") or {})
    requirements_dev.update(os=target.os, arch=target.arch, python=">=3.10")
    return {
        "name": name,
        "model": {"id": source.get("model_id", ""), "source_sha256": source.get("sha256", ""),
                  "source_format": source.get("format", "")},
        "config": config,
        "scheme": quant.get("scheme", artifact.get("scheme")),
        "embed_format": quant.get("embed_format"),
        "model_dtype": quant.get("model_dtype", artifact.get("model_dtype")),
        "target": {"name": target.name, "description": target.description, "os": target.os,
                   "arch": target.arch, "run": target.run, **({"cpu": target.cpu} if target.cpu else {})},
        "backend": artifact["backend"],
        "device": artifact.get("device", "cpu"),
        "kv_cache": kv_cache(artifact),
        "has_weights": has_weights,
        "runtime_requirements": requirements,
        "toolchain": dict(sorted({**(artifact.get("toolchain") or {}), "edgeforge": __version__,
                                  "python": platform.python_version()}.items())),
        "device_requirements": dict(sorted(requirements_dev.items())),
    }
