"""Write an all-F32 GGUF holding the same float weights edgeforge starts from.

edgeforge dequantizes the source GGUF (SmolLM2 Q4_1) to float32 with the gguf package; llama.cpp's
quantizers must start from exactly those floats, or the quality comparison would mix two sources.
So every tensor is dequantized with gguf.quants.dequantize (the call edgeforge's loader makes) and
stored as F32 under its GGUF name and layout; all metadata (tokenizer, chat template, rope) is
copied unchanged except general.file_type.

    python bench/float_gguf.py SRC.gguf OUT-f32.gguf
    python bench/float_gguf.py SRC.gguf OUT-plausible-f32.gguf --plausible 0

--plausible SEED writes a plausible float model behind the quantized source instead (issue 13):
every element moves to a seeded uniform point of its own rounding cell, x + U(-d/2, d/2) with
d = (max - min) / 15 per Q4_1 group of 32 and d = max|x| / 127 per Q8_0 block. Quantizers that
start from the plain dequantized floats can re-find the source grid exactly (an asymmetric 4-bit
format scores KL 0 on them), which says nothing about real checkpoints; on the plausible floats
they cannot.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np


def plausible(data: np.ndarray, kind, rng) -> np.ndarray:
    """Move each element to a uniform point of its rounding cell in the source's quantization."""
    import gguf

    if data.ndim != 2 or kind not in (gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0):
        return data
    g = data.reshape(data.shape[0], -1, 32)
    if kind == gguf.GGMLQuantizationType.Q8_0:
        d = np.abs(g).max(axis=2, keepdims=True) / 127
    else:
        d = (g.max(axis=2, keepdims=True) - g.min(axis=2, keepdims=True)) / 15
    return (g + (rng.random(g.shape, dtype=np.float32) - np.float32(0.5)) * d).reshape(data.shape)


def write_f32_gguf(src: Path, dst: Path, plausible_seed: int | None = None) -> Path:
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = dst.with_name(dst.name + ".part")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for field in reader.fields.values():
        # GGUFWriter writes the architecture and the GGUF.* virtual fields itself.
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name == gguf.Keys.General.FILE_TYPE:
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    rng = np.random.default_rng(plausible_seed) if plausible_seed is not None else None
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        # numpy order is the reverse of GGUF's ne[]: the writer reverses it back.
        data = data.reshape(tuple(int(d) for d in reversed(t.shape)))
        if rng is not None:
            data = plausible(data, t.tensor_type, rng)
        writer.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)
    return dst


if __name__ == "__main__":
    args = sys.argv[1:]
    seed = None
    if "--plausible" in args:
        i = args.index("--plausible")
        seed = int(args[i + 1])
        del args[i : i + 2]
    if len(args) != 2:
        sys.exit(__doc__)
    print(write_f32_gguf(Path(args[0]), Path(args[1]), seed))
