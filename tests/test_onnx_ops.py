"""The layouts the ONNX builder relies on, checked against ONNX Runtime itself: our q4/q8 arrays fed
as is to MatMulNBits and GatherBlockQuantized (default zero points 8 and 128) give exactly the
numpy dequantization of quant/formats.py."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgeforge.backends.onnx import pack  # noqa: E402
from edgeforge.errors import EdgeforgeError  # noqa: E402
from edgeforge.quant.formats import get_format  # noqa: E402


def run_ops(q: pack.QuantLinear, x: np.ndarray, ids: np.ndarray, dtype):
    """y = MatMulNBits(x, q) and e = GatherBlockQuantized(q, ids), sharing the blob initializer."""
    t = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    inits = [numpy_helper.from_array(q.blob, "B"), numpy_helper.from_array(q.scales.reshape(-1), "S"),
             numpy_helper.from_array(q.scales[:, :, None], "S3")]
    nodes = [
        helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=q.k, N=q.n,
                         bits=q.bits, block_size=32, accuracy_level=0),
        helper.make_node("GatherBlockQuantized", ["B", "ids", "S3"], ["e"], domain="com.microsoft",
                         bits=q.bits, block_size=32, gather_axis=0, quantize_axis=2),
    ]
    graph = helper.make_graph(nodes, "ops", [helper.make_tensor_value_info("x", t, [1, None, q.k]),
                                             helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("y", t, None), helper.make_tensor_value_info("e", t, None)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, e = sess.run(None, {"x": x.astype(dtype), "ids": ids})
    return y.astype(np.float32), e.reshape(1, ids.shape[1], q.k).astype(np.float32)


@pytest.mark.parametrize("fmt_name,scale_dtype", [("q4", "float32"), ("q4", "float16"), ("q8", "float16"), ("q8", "float32")])
def test_matmulnbits_and_gather_read_our_arrays_exactly(fmt_name, scale_dtype):
    rng = np.random.default_rng(1)
    n, k = 40, 96
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[3, 32:64] = 0.0  # a zero group: scale 0, stored q = 0 (8 for q4)
    fmt = get_format(fmt_name, scale_dtype)
    arrays = fmt.quantize(w, "t.weight")
    expected_w = fmt.dequantize(arrays)
    entry = {"format": fmt_name, "shape": [n, k], "scale_dtype": scale_dtype}
    dtype = np.float32 if scale_dtype == "float32" else np.float16
    q = pack.quant_linear("t.weight", entry, arrays, dtype)
    x = rng.standard_normal((1, 3, k)).astype(np.float32)
    ids = np.array([[0, 3, n - 1, 3]], dtype=np.int64)
    y, e = run_ops(q, x, ids, dtype)
    # Gather is exact up to the rounding of q * scale to the output dtype.
    np.testing.assert_array_equal(e, expected_w[ids[0]][None].astype(dtype).astype(np.float32))
    x_in = x.astype(dtype).astype(np.float32)
    tol = 1e-5 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(y, x_in @ expected_w.T, atol=tol, rtol=tol)


def test_bad_arrays_name_the_tensor():
    fmt = get_format("q4", "float32")
    arrays = fmt.quantize(np.ones((8, 64), np.float32), "m.weight")
    entry = {"format": "q4", "shape": [8, 64], "scale_dtype": "float32"}
    with pytest.raises(EdgeforgeError, match="m.weight"):
        pack.quant_linear("m.weight", entry, {**arrays, "qweight": arrays["qweight"].view(np.int32)}, np.float32)
    with pytest.raises(EdgeforgeError, match="m.weight.*scales"):
        pack.quant_linear("m.weight", entry, {**arrays, "scales": arrays["scales"][:, :1]}, np.float32)
    with pytest.raises(EdgeforgeError, match="m.weight.*multiple of 32"):
        pack.quant_linear("m.weight", {**entry, "shape": [8, 60]}, arrays, np.float32)
