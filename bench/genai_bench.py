"""Time ONNX Runtime GenAI's generator loop like llama-bench: ppN (one prompt of N random tokens
from an empty cache) and tgN (N greedy decode steps after a 1-token prompt, as llama-bench's tg
starts from an empty cache). Runs inside the ORT GenAI venv of bench/peers.py.

    python genai_bench.py MODEL_DIR --n-prompt 512 --n-gen 128 --threads 2
prints one JSON object: {"pp_ts": tok/s, "tg_ts": tok/s, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime_genai as og


def threaded_copy(model_dir: Path, threads: int, tmp: Path) -> Path:
    """The model folder with genai_config.json pinned to `threads` intra-op threads (links, no copies)."""
    for f in model_dir.iterdir():
        if f.name != "genai_config.json":
            os.symlink(f.resolve(), tmp / f.name)
    config = json.loads((model_dir / "genai_config.json").read_text())
    opts = config["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"] = threads
    opts["inter_op_num_threads"] = 1
    (tmp / "genai_config.json").write_text(json.dumps(config))
    return tmp


def run_once(model, ids: np.ndarray, n_gen: int) -> tuple[float, float]:
    """(seconds for the prompt's forward pass, seconds for n_gen decode steps after it)."""
    params = og.GeneratorParams(model)
    # min_length keeps EOS from ending the decode loop early on random prompts.
    params.set_search_options(max_length=len(ids) + n_gen, min_length=len(ids) + n_gen, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids)  # runs the prompt forward pass
    t1 = time.perf_counter()
    for _ in range(n_gen):
        gen.generate_next_token()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def pp_tg(model, ids: np.ndarray, n_gen: int) -> tuple[float, float | None]:
    """llama-bench's two tests: ppN = the whole prompt from an empty cache; tgN = N decode steps
    from an (almost) empty cache, i.e. after a 1-token prompt, not after the long prompt."""
    pp_s, _ = run_once(model, ids, 0)
    tg_s = run_once(model, ids[:1], n_gen)[1] if n_gen else None
    return pp_s, tg_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    vocab = json.loads((args.model_dir / "genai_config.json").read_text())["model"]["vocab_size"]
    ids = np.random.default_rng(args.seed).integers(0, vocab, size=max(args.n_prompt, 1)).astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        model = og.Model(str(threaded_copy(args.model_dir, args.threads, Path(tmp))))
        run_once(model, ids[: min(len(ids), 16)], 4)  # warm-up: allocations, first-call costs
        pp_s, tg_s = pp_tg(model, ids, args.n_gen)
    print(json.dumps({"pp_ts": len(ids) / pp_s, "tg_ts": args.n_gen / tg_s if tg_s else None,
                      "n_prompt": len(ids), "n_gen": args.n_gen, "threads": args.threads,
                      "version": og.__version__}))


if __name__ == "__main__":
    main()
