"""Embedding rows read straight from an ONNX artifact's data file.

Copied into bundles: imports only numpy and this package.

The ONNX graph takes `inputs_embeds`; the table sits in model.onnx.data at the offsets
artifact.json's `onnx.embedding` gives (backends/onnx/graph.py writes them). Each row is read with
its own small positioned read (pread), where a Gather inside ONNX Runtime kept the whole table resident (a 1B
model's q8 table: ~270 MB of ~930 MB of weights). Not a memory map: the kernel maps whole large
folios / readahead windows on each fault (measured: 100 random rows of that table made 140 MB
resident), while reads leave nothing in the process.

Quantized tables are MatMulNBits' layout: uint8 blob [vocab, H/32, 32 * bits / 8] with the default
zero point (8 for 4 bits, low nibble first; 128 for 8 bits) and float32 scales [vocab, H/32]; a row
is float32(q - zero_point) * scale, which is what GatherBlockQuantized computes (tests compare the
two on the same bytes).

A tied head that runs edgeforge's kernels (layout "edgeforge-q4" or "edgeforge-q8",
backends/onnx/kernels) is the table's one copy: rows interleaved in groups of 8, per block of 32 the
group's 8 fp16 scales then 32-byte chunks of 8 rows x 4 elements (4-bit: chunk j byte 4r + t holds row
r's code of element 8j + t in the low nibble, 8j + 4 + t in the high one; 8-bit: chunk j byte 4r + t
is row r's code of element 4j + t). A row is read as its group (8 rows' bytes, one positioned read)
and picked out.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .bundle_errors import BundleError

def _pread(f, n: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(f.fileno(), n, offset)
    f.seek(offset)  # Windows: no pread
    return f.read(n)


DTYPES = {"uint8": np.uint8, "float32": np.float32, "float16": np.float16}
ZERO_POINT = {4: 8, 8: 128}
KERNEL_LAYOUTS = {"edgeforge-q4": 4, "edgeforge-q8": 8}  # the kernels' layouts (kernels.c) and their bits
KERNEL_GROUP_ROWS = 8


def kernel_block_bytes(bits: int) -> int:
    """Bytes of one block of 32 for a group of 8 rows: 8 fp16 scales, then the codes."""
    return 16 + 32 * bits


class EmbeddingTable:
    """rows(ids) -> float32 [len(ids), hidden] from the artifact's data file."""

    def __init__(self, artifact_dir, spec: dict, vocab_size: int, hidden_size: int):
        self.where = Path(artifact_dir) / "artifact.json"
        self.vocab_size, self.hidden_size = int(vocab_size), int(hidden_size)
        self._files: dict = {}
        try:
            self.kind = spec["kind"]
            self.layout = spec.get("layout", "matmulnbits")
            if self.kind == "quantized" and self.layout in KERNEL_LAYOUTS:
                self.bits, self.block = int(spec["bits"]), int(spec["block_size"])
                if (self.bits, self.block) != (KERNEL_LAYOUTS[self.layout], 32) or self.hidden_size % 32:
                    raise BundleError(f"{self.where}: an {self.layout} embedding must be {KERNEL_LAYOUTS[self.layout]}-bit "
                                      f"in blocks of 32, got bits {self.bits} / block_size {self.block} / hidden "
                                      f"{self.hidden_size}")
                groups = -(-self.vocab_size // KERNEL_GROUP_ROWS)
                self.packed = self._tensor(artifact_dir, spec["packed"], "uint8",
                                           (groups, self.hidden_size // 32 * kernel_block_bytes(self.bits)))
            elif self.kind == "quantized" and self.layout == "matmulnbits":
                self.bits, self.block = int(spec["bits"]), int(spec["block_size"])
                if self.bits not in ZERO_POINT or self.block <= 0 or self.hidden_size % self.block:
                    raise BundleError(f"{self.where}: embedding bits {self.bits} / block_size {self.block} not supported")
                blocks = self.hidden_size // self.block
                self.blob = self._tensor(artifact_dir, spec["blob"], "uint8", (self.vocab_size, blocks, self.block * self.bits // 8))
                self.scales = self._tensor(artifact_dir, spec["scales"], "float32", (self.vocab_size, blocks))
            elif self.kind == "quantized":
                raise BundleError(f"{self.where}: embedding layout {self.layout!r} is not one this runtime reads")
            elif self.kind == "dense":
                self.table = self._tensor(artifact_dir, spec["table"], None, (self.vocab_size, self.hidden_size))
            else:
                raise BundleError(f"{self.where}: embedding kind {self.kind!r} is neither 'quantized' nor 'dense'")
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(f"{self.where}: malformed 'embedding' entry ({err!r})") from None

    def _tensor(self, artifact_dir, tensor: dict, dtype: str | None, shape: tuple) -> dict:
        """Check that one tensor entry describes what the graph expects and lies inside the file (a
        bad entry is a BundleError, never a wild read); returns {file, offset, row_bytes, dtype}."""
        name, dt = tensor["file"], tensor["dtype"]
        if Path(name).name != name or name in ("", ".", ".."):
            raise BundleError(f"{self.where}: embedding file {name!r} must be a file name in the artifact folder")
        if dt not in DTYPES or (dtype is not None and dt != dtype) or (dtype is None and dt == "uint8"):
            raise BundleError(f"{self.where}: embedding tensor dtype {dt!r} is not what a {self.kind} table uses")
        if [int(d) for d in tensor["shape"]] != list(shape):
            raise BundleError(f"{self.where}: embedding tensor shape {tensor['shape']}, expected {list(shape)}")
        offset, length = int(tensor["offset"]), int(tensor["length"])
        path = Path(artifact_dir) / name
        size = path.stat().st_size if path.is_file() else -1
        if length != int(np.prod(shape)) * np.dtype(DTYPES[dt]).itemsize or offset < 0 or offset + length > size:
            raise BundleError(f"{path}: the embedding table ({length} bytes at offset {offset}) is not inside the file "
                              f"({size} bytes) or does not match its shape")
        if path not in self._files:
            try:  # unbuffered: each row is one positioned read (os.pread), nothing read ahead
                self._files[path] = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
            except OSError as err:
                raise BundleError(f"{path}: cannot read the embedding table ({err.strerror or err})") from None
        return {"file": self._files[path], "offset": offset, "row_bytes": length // shape[0],
                "dtype": np.dtype(DTYPES[dt]), "row_shape": shape[1:]}

    def _read(self, t: dict, ids) -> np.ndarray:
        """Rows `ids` of one tensor, each with its own positioned read."""
        f, n = t["file"], t["row_bytes"]
        out = np.empty((len(ids), n), np.uint8)
        for i, row in enumerate(ids):
            data = _pread(f, n, t["offset"] + int(row) * n)
            if len(data) != n:
                raise BundleError(f"{f.name}: truncated while reading embedding row {int(row)}")
            out[i] = np.frombuffer(data, np.uint8)
        return out.view(t["dtype"]).reshape((len(ids), *t["row_shape"]))

    @property
    def files(self) -> list[Path]:
        """The data files the table is read from (checked names inside the artifact folder)."""
        return list(self._files)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def rows(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise BundleError(f"token id {int(bad[0])} is outside the vocabulary (0..{self.vocab_size - 1})")
        if self.kind == "dense":
            return self._read(self.table, ids).astype(np.float32)
        if self.layout in KERNEL_LAYOUTS:
            return self._kernel_rows(ids)
        blob = self._read(self.blob, ids)
        if self.bits == 4:  # two values a byte, low nibble first
            blob = np.stack([blob & 0x0F, blob >> 4], axis=-1).reshape(len(ids), -1, self.block)
        q = blob.astype(np.float32) - np.float32(ZERO_POINT[self.bits])
        return (q * self._read(self.scales, ids)[:, :, None]).reshape(len(ids), self.hidden_size)

    def _kernel_rows(self, ids) -> np.ndarray:
        n, nb, rows = len(ids), self.hidden_size // 32, KERNEL_GROUP_ROWS
        group = self._read(self.packed, ids // rows).reshape(n, nb, kernel_block_bytes(self.bits))
        lane = (ids % rows)[:, None]
        scales = np.ascontiguousarray(group[:, :, :16]).view(np.float16)  # [n, nb, 8 rows]
        scale = np.take_along_axis(scales, lane[:, :, None], axis=2)[:, :, 0].astype(np.float32)
        chunks = group[:, :, 16:].reshape(n, nb, self.bits, rows, 4)  # [n, nb, chunk, row, t]: 4 or 8 chunks of 32 B
        mine = np.take_along_axis(chunks, lane[:, :, None, None, None], axis=3)[:, :, :, 0]  # [n, nb, chunk, t]
        if self.bits == 4:
            codes = np.stack([mine & 0x0F, mine >> 4], axis=3).reshape(n, nb, 32)  # element 8j + 4h + t
        else:
            codes = mine.reshape(n, nb, 32)  # element 4j + t
        q = codes.astype(np.float32) - np.float32(ZERO_POINT[self.bits])
        return (q * scale[:, :, None]).reshape(n, self.hidden_size)
