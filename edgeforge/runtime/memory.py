"""Memory a step needs against what this machine has free: one piece of arithmetic for the compiler's
stages (edgeforge/hostmem.py) and the runtime's engines, so a step that cannot fit says so by name
before it allocates, instead of being killed. Copied into bundles: standard library only."""

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


def check_kv_buffers(stage: str, shape: tuple[int, ...], num_layers: int, itemsize: int, advice: str) -> None:
    """check_memory for ONNX-style KV buffers: a key and a value buffer of `shape` per layer."""
    check_memory(stage, 2 * num_layers * math.prod(int(d) for d in shape) * int(itemsize), advice)
