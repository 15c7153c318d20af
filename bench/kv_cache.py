"""The int8 KV cache (issue 24): quality, decode speed and memory next to the float cache.

    python bench/kv_cache.py quality --float A --int8 B [--tokens 8192] [--window 512]
    python bench/kv_cache.py speed --float A --int8 B [--context 8192] [--steps 64] [--rounds 3]
    python bench/kv_cache.py memory [--measure-1b DIR] [--context 8192]
    python bench/kv_cache.py clip QDIR ARTIFACT [--tokens 8192]
    python bench/kv_cache.py floor --float A [--tokens 8192] [--window 512] [--eps 1e-6]
    python bench/kv_cache.py reference QDIR ARTIFACT [--tokens 8192] [--window 512]

A and B are compiled ONNX artifacts (`edgeforge compile QDIR --target x86-cpu --backend onnx
--kv-cache float|int8 -o A|B`) of the same QDIR. Results are JSON on stdout.

quality: KL(float cache || int8 cache) per position, teacher-forced on TEXT (bench/data's eval
texts and frozen README, then this repository's docs, until --tokens; the calibration text is not
used), in windows: each window's prefix is prefilled in one call (the graph returns the last position's logits), then
its --window positions are decoded one token at a time and scored.
speed: decode tok/s at a context of --context tokens, float and int8 interleaved for --rounds.
memory: KV bytes at 2k, 8k and 32k tokens for the 1B and 8B shapes (computed), and with
--measure-1b the peak RSS of one process per cache that opens a random 1B-shaped bundle's engine,
prefills --context - 16 tokens and decodes 16 (bench/gpu.py synth_qdir makes the QDIR).
floor: quality's KL between A and a copy of A whose RoPE tables are scaled by 1 + --eps (a
perturbation far below any cache's rounding): what any change costs on that graph. With
accuracy_level 4 (int8 activations, x86-cpu's default) a tiny change flips some activation
roundings and the flips grow through the layers, so this floor bounds from below what quality can
show for any cache (docs/notes/kv-cache.md, Session 10).
reference: the cache's own KL, without int8 activations: the numpy reference of QDIR in float32
against the same with keys and values rounded by ARTIFACT's scales (reference.int8_kv: ONNX
Runtime's arithmetic, exact), over the same windows (each window's positions scored in one pass).
clip: how often the eval text's keys and values fall outside the calibrated range (the numpy
reference with the artifact's scales; what saturation costs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

# The first 8192 tokens are frozen files (eval-readme.md: README.md as of commit df12b4f), so that a
# docs edit does not move the text under a comparison; longer runs go on into the live docs.
TEXT_FILES = [BENCH / "data" / "eval-long.txt", BENCH / "data" / "eval-second.txt", BENCH / "data" / "eval-readme.md",
              ROOT / "docs" / "INTERNALS.md", ROOT / "docs" / "BUNDLES.md", ROOT / "BENCHMARKS.md"]
# KV shapes (layers, kv heads, head_dim) of the models people deploy
KV_SHAPES = {"llama32-1b": (16, 8, 64), "llama3-8b": (32, 8, 128)}
CONTEXTS = (2048, 8192, 32768)
KV_BYTES = {"float32": 4, "float16": 2, "int8": 1}


def eval_ids(tokenizer, tokens: int) -> list[int]:
    ids: list[int] = []
    for path in TEXT_FILES:
        ids += tokenizer.encode(path.read_text())
        if len(ids) >= tokens:
            return ids[:tokens]
    raise SystemExit(f"only {len(ids)} tokens of text; asked for {tokens}")


def _tokenizer(artifact: Path, qdir: Path | None):
    from edgeforge.runtime.tokenizer import Tokenizer

    folder = qdir if qdir is not None else artifact.parent / "tokenizer"
    return Tokenizer.load(folder)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def quality(args) -> dict:
    from edgeforge.runtime.onnx_engine import OnnxEngine

    engines = {kv: OnnxEngine(path, max_length=args.tokens) for kv, path in (("float", args.float), ("int8", args.int8))}
    ids = eval_ids(_tokenizer(args.float, args.qdir), args.tokens)
    starts = windows_of(args.tokens, args.window)
    windows = []
    for start in starts:
        logps = {}
        for kv, engine in engines.items():
            engine.reset()
            t0 = time.perf_counter()
            rows = [engine.prefill(ids[: start + 1])]
            rows += [engine.decode(t) for t in ids[start + 1 : start + args.window]]
            logps[kv] = np.array([log_softmax(r) for r in rows])
            print(f"window {start}: {kv} {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        p = np.exp(logps["float"])
        kl = (p * (logps["float"] - logps["int8"])).sum(axis=1)
        same = (logps["float"].argmax(1) == logps["int8"].argmax(1)).mean()
        windows.append({"positions": [start, start + args.window - 1], "kl_mean": float(kl.mean()),
                        "kl_p99": float(np.quantile(kl, 0.99)), "kl_max": float(kl.max()), "top1_agree": float(same)})
    return {"tokens": len(ids), "text": [str(p.relative_to(ROOT)) for p in TEXT_FILES], "windows": windows}


def speed(args) -> dict:
    from edgeforge.runtime.onnx_engine import OnnxEngine

    engines = {kv: OnnxEngine(path, max_length=args.context) for kv, path in (("float", args.float), ("int8", args.int8))}
    ids = eval_ids(_tokenizer(args.float, args.qdir), args.context)
    prompt = ids[: args.context - args.steps]
    for engine in engines.values():  # one prefill each; every round decodes the same positions again
        engine.reset()
        engine.prefill(prompt)
    rates: dict[str, list[float]] = {kv: [] for kv in engines}
    for _ in range(args.rounds):
        for kv, engine in engines.items():
            engine.length = len(prompt)  # rewind: the cache keeps the prompt's rows
            t0 = time.perf_counter()
            for t in ids[len(prompt) :]:
                engine.decode(t)
            rates[kv].append(args.steps / (time.perf_counter() - t0))
    load = os.getloadavg()
    return {"context": args.context, "steps": args.steps, "rounds": args.rounds,
            "tok_s": {kv: [round(r, 1) for r in v] for kv, v in rates.items()},
            "median": {kv: round(float(np.median(v)), 1) for kv, v in rates.items()},
            "threads": os.environ.get("EDGEFORGE_THREADS", "0 (onnxruntime default)"),
            "loadavg_after": [round(x, 2) for x in load], "cpus": os.cpu_count()}


def floor(args) -> dict:
    import shutil
    import tempfile

    import onnx
    from onnx import numpy_helper

    with tempfile.TemporaryDirectory(prefix="kv-floor-") as tmp:
        copy = Path(tmp) / "artifact"
        shutil.copytree(args.float, copy)
        model = onnx.load(str(copy / "model.onnx"))
        for t in model.graph.initializer:
            if t.name in ("cos_cache", "sin_cache"):
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1 + args.eps), t.name))
        (copy / "model.onnx.data").unlink()
        onnx.save(model, str(copy / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
        args.int8, args.qdir = copy, args.qdir or (args.float.parent / "tokenizer")
        result = quality(args)
    return {"eps": args.eps, **result}


def windows_of(tokens: int, window: int) -> list[int]:
    return sorted({0, *[s for s in (2048 - window, 4096 - window, tokens - window) if s > 0]})


def reference(args) -> dict:
    from edgeforge.backends.onnx.compile import kv_quant_of
    from edgeforge.model.kv_int8 import KvInt8Hook
    from edgeforge.model.loader import load_model
    from edgeforge.model.reference import KVCache, ReferenceModel

    model = load_model(Path(args.qdir))
    ids = eval_ids(model.tokenizer, args.tokens)
    starts = windows_of(len(ids), args.window)
    scored = np.concatenate([np.arange(s, s + args.window) for s in starts])
    last = int(scored.max()) + 1

    def logps(ref):  # log-softmax rows of the scored positions, 128 positions per step
        cache, out = KVCache(model.config), []
        for start in range(0, last, 128):
            logits = ref._step(ids[start : min(start + 128, last)], cache)
            rows = scored[(scored >= start) & (scored < start + 128)] - start
            out += [log_softmax(r) for r in logits[rows]]
        return np.array(out)

    t0 = time.perf_counter()
    want = logps(ReferenceModel(model, chunk=128))
    got = logps(ReferenceModel(model, chunk=128, kv_hook=KvInt8Hook(kv_quant_of(args.artifact))))
    kl = (np.exp(want) * (want - got)).sum(axis=1)
    same = want.argmax(1) == got.argmax(1)
    windows = [{"positions": [s, s + args.window - 1], "kl_mean": float(kl[i * args.window : (i + 1) * args.window].mean()),
                "top1_agree": float(same[i * args.window : (i + 1) * args.window].mean())} for i, s in enumerate(starts)]
    return {"tokens": len(ids), "seconds": round(time.perf_counter() - t0), "windows": windows}


def kv_bytes(shape: tuple[int, int, int], tokens: int, dtype: str) -> int:
    layers, heads, dim = shape
    scales = 2 * layers * heads * dim * 4 if dtype == "int8" else 0  # float32 k/v scales per layer
    return 2 * layers * heads * dim * tokens * KV_BYTES[dtype] + scales


def memory(args) -> dict:
    table = {name: {str(n): {dt: kv_bytes(shape, n, dt) for dt in KV_BYTES} for n in CONTEXTS}
             for name, shape in KV_SHAPES.items()}
    out = {"computed_bytes": table}
    if args.measure_1b:
        out["measured_1b"] = {kv: _measure_rss(Path(args.measure_1b) / f"1b-{kv}", args.context) for kv in ("float", "int8")}
    return out


RSS_CHILD = r"""
import json, os, sys, time, resource
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from edgeforge.runtime.onnx_engine import OnnxEngine
art, n = sys.argv[1], int(sys.argv[2])
e = OnnxEngine(art, max_length=n)
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith(("VmHWM", "VmRSS")):
            yield line.split()[0].rstrip(":"), int(line.split()[1]) * 1024
