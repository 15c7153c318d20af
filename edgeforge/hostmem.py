"""How much memory this machine has free, and the one check every memory-hungry stage makes first:
a stage that cannot fit says so before it starts (needed vs available), instead of being killed."""

from __future__ import annotations

from .errors import EdgeforgeError
from .runtime.memory import mem_available, memory_refusal

__all__ = ["check_memory", "mem_available"]


def check_memory(stage: str, needed: int, advice: str = "close other programs, build fewer targets at once, "
                 "skip the smoke test (--no-smoke), or use a machine with more memory") -> None:
    """Raise EdgeforgeError naming `stage` when `needed` bytes exceed what is available."""
    message = memory_refusal(stage, needed, mem_available(), advice)
    if message:
        raise EdgeforgeError(message)
