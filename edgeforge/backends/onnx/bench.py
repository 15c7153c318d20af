"""Measure prompt and decode speed of a compiled ONNX artifact (what docs/notes/onnx.md quotes).

    python -m edgeforge.backends.onnx.bench ARTIFACT_DIR --threads 2 --prompt-tokens 37 --decode-tokens 128

Token ids are synthetic (speed does not depend on them); greedy decoding feeds back the argmax.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from ...runtime.onnx_engine import OnnxEngine


def bench(artifact_dir, threads: int, prompt_tokens: int, decode_tokens: int, repeats: int = 3) -> dict:
    engine = OnnxEngine(artifact_dir, threads=threads)
    prompt = [int(i) for i in np.random.default_rng(0).integers(10, engine.vocab_size - 1, prompt_tokens)]
    best_prefill, best_decode = float("inf"), float("inf")
    for _ in range(repeats):  # best of N: the machines are shared, the minimum is the least disturbed
        engine.reset()
        t0 = time.perf_counter()
        token = int(np.argmax(engine.prefill(prompt)))
        t1 = time.perf_counter()
        for _ in range(decode_tokens):
            token = int(np.argmax(engine.decode(token)))
        t2 = time.perf_counter()
        best_prefill, best_decode = min(best_prefill, t1 - t0), min(best_decode, t2 - t1)
    return {"artifact": str(artifact_dir), "threads": threads, "prompt_tokens": prompt_tokens,
            "decode_tokens": decode_tokens, "prompt_tok_s": round(prompt_tokens / best_prefill, 1),
            "decode_tok_s": round(decode_tokens / best_decode, 1), "device": engine.device}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=37)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    print(json.dumps(bench(a.artifact, a.threads, a.prompt_tokens, a.decode_tokens, a.repeats)))


if __name__ == "__main__":
    main()
