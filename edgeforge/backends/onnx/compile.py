"""`compile_model` for the ONNX backend: QDIR -> model.onnx + model.onnx.data + artifact.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import onnx

from ...errors import EdgeforgeError
from ...runtime.onnx_engine import CUSTOM_OP_CPU_FEATURES
from . import kernels
from .graph import IR_VERSION, KV_ROTATION, MS_OPSET, OPSET, build_model
from .qdir import QdirWeights

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"

logger = logging.getLogger(__name__)

# execution provider -> (device name, the onnxruntime package that has it on the device)
PROVIDERS = {
    "CPUExecutionProvider": ("cpu", "onnxruntime"),
    "CUDAExecutionProvider": ("cuda", "onnxruntime-gpu"),
    "WebGpuExecutionProvider": ("webgpu", "onnxruntime-webgpu"),
    "CoreMLExecutionProvider": ("coreml", "onnxruntime"),
    # onnxruntime-web in a browser page (the `web` target): WebGPU, or WASM without a GPU
    "web": ("browser", "onnxruntime-web"),
}
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def compile_model(qdir: Path, target, out: Path) -> dict:
    """Build the graph for `target` ([onnx] execution_provider, accuracy_level) into `out`."""
    ep, level = _target_settings(target)
    weights = QdirWeights(Path(qdir))
    compute = compute_dtype(target, ep, weights.model_dtype_name)
    kv_cache = kv_cache_setting(target, ep, compute)
    kv_quant, kv_info = _kv_quant(qdir) if kv_cache == "int8" else (None, None)
    who = kernels_setting(target, ep, compute, level)
    logger.info(f"onnx: building {weights.scheme} graph ({compute} compute, {kv_cache} KV cache, "
                f"accuracy_level {level}, {who} kernels) for {ep}")
    out = Path(out)
    # External data: one file next to the graph, every tensor of >= 1 KiB written into it as it is
    # made (memory stays at one tensor), the .onnx keeps the graph and references.
    with open(out / DATA_FILE, "wb") as data:
        model, embedding, kernel_ops = build_model(weights, level, compute, (data, DATA_FILE), kv_quant,
                                                   use_kernels=who == "edgeforge")
    logger.debug(f"onnx: built {len(model.graph.node)} nodes; saving and checking {out / MODEL_FILE}")
    onnx.save_model(model, out / MODEL_FILE)
    try:
        onnx.checker.check_model(str(out / MODEL_FILE))
    except onnx.checker.ValidationError as err:  # a builder bug, not bad input, but say where
        raise EdgeforgeError(f"{out / MODEL_FILE}: onnx.checker rejected the graph: {str(err).splitlines()[0]}") from err
    artifact = _artifact(weights, target, ep, level, compute, embedding)
    if kernel_ops:  # the graph needs the library: built for this target, shipped and checksummed with it
        cc = kernels.find_compiler()
        library = kernels.build_library(out, cc)
        artifact["files"].append(library.name)
        artifact["onnx"]["custom_ops"] = {"library": library.name, "ops": [f"{kernels.DOMAIN}.{kernels.OP}"],
                                          "count": kernel_ops, "source_sha256": kernels.source_digest(),
                                          "needs": "x86-64 with AVX2, FMA and F16C (AVX-512 VNNI used when present)"}
        artifact["toolchain"]["cc"] = kernels.compiler_version(cc)
        artifact["device_requirements"]["cpu_features"] = list(CUSTOM_OP_CPU_FEATURES)
        logger.info(f"onnx: {kernel_ops} linears run edgeforge's kernels ({library.name})")
    if kv_quant is not None:
        artifact["onnx"].update(kv_dtype="int8", kv_cache=kv_info)
    (out / "artifact.json").write_text(json.dumps(artifact, indent=1, sort_keys=True))
    size = (out / DATA_FILE).stat().st_size if (out / DATA_FILE).exists() else 0
    logger.info(f"onnx: wrote {MODEL_FILE} ({len(model.graph.node)} nodes) and {DATA_FILE} ({size / 2**20:.1f} MiB)")
    return artifact


ONNX_KEYS = {"execution_provider", "accuracy_level", "compute_dtype", "kv_cache", "kernels"}
KERNEL_CHOICES = ("auto", "onnxruntime", "edgeforge")


def kernels_setting(target, ep: str, compute: str, level: int) -> str:
    """[onnx] kernels = "auto" (default) | "edgeforge" | "onnxruntime": who runs the quantized linears.

    "edgeforge": our kernels (backends/onnx/kernels: 4.5 / 8.5 bits a weight read in place, where
    ONNX Runtime's MatMulNBits repacks to 6 / 10), compiled by the build machine's C compiler for
    x86-64 (AVX2; AVX-512 VNNI picked at load when the CPU has it). They do MatMulNBits'
    accuracy_level-4 arithmetic, so they need an x86_64 CPU target at that level with float32 compute.
    "auto": "edgeforge" where those hold and a C compiler is found (without one: a warning, and
    MatMulNBits), else "onnxruntime". Returns "edgeforge" or "onnxruntime"."""
    setting = (getattr(target, "onnx", None) or {}).get("kernels", "auto")
    where = f"target '{target.name}'"
    if setting not in KERNEL_CHOICES:
        raise EdgeforgeError(f"{where}: [onnx] kernels must be one of {', '.join(KERNEL_CHOICES)}, got {setting!r}")
    fits = (ep == "CPUExecutionProvider" and getattr(target, "arch", "") == "x86_64" and compute == "float32"
            and level == 4)
    if setting == "edgeforge" and not fits:
        raise EdgeforgeError(f"{where}: [onnx] kernels = \"edgeforge\" needs an x86_64 CPU target with float32 "
                             f"compute and accuracy_level 4 (this target: {ep}, {getattr(target, 'arch', '?')}, "
                             f"{compute} compute, accuracy_level {level})")
    if setting == "onnxruntime" or not fits:
        return "onnxruntime"
    if setting == "auto" and kernels.find_compiler() is None:
        logger.warning(f"{where}: no C compiler (gcc or cc) on PATH, so the quantized linears run ONNX Runtime's "
                       "MatMulNBits, not edgeforge's faster kernels (apt-get install gcc; or set [onnx] "
                       "kernels = \"onnxruntime\" to silence this)")
        return "onnxruntime"
    return "edgeforge"
KV_CACHE_CHOICES = ("float", "int8")


def kv_cache_setting(target, ep: str, compute: str) -> str:
    """[onnx] kv_cache = "float" (default: the compute dtype) | "int8" (`--kv-cache int8`).

    int8 needs ONNX Runtime's CPU GroupQueryAttention with float32 Q/K/V (its kernel takes an int8
    cache only then; other providers were not tried): refused by name elsewhere."""
    setting = (getattr(target, "onnx", None) or {}).get("kv_cache", "float")
    where = f"target '{target.name}'"
    if setting not in KV_CACHE_CHOICES:
        raise EdgeforgeError(f"{where}: [onnx] kv_cache must be float or int8, got {setting!r}")
    if setting == "int8" and (ep != "CPUExecutionProvider" or compute != "float32"):
        raise EdgeforgeError(f"{where}: --kv-cache int8 needs the CPU execution provider with float32 compute "
                             f"(this target: {ep}, {compute} compute; set [onnx] compute_dtype = \"float32\" on ARM CPUs)")
    return setting


def _kv_quant(qdir: Path) -> tuple:
    """The int8 KV cache's rotation and static scales, calibrated on the QDIR's reference
    (model/kv_int8.py)."""
    from ...model import kv_int8
    from ...model.loader import load_model

    quant, info = kv_int8.calibrate(load_model(Path(qdir)))
    return quant, {"dtype": "int8", "scales": "static: one per KV head for keys and for values, after the rotation",
                   "rotation": kv_int8.rotation_kind(quant.rotation.shape[0]), "calibration": info}


def kv_quant_of(artifact_dir: Path):
    """The int8 KV cache of a compiled graph (a model/kv_int8.KvQuant: per layer (key, value) scales
    [kv_heads, head_dim] and the rotation, None in graphs from before Session 18): what its golden
    data must round by, the graph being their one copy."""
    import numpy as np
    from onnx import numpy_helper

    from ...model.kv_int8 import KvQuant

    model = onnx.load(str(Path(artifact_dir) / MODEL_FILE), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer if t.name.endswith(("k_scale", "v_scale", KV_ROTATION))}

    def array(name):
        return np.asarray(numpy_helper.to_array(inits[name], str(artifact_dir)), np.float32)

    scales = [tuple(array(f"model.layers.{i}.self_attn.{kind}_scale")[0, :, 0, :] for kind in ("k", "v"))
              for i in range(len([n for n in inits if n.endswith("k_scale")]))]
    return KvQuant(scales, array(KV_ROTATION) if KV_ROTATION in inits else None)


def compute_dtype(target, ep: str, model_dtype: str) -> str:
    """[onnx] compute_dtype = "auto" (default) | "float32" | "float16".

    auto: the scheme's model dtype, except float32 for the CPU provider on x86-64. There ONNX
    Runtime has no float16 arithmetic: it converts around nearly every op, so a float16 graph is
    slower (12.2 vs 10.5 ms/token CPU time, SmolLM2 shape, 1 thread) and rounds activations for
    nothing (about 1e-3 of the logit range on the tiny models). float16 scales widen exactly, so
    the weights are the QDIR's bit for bit either way.
    """
    setting = (getattr(target, "onnx", None) or {}).get("compute_dtype", "auto")
    if setting not in ("auto", "float32", "float16"):
        raise EdgeforgeError(f"target '{target.name}': [onnx] compute_dtype must be auto, float32 or float16, got {setting!r}")
    if setting != "auto":
        return setting
    return "float32" if ep == "CPUExecutionProvider" and getattr(target, "arch", "") == "x86_64" else model_dtype


def _target_settings(target) -> tuple[str, int]:
    settings = getattr(target, "onnx", None) or {}
    where = f"target '{target.name}' ({getattr(target, 'path', None) or 'built-in'})"
    unknown = sorted(set(settings) - ONNX_KEYS)
    if unknown:  # a misspelled key would be ignored, not used
        raise EdgeforgeError(f"{where}: [onnx] unknown key {unknown[0]!r} (known: {', '.join(sorted(ONNX_KEYS))})")
    ep = settings.get("execution_provider")
    if ep not in PROVIDERS:
        raise EdgeforgeError(f"{where}: [onnx] execution_provider must be one of {', '.join(PROVIDERS)}, got {ep!r}")
    level = settings.get("accuracy_level", 4)
    if level not in ACCURACY_LEVELS:
        raise EdgeforgeError(f"{where}: [onnx] accuracy_level must be one of {ACCURACY_LEVELS}, got {level!r}")
    return ep, int(level)


# onnxruntime-webgpu ships on its own release train; this is the version scripts/setup-vulkan.sh
# installs and the Vulkan tests run. The GPU build of ORT follows the CPU version we compiled against.
WEBGPU_RUNTIME_VERSION = "1.27.0"


def _runtime_version(package: str, ort_version: str) -> str:
    if package == "onnxruntime-web":  # the npm build the page ships (edgeforge/web)
        from ...web import NPM_PACKAGES

        return NPM_PACKAGES[package]
    return WEBGPU_RUNTIME_VERSION if package == "onnxruntime-webgpu" else ort_version


def _artifact(weights: QdirWeights, target, ep: str, level: int, compute: str, embedding: dict) -> dict:
    import onnxruntime

    cfg = weights.config
    device, package = PROVIDERS[ep]
    files = [MODEL_FILE, DATA_FILE]
    ort_version = onnxruntime.__version__
    return {
        "format": "edgeforge-artifact", "version": 1, "backend": "onnx", "target": target.name,
        "files": files, "device": device, "model_dtype": weights.model_dtype_name, "scheme": weights.scheme,
        "needs_weights": False,
        # The graph needs GroupQueryAttention with shared past/present buffers and MatMulNBits
        # (bits 4 and 8): tested with these versions.
        "runtime": {package: _runtime_version(package, ort_version)},
        "toolchain": {"onnx": onnx.__version__, "onnxruntime": ort_version},
        "device_requirements": {"execution_provider": ep, "package": package},
        "onnx": {
            "model": MODEL_FILE, "execution_provider": ep, "accuracy_level": level,
            "opset": OPSET, "ms_opset": MS_OPSET, "ir_version": IR_VERSION,
            "num_layers": cfg["num_layers"], "num_kv_heads": cfg["num_kv_heads"], "head_dim": cfg["head_dim"],
            "vocab_size": cfg["vocab_size"], "context_length": cfg["context_length"],
            "compute_dtype": compute, "kv_dtype": compute, "hidden_size": cfg["hidden_size"],
            "input": "inputs_embeds", "embedding": embedding,
            # the batch dimension is free: a server decodes many sequences in one call (runtime/onnx_batch.py)
            "batch_decode": True,
        },
    }
