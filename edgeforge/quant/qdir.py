"""Write and read QDIRs (quantized model folders, docs/INTERNALS.md "QDIR").

write_qdir() streams: shards (and their safetensors headers) are planned from tensor shapes alone,
then filled by reading one source tensor, quantizing it, writing the result at its planned offset
and dropping both. Peak memory is about one float32 tensor plus its quantized arrays, and the
source's mapped pages are released after each tensor (docs/notes/models-memory.md).

load_qdir() gives a LoadedModel whose tensors.get(name) is the *dequantized* float32 weight, so
the numpy reference runs on exactly the weights the backends see; tensors.arrays(name) gives the
stored arrays.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import EdgeforgeError
from ..fsutil import atomic_output_dir
from ..progress import progress
from ..runtime.bundle_errors import BundleError
from ..runtime.safetensors import layout, st_dtype
from ..runtime.weights import (
    CONFIG, CONFIG_FORMAT, INDEX, QUANT_FORMAT, QUANTIZATION, VERSION, QdirWeights, is_qdir, shard_name, stored_key,
)
from .formats import GROUP_SIZE, get_format
from .schemes import EMBED_NAMES, Scheme, check_embed_bits, get_scheme

MAX_SHARD_BYTES = 2 * 1024**3  # what HF tooling also uses; keeps every file well below 4 GiB limits

logger = logging.getLogger(__name__)


def natural_key(name: str):
    """Order tensors by layer number (layers.2 before layers.10), then by name."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"\.", name)]


def dump_json(data: dict) -> bytes:
    """Deterministic JSON bytes (fixed indentation, key order as built, trailing newline)."""
    return (json.dumps(data, indent=1, ensure_ascii=True) + "\n").encode("ascii")


# ---- writing ----------------------------------------------------------------------------------

def plan_tensors(model, scheme: Scheme, embed_bits: int | None) -> list[tuple[str, tuple, object]]:
    """[(tensor name, shape, format)] in writing order; checks every tensor before any work starts."""
    plan = []
    for name in sorted(model.tensors.names(), key=natural_key):
        shape = tuple(int(d) for d in model.tensors.shape(name))
        fmt = scheme.format_for(name, shape, embed_bits, model.config.num_layers)
        if fmt.name in ("q8", "q4", "q4a") and shape[1] % GROUP_SIZE:
            raise EdgeforgeError(
                f"tensor '{name}': width {shape[1]} is not divisible by the group size {GROUP_SIZE}, "
                f"cannot store it as {fmt.name} (scheme {scheme.name})"
            )
        plan.append((name, shape, fmt))
    return plan


def plan_shards(plan, max_shard_bytes: int) -> list[list[int]]:
    """Group plan entries (by index) into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, fmt) in enumerate(plan):
        nbytes = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in fmt.stored(shape).values())
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def tensor_entry(shape, fmt) -> dict:
    entry = {"format": fmt.name, "shape": list(shape)}
    if fmt.scale_dtype:
        entry["scale_dtype"] = fmt.scale_dtype
    return entry


def write_qdir(model, scheme, out, embed_bits: int | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Quantize `model` (a LoadedModel) with `scheme` into the QDIR folder `out`; returns a summary.

    Progress: a "[quantize]" bar (edgeforge.progress) and one DEBUG record per tensor. Built in a
    temporary folder and renamed: on any error nothing is left at `out`.
    """
    scheme = get_scheme(scheme)
    check_embed_bits(embed_bits)
    start = time.perf_counter()
    plan = plan_tensors(model, scheme, embed_bits)
    shards = plan_shards(plan, max_shard_bytes)
    entries: dict[str, dict] = {}
    weight_map: dict[str, str] = {}
    total = 0
    with atomic_output_dir(out, is_qdir, "QDIR (quantized model folder)") as tmp:
        with tempfile.TemporaryDirectory(prefix=".gptq-", dir=tmp) as spill:  # gone before the rename
            calib = calibrate(model, scheme, plan, Path(spill))
            with progress(len(plan), "[quantize]", unit="tensors", logger=logger) as bar:
                for s, members in enumerate(shards, start=1):
                    fname = shard_name(s, len(shards))
                    with ShardWriter(tmp / fname, shard_specs(plan[i] for i in members)) as shard:
                        for i in members:
                            name, shape, fmt = plan[i]
                            entries[name] = _quantize_tensor(model, name, shape, fmt, shard, calib)
                            weight_map.update({key: fname for key in entries[name]["arrays"].values()})
                            logger.debug("[%d/%d] %s %s -> %s", i + 1, len(plan), name, list(shape), fmt.name)
                            bar.advance(1, name)
                    total += shard.nbytes
        _write_metadata(tmp, model, scheme, embed_bits, entries, weight_map, total, calib.info)
    params = sum(int(np.prod(shape)) for _, shape, _ in plan)
    return {
        "path": str(Path(out)), "scheme": scheme.name, "model_dtype": scheme.model_dtype,
        "bits_per_weight": round(8 * total / params, 3) if params else None, "calibration": calib.info,
        "embed_format": scheme.embed_format(embed_bits), "tensors": len(plan), "shards": len(shards),
        "bytes": total, "seconds": round(time.perf_counter() - start, 3),
    }


