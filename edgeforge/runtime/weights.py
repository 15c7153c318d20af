"""Read a QDIR (the output of `edgeforge quantize`): config, quantization.json and raw stored arrays.

numpy-only: bundles use it to feed a compiled module its weights, and the compiler side
(edgeforge.quant.qdir) builds its dequantizing reader on it. Without numpy (a TVM bundle's device)
`stored()` still gives each array's address in the mapped shards. The layout is defined in
docs/INTERNALS.md ("QDIR").
"""

from __future__ import annotations

import os
from pathlib import Path

from .bundle_errors import BundleError
from .files import read_json as _read_json
from .safetensors import ELEMENTS, SafetensorsError, SafetensorsFolder

CONFIG = "config.json"
QUANTIZATION = "quantization.json"
INDEX = "model.safetensors.index.json"
CONFIG_FORMAT = "edgeforge-config"
QUANT_FORMAT = "edgeforge-quant"
VERSION = 1
# stored arrays of each storage format (role -> dtype)
FORMAT_ARRAYS = {
    "f32": {"weight": "float32"},
    "f16": {"weight": "float16"},
    "q8": {"qweight": "int8", "scales": None},
    "q4": {"qweight": "uint32", "scales": None},
    "q4a": {"qweight": "uint32", "scales": None, "zeros": "uint8"},
}


GROUP = 32  # inputs per scale (and per zero point)
Q4_PER_WORD = 8  # nibbles per uint32 word, element 8k+j in bits 4j..4j+3 of word k


def zeros_width(groups: int) -> int:
    """Bytes a row of q4a zero points takes: two a byte, the last one alone when `groups` is odd."""
    return (groups + 1) // 2


