"""What does one batched decode step cost? B sequences (after prompts of different lengths) decoded in one
call of the ONNX graph (runtime/onnx_batch.py), against B single-sequence steps.

    EDGEFORGE_THREADS=2 python bench/serve_batch_step.py dist/smollm2-135m-q4f16-x86-cpu-onnx

(Session 8 measured a proxy, a k-token prefill, before the graph had a batch dimension.)
"""
import statistics
import sys
import time

from edgeforge.runtime.onnx_batch import BatchDecoder
from edgeforge.runtime.session import open_session

PROMPT_LENGTHS = (32, 48, 24, 40)  # cycled: the rows' lengths differ, as a server's do


def step_seconds(decoder: BatchDecoder, batch: int, reps: int = 15) -> float:
    """Median seconds of one decode step over `batch` sequences."""
    members = decoder.members(batch)
    for i, m in enumerate(members):
        m.prefill(list(range(100, 100 + PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)])))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        decoder._decode_rows(list(decoder.rows), [200] * batch)
        times.append(time.perf_counter() - t0)
    for m in members:
        m.finish()
    return statistics.median(times)


def main() -> None:
    engine = open_session(sys.argv[1], max_length=512).engine
    decoder = BatchDecoder(engine)
    step_seconds(decoder, 1)  # warm up
    one = step_seconds(decoder, 1)
    print("| batch | ms a step | tok/s | x one sequence |\n|---:|---:|---:|---:|")
    for batch in (1, 2, 4, 8, 16):
        t = one if batch == 1 else step_seconds(decoder, batch)
        print(f"| {batch} | {t * 1000:.1f} | {batch / t:.1f} | {batch * one / t:.2f} |")


if __name__ == "__main__":
    main()
