"""GGUF loader (llama architecture) on top of the `gguf` package.

- The header is parsed here (read_gguf: much faster than gguf.GGUFReader on big vocabularies);
  tensors are memory-mapped and dequantized one at a time on get() with gguf.quants
  (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K and whatever else it handles).
- llama.cpp's converter permutes the rows of Q and K (it interleaves the two rotary halves);
  we undo that so Q/K are in HF order like every other source.
- GGUF names are mapped to HF names (INTERNALS "Tensor names").
- llama3 rope scaling arrives as `rope_freqs.weight` (per-frequency divisors); LlamaConfig maps it
  back to llama3 parameters when they reproduce it, else keeps the factors (see config.py).
- The tokenizer is rebuilt from tokenizer.ggml.* metadata (tokenizer_build.py).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgeforgeError
from ..runtime.tokenizer import Tokenizer
from .config import LlamaConfig
from ..cache import cached_sha256
from .types import LoadedModel, TensorSource, check_shapes
from .tokenizer_build import from_gguf_metadata

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")
ROPE_FREQS = "rope_freqs.weight"


def hf_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor name, or None if it is not a llama weight we know."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute(w, n_head, n_head_kv)`: per head, rows were reordered from
    (half, pair) to (pair, half); swap them back."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class GGUFTensorInfo:
    name: str
    ggml_type: object  # gguf.GGMLQuantizationType
    dims: tuple[int, ...]  # ggml order: dims[0] is the row length
    data: np.ndarray  # raw bytes (memory-mapped)


def read_gguf(path: Path) -> tuple[dict, list[GGUFTensorInfo]]:
    """(metadata, tensors) of a GGUF file. A small parser of our own: gguf.GGUFReader builds numpy
    views per string and needs ~5 s for a 49k-token vocabulary; this needs ~0.2 s. The gguf package
    still provides the type table and the dequantization."""
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as err:
        raise EdgeforgeError(f"{path}: cannot read GGUF ({err})") from None
    if data[:4].tobytes() != b"GGUF":
        raise EdgeforgeError(f"{path}: not a GGUF file (bad magic)")
    try:
        return _parse(path, data)
    except EdgeforgeError:
        raise
    except (struct.error, ValueError, IndexError, UnicodeDecodeError, KeyError, OverflowError) as err:
        raise EdgeforgeError(f"{path}: corrupt or truncated GGUF ({type(err).__name__}: {err})") from None


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value[0]

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("string runs past the end of the file")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="surrogateescape")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.take("<I"), self.take("<Q")
            if itype in _SCALARS and itype != 7:  # numeric arrays in one go
                dtype = np.dtype(_SCALARS[itype])
                end = self.pos + count * dtype.itemsize
                if end > len(self.buf):
                    raise ValueError("array runs past the end of the file")
                arr = np.frombuffer(self.buf[self.pos : end], dtype=dtype).tolist()
                self.pos = end
                return arr
            return [self.value(itype) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype}")


def _parse(path: Path, data: np.ndarray) -> tuple[dict, list[GGUFTensorInfo]]:
    import gguf

    cur = _Cursor(memoryview(data))
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise EdgeforgeError(f"{path}: unsupported GGUF version {version}")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    meta = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.take("<Q") for _ in range(cur.take("<I")))
        infos.append((name, dims, cur.take("<I"), cur.take("<Q")))
    align = int(meta.get("general.alignment", 32))
    start = -(-cur.pos // align) * align
    tensors = []
    for name, dims, raw_type, offset in infos:
        try:
            ggml_type = gguf.GGMLQuantizationType(raw_type)
        except ValueError:
            raise EdgeforgeError(f"{path}: tensor '{name}' has unknown ggml type {raw_type}") from None
        block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        nbytes = int(np.prod(dims, dtype=np.int64)) // block * type_size
        begin = start + offset
        if begin + nbytes > data.size:
            raise EdgeforgeError(
                f"{path}: truncated GGUF (tensor '{name}' needs bytes up to {begin + nbytes}, the file has {data.size})"
            )
        tensors.append(GGUFTensorInfo(name, ggml_type, dims, data[begin : begin + nbytes]))
    return meta, tensors


class GGUFTensors(TensorSource):
    def __init__(self, path: Path, infos: list[GGUFTensorInfo], config: LlamaConfig):
        import gguf

        self.path, self.config = path, config
        self._tensors: dict[str, GGUFTensorInfo] = {}
        dequantizable = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *gguf.quants._type_traits}
        for t in infos:
            if t.name == ROPE_FREQS:
                continue
            name = hf_name(t.name)
            if name is None:
                raise EdgeforgeError(f"{path}: unexpected tensor '{t.name}' for a llama model")
            if t.ggml_type not in dequantizable:
                raise EdgeforgeError(f"{path}: tensor '{t.name}' has type {t.ggml_type.name}, which cannot be dequantized")
            self._tensors[name] = t

    def names(self) -> list[str]:
        return [n for n in self.config.tensor_shapes() if n in self._tensors]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(reversed(self._tensors[name].dims))  # ggml lists the row length first

    def dtype(self, name: str) -> str:
        return self._tensors[name].ggml_type.name

    def gguf_name(self, name: str) -> str:
        return self._tensors[name].name

    def get(self, name: str) -> np.ndarray:
        import gguf

        t = self._tensors[name]
        shape = self.shape(name)
        try:
            rows = t.data.reshape(shape[0] if len(shape) > 1 else 1, -1)
            w = gguf.quants.dequantize(rows, t.ggml_type)
        except Exception as err:
            raise EdgeforgeError(f"{self.path}: cannot dequantize tensor '{t.name}' ({err})") from None
        w = np.asarray(w, dtype=np.float32).reshape(shape)
        c = self.config
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rows(w, c.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rows(w, c.num_kv_heads)
        return np.ascontiguousarray(w)


def load_gguf(path: Path) -> LoadedModel:
    path = Path(path)
    meta, infos = read_gguf(path)
    by_name = {t.name: t for t in infos}
    freqs = by_name.get(ROPE_FREQS)
    rope_factors = None if freqs is None else np.frombuffer(freqs.data.tobytes(), dtype=np.float32)
    embd = by_name.get("token_embd.weight")
    vocab = int(embd.dims[1]) if embd is not None and len(embd.dims) == 2 else None
    config = LlamaConfig.from_gguf(meta, str(path), has_output="output.weight" in by_name,
                                   rope_factors=rope_factors, vocab_size=vocab)
    tensors = GGUFTensors(path, infos, config)
    check_shapes(config, tensors, lambda name: str(path), "the GGUF metadata")
    tok, tcfg = from_gguf_metadata(meta, str(path))
    tokenizer = Tokenizer(tok, tcfg["bos_token_id"], tcfg["eos_token_ids"], tcfg["add_bos_token"],
                          tcfg["chat_template"])
    source = {"path": str(path.resolve()), "format": "gguf", "sha256": cached_sha256(path),
              "model_id": path.stem}
    return LoadedModel(config=config, tensors=tensors, tokenizer=tokenizer, source=source)
