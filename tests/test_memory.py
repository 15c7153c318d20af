"""Issue 21 (session 12): a GPU's memory is checked before an engine puts weights or a KV cache there
(runtime/memory.py: device_memory_refusal / check_device_memory). The decision is tested here with the
device's figures passed in, as check_memory takes `available`: there is no GPU on the CPU tiers. The
same check on a real device: tests/test_gpu.py (the gpu tier)."""

from __future__ import annotations

import logging

import pytest

from edgeforge.runtime.bundle_errors import BundleError
from edgeforge.runtime.memory import (GIB, check_device_memory, device_memory_refusal, kv_buffers_bytes,
                                      kv_cache_bytes)

STAGE = "the KV cache for 131072 positions (--ctx; default the model's context length)"
ADVICE = "open the bundle with a smaller --ctx, or serve fewer --parallel engines"
DEVICE = "cuda:0 (NVIDIA H100 80GB HBM3)"


def test_a_kv_cache_larger_than_the_free_gpu_memory_is_refused_by_name():
    needed, free = 40 << 30, 12 << 30
    message = device_memory_refusal(STAGE, needed, DEVICE, ADVICE, free=free, total=80 << 30)
    assert message is not None
    assert message.startswith(STAGE) and f"on {DEVICE}" in message  # the stage and the device
    assert f"({needed} bytes needed, {free} available)" in message  # the bytes, exactly
    assert "40.0 GiB" in message and "12.0 GiB is free" in message
    assert message.endswith(ADVICE) and "--ctx" in message and "--parallel" in message  # what to do
    with pytest.raises(BundleError) as err:
        check_device_memory(STAGE, needed, DEVICE, ADVICE, free=free, total=80 << 30)
    assert str(err.value) == message and err.value.exit_code == 2


def test_what_fits_in_the_free_memory_is_not_refused():
    assert device_memory_refusal(STAGE, 12 << 30, DEVICE, ADVICE, free=12 << 30, total=80 << 30) is None
    check_device_memory(STAGE, 1, DEVICE, ADVICE, free=1, total=None)


def test_free_memory_already_excludes_the_resident_weights():
    """Free memory is measured after the weights went to the device: they are not counted twice."""
    assert device_memory_refusal(STAGE, 10 << 30, DEVICE, ADVICE, free=11 << 30, total=16 << 30,
                                 resident=8 << 30) is None


def test_with_only_the_total_known_the_resident_weights_count():
    """A device that reports its total only (TVM's Vulkan and Metal): the KV cache plus the weights this
    engine already put there must fit in the total."""
    kv, weights, total = 6 << 30, 3 << 30, 8 << 30
    assert device_memory_refusal(STAGE, kv, "vulkan:0", ADVICE, total=total) is None  # alone it fits
    message = device_memory_refusal(STAGE, kv, "vulkan:0", ADVICE, total=total, resident=weights)
    assert message is not None and f"({kv + weights} bytes needed, {total} available)" in message
    assert "with the 3.0 GiB already there" in message and "8.0 GiB in all" in message
    assert "vulkan:0" in message and message.endswith(ADVICE)


@pytest.mark.parametrize("needed", [0, 1 << 40, 1 << 62])
def test_an_unknown_device_memory_never_refuses_and_says_so(needed, caplog):
    """Where the device reports neither figure (no driver API, a device TVM does not ask): logged, run."""
    with caplog.at_level(logging.INFO, logger="edgeforge.memory"):
        assert device_memory_refusal(STAGE, needed, "metal:0", ADVICE) is None
        check_device_memory(STAGE, needed, "metal:0", ADVICE, free=None, total=None, resident=1 << 40)
    assert any("metal:0" in r.getMessage() and "does not report its memory" in r.getMessage() for r in caplog.records)


def test_the_check_logs_what_it_compared(caplog):
    with caplog.at_level(logging.INFO, logger="edgeforge.memory"):
        device_memory_refusal(STAGE, 1 << 30, DEVICE, ADVICE, free=4 << 30)
    assert any("[memory]" in r.getMessage() and "4.0 GiB is free" in r.getMessage() for r in caplog.records)


def test_kv_buffers_bytes_is_the_onnx_layout():
    """ONNX Runtime's CUDA buffers for Llama-3.2-1B at its default context, fp16: a key and a value
    buffer [1, 8, 131072, 64] per layer, 16 layers = 4 GiB, as the paged TVM layout (pages of 1)."""
    llama32_1b = {"num_layers": 16, "num_kv_heads": 8, "head_dim": 64}
    assert kv_buffers_bytes((1, 8, 131072, 64), 16, 2) == 4 << 30 == kv_cache_bytes(llama32_1b, 131072, 2)
    assert kv_buffers_bytes((4, 8, 256, 64), 16, 1) == 2 * 16 * 4 * 8 * 256 * 64


def test_tvm_params_bytes_from_params_json():
    """The weights the TVM engine is about to copy to a GPU, from params.json (None where it cannot be read:
    the engine's own shape check then refuses the file by name)."""
    from edgeforge.runtime.tvm_engine import _params_bytes

    spec = [{"name": "a.qweight", "shape": [384, 128], "dtype": "int8"},
            {"name": "a.scales", "shape": [384, 4], "dtype": "float32"},
            {"name": "b.qweight", "shape": [64, 16], "dtype": "uint32"},
            {"name": "b.scales", "shape": [64, 2], "dtype": "float16"}]
    assert _params_bytes(spec) == 384 * 128 + 384 * 4 * 4 + 64 * 16 * 4 + 64 * 2 * 2
    assert _params_bytes([]) == 0
    for bad in ([{"shape": [2], "dtype": "bool"}], [{"shape": ["x"], "dtype": "int8"}], [{"dtype": "int8"}], [3]):
        assert _params_bytes(bad) is None, bad


def test_cuda_memory_never_raises_here():
    """The driver-API query runs for real (no GPU and no libcuda on the CPU tiers: nothing known); where
    a GPU is, free never exceeds total."""
    from edgeforge.runtime.hostcheck import cuda_gpus, cuda_memory

    free, total = cuda_memory(0)
    if not cuda_gpus()[0]:
        assert (free, total) == (None, None)
    assert free is None or (total is not None and 0 < free <= total)
    assert total is None or total > GIB // 4
