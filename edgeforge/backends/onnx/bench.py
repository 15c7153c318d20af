"""Measure prompt and decode speed of a compiled ONNX artifact (what docs/notes/onnx.md quotes).

    python -m edgeforge.backends.onnx.bench ARTIFACT_DIR --threads 2 --prompt-tokens 37 --decode-tokens 128
    python -m edgeforge.backends.onnx.bench ARTIFACT_DIR --genai GENAI_MODEL_DIR   # interleaved A/B

Token ids are synthetic (speed does not depend on them); greedy decoding feeds back the argmax.
With --genai, an onnxruntime-genai model folder (model.onnx + genai_config.json) is run with the
same onnxruntime, threads, I/O binding and shared KV buffers, alternating rounds with ours so that
noise on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ...runtime.onnx_engine import OnnxEngine


class GenaiGraph:
    """Just enough of onnxruntime-genai's decoder loop (its graph takes attention_mask, not seqlens)."""

    def __init__(self, folder, threads: int, capacity: int = 1024):
        import onnxruntime as ort

        dec = json.loads((Path(folder) / "genai_config.json").read_text())["model"]["decoder"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(Path(folder) / dec["filename"]), opts, providers=["CPUExecutionProvider"])
        self.io, self.length = self.session.io_binding(), 0
        shape = (1, dec["num_key_value_heads"], capacity, dec["head_size"])
        self._kv = []
        for i in range(dec["num_hidden_layers"]):
            for kind in ("key", "value"):
                buf = np.zeros(shape, np.float32)
                value = ort.OrtValue.ortvalue_from_numpy(buf)
                self._kv.append((buf, value))
                self.io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", value)
                self.io.bind_ortvalue_output(f"present.{i}.{kind}", value)
        self.vocab_size = self.session.get_outputs()[0].shape[-1]

    def reset(self):
        self.length = 0

    def prefill(self, ids):
        return self._step(ids)

    def decode(self, token):
        return self._step([token])

    def _step(self, ids):
        total = self.length + len(ids)
        self.io.bind_cpu_input("input_ids", np.array([ids], np.int64))
        self.io.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        self.io.bind_output("logits", "cpu")
        self.session.run_with_iobinding(self.io)
        self.length = total
        return self.io.get_outputs()[-1].numpy()[0, -1]


def _one_round(engine, prompt, decode_tokens) -> tuple[float, float]:
    engine.reset()
    t0 = time.perf_counter()
    token = int(np.argmax(engine.prefill(prompt)))
    t1 = time.perf_counter()
    for _ in range(decode_tokens):
        token = int(np.argmax(engine.decode(token)))
    return t1 - t0, time.perf_counter() - t1


def bench(artifact_dir, threads: int, prompt_tokens: int, decode_tokens: int, repeats: int = 3,
          genai_dir=None) -> dict:
    engines = {"edgeforge": OnnxEngine(artifact_dir, threads=threads)}
    if genai_dir:
        engines["genai"] = GenaiGraph(genai_dir, threads)
    vocab = engines["edgeforge"].vocab_size
    prompt = [int(i) for i in np.random.default_rng(0).integers(10, vocab - 1, prompt_tokens)]
    times = {name: [] for name in engines}
    for _ in range(repeats):
        for name, engine in engines.items():
            times[name].append(_one_round(engine, prompt, decode_tokens))
    out = {"artifact": str(artifact_dir), "threads": threads, "prompt_tokens": prompt_tokens,
           "decode_tokens": decode_tokens, "repeats": repeats, "device": engines["edgeforge"].device}
    for name, rounds in times.items():
        best = np.min(np.array(rounds), axis=0)  # best of N: the least disturbed round on a shared machine
        out[name] = {"prompt_tok_s": round(prompt_tokens / best[0], 1), "decode_tok_s": round(decode_tokens / best[1], 1),
                     "decode_tok_s_median": round(decode_tokens / float(np.median([r[1] for r in rounds])), 1)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=37)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--genai", help="an onnxruntime-genai model folder to run side by side")
    a = p.parse_args(argv)
    print(json.dumps(bench(a.artifact, a.threads, a.prompt_tokens, a.decode_tokens, a.repeats, a.genai)))


if __name__ == "__main__":
    main()
