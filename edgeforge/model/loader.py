"""load_model(path) -> LoadedModel: one entry point for HF folders, GGUF files and QDIRs.

Weights stay on disk (memory-mapped) until `tensors.get(name)` asks for one of them.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..cache import cached_sha256  # noqa: F401 - re-exported (older import path)
from ..errors import EdgeforgeError
from .types import LoadedModel, TensorSource, check_shapes, files_sha256  # noqa: F401 - re-exported


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Open an HF folder, a .gguf file or a QDIR (folder with quantization.json)."""
    p = Path(path)
    if not p.exists():
        raise EdgeforgeError(f"{path}: no such file or folder")
    if not (p.is_dir() or p.is_file()):  # a FIFO or device would block or never end
        raise EdgeforgeError(f"{path}: not a regular file or folder")
    if p.is_dir():
        if (p / "quantization.json").exists():
            from ..quant.qdir import load_qdir

            return load_qdir(p)
        if (p / "manifest.json").exists():
            raise EdgeforgeError(f"{p}: is a bundle, not a model (use `edgeforge run` or `edgeforge smoke`)")
        if (p / "config.json").exists():
            from .hf import load_hf_folder

            return load_hf_folder(p)
        raise EdgeforgeError(f"{p}: not a model folder (no config.json, quantization.json or manifest.json)")
    if p.suffix.lower() == ".gguf" or _has_gguf_magic(p):
        from .gguf import load_gguf

        return load_gguf(p)
    raise EdgeforgeError(f"{p}: not a model (expected an HF folder, a .gguf file or a QDIR)")


def _has_gguf_magic(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


