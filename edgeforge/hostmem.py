"""How much memory this machine has free, and the one check every memory-hungry stage makes first:
a stage that cannot fit says so before it starts (needed vs available), instead of being killed."""

from __future__ import annotations

import logging

from .errors import EdgeforgeError

logger = logging.getLogger(__name__)


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


def check_memory(stage: str, needed: int, advice: str = "close other programs, build fewer targets at once, "
                 "skip the smoke test (--no-smoke), or use a machine with more memory") -> None:
    """Raise EdgeforgeError naming `stage` when `needed` bytes exceed what is available."""
    avail = mem_available()
    if avail is None:
        return
    logger.info(f"[memory] {stage}: needs about {needed / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available")
    if needed > avail:
        raise EdgeforgeError(f"{stage} needs about {needed / 2**30:.1f} GiB of memory and {avail / 2**30:.1f} GiB "
                             f"is available: {advice}")
