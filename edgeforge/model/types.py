"""What every model source provides (a leaf module: the loaders for HF folders, GGUF files and QDIRs
import these types from here, and model/loader.py dispatches to those loaders: imports run one way)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cache import cached_sha256
from ..errors import EdgeforgeError
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
