"""The backend registry: one entry per backend, asked by every layer.

Adding a backend = a folder edgeforge/backends/<name>/ (its compiler, `compile_model`), an engine
module here in runtime/ (`open_engine`), and one entry below. The CLI's --backend choices, target
files' validation (targets.py), the builder and doctor (bundle/), the runtime loader and the docs'
tables read this table; nothing else names backends.

It lives in runtime/ because bundles carry the loader, which must find engines without the compiler
side (so this module imports nothing, and names the compiler modules as strings only).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    name: str
    compile_module: str  # the compiler side: a module with compile_model(qdir, target, out) -> dict
    compile_extra: str  # what installs the compiler: the edgeforge extra (the packages it brings)
    compile_check: str  # the `edgeforge doctor` check that says whether this machine can compile
    engine_module: str  # the runtime side, relative to this package: a module with open_engine(...)
    runtime_requirement: str  # the pip requirement that provides the engine's runtime on a device
    target_required: str  # the key a target file's [<name>] table must set when it lists this backend
    weights_in_artifact: bool  # True: the artifact holds the weights; False: they ship as the QDIR
    artifact_files: str  # what the compile output holds, for the docs


BACKENDS = {b.name: b for b in (
    Backend("tvm", compile_module="edgeforge.backends.tvm.compile",
            compile_extra="edgeforge[tvm] (apache-tvm)", compile_check="apache-tvm",
            engine_module=".tvm_engine", runtime_requirement="apache-tvm-ffi", target_required="host",
            weights_in_artifact=False, artifact_files="model.so (or model.tar of objects) + params.json"),
    Backend("onnx", compile_module="edgeforge.backends.onnx.compile",
            compile_extra="edgeforge[onnx] (onnx, onnxruntime)", compile_check="onnx",
            engine_module=".onnx_engine", runtime_requirement="onnxruntime",
            target_required="execution_provider", weights_in_artifact=True,
            artifact_files="model.onnx + model.onnx.data"),
)}


def backend_names() -> tuple[str, ...]:
    return tuple(BACKENDS)