def shard_specs(members) -> dict[str, tuple[str, tuple]]:
    """{stored key: (numpy dtype, shape)} of every array the plan entries (name, shape, format) store."""
    return {stored_key(name, role): (dtype, tuple(s))
            for name, shape, fmt in members for role, (s, dtype) in fmt.stored(shape).items()}


class ShardWriter:
    """One safetensors shard written as its tensors arrive. The header is planned up front from
    the stored shapes (runtime.safetensors.layout, so the bytes equal write_safetensors' for the
    same arrays) and each array goes straight to its offset: nothing accumulates in memory."""

    def __init__(self, path: Path, specs: dict[str, tuple[str, tuple]]):
        self.path, self.specs, self.done = Path(path), specs, set()
        head, self.offsets = layout({k: (st_dtype(d), shape) for k, (d, shape) in specs.items()})
        self.base = len(head)
        self.nbytes = sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(d).itemsize for d, shape in specs.values())
        self.f = open(self.path, "wb")
        self.f.write(head)
        self.f.truncate(self.base + self.nbytes)

    def write(self, key: str, arr: np.ndarray) -> None:
        dtype, shape = self.specs[key]
        if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != shape:  # formats.stored() disagrees with quantize()
            raise EdgeforgeError(f"tensor '{key}': quantized to {arr.dtype} {list(arr.shape)}, planned {dtype} {list(shape)}")
        data = np.ascontiguousarray(arr, dtype=np.dtype(dtype).newbyteorder("<"))
        self.f.seek(self.base + self.offsets[key])
        self.f.write(memoryview(data.reshape(-1)).cast("B"))
        self.done.add(key)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.f.close()
        missing = sorted(set(self.specs) - self.done)
        if exc_type is None and missing:
            raise EdgeforgeError(f"{self.path}: tensor '{missing[0]}' was planned but never written")


def calibrate(model, scheme, plan, spill: Path | None = None, importance: tuple | None = None):
    """The scheme's calibration (quant.calibrate.Calibration): none unless it is calibrated and some
    tensor is q4/q4a; GPTQ schemes solve their q4a and q8 matrices now (spilled to `spill`, a fresh
    temporary folder when None); the others measure importance, or reuse `importance` ((importance,
    info) measured earlier: it does not depend on the scheme)."""
    from .calibrate import Calibration, GptqStore, collect_importance, gptq_tokens, prefill_bytes, solve_gptq

    if not (scheme.calibrated and any(fmt.name in ("q4", "q4a") for _, _, fmt in plan)):
        return Calibration({}, None)
    if scheme.gptq:
        from ..hostmem import check_memory
        from .gptq import memory_needed

        targets = {name: fmt for name, _, fmt in plan if fmt.name in ("q4a", "q8") and name not in EMBED_NAMES}
        check_memory(f"GPTQ calibration of {scheme.name}", memory_needed(s for n, s, _ in plan if n in targets)
                     + prefill_bytes(model.config, gptq_tokens(model)),
                     "close other programs, use a machine with more memory, or a scheme without GPTQ (q4f16)")
        store = GptqStore(spill)
        return Calibration(*solve_gptq(model, targets, store), store)
    return Calibration(*(importance or collect_importance(model)))


def _quantize_tensor(model, name: str, shape, fmt, shard: ShardWriter, calib) -> dict:
    """Read one source tensor (or take GPTQ's result), write its quantized arrays into `shard`; its
    quantization.json entry."""
    entry = {**tensor_entry(shape, fmt), "arrays": {}}
    arrays = calib.solved(name)
    if arrays is not None:
        entry["scales"] = "gptq"  # quantization.json "calibration" says on what
    else:
        importance = calib.importance.get(name) if getattr(fmt, "searchable", False) else None
        if importance is not None:
            entry["scales"] = "searched"
        arrays = fmt.quantize(model.tensors.get(name), name, importance=importance)
    for role, arr in arrays.items():
        entry["arrays"][role] = stored_key(name, role)
        shard.write(stored_key(name, role), arr)
    # Memory-mapped sources keep every page read resident until the mapping closes: without
    # this, resident memory grows to the whole checkpoint (measured in docs/notes/models-memory.md).
    release = getattr(model.tensors, "release", None)
    if release is not None:
        release(name)
    return entry


