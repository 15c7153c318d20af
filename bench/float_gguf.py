"""Write an all-F32 GGUF holding the same float weights edgeforge starts from.

edgeforge dequantizes the source GGUF (SmolLM2 Q4_1) to float32 with the gguf package; llama.cpp's
quantizers must start from exactly those floats, or the quality comparison would mix two sources.
So every tensor is dequantized with gguf.quants.dequantize (the call edgeforge's loader makes) and
stored as F32 under its GGUF name and layout; all metadata (tokenizer, chat template, rope) is
copied unchanged except general.file_type.

    python bench/float_gguf.py SRC.gguf OUT-f32.gguf
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np


def write_f32_gguf(src: Path, dst: Path) -> Path:
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
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        # numpy order is the reverse of GGUF's ne[]: the writer reverses it back.
        data = data.reshape(tuple(int(d) for d in reversed(t.shape)))
        writer.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)
    return dst


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(write_f32_gguf(Path(sys.argv[1]), Path(sys.argv[2])))
