"""`edgeforge smoke` and `edgeforge bench` for a web bundle: the page's smoke and bench modes in
headless Chromium, on each execution provider asked for (WASM, WebGPU on a software adapter).

The result of each run has the keys of the Python smoke result (runtime/smoke.py), so the CLI
prints it with the same describe(). Exit codes as for every smoke: 0 PASS, 1 FAIL, 2 unusable
(the page refused a file, no WebGPU adapter, no Chromium).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from ..errors import EdgeforgeError
from .browser import EPS, run_page

CODES = {"PASS": 0, "FAIL": 1}


def is_web(manifest: dict) -> bool:
    return (manifest.get("target") or {}).get("run") == "browser"


def smoke(bundle: Path, manifest: dict, eps=EPS, prompts: int | None = None,
          timeout_s: float = 3600) -> tuple[int, dict]:
    """Run the page's smoke mode once per EP (the first `prompts` golden prompts, else all); returns
    (worst exit code, {status, runs: [...]})."""
    runs = []
    for ep in eps:
        result = run_page(bundle, "smoke", ep, {"prompts": prompts} if prompts else None, timeout_s=timeout_s)
        result.setdefault("peak_rss_mb", None)  # the browser does not tell a page its peak memory
        result.setdefault("bundle", manifest.get("name"))
        runs.append(result)
    code = max(CODES.get(r.get("status"), 2) for r in runs)
    status = {0: "PASS", 1: "FAIL", 2: "ERROR"}[code]
    errors = [f"{r.get('ep') or ep}: {r['error']}" for r, ep in zip(runs, eps) if r.get("error")]
    out = {"status": status, "bundle": manifest.get("name"), "runs": runs, "quality": manifest.get("quality")}
    if errors:
        out["error"] = "; ".join(errors)
    return code, out


def bench(bundle: Path, manifest: dict, n_prompt: int, n_gen: int, repetitions: int, eps=EPS) -> list[dict]:
    """llama-bench records (bundle/bench.py's) for each EP, measured in the page."""
    from ..bundle.bench import _record

    context = int((manifest.get("config") or {}).get("context_length") or 0)
    if context and max(n_prompt, n_gen + 1) > context:
        raise EdgeforgeError(f"-p {n_prompt} / -n {n_gen}: longer than the model's context length {context}")
    records = []
    for ep in eps:
        r = run_page(bundle, "bench", ep, {"pp": n_prompt, "tg": n_gen, "reps": repetitions}, timeout_s=1800)
        if r.get("error"):
            raise EdgeforgeError(f"{bundle}: the page's bench on {ep} failed: {r['error']}")
        where = SimpleNamespace(device=r.get("device", ep))
        if n_prompt:
            records.append(_record(manifest, where, f"pp{n_prompt}", n_prompt, r["pp_s"]))
        if n_gen:
            records.append(_record(manifest, where, f"tg{n_gen}", n_gen, r["tg_s"]))
    return records