load = dict(hwm())
t0 = time.perf_counter(); e.prefill([1 + (i * 7919) % 250 for i in range(n - 16)]); prefill = time.perf_counter() - t0
t0 = time.perf_counter()
for i in range(16): e.decode(3 + i)
decode = 16 / (time.perf_counter() - t0)
end = dict(hwm())
kv = sum(b.nbytes for b in e._kv)
print(json.dumps({"after_load": load, "end": end, "kv_buffer_bytes": kv, "capacity": e.capacity,
                  "prefill_s": round(prefill, 1), "decode_tok_s_at_context": round(decode, 2)}))
"""


def _measure_rss(artifact: Path, context: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", RSS_CHILD, str(artifact), str(context)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=3600)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    data = artifact / "model.onnx.data"
    result["weights_bytes"] = data.stat().st_size
    result["peak_over_weights_plus_kv"] = round(result["end"]["VmHWM"] / (result["weights_bytes"] + result["kv_buffer_bytes"]), 3)
    return result


def clip(args) -> dict:
    """Fraction of keys / values beyond the calibrated range (the scale x 127 / HEADROOM) and beyond
    the stored range (the artifact's scales x 127: what saturates), and per layer the largest
    magnitude over the stored range; rotated as the artifact stores them."""
    from edgeforge.backends.onnx.compile import kv_quant_of
    from edgeforge.model.kv_int8 import HEADROOM
    from edgeforge.model.loader import load_model
    from edgeforge.model.reference import ReferenceModel

    quant = kv_quant_of(args.artifact)
    scales, rotation = quant.scales, quant.rotation
    counts = {"values": 0, "k_over_calibrated": 0, "k_saturated": 0, "v_over_calibrated": 0, "v_saturated": 0}
    worst = {"k": [0.0] * len(scales), "v": [0.0] * len(scales)}

    def hook(layer, k, v):
        stored = (k, v) if rotation is None else (k @ rotation, v @ rotation)
        for name, x, scale in zip("kv", stored, scales[layer]):
            ratio = np.abs(x) / (127 * scale[:, None])  # 1: the largest stored magnitude
            counts[f"{name}_over_calibrated"] += int((ratio > 1 / HEADROOM).sum())
            counts[f"{name}_saturated"] += int((np.abs(x) > 127.5 * scale[:, None]).sum())
            worst[name][layer] = max(worst[name][layer], float(ratio.max()))
        counts["values"] += v.size
        return k, v

    model = load_model(Path(args.qdir))
    ref = ReferenceModel(model, kv_hook=hook)
    ids = eval_ids(model.tokenizer, args.tokens)
    for start in range(0, len(ids), 512):
        ref.prefill(ids[start : start + 512])
    return {"tokens": len(ids), **counts,
            **{f"{k}_fraction": counts[k] / counts["values"] for k in counts if k != "values"},
            "largest_over_stored_range_per_layer": {n: [round(r, 2) for r in w] for n, w in worst.items()}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    for name in ("quality", "speed"):
        p = sub.add_parser(name)
        p.add_argument("--float", type=Path, required=True)
        p.add_argument("--int8", type=Path, required=True)
        p.add_argument("--qdir", type=Path, default=None, help="tokenizer folder when the artifacts are not in bundles")
    sub.choices["quality"].add_argument("--tokens", type=int, default=8192)
    sub.choices["quality"].add_argument("--window", type=int, default=512)
    sub.choices["speed"].add_argument("--context", type=int, default=8192)
    sub.choices["speed"].add_argument("--steps", type=int, default=64)
    sub.choices["speed"].add_argument("--rounds", type=int, default=3)
    p = sub.add_parser("memory")
    p.add_argument("--measure-1b", default=None, metavar="DIR", help="DIR/1b-float and DIR/1b-int8: compiled artifacts")
    p.add_argument("--context", type=int, default=8192)
    p = sub.add_parser("floor")
    p.add_argument("--float", type=Path, required=True)
    p.add_argument("--qdir", type=Path, default=None, help="tokenizer folder when the artifact is not in a bundle")
    p.add_argument("--eps", type=float, default=1e-6)
    p = sub.add_parser("reference")
    p.add_argument("qdir", type=Path)
    p.add_argument("artifact", type=Path)
    for name in ("floor", "reference"):
        sub.choices[name].add_argument("--tokens", type=int, default=8192)
        sub.choices[name].add_argument("--window", type=int, default=512)
    p = sub.add_parser("clip")
    p.add_argument("qdir", type=Path)
    p.add_argument("artifact", type=Path)
    p.add_argument("--tokens", type=int, default=8192)
    for p in sub.choices.values():
        p.add_argument("-o", "--output", type=Path, default=None,
                       help="merge the result into this JSON file under the mode's name (bench/results/kv-cache.json)")
        p.add_argument("--key", default=None, help="that name instead of the mode's (quality_float_activations: "
                       "quality on artifacts compiled with [onnx] accuracy_level = 1, which bench/report.py shows beside)")
    args = ap.parse_args(argv)
    result = {"quality": quality, "speed": speed, "memory": memory, "clip": clip, "floor": floor,
              "reference": reference}[args.mode](args)
    result["command"] = "python bench/kv_cache.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(json.dumps(result, indent=1))
    if args.output:
        merged = json.loads(args.output.read_text()) if args.output.exists() else {}
        merged[args.key or args.mode] = result
        args.output.write_text(json.dumps(merged, indent=1) + "\n")


if __name__ == "__main__":
    main()
