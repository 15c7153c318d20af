"""load_model(path) -> LoadedModel: one entry point for HF folders, GGUF files and QDIRs.

Weights stay on disk (memory-mapped) until `tensors.get(name)` asks for one of them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgeforgeError
from ..runtime.files import sha256_file
from ..runtime.tokenizer import Tokenizer
from .config import LlamaConfig


class TensorSource:
    """Lazy access to a model's weights by HF name (see INTERNALS "Tensor names")."""

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, name: str) -> np.ndarray:
        """The weight as float32 (dequantized when stored quantized), HF layout and row order."""
        raise NotImplementedError

    def dtype(self, name: str) -> str:
        """How the source stores it, e.g. "BF16", "F32", "Q4_1" (for `inspect`)."""
        raise NotImplementedError

    def rows(self, name: str, index) -> np.ndarray:
        """Rows `index` (a slice or an id array) of a 2-D weight as float32. Sources that can read
        part of a tensor override this; the fallback reads the whole tensor."""
        return np.asarray(self.get(name)[index], dtype=np.float32)


@dataclass
class LoadedModel:
    config: LlamaConfig
    tensors: TensorSource
    tokenizer: Tokenizer
    source: dict  # {"path", "format": "hf"|"gguf"|"qdir", "sha256", "model_id"}


def load_model(path: str | os.PathLike, log=lambda msg: None) -> LoadedModel:
    """Open an HF folder, a .gguf file or a QDIR (folder with quantization.json)."""
    p = Path(path)
    if not p.exists():
        raise EdgeforgeError(f"{path}: no such file or folder")
    if not (p.is_dir() or p.is_file()):  # a FIFO or device would block or never end
        raise EdgeforgeError(f"{path}: not a regular file or folder")
    if p.is_dir():
        if (p / "quantization.json").exists():
            from ..quant.qdir import load_qdir  # written by the quantization part; imported on use

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


def check_shapes(config: LlamaConfig, tensors: TensorSource, where, config_name: str) -> None:
    """Every expected tensor is present with the shape the config implies. `where(name)` names the
    file that holds a tensor (for the message)."""
    present = set(tensors.names())
    for name, shape in config.tensor_shapes().items():
        if name not in present:
            raise EdgeforgeError(f"{where(None)}: tensor '{name}' is missing")
        got = tuple(tensors.shape(name))
        if got != shape:
            raise EdgeforgeError(
                f"{where(name)}: tensor '{name}' has shape {list(got)}, {config_name} implies {list(shape)}"
            )


# ---- source checksums ------------------------------------------------------------------------------
def files_sha256(paths: list[Path]) -> str:
    """sha256 of one file, or for several (shards) the sha256 of their `sha256sum`-style listing
    ("<sha256>  <file name>\\n" per file, sorted by name)."""
    if len(paths) == 1:
        return cached_sha256(paths[0])
    listing = "".join(f"{cached_sha256(p)}  {p.name}\n" for p in sorted(paths, key=lambda p: p.name))
    return hashlib.sha256(listing.encode()).hexdigest()


def cached_sha256(path: Path) -> str:
    """sha256_file, remembered per (path, size, mtime) in the edgeforge cache: hashing an 8B
    model takes tens of seconds and every command that loads it needs the value."""
    from ..models import cache_dir

    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    store = cache_dir() / "sha256.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    digest = sha256_file(path)
    known[key] = digest
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f".sha256.{os.getpid()}.json")
        tmp.write_text(json.dumps(known, indent=0, sort_keys=True))
        os.replace(tmp, store)
    except OSError:
        pass  # a read-only cache only costs time
    return digest
