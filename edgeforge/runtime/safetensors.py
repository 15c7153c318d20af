"""numpy-only safetensors: a memory-mapped reader (bf16 -> float32) and a deterministic writer.

Format (https://huggingface.co/docs/safetensors): 8-byte little-endian header length N, N bytes of
JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
then the data buffer. Offsets are relative to the start of the data buffer.

This module is copied into bundles: it imports only the standard library and numpy, and reads
without numpy too (`raw_pointer`: a TVM bundle's device install has no numpy). Errors are
`SafetensorsError` (a ValueError) whose message names the file; the compiler side turns them into
EdgeforgeError.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import struct
from pathlib import Path

from .bundle_errors import BundleError
from .manifest_check import read_regular

try:
    import numpy as np
except ImportError:  # a TVM bundle on its device: raw_pointer() only
    np = None

# safetensors dtype name -> (bytes per element, the dtype's usual name: TVM's and numpy's)
ELEMENTS = {"F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
            "I64": (8, "int64"), "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"),
            "U64": (8, "uint64"), "U32": (4, "uint32"), "U16": (2, "uint16"), "U8": (1, "uint8"), "BOOL": (1, "bool")}
# safetensors dtype name -> numpy dtype (little-endian). BF16 has no numpy dtype: it is read as
# uint16 and widened to float32 by get().
DTYPES = {} if np is None else {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NUMPY_TO_ST = {} if np is None else {
    np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16",
    np.dtype("<i8"): "I64", np.dtype("<i4"): "I32", np.dtype("<i2"): "I16", np.dtype("i1"): "I8",
    np.dtype("<u8"): "U64", np.dtype("<u4"): "U32", np.dtype("<u2"): "U16", np.dtype("u1"): "U8",
    np.dtype("?"): "BOOL",
}
# The writer always stores this metadata (plus what the caller adds), so outputs are byte-stable.
DEFAULT_METADATA = {"format": "pt"}
_MAX_HEADER = 100 * 1024 * 1024  # same sanity limit as the reference implementation


class SafetensorsError(ValueError):
    """A safetensors file is unreadable; the message names the file and the tensor if any."""


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32: bf16 is the top half of a float32."""
    wide = np.asarray(raw, dtype=np.uint16).astype(np.uint32)
    wide <<= 16  # in place: one float32-sized array at the peak, not two (an 8B embedding is 2 GB)
    return wide.view(np.float32)


class _PyBuffer(ctypes.Structure):  # CPython's Py_buffer (3.9 - 3.13)
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


def _buffer_address(source) -> int:
    """The address of a read-only buffer (a mapping opened ACCESS_READ) through CPython's buffer
    protocol: ctypes' from_buffer() wants a writable one. The export is released at once: the
    address stays valid as long as `source` is neither closed nor resized (SafetensorsFile keeps its
    mapping open for its lifetime)."""
    view = _PyBuffer()
    get, release = ctypes.pythonapi.PyObject_GetBuffer, ctypes.pythonapi.PyBuffer_Release
    get.argtypes, release.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int], [ctypes.POINTER(_PyBuffer)]
    if get(source, ctypes.byref(view), 0) != 0:  # PyBUF_SIMPLE: contiguous bytes, read-only is fine
        raise SafetensorsError("cannot read the address of a mapped safetensors file")
    try:
        return int(view.buf or 0)
    finally:
        release(ctypes.byref(view))


