"""Helpers for the ONNX backend tests: QDIR -> compiled artifact, and comparisons with the reference."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from edgeforge.backends import compile_qdir

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a land far away, there lived",
    "Numbers: 1, 2, 3, 4, 5,",
]


def target_file(folder: Path, name: str, provider: str, accuracy_level: int, run: str = "host", **onnx_extra) -> Path:
    """A user target .toml (the presets fix accuracy_level; tests need both levels)."""
    path = Path(folder) / f"{name}.toml"
    extra = "".join(f'{k} = "{v}"\n' for k, v in onnx_extra.items())
    path.write_text(f'name = "{name}"\ndescription = "test"\nbackends = ["onnx"]\nrun = "{run}"\n'
                    f'os = "linux"\narch = "x86_64"\n\n[onnx]\nexecution_provider = "{provider}"\n'
                    f"accuracy_level = {accuracy_level}\n{extra}")
    return path


def compile_onnx(qdir: Path, out: Path, provider="CPUExecutionProvider", accuracy_level=0, name="onnx-test",
                 **onnx_extra) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    toml = target_file(out.parent, f"{name}-{out.name}", provider, accuracy_level, **onnx_extra)
    compile_qdir(qdir, str(toml), "onnx", out)
    return out


def record(path: Path, entry: dict) -> None:
    """Append one measurement to a JSON-lines file (the tests' report of accuracy level 4)."""
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def with_onnx(target, provider: str, level: int):
    return dataclasses.replace(target, onnx={"execution_provider": provider, "accuracy_level": level})


def matmul_nbits(rng, k: int, n: int, bits: int):
    """A random MatMulNBits weight (block 32, default zero point): (its float32 [n, k] value,
    run(a, accuracy_level) -> ONNX Runtime's a @ W.T on the CPU)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    levels = 16 if bits == 4 else 256
    q = rng.integers(0, levels, (n, k)).astype(np.uint8)
    blob = (q[:, 0::2] | (q[:, 1::2] << 4)) if bits == 4 else q
    scales = (rng.random((n, k // 32)) * 0.05 + 0.01).astype(np.float32)
    w = ((q.astype(np.float32) - levels // 2).reshape(n, k // 32, 32) * scales[:, :, None]).reshape(n, k)

    def run(a: np.ndarray, accuracy_level: int) -> np.ndarray:
        node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                                block_size=32, accuracy_level=accuracy_level)
        graph = helper.make_graph(
            [node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, list(a.shape))],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [a.shape[0], n])],
            initializer=[numpy_helper.from_array(blob.reshape(n, k // 32, -1), "B"), numpy_helper.from_array(scales, "S")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"A": a})[0]

    return w, run
