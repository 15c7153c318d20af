"""GPU benchmark: edgeforge cuda bundles, decode/prefill tok/s and the fraction of the HBM roofline.

Run on a CUDA machine (H100/H200) with edgeforge installed:

    python bench/gpu.py                                   # smollm2, llama32-1b, llama3-8b; q4f16
    python bench/gpu.py --models llama32-1b --quant q4f16 --quant q8f16 --bandwidth-gbs 3350
    python bench/gpu.py --models tiny --build-only        # check the script itself on any machine

For each model it builds `edgeforge build MODEL --quant Q --target cuda --backend tvm`, runs
`edgeforge bench BUNDLE -p 512 -n 128 --json`, and reports decode tok/s x weight bytes / peak HBM
bandwidth: the share of the memory roofline that decode reaches (decode reads every weight once per
token; the KV cache is small at these lengths). Llama-3.2-1B- and Llama-3-8B-shaped models are
random fp16 weights written here (no hub access needed); speed does not depend on the values.
Results go to bench/results/gpu.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

# HF LlamaConfig fields of the shapes timed here (random weights)
SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, rope_theta=10000.0,
                 max_position_embeddings=1024),
    "llama32-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                       rope_theta=500000.0, max_position_embeddings=131072,
                       rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                      rope_theta=500000.0, max_position_embeddings=8192),
}
# Peak HBM bandwidth by GPU name (GB/s, vendor figures); --bandwidth-gbs overrides
BANDWIDTH = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H200": 4800, "A100-SXM4-80GB": 2039,
             "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555, "L4": 300, "RTX 4090": 1008}


def write_random_llama(out: Path, shape: str, seed: int = 0) -> Path:
    """An HF Llama folder with random fp16 weights, written one tensor at a time (8B fits in RAM)."""
    from safetensors.numpy import save_file

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(SHAPES[shape])
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim", h // cfg["num_attention_heads"])
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    rng = np.random.default_rng(seed)

    def rand(*dims):
        return (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(np.float16)

    weight_map = {}
    shards = [("model.embed_tokens.weight", (cfg["vocab_size"], h)), ("model.norm.weight", (h,))]
    if not cfg["tie_word_embeddings"]:
        shards.append(("lm_head.weight", (cfg["vocab_size"], h)))
    groups = [shards] + [[
        (f"model.layers.{i}.input_layernorm.weight", (h,)),
        (f"model.layers.{i}.post_attention_layernorm.weight", (h,)),
        (f"model.layers.{i}.self_attn.q_proj.weight", (q, h)), (f"model.layers.{i}.self_attn.k_proj.weight", (kv, h)),
        (f"model.layers.{i}.self_attn.v_proj.weight", (kv, h)), (f"model.layers.{i}.self_attn.o_proj.weight", (h, q)),
        (f"model.layers.{i}.mlp.gate_proj.weight", (inter, h)), (f"model.layers.{i}.mlp.up_proj.weight", (inter, h)),
        (f"model.layers.{i}.mlp.down_proj.weight", (h, inter)),
    ] for i in range(layers)]
    total = 0
    for n, group in enumerate(groups):
        fname = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: (np.ones(dims, np.float16) if name.endswith("norm.weight") else rand(*dims))
                   for name, dims in group}
        save_file(tensors, str(out / fname))
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({name: fname for name in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import _train_bpe_tokenizer  # a small byte-level BPE; ids above it are never decoded

    _train_bpe_tokenizer(out)
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float16",
        "rms_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 1, **cfg}, indent=1))
    return out


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def peak_bandwidth(name: str | None, override: float | None) -> float | None:
    if override:
        return override
    return next((bw for key, bw in BANDWIDTH.items() if name and key in name), None)


def edgeforge(*args) -> str:
    cmd = [sys.executable, "-m", "edgeforge.cli", *map(str, args)]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def bench_model(model: str, label: str, quant: str, work: Path, args, bandwidth) -> dict:
    t0 = time.monotonic()
    summary = json.loads(edgeforge("build", model, "--quant", quant, "--target", "cuda", "--backend", "tvm",
                                   "-o", work / f"{label}-{quant}", "--json"))
    bundle = Path(summary["bundles"][0]["path"])
    wbytes = sum(p.stat().st_size for p in (bundle / "weights").rglob("*.safetensors"))
    row = {"model": label, "quant": quant, "bundle": str(bundle), "weight_bytes": wbytes,
           "build_s": round(time.monotonic() - t0, 1)}
    if args.build_only:
        return row
    recs = json.loads(edgeforge("bench", bundle, "-p", args.n_prompt, "-n", args.n_gen, "-r", args.reps, "--json"))
    by = {r["test"][:2]: r for r in recs}
    row.update(device=by["tg"]["device"], pp_ts=by["pp"]["avg_ts"], pp_sd=by["pp"]["stddev_ts"],
               tg_ts=by["tg"]["avg_ts"], tg_sd=by["tg"]["stddev_ts"])
    if bandwidth:
        row["roofline_fraction"] = row["tg_ts"] * wbytes / (bandwidth * 1e9)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,llama32-1b,llama3-8b",
                    help="comma list: smollm2 (real weights) and/or " + ", ".join(SHAPES))
    ap.add_argument("--quant", action="append", help="schemes (repeat; default q4f16)")
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="peak HBM GB/s (default: by GPU name)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeforge-gpu-bench"))
    ap.add_argument("--build-only", action="store_true", help="build bundles, do not run them (no GPU needed)")
    ap.add_argument("--json-out", type=Path, default=BENCH / "results" / "gpu.json")
    args = ap.parse_args(argv)
    name = gpu_name()
    bandwidth = peak_bandwidth(name, args.bandwidth_gbs)
    rows = []
    for label in args.models.split(","):
        model = "smollm2-135m" if label == "smollm2" else str(write_random_llama(args.work / "models" / label, label))
        for quant in args.quant or ["q4f16"]:
            try:
                rows.append(bench_model(model, label, quant, args.work, args, bandwidth))
            except RuntimeError as err:
                rows.append({"model": label, "quant": quant, "error": str(err)})
    result = {"gpu": name, "peak_bandwidth_gbs": bandwidth, "n_prompt": args.n_prompt, "n_gen": args.n_gen,
              "rows": rows, "command": "python bench/gpu.py " + " ".join(argv or sys.argv[1:])}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"GPU: {name or 'none found'}, peak bandwidth {bandwidth or '?'} GB/s\n")
    print(f"| model | quant | weights (MiB) | pp{args.n_prompt} tok/s | tg{args.n_gen} tok/s | roofline |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['quant']} | failed: {r['error'][:80]} | | | |")
            continue
        roof = f"{r['roofline_fraction']:.0%}" if r.get("roofline_fraction") is not None else "-"
        pp, tg = r.get("pp_ts"), r.get("tg_ts")
        print(f"| {r['model']} | {r['quant']} | {r['weight_bytes'] / 2**20:.1f} | {'-' if pp is None else f'{pp:.0f}'} | "
              f"{'-' if tg is None else f'{tg:.1f}'} | {roof} |")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
