"""open_engine(): read a compile output's artifact.json and open the matching runtime engine.

Only the backend's *runtime* is imported (tvm runtime or onnxruntime), never a compiler.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .backends import BACKENDS
from .bundle_errors import BundleError
from .files import read_json

ARTIFACT_FORMAT = "edgeforge-artifact"


def read_artifact(artifact_dir: Path) -> dict:
    path = Path(artifact_dir) / "artifact.json"
    artifact = read_json(path)
    if artifact.get("format") != ARTIFACT_FORMAT or artifact.get("backend") not in BACKENDS:
        raise BundleError(f"{path}: not an edgeforge artifact, or unknown backend {artifact.get('backend')!r}")
    return artifact


def checked_max_length(asked, context, default=None) -> int:
    """The sequence length an engine is opened for: `asked`, else the model's context length."""
    if asked is not None and context and int(asked) > int(context):
        raise BundleError(f"a length of {asked} tokens exceeds the model's context length {context}")
    if asked is not None and int(asked) < 2:
        raise BundleError(f"a length of {asked} tokens is too short (at least 2)")
    return int(asked or context or default)


def open_engine(artifact_dir, weights_dir=None, device=None, max_length=None):
    """Return an Engine (reset/prefill/decode/device) for a compiled artifact folder.

    max_length: the most tokens (prompt + generated) a sequence may hold; default the model's
    context length. TVM reserves its paged KV cache for it when the engine opens (SmolLM2, 8192
    tokens: 189 MB of address space; pages become resident as they fill, so peak RSS on Linux
    does not change with it: measured in docs/notes/tvm.md)."""
    artifact_dir = Path(artifact_dir)
    artifact = read_artifact(artifact_dir)
    backend = artifact["backend"]
    if artifact.get("needs_weights") and weights_dir is None:
        raise BundleError(f"{artifact_dir / 'artifact.json'}: this {backend} artifact needs a weights folder")
    entry = BACKENDS[backend]
    try:
        module = importlib.import_module(entry.engine_module, __package__)
    except ImportError as err:
        raise BundleError(f"the {backend} runtime is not installed here ({err}); "
                          f"pip install {entry.runtime_requirement} (see the bundle's requirements.txt)") from None
    return module.open_engine(artifact_dir, weights_dir, device=device, max_length=max_length)