def _write_metadata(tmp: Path, model, scheme: Scheme, embed_bits, entries, weight_map, total, calibration=None) -> None:
    config = {"format": CONFIG_FORMAT, "version": VERSION, **model.config.to_dict()}
    src = model.source or {}
    quant = {
        "format": QUANT_FORMAT, "version": VERSION, "scheme": scheme.name, "model_dtype": scheme.model_dtype,
        "group_size": GROUP_SIZE, "embed_format": scheme.embed_format(embed_bits),
        "source": {"model_id": src.get("model_id"), "sha256": src.get("sha256"), "format": src.get("format")},
        "calibration": calibration,
        "tensors": entries,
    }
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / CONFIG).write_bytes(dump_json(config))
    (tmp / QUANTIZATION).write_bytes(dump_json(quant))
    (tmp / INDEX).write_bytes(dump_json(index))
    model.tokenizer.save(tmp)


# ---- reading ----------------------------------------------------------------------------------

class QdirTensors:
    """TensorSource over a QDIR: get() dequantizes to float32; arrays() gives what is stored."""

    def __init__(self, weights: QdirWeights):
        self.weights = weights

    def names(self) -> list[str]:
        return self.weights.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.weights.shape(name)

    def format(self, name: str):
        info = self.weights.info(name)
        return get_format(info["format"], info.get("scale_dtype"))

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        try:
            return self.weights.arrays(name)
        except BundleError as err:
            raise EdgeforgeError(str(err)) from None

    def rows(self, name: str, index) -> np.ndarray:
        """Only the rows asked for are dequantized (formats work row by row on memory-mapped arrays)."""
        arrays = {role: np.asarray(a[index]) if a.ndim == 2 else a for role, a in self.arrays(name).items()}
        return self.format(name).dequantize(arrays)

    def get(self, name: str) -> np.ndarray:
        w = self.format(name).dequantize(self.arrays(name))
        shape = self.shape(name)
        if w.shape != shape:
            raise EdgeforgeError(f"{self.weights.path}: tensor '{name}' dequantizes to {list(w.shape)}, expected {list(shape)}")
        return w


def open_qdir(path: str | os.PathLike) -> QdirWeights:
    try:
        return QdirWeights(path)
    except BundleError as err:
        raise EdgeforgeError(str(err)) from None


def load_qdir(path: str | os.PathLike):
    """A LoadedModel over a QDIR (tensors dequantized on get(); `.source["scheme"]` says which)."""
    from ..model.config import LlamaConfig
    from ..model.types import LoadedModel
    from ..runtime.tokenizer import Tokenizer, TokenizerError

    weights = open_qdir(path)
    config = LlamaConfig.from_dict(weights.config, source=str(Path(path) / CONFIG))
    src = weights.quantization.get("source") or {}
    source = {"path": str(path), "format": "qdir", "sha256": src.get("sha256"), "model_id": src.get("model_id"),
              "scheme": weights.scheme, "source_format": src.get("format")}
    try:
        tokenizer = Tokenizer.load(Path(path))
    except TokenizerError as err:
        raise EdgeforgeError(str(err)) from None
    return LoadedModel(config=config, tensors=QdirTensors(weights), tokenizer=tokenizer, source=source)


# ---- in memory (eval) -------------------------------------------------------------------------

class QuantizedTensors:
    """TensorSource that quantizes then dequantizes each source tensor on get(): the float32
    weights a QDIR of `scheme` would give, without writing one (`calib`: its Calibration)."""

    def __init__(self, source, scheme, embed_bits: int | None = None, num_layers: int | None = None, calib=None):
        from .calibrate import Calibration

        self.source, self.scheme, self.embed_bits = source, get_scheme(scheme), embed_bits
        self.num_layers, self.calib = num_layers, calib or Calibration({}, None)

    def names(self) -> list[str]:
        return self.source.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.source.shape(name))

    def get(self, name: str) -> np.ndarray:
        fmt = self.scheme.format_for(name, self.shape(name), self.embed_bits, self.num_layers)
        arrays = self.calib.solved(name)
        if arrays is None:
            arrays = fmt.quantize(self.source.get(name), name, importance=self.calib.importance.get(name))
        return fmt.dequantize(arrays)


def quantize_in_memory(model, scheme, embed_bits: int | None = None, importance: tuple | None = None):
    """A LoadedModel like `model` whose tensors are quantized with `scheme` (lazily, per get());
    source["calibration"] is the scheme's calibration info. A calibrated scheme is calibrated here (GPTQ schemes solve now;
    the others reuse `importance`, (importance, info) of quant.calibrate.collect_importance, if given)."""
    import dataclasses

    check_embed_bits(embed_bits)
    scheme = get_scheme(scheme)
    calib = calibrate(model, scheme, plan_tensors(model, scheme, embed_bits), importance=importance)
    source = {**(model.source or {}), "scheme": scheme.name, "calibration": calib.info}
    tensors = QuantizedTensors(model.tensors, scheme, embed_bits, model.config.num_layers, calib)
    return dataclasses.replace(model, tensors=tensors, source=source)
