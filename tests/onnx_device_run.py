"""Run a compiled ONNX artifact greedily in *this* interpreter (an aarch64 Python under qemu, the
onnxruntime-webgpu venv): a helper the ONNX target tests start in a subprocess.

    python onnx_device_run.py ARTIFACT OUT.npz --ids 1,2,3 --tokens 8 [--device webgpu] [--threads 2]

`edgeforge_runtime` (a copy of edgeforge/runtime, as in a bundle) must be importable. Writes the
greedy tokens and each step's logits to OUT.npz and prints one JSON line (device, providers, tokens).
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
from edgeforge_runtime.onnx_engine import OnnxEngine


def main():
    p = argparse.ArgumentParser()
    p.add_argument("artifact")
    p.add_argument("out")
    p.add_argument("--ids", required=True)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    t0 = time.perf_counter()
    engine = OnnxEngine(a.artifact, device=a.device, threads=a.threads)
    t1 = time.perf_counter()
    logits = [engine.prefill([int(i) for i in a.ids.split(",")])]
    tokens = [int(np.argmax(logits[-1]))]
    while len(tokens) < a.tokens:
        logits.append(engine.decode(tokens[-1]))
        tokens.append(int(np.argmax(logits[-1])))
    t2 = time.perf_counter()
    np.savez(a.out, logits=np.stack(logits), tokens=np.array(tokens))
    print(json.dumps({"device": engine.device, "providers": engine.session.get_providers(), "tokens": tokens,
                      "machine": platform.machine(), "load_seconds": round(t1 - t0, 1),
                      "run_seconds": round(t2 - t1, 1)}), flush=True)
    # Dawn on Mesa lavapipe segfaults during interpreter teardown, after every result is written
    # (edgeforge/runtime/smoke.py does the same): leave without the teardown.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
