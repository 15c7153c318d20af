"""Hugging Face folder loader: config.json, model.safetensors (single or sharded), tokenizer files,
generation_config.json. Tensors are memory-mapped; nothing is read until asked for."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EdgeforgeError
from ..runtime.safetensors import SafetensorsError, SafetensorsFolder
from ..runtime.files import read_json, read_text

MAX_TEMPLATE_BYTES = 1 << 20  # a chat template; real ones are a few KB
from ..runtime.tokenizer import Tokenizer, TokenizerError, load_tokenizer_json
from .config import LlamaConfig
from .types import LoadedModel, TensorSource, check_shapes, files_sha256

# Saved by some exporters but not weights of the model.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HFTensors(TensorSource):
    def __init__(self, folder: Path, config: LlamaConfig):
        try:
            self.st = SafetensorsFolder(folder)
            self.st.open_all()  # a truncated shard fails at load, naming the file
            stored = self.st.keys()
        except SafetensorsError as err:
            raise EdgeforgeError(str(err)) from None
        expected = config.tensor_shapes()
        # A tied model may still carry lm_head.weight (some exporters write it): transformers
        # ignores it, so do we. Anything else unknown means an architecture we do not implement.
        unknown = [k for k in stored if k not in expected and not k.endswith(IGNORED_SUFFIXES)
                   and not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if unknown:
            raise EdgeforgeError(f"{self.where(unknown[0])}: unexpected tensor '{unknown[0]}' for a Llama model")
        self._names = [k for k in expected if k in self.st]

    def where(self, name: str | None) -> str:
        return str(self.st.folder / self.st.weight_map[name]) if name else str(self.st.folder)

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.st.shape(name)

    def dtype(self, name: str) -> str:
        return self.st.dtype(name)

    def get(self, name: str) -> np.ndarray:
        try:
            return np.asarray(self.st.get(name), dtype=np.float32)
        except SafetensorsError as err:
            raise EdgeforgeError(str(err)) from None

    def rows(self, name: str, index) -> np.ndarray:
        try:
            return np.asarray(self.st.get(name)[index], dtype=np.float32)  # memory-mapped: reads those rows
        except SafetensorsError as err:
            raise EdgeforgeError(str(err)) from None

    def release(self, name: str) -> None:
        """Done with `name` for now: drop its mapped pages (streaming quantization calls this)."""
        self.st.release(name)


def load_hf_folder(folder: Path) -> LoadedModel:
    folder = Path(folder)
    hf = read_json(folder / "config.json")
    config = LlamaConfig.from_hf(hf, str(folder / "config.json"))
    gen_path = folder / "generation_config.json"
    gen = read_json(gen_path) if gen_path.exists() else {}
    config.eos_token_ids = _merge_eos(config.eos_token_ids, gen.get("eos_token_id"))
    if config.bos_token_id is None and gen.get("bos_token_id") is not None:
        config.bos_token_id = int(gen["bos_token_id"])

    tensors = HFTensors(folder, config)
    check_shapes(config, tensors, tensors.where, "config.json")
    tokenizer = load_hf_tokenizer(folder, config)
    files = tensors.st.files()
    source = {"path": str(folder.resolve()), "format": "hf", "sha256": files_sha256(files),
              "model_id": _model_id(folder, hf)}
    return LoadedModel(config=config, tensors=tensors, tokenizer=tokenizer, source=source)


def _model_id(folder: Path, hf: dict) -> str:
    """'org/name' for a hub cache snapshot (its folder name is only the commit hash), else the
    config's _name_or_path, else the folder name."""
    from ..models import repo_id_of_snapshot

    return repo_id_of_snapshot(folder.resolve()) or hf.get("_name_or_path") or folder.resolve().name


def _merge_eos(config_eos: list[int], gen_eos) -> list[int]:
    """generation_config.json's eos ids (Llama 3 instruct lists several) plus config.json's."""
    extra = [] if gen_eos is None else (gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return list(dict.fromkeys([int(e) for e in extra] + list(config_eos)))


def load_hf_tokenizer(folder: Path, config: LlamaConfig) -> Tokenizer:
    """tokenizer.json (or tokenizer.model, converted) + tokenizer_config.json."""
    cfg_path = folder / "tokenizer_config.json"
    tcfg = read_json(cfg_path) if cfg_path.exists() else {}
    if (folder / "tokenizer.json").exists():
        try:
            tok = load_tokenizer_json(folder / "tokenizer.json")
        except TokenizerError as err:
            raise EdgeforgeError(str(err)) from None
        add_bos = tcfg.get("add_bos_token")
        if add_bos is None:  # not stated: does the tokenizer's own post-processor add BOS?
            add_bos = bool(config.bos_token_id is not None and tok.encode("a").ids[:1] == [config.bos_token_id])
    elif (folder / "tokenizer.model").exists():
        from .tokenizer_build import from_sentencepiece_file

        tok, _ = from_sentencepiece_file(folder / "tokenizer.model")
        add_bos = tcfg.get("add_bos_token", True)  # transformers' LlamaTokenizer default
    else:
        raise EdgeforgeError(f"{folder}: no tokenizer (tokenizer.json or tokenizer.model) in the model folder")
    bos = config.bos_token_id if config.bos_token_id is not None else _token_id(tok, tcfg.get("bos_token"))
    eos = list(config.eos_token_ids)
    cfg_eos = _token_id(tok, tcfg.get("eos_token"))
    if not eos and cfg_eos is not None:
        eos = [cfg_eos]
    template = tcfg.get("chat_template")
    if template is None and (folder / "chat_template.jinja").exists():
        template = read_text(folder / "chat_template.jinja", MAX_TEMPLATE_BYTES, "chat template")
    if isinstance(template, list):  # several named templates: use the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return Tokenizer(tok, bos, eos, bool(add_bos), template)


def _token_id(tok, token) -> int | None:
    if isinstance(token, dict):  # AddedToken serialized as {"content": ...}
        token = token.get("content")
    return tok.token_to_id(token) if isinstance(token, str) else None