def stored_arrays(fmt: str, shape, scale_dtype: str | None = None) -> dict[str, tuple[tuple, str]]:
    """role -> (shape, dtype) of the stored arrays of one [out, in] weight in format `fmt`: the one
    statement of the QDIR layout that quantizers (formats.stored), the TVM module's parameters and
    this reader's checks all use. q4a zero points are two a byte (even group in the low nibble)."""
    out = {}
    for role, dtype in FORMAT_ARRAYS[fmt].items():
        if role == "weight":
            dims = tuple(int(d) for d in shape)
        else:
            out_f, in_f = (int(d) for d in shape)
            dims = {"qweight": (out_f, in_f // Q4_PER_WORD if fmt in ("q4", "q4a") else in_f),
                    "scales": (out_f, in_f // GROUP), "zeros": (out_f, zeros_width(in_f // GROUP))}[role]
        out[role] = (dims, dtype or scale_dtype)
    return out


def stored_key(tensor: str, role: str) -> str:
    """Stored array name: 'x.q_proj.weight' + 'scales' -> 'x.q_proj.scales' ('weight' keeps the name)."""
    base = tensor[: -len(".weight")] if tensor.endswith(".weight") else tensor
    return f"{base}.{role}"


def shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def is_qdir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / QUANTIZATION).is_file() and (p / CONFIG).is_file()


def read_json(path: Path, fmt: str | None = None) -> dict:
    return _read_json(path, fmt, VERSION if fmt is not None else None)


class QdirWeights:
    """A QDIR on disk. `config` and `quantization` are the parsed JSON files; arrays are memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise BundleError(f"{self.path}: not a QDIR folder")
        self.config = read_json(self.path / CONFIG, CONFIG_FORMAT)
        self.quantization = read_json(self.path / QUANTIZATION, QUANT_FORMAT)
        self.tensors: dict = self.quantization.get("tensors") or {}
        if not isinstance(self.tensors, dict) or not self.tensors:
            raise BundleError(f"{self.path / QUANTIZATION}: no 'tensors' listed")
        try:
            self._store = SafetensorsFolder(self.path, index_name=INDEX, single_name="model.safetensors")
        except SafetensorsError as err:
            raise BundleError(str(err)) from None

    @property
    def scheme(self) -> str:
        return self.quantization.get("scheme", "")

    @property
    def model_dtype(self) -> str:
        return self.quantization.get("model_dtype", "float32")

    def names(self) -> list[str]:
        """Logical (Hugging Face) tensor names, in quantization.json order."""
        return list(self.tensors)

    def info(self, name: str) -> dict:
        """{"format", "shape", "arrays": {role: stored key}, "scale_dtype"?} of one logical tensor."""
        try:
            return self.tensors[name]
        except KeyError:
            raise BundleError(f"{self.path / QUANTIZATION}: no tensor named '{name}'") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.info(name)["shape"])

    def keys(self) -> list[str]:
        """Stored array names (as in the safetensors shards)."""
        return self._store.keys()

    def get_raw(self, key: str):
        """One stored array by its key, as stored (read-only, memory-mapped)."""
        try:
            return self._store.get_raw(key)
        except SafetensorsError as err:
            raise BundleError(str(err)) from None

    def release(self, name: str) -> None:
        """Done with a tensor's stored arrays: drop their mapped pages from this process (an engine
        that copied them into its own memory would otherwise hold both copies)."""
        for key in self.info(name)["arrays"].values():
            try:
                self._store.release(key)
            except (SafetensorsError, OSError, ValueError):
                pass  # only a memory hint

    def stored(self, name: str, role: str) -> dict:
        """{dtype, shape, address, nbytes} of one stored array of a logical tensor, its dtype checked
        against quantization.json; the address is in this process's mapping of the shard (numpy-free)."""
        info = self.info(name)
        key = (info.get("arrays") or {}).get(role)
        expected = FORMAT_ARRAYS.get(info.get("format"), {})
        if key is None or role not in expected:
            raise BundleError(f"{self.path}: tensor '{name}' has no '{role}' array (the module needs it)")
        try:
            dtype = ELEMENTS[self._store.dtype(key)][1]
            shape = [int(d) for d in self._store.shape(key)]
            address, nbytes = self._store.raw_pointer(key)
        except SafetensorsError as err:
            raise BundleError(str(err)) from None
        want = expected[role] or info.get("scale_dtype")
        if dtype != want:
            raise BundleError(f"{self.path}: array '{key}' of tensor '{name}' is {dtype}, expected {want}")
        return {"dtype": dtype, "shape": shape, "address": address, "nbytes": nbytes}

    def arrays(self, name: str) -> dict:
        """The stored arrays of a logical tensor: {"weight": ...} or {"qweight": ..., "scales": ...}."""
        info = self.info(name)
        out = {role: self.get_raw(key) for role, key in info["arrays"].items()}
        self._check(name, info, out)
        return out

    def _check(self, name: str, info: dict, arrays: dict) -> None:
        """Catch a QDIR whose arrays disagree with quantization.json before a backend misreads them."""
        self._check_layout(name, info, {role: (str(a.dtype), tuple(a.shape)) for role, a in arrays.items()})

    def check_layout(self) -> None:
        """Every tensor's stored arrays (dtype and shape, from the shard headers: no data read, no
        numpy) against quantization.json and the QDIR layout: what a compiler checks first."""
        for name in self.names():
            info = self.info(name)
            try:
                got = {role: (ELEMENTS[self._store.dtype(key)][1], tuple(int(d) for d in self._store.shape(key)))
                       for role, key in (info.get("arrays") or {}).items()}
            except (SafetensorsError, KeyError) as err:
                raise BundleError(f"{self.path}: tensor '{name}': {err}") from None
            self._check_layout(name, info, got)

    def _check_layout(self, name: str, info: dict, got: dict) -> None:
        expected = FORMAT_ARRAYS.get(info.get("format"))
        if expected is None or set(got) != set(expected):
            raise BundleError(f"{self.path / QUANTIZATION}: tensor '{name}' has bad format/arrays entry")
        try:
            layout = stored_arrays(info["format"], info["shape"], info.get("scale_dtype"))
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"{self.path / QUANTIZATION}: tensor '{name}' has a bad shape {info.get('shape')!r}") from None
        for role, (shape, dtype) in layout.items():
            key, (got_dtype, got_shape) = info["arrays"][role], got[role]
            if got_dtype != dtype:
                raise BundleError(f"{self.path}: array '{key}' of tensor '{name}' is {got_dtype}, expected {dtype}")
            if got_shape != shape:
                old = role == "zeros" and got_shape == (shape[0], int(info["shape"][1]) // GROUP)
                raise BundleError(f"{self.path}: array '{key}' of tensor '{name}' has shape {list(got_shape)}, expected "
                                  f"{list(shape)}" + (" (q4a zero points one a byte: written by an edgeforge before "
                                                      "2026-11-27; quantize the model again)" if old else ""))

    def files(self) -> list[Path]:
        """Every file of the QDIR's weights (shards + index + JSON), for checksumming and copying."""
        extra = [self.path / f for f in (CONFIG, QUANTIZATION, INDEX) if (self.path / f).exists()]
        return sorted(extra + self._store.files())
