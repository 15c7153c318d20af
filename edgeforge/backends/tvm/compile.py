"""compile_model(qdir, target, out): QDIR -> TVM module for one target (+ artifact.json).

The module holds code only; weights stay in the QDIR and are passed at run time (params.json lists
the order). Export per target (targets/*.toml [tvm].export):
  so  - a shared library, cross-linked for aarch64 targets; CUDA kernels as real fatbins per arch;
  tar - objects (Mach-O for Apple, ELF for Android) with the Metal source inside, for the app to link.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ...errors import EdgeforgeError
from .model import LlamaForCausalLM, ModelSpec, fused_sources
from . import device_runtime
from .targets import TvmTarget, tvm_target_for

PARAMS_FILE = "params.json"
MODULE_SO = "model.so"
MODULE_TAR = "model.tar"

logger = logging.getLogger(__name__)


def load_spec(qdir: Path) -> tuple[ModelSpec, dict]:
    """ModelSpec from a QDIR's config.json and quantization.json (plus the quantization dict)."""
    from ...model.config import LlamaConfig
    from ...runtime.files import read_json

    qdir = Path(qdir)
    config_path, quant_path = qdir / "config.json", qdir / "quantization.json"
    config, quant = read_json(config_path), read_json(quant_path)
    cfg = LlamaConfig.from_dict(config, source=str(config_path))
    formats = {}
    for name, info in quant.get("tensors", {}).items():
        formats[name] = (info["format"], info.get("scale_dtype"))
    model_dtype = quant.get("model_dtype", "float32")
    if model_dtype not in ("float32", "float16"):
        raise EdgeforgeError(f"{quant_path}: model_dtype {model_dtype!r} is not float32 or float16")
    _check_formats(cfg, formats, quant_path)
    spec = ModelSpec(config=cfg, model_dtype=model_dtype, formats=formats)
    return spec, quant


def _check_formats(cfg, formats: dict, quant_path: Path) -> None:
    needed = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        needed.append("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        needed += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
        needed += [f"{p}.self_attn.{x}_proj.weight" for x in "qkvo"]
        needed += [f"{p}.mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    for name in needed:
        if name not in formats:
            raise EdgeforgeError(f"{quant_path}: tensor '{name}' is missing")
        fmt = formats[name][0]
        if fmt not in ("q4", "q4a", "q8", "f16", "f32"):
            raise EdgeforgeError(f"{quant_path}: tensor '{name}' has unknown format {fmt!r}")


def _check_stored_layout(qdir: Path) -> None:
    """The module is compiled from quantization.json alone: check the stored arrays agree with it
    (dtype and shape of every array) now, so that a bad or outdated QDIR is named at compile time,
    not at load time as a module/weights mismatch."""
    from ...runtime.bundle_errors import BundleError
    from ...runtime.weights import QdirWeights

    try:
        QdirWeights(qdir).check_layout()
    except BundleError as err:
        raise EdgeforgeError(str(err)) from None


def export_module(spec: ModelSpec):
    """IRModule + ordered parameter list [(name, shape, dtype)] of the model."""
    model = LlamaForCausalLM(spec)
    mod, named_params = model.export_tvm(spec=model.get_default_spec())
    params = []
    for name, p in named_params:
        entry = {"name": name, "shape": [int(d) for d in p.shape], "dtype": str(p.dtype)}
        sources = fused_sources(name)
        if sources:
            entry["sources"] = sources  # stacked by rows at load time (runtime/tvm_engine.py)
        params.append(entry)
    return mod, params


def build(spec: ModelSpec, tt: TvmTarget):
    """relax.build the model for a target; returns (executable, params)."""
    import tvm
    from tvm import relax

    from .cpu_schedule import ScheduleQuantizedMatmul
    from .pipeline import lowering_pipeline

    target = tt.target()
    with target:  # the KV cache picks CPU or GPU attention kernels from the current target
        mod, params = export_module(spec)
    logger.debug("tvm: exported the model (%d parameters); relax.build for %s ...", len(params), tt.describe())
    cpu_sched = None if tt.is_gpu else ScheduleQuantizedMatmul(target)
    # nvcc's wrapper reads the arch from the current target, hence `with target` here too.
    with tt.build_env(), tvm.transform.PassContext(config=pass_config(tt)), target:
        ex = relax.build(mod, target=target, relax_pipeline=lowering_pipeline(target, cpu_sched))
    return ex, params


def pass_config(tt: TvmTarget) -> dict:
    """CUDA: decode runs as CUDA graphs. RewriteCUDAGraph (in our pipeline) captures the kernels
    between two KV-cache calls into one graph, replayed on later steps: one launch per layer
    instead of ~10. Decode of small models is launch-bound, so this is where GPU decode speed is."""
    return {"relax.backend.use_cuda_graph": tt.is_cuda and tt.cuda_graph}


def compile_model(qdir: Path, target, out: Path) -> dict:
    """Compile `qdir` for `target` (edgeforge.targets.Target) into the folder `out`."""
    import tvm

    qdir, out = Path(qdir), Path(out)
    spec, quant = load_spec(qdir)
    _check_stored_layout(qdir)
    tt = tvm_target_for(target)
    tt.check_toolchain()
    runtime = device_runtime.runtime_spec(tt)  # before the long build: an unknown device CPU fails here
    logger.info(f"tvm: building {quant.get('scheme', '?')} for {target.name} ({tt.describe()}) ...")
    start = time.time()
    ex, params = build(spec, tt)
    built = time.time() - start
    logger.debug(f"tvm: relax.build took {built:.1f} s; exporting to {out}")
    files = tt.export(ex, out)
    (out / PARAMS_FILE).write_text(json.dumps({"params": params}, indent=1))
    artifact = {
        "format": "edgeforge-artifact", "version": 1, "backend": "tvm", "target": target.name,
        "files": sorted(files + [PARAMS_FILE]), "module": files[0], "device": tt.device_name,
        "model_dtype": spec.model_dtype, "scheme": quant.get("scheme"), "needs_weights": True,
        # runtime-only TVM for the device's arch goes into the bundle (device_runtime.py)
        "bundled_runtime": runtime,
        "runtime": device_runtime.pip_requirements(runtime),
        "toolchain": dict({"apache-tvm": tvm.__version__}, **tt.toolchain_versions()),
        "device_requirements": tt.device_requirements(),
        "cuda_graph": pass_config(tt)["relax.backend.use_cuda_graph"],
        "build_seconds": round(built, 1),
    }
    (out / "artifact.json").write_text(json.dumps(artifact, indent=1, sort_keys=True))
    logger.info(f"tvm: built in {built:.0f} s -> {', '.join(files)}")
    return artifact
