"""Scaling: edgeforge on the models people deploy (issue 10), on this machine.

    python bench/scale.py model llama3-8b /data/llama3-8b     # a random bf16 HF folder, sharded
    python bench/scale.py build /data/llama3-8b --backend all -o /data/dist   # timed, peak RSS

`model` writes an HF Llama folder of the given shape (bench/gpu.py's SHAPES: smollm2, llama32-1b,
llama3-8b, plus llama32-3b and llama2-7b here) with random bf16 weights in 5 GB shards, a tensor at a
time (a 16 GB model needs no more memory than its largest tensor). The values are seeded raw bits,
so every machine writes the same bytes.

`build` runs `edgeforge build MODEL --quant q4f16 --target x86-cpu` under /usr/bin/time and prints
each stage's wall time (from the build's own progress lines) and the peak RSS of the build and of
its largest child (the smoke test), as JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import gpu  # noqa: E402  (SHAPES, the seeded bit source, the tokenizer used by random models)

SHAPES = dict(gpu.SHAPES)
SHAPES["llama32-3b"] = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                            num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
                            rope_theta=500000.0, max_position_embeddings=131072,
                            rope_scaling=gpu.SHAPES["llama32-1b"]["rope_scaling"])
SHAPES["llama2-7b"] = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False, rope_theta=10000.0,
                           max_position_embeddings=4096)
SHARD_BYTES = 5 << 30


def _bf16(key: str, n: int, std: float, seed: int) -> np.ndarray:
    """n bf16 values (as uint16 bits), uniform with standard deviation `std`, from seeded raw bits."""
    u = gpu._bits(key, seed, 4 * n).view(np.uint32)  # noqa: SLF001 - the shared seeded source
    f = ((u >> np.uint32(9)).astype(np.float32) / np.float32(1 << 23) - np.float32(0.5)) * np.float32(std * 12**0.5)
    return (f.view(np.uint32) >> np.uint32(16)).astype(np.uint16)  # truncation to bf16


def write_model(shape: str, out: Path, seed: int = 0, log=print) -> Path:
    cfg = dict(SHAPES[shape])
    out = Path(out)
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5, "bos_token_id": 0,
            "eos_token_id": 1}
    hf = {**base, **cfg, "torch_dtype": "bfloat16"}
    from edgeforge.model.config import LlamaConfig

    shapes = LlamaConfig.from_hf(hf, f"random {shape}").tensor_shapes()
    names = list(shapes)
    # plan shards (HF's "model-0000i-of-0000n" names)
    shards, size = [[]], 0
    for name in names:
        nbytes = int(np.prod(shapes[name])) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map, t0 = {}, time.monotonic()
    for i, members in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name in members:
            n = int(np.prod(shapes[name])) * 2
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
            offset += n
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        with open(out / fname, "wb") as f:
            f.write(len(head).to_bytes(8, "little") + head)
            for name in members:
                n = int(np.prod(shapes[name]))
                if name.endswith("norm.weight"):
                    data = np.full(n, 0x3F80, np.uint16)  # 1.0
                else:
                    std = gpu.EMBED_STD if ("embed" in name or "lm_head" in name) else gpu.WEIGHT_STD
                    data = _bf16(name, n, std, seed)
                f.write(data.tobytes())
                weight_map[name] = fname
        log(f"  {fname}: {len(members)} tensors ({time.monotonic() - t0:.0f} s)")
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(int(np.prod(s)) * 2 for s in shapes.values())}, "weight_map": weight_map}))
    sys.path.insert(0, str(BENCH.parent / "tests"))
    from tiny_models import _train_bpe_tokenizer

    _train_bpe_tokenizer(out)
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    return out


STAGES = ("[load]", "[quantize]", "[golden]", "compile", "smoke")


def timed_build(model: Path, args) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "edgeforge.cli", "build", str(model), "--quant", args.quant,
           "--target", args.target, "--backend", args.backend, "-o", str(args.output)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=BENCH.parent)
    lines = []
    for line in proc.stderr:
        stamp = time.monotonic() - t0
        lines.append((stamp, line.rstrip()))
        print(f"[{stamp:7.1f} s] {line.rstrip()}", flush=True)
    proc.wait()
    text = "\n".join(line for _, line in lines)
    peak_kb = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    result = {"model": str(model), "command": " ".join(cmd[2:]), "exit": proc.returncode,
              "seconds": round(time.monotonic() - t0, 1),
              "peak_rss_gib": round(int(peak_kb.group(1)) / 2**20, 2) if peak_kb else None,
              "stage_start_s": {}}
    for stamp, line in lines:
        for key in ("[load]", "[quantize]", "[golden]"):
            if line.startswith(key) and key not in result["stage_start_s"]:
                result["stage_start_s"][key] = round(stamp, 1)
        m = re.match(r"\[\d+/\d+\] (\S+) with (\S+) ->", line)
        if m:
            result["stage_start_s"][f"bundle {m.group(1)}/{m.group(2)}"] = round(stamp, 1)
        m = re.search(r"smoke (\S+): (PASS|FAIL|not run here.*?)(?: \(|$)", line)
        if m:
            result.setdefault("smoke", {})[m.group(1)] = m.group(2)
            result["stage_start_s"][f"smoke done {m.group(1)}"] = round(stamp, 1)
    result["bundles"] = bundle_sizes(Path(args.output))
    return result


def bundle_sizes(dist: Path) -> dict:
    """Bytes of each bundle folder under `dist` (what a device downloads, before archiving)."""
    return {b.name: sum(f.stat().st_size for f in b.rglob("*") if f.is_file())
            for b in sorted(Path(dist).iterdir()) if (b / "manifest.json").is_file()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("model")
    m.add_argument("shape", choices=sorted(SHAPES))
    m.add_argument("out", type=Path)
    b = sub.add_parser("build")
    b.add_argument("model", type=Path)
    b.add_argument("-o", "--output", type=Path, required=True)
    b.add_argument("--quant", default="q4f16")
    b.add_argument("--target", default="x86-cpu")
    b.add_argument("--backend", default="all")
    b.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.mode == "model":
        write_model(args.shape, args.out)
        return 0
    result = timed_build(args.model, args)
    print(json.dumps(result))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
