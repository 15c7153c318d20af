"""Memory a step needs against what this machine has free: one piece of arithmetic for the compiler's
stages (edgeforge/hostmem.py) and the runtime's engines, so a step that cannot fit says so by name
before it allocates, instead of being killed. A GPU's memory is checked the same way
(check_device_memory) before an engine puts weights or a KV cache there, from what the device
reports (hostcheck.cuda_memory for ONNX Runtime's CUDA EP, TVM's device attributes for TVM); a device
that reports nothing is logged and never refused. Copied into bundles: standard library only."""

from __future__ import annotations

import logging
import math

from .bundle_errors import BundleError

logger = logging.getLogger("edgeforge.memory")

GIB = float(1 << 30)


def mem_available() -> int | None:
    """MemAvailable (bytes) from /proc/meminfo; None where there is none (not Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def memory_refusal(stage: str, needed: int, available: int | None, advice: str) -> str | None:
    """The refusal message when `needed` bytes exceed `available` (None: unknown, never refused)."""
    if available is None:
        return None
    logger.info(f"[memory] {stage}: needs about {needed / GIB:.1f} GiB, {available / GIB:.1f} GiB available")
    if needed <= available:
        return None
    return (f"{stage} needs about {needed / GIB:.1f} GiB of memory and {available / GIB:.1f} GiB is available "
            f"({needed} bytes needed, {available} available): {advice}")


def check_memory(stage: str, needed: int, advice: str, available: int | None = None) -> None:
    """BundleError naming `stage` when `needed` bytes exceed `available` (default: this machine's free memory)."""
    message = memory_refusal(stage, needed, mem_available() if available is None else available, advice)
    if message:
        raise BundleError(message)


def kv_cache_bytes(config: dict, tokens: int, dtype_bytes: int, page_size: int = 1) -> int:
    """Bytes of a KV cache holding `tokens` positions: keys and values of every layer and KV head,
    rounded up to whole pages (a paged cache reserves whole pages)."""
    pages = -(-int(tokens) // page_size)
    return (int(config["num_layers"]) * 2 * int(config["num_kv_heads"]) * int(config["head_dim"])
            * pages * page_size * dtype_bytes)


def kv_buffers_bytes(shape: tuple[int, ...], num_layers: int, itemsize: int) -> int:
    """Bytes of ONNX-style KV buffers: a key and a value buffer of `shape` per layer."""
    return 2 * int(num_layers) * math.prod(int(d) for d in shape) * int(itemsize)


def check_kv_buffers(stage: str, shape: tuple[int, ...], num_layers: int, itemsize: int, advice: str) -> None:
    """check_memory for ONNX-style KV buffers: a key and a value buffer of `shape` per layer."""
    check_memory(stage, kv_buffers_bytes(shape, num_layers, itemsize), advice)


def device_memory_refusal(stage: str, needed: int, device: str, advice: str, free: int | None = None,
                          total: int | None = None, resident: int = 0) -> str | None:
    """The refusal message when `needed` more bytes do not fit on `device` (a GPU), else None.

    free: the bytes the device reports free now; what is already there (this engine's weights, other
    engines, other programs) is out of it, so `needed` is compared with it alone. Else total: the
    device's whole memory, compared with `needed` plus `resident` (the bytes this engine already put
    there, its weights; what others hold is not known). Neither known: logged, never refused."""
    if free is None and total is None:
        logger.info(f"[memory] {stage} on {device}: the device does not report its memory; not checked")
        return None
    if free is not None:
        have, want = int(free), int(needed)
    else:
        have, want = int(total), int(needed) + int(resident)
    held = f", with the {resident / GIB:.1f} GiB already there," if free is None and resident else ""
    have_text = f"{have / GIB:.1f} GiB is free" if free is not None else f"it has {have / GIB:.1f} GiB in all"
    logger.info(f"[memory] {stage} on {device}: needs about {want / GIB:.1f} GiB{held.rstrip(',')}; {have_text}")
    if want <= have:
        return None
    return (f"{stage} on {device} needs about {want / GIB:.1f} GiB of its memory{held} and {have_text} "
            f"({want} bytes needed, {have} available): {advice}")


def check_device_memory(stage: str, needed: int, device: str, advice: str, free: int | None = None,
                        total: int | None = None, resident: int = 0) -> None:
    """BundleError naming `stage`, the bytes and `advice` when `needed` more bytes do not fit on
    `device` (device_memory_refusal); an unknown figure is never refused."""
    message = device_memory_refusal(stage, needed, device, advice, free, total, resident)
    if message:
        raise BundleError(message)
