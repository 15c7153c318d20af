"""Compare an engine with golden.json: teacher-forced logits and greedy-token agreement.

The engine is fed the golden tokens (not its own picks), so every step is comparable even after a
near-tie flips one token. A step passes when the golden top-k logits match within the tolerance
(rel x the golden logit range at that step) and the engine's argmax is the golden token or a
near-tie of it (its golden logit within the tolerance of the golden token's). Where golden.json
measured that the model amplifies its compute path's rounding noise at a step (`spread`), that
step's tolerance is wider (manifest_check.step_rel, bounded by the verifier).

The checks are plain Python over the logits (numpy arrays or array('f') alike): a TVM bundle runs
on its device without numpy. Only step_summary, which builds golden.json on the compiler side,
uses numpy.
"""

from __future__ import annotations

import math
import time
from array import array

from .bundle_errors import BundleError
from .manifest_check import step_rel

GOLDEN_FORMAT = "edgeforge-golden"


def step_summary(logits, top_k: int) -> dict:
    """What golden.json keeps of one step's logits: the top-k ids and values, and the range."""
    import numpy as np  # noqa: PLC0415 - compiler side only

    logits = np.asarray(logits, dtype=np.float32)
    top = np.argsort(-logits, kind="stable")[:top_k]
    return {"top_ids": [int(i) for i in top], "top_logits": [float(logits[i]) for i in top],
            "max": float(logits.max()), "min": float(logits.min())}


def _floats(logits) -> array:
    """The logits as array('f') (float32 values, no numpy needed): a copy of the raw bytes when they
    are float32 already (numpy float32, array('f')), else element by element."""
    try:
        view = memoryview(logits)
        if view.format == "f" and view.c_contiguous:
            out = array("f")
            out.frombytes(view.cast("B"))
            return out
    except TypeError:
        pass
    return array("f", [float(x) for x in logits])


def compare_step(logits, golden_step: dict, expected_token: int, rel_tol: float) -> dict:
    logits = _floats(logits)
    ids, want = golden_step["top_ids"], [float(x) for x in array("f", golden_step["top_logits"])]
    rel = step_rel(rel_tol, golden_step.get("spread"))
    if max(ids) >= len(logits):
        raise BundleError(f"golden.json: token id {max(ids)} is past the model's {len(logits)} logits")
    finite = math.isfinite(sum(logits))  # an inf or nan anywhere makes the sum inf or nan
    # The tolerance is a fraction of the golden logit range, capped at twice the range the engine
    # shows: a golden.json whose min was rewritten to -1e30 widens nothing (the verifier bounds rel,
    # max and the top logits; min is the one number it cannot check without running the model).
    hi = max(logits) if finite else float("nan")
    seen = hi - min(logits) if finite else float("inf")
    tol = rel * min(golden_step["max"] - golden_step["min"], 2 * seen)
    err = max(abs(logits[i] - w) for i, w in zip(ids, want)) if finite else float("inf")
    pick = logits.index(hi) if finite else -1  # the first maximum, like numpy's argmax
    agree = pick == expected_token
    near_tie = False
    if not agree and pick in ids:
        gap = want[ids.index(expected_token)] - want[ids.index(pick)] if expected_token in ids else float("inf")
        near_tie = bool(gap <= tol)
    ok = finite and err <= tol and (agree or near_tie)
    return {"ok": ok, "err": float(err), "tol": tol, "agree": agree, "pick": pick, "widened": rel > rel_tol}


def teacher_forced_steps(engine, prompt: dict, rel_tol: float, times: list | None = None) -> list[dict]:
    """compare_step for every step of one golden prompt, the engine fed the golden tokens; `times`, when
    given, gets the clock before the prefill, after it, and after the last decode."""
    tokens = prompt["tokens"]
    engine.reset()
    clock = [time.perf_counter()]
    logits = engine.prefill(list(prompt["prompt_ids"]))
    clock.append(time.perf_counter())
    steps = [compare_step(logits, prompt["steps"][0], tokens[0], rel_tol)]
    for i in range(1, len(tokens)):
        logits = engine.decode(int(tokens[i - 1]))
        steps.append(compare_step(logits, prompt["steps"][i], tokens[i], rel_tol))
    clock.append(time.perf_counter())
    if times is not None:
        times[:] = clock
    return steps


def run_prompt(engine, prompt: dict, rel_tol: float) -> dict:
    """Teacher-forced run of one golden prompt; returns per-prompt numbers."""
    tokens, clock = prompt["tokens"], []
    steps = teacher_forced_steps(engine, prompt, rel_tol, clock)
    t0, t1, t2 = clock
    return {
        "text": prompt.get("text", ""), "ok": all(s["ok"] for s in steps),
        "max_err": max(s["err"] for s in steps), "tol": min(s["tol"] for s in steps),
        # the worst step as a fraction of its own tolerance (> 1: FAIL), and how many steps were widened
        "worst_ratio": max(s["err"] / s["tol"] if s["tol"] > 0 else float("inf") for s in steps),
        "widened": sum(s["widened"] for s in steps),
        "agree": sum(s["agree"] for s in steps), "steps": len(steps),
        "picked": [s["pick"] for s in steps], "expected": list(tokens),
        "first_bad_step": next((i for i, s in enumerate(steps) if not s["ok"]), None),
        "prompt_tokens": len(prompt["prompt_ids"]), "prefill_s": t1 - t0,
        "decode_tokens": len(tokens) - 1, "decode_s": t2 - t1,
    }


def summarize(results: list[dict]) -> dict:
    prefill_s = sum(r["prefill_s"] for r in results)
    decode_s = sum(r["decode_s"] for r in results)
    steps = sum(r["steps"] for r in results)
    return {
        "status": "PASS" if all(r["ok"] for r in results) else "FAIL",
        "max_logit_err": max(r["max_err"] for r in results),
        "tolerance": min(r["tol"] for r in results),
        "worst_ratio": max(r["worst_ratio"] for r in results),
        "steps_widened": sum(r["widened"] for r in results),
        "token_agreement": sum(r["agree"] for r in results) / steps if steps else 0.0,
        "tokens_agree": sum(r["agree"] for r in results), "tokens_total": steps,
        "prefill_tok_s": sum(r["prompt_tokens"] for r in results) / prefill_s if prefill_s else None,
        "decode_tok_s": sum(r["decode_tokens"] for r in results) / decode_s if decode_s else None,
    }
