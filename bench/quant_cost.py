"""What quantizing costs: wall time and peak memory of each int4 scheme (issue 13).

    python bench/quant_cost.py                 # SmolLM2 end to end + Llama-3-8B-width matrices
    python bench/quant_cost.py --no-8b         # SmolLM2 only (~2 min)

1. SmolLM2-135M: `edgeforge quantize smollm2-135m --quant S` for q4f16_rtn, q4f16 and q4f16_m under
   /usr/bin/time (wall time, peak RSS), calibration included.
2. Llama-3-8B widths (bench/gpu.py's 8B shape; random weights, inputs of GPTQ_TOKENS random tokens):
   one q, k, gate and down matrix quantized the way q4f16 (calibrated scale search) and q4f16_m
   (GPTQ) do it, each in a fresh process (its own peak RSS); a layer is 2 q-like (q, o), 2 k-like
   (k, v), 2 gate-like (gate, up) and one down matrix, so the table adds up an estimate of a layer
   and of the 32 layers. The calibration prefill itself is not in these per-matrix numbers.
Writes bench/results/quant-cost.json, rendered into BENCHMARKS.md by bench/report.py.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SCHEMES = ["q4f16_rtn", "q4f16", "q4f16_m"]
# Llama-3-8B: hidden 4096, 8 kv heads of 128, intermediate 14336
MATRICES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "gate_proj": (14336, 4096), "down_proj": (4096, 14336)}
PER_LAYER = {"q_proj": 2, "k_proj": 2, "gate_proj": 2, "down_proj": 1}

MATRIX_JOB = r"""
import json, resource, sys, time
import numpy as np
sys.path.insert(0, {root!r})
from edgeforge.quant.calibrate import GPTQ_TOKENS
from edgeforge.quant.formats import get_format
from edgeforge.quant.gptq import gptq_quantize
rows, cols, how = {rows}, {cols}, {how!r}
rng = np.random.default_rng(0)
x = rng.standard_normal((GPTQ_TOKENS if how == "gptq" else 512, cols)).astype(np.float32)
w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
t = time.perf_counter()
if how == "gptq":
    x64 = x.astype(np.float64)
    h = x64.T @ x64
    del x64
    gptq_quantize(w, h, get_format("q4a", "float16"), "w")
else:
    get_format("q4", "float16").quantize(w, "w", importance=np.mean(x * x, axis=0))
print(json.dumps({{"seconds": round(time.perf_counter() - t, 1), "tokens": len(x),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}}))
"""


def timed(cmd: list[str]) -> dict:
    """Wall seconds and peak RSS (MiB) of a command under /usr/bin/time -v."""
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"seconds": round(time.perf_counter() - t, 1), "peak_rss_mib": rss // 1024}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-8b", action="store_true", help="skip the Llama-3-8B-width matrices (~10 min)")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "quant-cost.json")
    args = ap.parse_args(argv)
    result = {"command": " ".join(["python bench/quant_cost.py", *(argv or sys.argv[1:])]), "smollm2": {}, "llama3_8b": {}}
    with tempfile.TemporaryDirectory(prefix="edgeforge-qcost-") as work:
        for scheme in SCHEMES:
            out = Path(work) / scheme
            result["smollm2"][scheme] = timed([sys.executable, "-m", "edgeforge.cli", "quantize", "smollm2-135m",
                                               "--quant", scheme, "-o", str(out)])
            print(f"smollm2 {scheme}: {result['smollm2'][scheme]}", flush=True)
    if not args.no_8b:
        for how in ("search", "gptq"):
            per = {}
            for name, (rows, cols) in MATRICES.items():
                job = MATRIX_JOB.format(root=str(ROOT), rows=rows, cols=cols, how=how)
                proc = subprocess.run([sys.executable, "-c", job], capture_output=True, text=True, check=True)
                per[name] = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"8B {name} {how}: {per[name]}", flush=True)
            layer = sum(PER_LAYER[n] * per[n]["seconds"] for n in per)
            result["llama3_8b"][how] = {"matrices": per, "layer_seconds": round(layer, 1),
                                        "model_minutes": round(32 * layer / 60, 1),
                                        "peak_rss_mib": max(p["peak_rss_mib"] for p in per.values())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
