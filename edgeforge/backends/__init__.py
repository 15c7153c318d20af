"""Backend registry. Each backend module exposes `compile_model(qdir, target, out, log) -> dict`.

Backends import their compiler (apache-tvm, onnx) only when asked for, so a machine with one of
them installed can still use the other.
"""

from __future__ import annotations

import importlib

from ..errors import EdgeforgeError

BACKENDS = {
    "tvm": ("edgeforge.backends.tvm.compile", "edgeforge[tvm] (apache-tvm)"),
    "onnx": ("edgeforge.backends.onnx.compile", "edgeforge[onnx] (onnx, onnxruntime)"),
}


def get_backend(name: str):
    if name not in BACKENDS:
        raise EdgeforgeError(f"unknown backend '{name}'; known backends: {', '.join(BACKENDS)}")
    module, extra = BACKENDS[name]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if err.name and err.name.startswith("edgeforge"):
            raise
        raise EdgeforgeError(f"backend '{name}' needs {extra}: pip install '{extra.split()[0]}' ({err})") from err
