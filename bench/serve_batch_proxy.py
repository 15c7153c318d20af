"""Would batched decoding help `edgeforge serve`? A proxy, measured with the ONNX engine as it is (batch 1):
one step over k new positions (a k-token prefill after a 32-token prompt) reads the weights once for k
tokens, as a batched decode step over k sequences would (attention over each sequence's own cache aside).

    EDGEFORGE_THREADS=1 python bench/serve_batch_proxy.py dist/smollm2-135m-q4f16-x86-cpu-onnx
"""
import statistics
import sys
import time

from edgeforge.runtime.session import open_session

PROMPT = list(range(100, 132))


def step_seconds(engine, k: int, reps: int = 15) -> float:
    """Median seconds of one step over k new positions after PROMPT (k = 1: a decode step)."""
    times = []
    for _ in range(reps):
        engine.reset()
        engine.prefill(PROMPT)
        t0 = time.perf_counter()
        if k == 1:
            engine.decode(200)
        else:
            engine.prefill(list(range(300, 300 + k)))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    engine = open_session(sys.argv[1], max_length=512).engine
    step_seconds(engine, 1)  # warm up
    one = step_seconds(engine, 1)
    for k in (1, 2, 4, 8, 16):
        t = one if k == 1 else step_seconds(engine, k)
        print(f"k={k:2d}: {t * 1000:7.2f} ms a step, {k / t:7.1f} tok/s if k sequences were batched, "
              f"x{k * one / t:.2f} one sequence's decode")


if __name__ == "__main__":
    main()
