"""Quantization quality on a plausible float SmolLM2, edgeforge's schemes next to llama.cpp's (issue 13).

    python bench/quality.py --llama-bin DIR      # DIR holds llama-quantize and llama-imatrix

1. A plausible float model behind the SmolLM2 Q4_1 GGUF (bench/float_gguf.py --plausible 0): the plain
   dequantized floats sit on a 4-bit grid that an asymmetric quantizer re-finds exactly.
2. llama.cpp's files from it: Q4_0 and Q4_K_M, each without and with an importance matrix made by
   llama-imatrix from edgeforge's own calibration text (the one edgeforge's calibrated schemes use).
3. `edgeforge eval` of the float model, the edgeforge schemes and every llama.cpp file, on the long
   evaluation text and on a second text (neither is the calibration text): one scorer, same tokens.
   Sizes: edgeforge's stored weight bytes; llama.cpp's GGUF file (weights plus ~1.8 MB of metadata)
   and its tensor bytes alone (`weight_bytes`): the goals compare weights with weights.
Writes bench/results/quality-plausible.json, rendered into BENCHMARKS.md by bench/report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
TEXTS = {"eval-long": BENCH / "data" / "eval-long.txt", "eval-second": BENCH / "data" / "eval-second.txt"}
SCHEMES = ["q4f16_rtn", "q4f16", "q4f16_m", "q8f16"]


def scheme_bytes(model, scheme: str) -> int:
    from edgeforge.quant.qdir import plan_tensors
    from edgeforge.quant.schemes import get_scheme

    total = 0
    for _, shape, fmt in plan_tensors(model, get_scheme(scheme), None):
        total += sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in fmt.stored(shape).values())
    return total


def gguf_tensor_bytes(path: Path) -> int:
    """The bytes of a GGUF file's tensors (no metadata, no tokenizer, no padding)."""
    from edgeforge.model.gguf import read_gguf

    return sum(int(t.data.nbytes) for t in read_gguf(path)[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bin", type=Path, required=True, help="folder with llama-quantize and llama-imatrix")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeforge-quality"))
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "quality-plausible.json")
    args = ap.parse_args(argv)
    from edgeforge.model.loader import load_model
    from edgeforge.models import fetch_model
    from edgeforge.quant.calibrate import CALIBRATION_TEXT

    import float_gguf

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    src = fetch_model("smollm2-135m")
    plausible = work / "smollm2-plausible-f32.gguf"
    if not plausible.exists():
        float_gguf.write_f32_gguf(src, plausible, plausible_seed=0)
    run = lambda *cmd: subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True)  # noqa: E731
    imatrix = work / "imatrix.gguf"
    if not imatrix.exists():
        run(args.llama_bin / "llama-imatrix", "-m", plausible, "-f", CALIBRATION_TEXT, "-o", imatrix, "-ngl", "0",
            "-c", "512", "-t", str(os.cpu_count() or 2))
    files = {}
    for qtype in ("Q4_0", "Q4_K_M"):
        for with_imatrix in (False, True):
            label = f"llama.cpp {qtype}" + (" + imatrix" if with_imatrix else "")
            path = work / f"smollm2-{qtype}{'-imat' if with_imatrix else ''}.gguf"
            if not path.exists():
                run(args.llama_bin / "llama-quantize", *(["--imatrix", imatrix] if with_imatrix else []), plausible,
                    path, qtype, "2")
            files[label] = path
    model = load_model(plausible)
    params = model.config.num_parameters()
    sizes = {s: scheme_bytes(model, s) for s in SCHEMES}
    weights = dict(sizes)
    sizes.update({label: p.stat().st_size for label, p in files.items()})
    weights.update({label: gguf_tensor_bytes(p) for label, p in files.items()})
    result = {"model": "SmolLM2-135M, plausible floats (bench/float_gguf.py --plausible 0)", "params": params,
              "bytes": sizes, "weight_bytes": weights, "bits_per_weight": {k: round(8 * b / params, 3) for k, b in weights.items()},
              "texts": {}, "command": "python bench/quality.py " + " ".join(argv or sys.argv[1:])}
    for name, text in TEXTS.items():
        t0 = time.time()
        cmd = [sys.executable, "-m", "edgeforge.cli", "eval", str(plausible), "--text", str(text), "--max-tokens", "4096",
               "--json"]
        for s in SCHEMES:
            cmd += ["--quant", s]
        for p in files.values():
            cmd += ["--compare", str(p)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        ev = json.loads(out)
        names = {p.name: label for label, p in files.items()}
        result["texts"][name] = {"tokens": ev["tokens"], "calibration": ev.get("calibrations") or ev.get("calibration"),
                                 "seconds": round(time.time() - t0, 1),
                                 "rows": [dict(r, scheme=names.get(Path(r["scheme"]).name, r["scheme"])) for r in ev["rows"]]}
        print(f"{name}: " + ", ".join(f"{r['scheme']} {r['kl']:.4f}" for r in result["texts"][name]["rows"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
