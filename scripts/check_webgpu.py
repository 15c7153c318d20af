"""Run one MatMul on ONNX Runtime's WebGPU execution provider and check it against numpy.

Used by setup-vulkan.sh (inside the onnxruntime-webgpu venv, with lavapipe selected by env.sh) and
by tests. Needs only numpy and onnxruntime(-webgpu): the model is encoded by hand because that venv
has no `onnx` package. Exits 1 unless the WebGPU EP is the session's first provider, CPU fallback
is disabled (so the MatMul node cannot silently run on CPU) and the result matches numpy.

    python check_webgpu.py [--json] [--expect-device NAME]

--expect-device also requires a Vulkan device whose name contains NAME (e.g. llvmpipe) to be the
only one the Vulkan loader shows, so Dawn cannot have picked another adapter.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, value) -> bytes:
    """One protobuf field: ints as varints, bytes/str as length-delimited."""
    if isinstance(value, int):
        return _varint(num << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def _tensor_info(name: str, shape: list[int]) -> bytes:
    dims = b"".join(_field(1, _field(1, d)) for d in shape)  # TensorShapeProto.dim.dim_value
    tensor_type = _field(1, 1) + _field(2, dims)  # elem_type FLOAT, shape
    return _field(1, name) + _field(2, _field(1, tensor_type))  # ValueInfoProto name, type


def matmul_model(m: int, k: int, n: int) -> bytes:
    """ModelProto bytes for Y = MatMul(A[m,k], B[k,n]) (opset 17, IR version 8)."""
    node = _field(1, "A") + _field(1, "B") + _field(2, "Y") + _field(3, "mm") + _field(4, "MatMul")
    graph = (
        _field(1, node)
        + _field(2, "matmul")
        + _field(11, _tensor_info("A", [m, k]))
        + _field(11, _tensor_info("B", [k, n]))
        + _field(12, _tensor_info("Y", [m, n]))
    )
    return _field(1, 8) + _field(7, graph) + _field(8, _field(1, "") + _field(2, 17))


def run_check(m: int = 64, k: int = 96, n: int = 32) -> dict:
    import numpy as np
    import onnxruntime as ort

    if "WebGpuExecutionProvider" not in ort.get_available_providers():
        raise SystemExit(f"this onnxruntime ({ort.__file__}) has no WebGpuExecutionProvider")
    opts = ort.SessionOptions()
    # Without this a node the EP refuses would quietly run on CPU and the check would prove nothing.
    opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    start = time.perf_counter()
    try:
        sess = ort.InferenceSession(matmul_model(m, k, n), opts, providers=["WebGpuExecutionProvider"])
    except Exception as err:  # ORT raises its own exception types (Fail, InvalidArgument, ...)
        # When Dawn finds no usable adapter ORT substitutes the CPU EP, which the config refuses.
        raise SystemExit(f"WebGPU EP could not start (no usable Vulkan adapter?): {err}") from err
    providers = sess.get_providers()
    if providers[0] != "WebGpuExecutionProvider":
        raise SystemExit(f"WebGPU EP not active (session providers: {providers}); ORT fell back to CPU")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    (y,) = sess.run(None, {"A": a, "B": b})
    seconds = time.perf_counter() - start
    err = float(np.abs(y - a @ b).max())
    if not err < 1e-3:
        raise SystemExit(f"WebGPU MatMul differs from numpy: max abs err {err}")
    return {
        "onnxruntime": ort.__version__,
        "providers": providers,
        "available": ort.get_available_providers(),
        "max_abs_err": err,
        "seconds": round(seconds, 3),
    }


def vulkan_devices() -> list[dict]:
    """Vulkan devices via vulkan_probe.py (next to this file, or in the edgeforge package)."""
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent / "edgeforge")]
    try:
        import vulkan_probe
    except ImportError:
        return []
    try:
        return vulkan_probe.list_devices()
    except (OSError, RuntimeError, AttributeError):
        return []


def main(argv: list[str]) -> int:
    result = run_check()
    result["vulkan_devices"] = vulkan_devices()
    if "--expect-device" in argv:
        want = argv[argv.index("--expect-device") + 1]
        names = [d["name"] for d in result["vulkan_devices"]]
        if len(names) != 1 or want not in names[0]:
            raise SystemExit(f"expected exactly one Vulkan device named like '{want}', the loader shows {names}")
    if "--json" in argv:
        print(json.dumps(result))
    else:
        print(
            f"WebGPU MatMul OK on {result['providers'][0]} (onnxruntime {result['onnxruntime']}): "
            f"max abs err {result['max_abs_err']:.2e}, {result['seconds']} s; "
            f"Vulkan devices: {[d['name'] for d in result['vulkan_devices']]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
