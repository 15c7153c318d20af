"""`edgeforge bench`: prefill and decode speed in llama-bench's vocabulary (pp512 / tg128, avg_ts, stddev_ts).

pp N: one prefill of N tokens from an empty cache. tg N: N single-token decode steps after a
one-token prefill (llama-bench generates from an empty context too). Token ids are random but seeded,
so repeats and machines see the same input.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from ..errors import EdgeforgeError


def _time_pp(engine, ids: list[int]) -> float:
    engine.reset()
    t0 = time.perf_counter()
    engine.prefill(ids)
    return time.perf_counter() - t0


def _time_tg(engine, first: int, n_gen: int) -> float:
    engine.reset()
    logits = engine.prefill([first])
    t0 = time.perf_counter()
    for _ in range(n_gen):
        logits = engine.decode(int(np.argmax(logits)))
    return time.perf_counter() - t0


def _record(manifest: dict, engine, test: str, n: int, seconds: list[float]) -> dict:
    ts = [n / s for s in seconds]
    return {"bundle": manifest.get("name"), "backend": manifest.get("backend"), "target": manifest["target"]["name"],
            "scheme": manifest.get("scheme"), "device": getattr(engine, "device", "?"), "test": test,
            "n_prompt": n if test.startswith("pp") else 0, "n_gen": n if test.startswith("tg") else 0,
            "avg_ts": statistics.fmean(ts), "stddev_ts": statistics.stdev(ts) if len(ts) > 1 else 0.0,
            "samples_ts": ts, "avg_ns": int(statistics.fmean(seconds) * 1e9)}


def run_bench(engine, manifest: dict, n_prompt: int, n_gen: int, repetitions: int, seed: int = 0) -> list[dict]:
    config = manifest.get("config", {})
    context = int(config.get("context_length") or 0)
    if context and max(n_prompt, n_gen + 1) > context:
        raise EdgeforgeError(f"-p {n_prompt} / -n {n_gen}: longer than the model's context length {context}")
    vocab = int(config.get("vocab_size") or 1000)
    rng = np.random.default_rng(seed)
    ids = [int(i) for i in rng.integers(0, vocab, size=max(n_prompt, 1))]
    records = []
    if n_prompt:
        _time_pp(engine, ids)  # warm-up: first calls allocate and (on GPUs) compile kernels
        records.append(_record(manifest, engine, f"pp{n_prompt}", n_prompt,
                               [_time_pp(engine, ids) for _ in range(repetitions)]))
    if n_gen:
        _time_tg(engine, ids[0], min(n_gen, 4))
        records.append(_record(manifest, engine, f"tg{n_gen}", n_gen,
                               [_time_tg(engine, ids[0], n_gen) for _ in range(repetitions)]))
    return records