class SafetensorsFile:
    """One .safetensors file, memory-mapped. Arrays returned by get_raw() are read-only views."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise SafetensorsError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as err:
            raise SafetensorsError(f"{self.path}: cannot read safetensors file ({err.strerror or err})") from err
        self._entries, self.metadata, self._data_start = _parse_header(self.path, self._mm, size)
        self._address: int | None = None  # where the mapping starts (raw_pointer)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> str:
        """The stored safetensors dtype name, e.g. "BF16"."""
        return self._entry(name)["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def get_raw(self, name: str) -> np.ndarray:
        """The stored array without conversion (BF16 comes back as uint16 bit patterns)."""
        e = self._entry(name)
        begin, end = e["data_offsets"]
        buf = np.frombuffer(self._mm, dtype=np.uint8, count=end - begin, offset=self._data_start + begin)
        return buf.view(DTYPES[e["dtype"]]).reshape(e["shape"])

    def raw_pointer(self, name: str) -> tuple[int, int]:
        """(address, bytes) of the stored tensor in this process's mapping, for a runtime that copies
        it into its own memory (no numpy needed). Valid while this object lives (it never closes
        its mapping)."""
        e = self._entry(name)
        begin, end = e["data_offsets"]
        if self._address is None:
            self._address = _buffer_address(self._mm)
        return self._address + self._data_start + begin, end - begin

    def get(self, name: str) -> np.ndarray:
        """The stored array; BF16 is widened to float32 (numpy has no bfloat16)."""
        raw = self.get_raw(name)
        return bf16_to_f32(raw) if self.dtype(name) == "BF16" else raw

    def release(self, name: str) -> None:
        """Drop this tensor's mapped pages from the process (they stay in the page cache and are
        read again on next use). Streaming readers call it once done with a tensor, so resident
        memory stays about one tensor instead of growing to the whole file."""
        if not hasattr(self._mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return  # not Linux/macOS: the pages are only reclaimed under memory pressure
        begin, end = self._entry(name)["data_offsets"]
        start = (self._data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > begin:
            self._mm.madvise(mmap.MADV_DONTNEED, start, self._data_start + end - start)

    def _entry(self, name: str) -> dict:
        try:
            return self._entries[name]
        except KeyError:
            raise SafetensorsError(f"{self.path}: no tensor named '{name}'") from None


def _parse_header(path: Path, mm, size: int):
    (n,) = struct.unpack("<Q", mm[:8])
    if n > _MAX_HEADER:
        raise SafetensorsError(f"{path}: not a safetensors file (header length {n} is implausible)")
    if 8 + n > size:
        raise SafetensorsError(f"{path}: truncated safetensors file (header needs {8 + n} bytes, file has {size})")
    try:
        header = json.loads(bytes(mm[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SafetensorsError(f"{path}: not a safetensors file (bad JSON header: {err})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    entries = {name: _check_entry(path, name, e, data_len) for name, e in header.items()}
    _check_disjoint(path, entries)
    return entries, metadata, 8 + n


def _check_disjoint(path: Path, entries: dict) -> None:
    """Two tensors sharing bytes is a forged or corrupt header: writing one would change the other,
    and an index of aliased names can smuggle one tensor's data in as another's."""
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], name) for name, e in entries.items()
                   if e["data_offsets"][1] > e["data_offsets"][0])
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise SafetensorsError(f"{path}: tensors '{first}' and '{second}' overlap in the file (corrupt or forged header)")


def _check_entry(path: Path, name: str, e, data_len: int) -> dict:
    try:
        dtype, shape, (begin, end) = e["dtype"], [int(d) for d in e["shape"]], e["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise SafetensorsError(f"{path}: tensor '{name}' has a malformed header entry") from None
    if dtype not in ELEMENTS:
        raise SafetensorsError(f"{path}: tensor '{name}' has unsupported dtype {dtype}")
    nbytes = math.prod(shape) * ELEMENTS[dtype][0]
    if end - begin != nbytes or begin < 0:
        raise SafetensorsError(f"{path}: tensor '{name}' offsets [{begin}, {end}] do not match shape {shape} {dtype}")
    if end > data_len:
        raise SafetensorsError(
            f"{path}: truncated safetensors file (tensor '{name}' ends at byte {end} of the data, which has {data_len})"
        )
    return {"dtype": dtype, "shape": shape, "data_offsets": [int(begin), int(end)]}


def _as_stored(name: str, value) -> tuple[str, np.ndarray]:
    """(safetensors dtype, contiguous little-endian array). A ("BF16", uint16 array) pair stores bf16."""
    if isinstance(value, tuple):
        dtype, arr = value
        if dtype != "BF16":
            raise SafetensorsError(f"tensor '{name}': only ('BF16', uint16 array) pairs are accepted, got {dtype}")
        return "BF16", np.ascontiguousarray(arr, dtype="<u2")
    arr = np.asarray(value)
    le = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    if le not in _NUMPY_TO_ST:
        raise SafetensorsError(f"tensor '{name}': numpy dtype {arr.dtype} cannot be stored in safetensors")
    return _NUMPY_TO_ST[le], np.ascontiguousarray(arr, dtype=le)


def serialize(tensors: dict, metadata: dict[str, str] | None = None) -> tuple[bytes, list[np.ndarray]]:
    """Header bytes and the arrays in data order, for write_safetensors (and total size computation).

    Determinism: header keys sorted, fixed metadata, header padded with spaces to a multiple of 8.
    Data is ordered by decreasing item size, then name, so every tensor starts aligned to its own
    item size (as the reference implementation does); there are no holes.
    """
    stored = {name: _as_stored(name, tensors[name]) for name in sorted(tensors)}
    head, offsets = layout({k: (dtype, arr.shape) for k, (dtype, arr) in stored.items()}, metadata)
    return head, [stored[name][1] for name in sorted(offsets, key=offsets.get)]


def layout(specs: dict[str, tuple[str, tuple]], metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """Header bytes and each tensor's data offset for {name: (safetensors dtype, shape)}: the file
    write_safetensors would write, planned before any data exists (streaming writers fill it in)."""
    size = {k: int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize for k, (dtype, shape) in specs.items()}
    order = sorted(specs, key=lambda k: (-DTYPES[specs[k][0]].itemsize, k))
    header: dict = {"__metadata__": {**DEFAULT_METADATA, **{str(k): str(v) for k, v in (metadata or {}).items()}}}
    offset, offsets = 0, {}
    for name in order:
        dtype, shape = specs[name]
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + size[name]]}
        offsets[name] = offset
        offset += size[name]
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


def st_dtype(dtype) -> str:
    """The safetensors dtype name of a numpy dtype (e.g. float16 -> "F16")."""
    d = np.dtype(dtype)
    d = d.newbyteorder("<") if d.byteorder == ">" else d
    if d not in _NUMPY_TO_ST:
        raise SafetensorsError(f"numpy dtype {dtype} cannot be stored in safetensors")
    return _NUMPY_TO_ST[d]


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> int:
    """Write `tensors` ({name: numpy array or ("BF16", uint16 array)}) to `path`; returns the data size.

    The same input always gives the same bytes. Writes directly to `path`: callers build inside a
    temporary output folder (fsutil.atomic_output_dir).
    """
    head, arrays = serialize(tensors, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for arr in arrays:
            f.write(memoryview(arr.reshape(-1)).cast("B"))
    return sum(a.nbytes for a in arrays)


class SafetensorsFolder:
    """The tensors of a folder: model.safetensors, or shards listed in model.safetensors.index.json.

    Same reading interface as SafetensorsFile (keys/shape/dtype/get/get_raw); shards are opened
    (memory-mapped) on first use.
    """

    def __init__(self, folder: str | os.PathLike, index_name: str = "model.safetensors.index.json",
                 single_name: str = "model.safetensors"):
        self.folder = Path(folder)
        index = self.folder / index_name
        if index.exists():
            self.weight_map = _read_index(index)
        elif (self.folder / single_name).exists():
            self.weight_map = {k: single_name for k in SafetensorsFile(self.folder / single_name).keys()}
        else:
            raise SafetensorsError(f"{self.folder}: no {single_name} or {index_name}")
        self._open: dict[str, SafetensorsFile] = {}

    def files(self) -> list[Path]:
        return [self.folder / f for f in sorted(set(self.weight_map.values()))]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def open_all(self) -> None:
        """Open (map) every shard now, so a truncated or inconsistent one fails early, named."""
        for fname in sorted(set(self.weight_map.values())):
            self._shard(fname)

    def file_for(self, name: str) -> SafetensorsFile:
        fname = self.weight_map.get(name)
        if fname is None:
            raise SafetensorsError(f"{self.folder}: no tensor named '{name}'")
        return self._shard(fname)

    def _shard(self, fname: str) -> SafetensorsFile:
        if fname not in self._open:
            f = SafetensorsFile(self.folder / fname)
            missing = [k for k, v in self.weight_map.items() if v == fname and k not in f]
            if missing:
                raise SafetensorsError(f"{f.path}: tensor '{missing[0]}' listed in the index is not in this file")
            self._open[fname] = f
        return self._open[fname]

    def dtype(self, name: str) -> str:
        return self.file_for(name).dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file_for(name).shape(name)

    def get_raw(self, name: str) -> np.ndarray:
        return self.file_for(name).get_raw(name)

    def raw_pointer(self, name: str) -> tuple[int, int]:
        return self.file_for(name).raw_pointer(name)

    def get(self, name: str) -> np.ndarray:
        return self.file_for(name).get(name)

    def release(self, name: str) -> None:
        self.file_for(name).release(name)


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(read_regular(index, 64 << 20, "safetensors index", follow_links=True))["weight_map"]
    except (BundleError, ValueError, KeyError, TypeError) as err:
        raise SafetensorsError(f"{index}: unreadable safetensors index ({err})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SafetensorsError(f"{index}: 'weight_map' must map tensor names to file names")
    for fname in set(weight_map.values()):
        if Path(fname).name != fname or fname in ("", ".", "..") or "\\" in fname:
            raise SafetensorsError(f"{index}: shard {fname!r} is not a file name in the model's folder "
                                   "(paths leading elsewhere are refused)")
        if not (index.parent / fname).exists():
            raise SafetensorsError(f"{index}: shard {fname} listed in the index does not exist")
        if not (index.parent / fname).is_file():
            raise SafetensorsError(f"{index}: shard {fname} is not a regular file")
    return weight_map
