"""Device-side smoke test of a bundle: verify checksums, check the host, run the golden prompts.

Used by the bundle's own `smoke.py` (`python smoke.py [--json]`) and by `edgeforge smoke`.
Exit codes: 0 PASS, 1 FAIL (outputs disagree with golden.json), 2 unusable bundle or machine.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from .bundle_errors import BundleError, SmokeFailed
from .files import read_json
from .golden_check import GOLDEN_FORMAT, run_prompt, summarize
from .hostcheck import check_can_run
from .manifest_check import VERIFIED_PREFIX, verified_copy


# Dawn on Mesa lavapipe segfaults when a WebGPU session is destroyed: engines stay referenced until
# the process ends, and main() leaves with os._exit() after a WebGPU run (see there).
_KEEP_ALIVE: list = []


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MiB.

    Linux: VmHWM, because getrusage's ru_maxrss survives exec() and would report the peak of the
    process that started us (e.g. a compiler with torch loaded)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def read_golden(bundle: Path) -> dict:
    path = bundle / "golden.json"
    golden = read_json(path)
    if golden.get("format") != GOLDEN_FORMAT or not golden.get("prompts"):
        raise BundleError(f"{path}: not an edgeforge golden file, or it has no prompts")
    return golden


def open_bundle_engine(bundle: Path, manifest: dict, device: str | None = None, max_length: int | None = None):
    from .loader import open_engine

    weights = bundle / "weights"
    return open_engine(bundle / "artifact", weights if weights.is_dir() else None, device=device, max_length=max_length)


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    """Golden prompts are one user message through the chat template when the model has one."""
    if chat:
        return list(tokenizer.encode_chat([{"role": "user", "content": text}]))
    return list(tokenizer.encode(text))


def check_tokenizer(bundle: Path, golden: dict) -> None:
    """The bundle's tokenizer must turn each golden prompt into the same ids as at build time."""
    from .tokenizer import Tokenizer, TokenizerError

    try:
        tok = Tokenizer.load(bundle / "tokenizer")
        encoded = [encode_prompt(tok, p["text"], p.get("chat")) for p in golden["prompts"]]
    except TokenizerError as err:
        raise BundleError(f"{bundle / 'tokenizer'}: {err}") from None
    for p, ids in zip(golden["prompts"], encoded):
        if list(ids) != list(p["prompt_ids"]):
            raise SmokeFailed(f"{bundle / 'tokenizer'}: encodes golden prompt {p['text']!r} differently than at build time")


def run_smoke(bundle: Path, device: str | None = None, log=lambda m: None, max_prompts: int | None = None,
              trust=None, verified: dict | None = None) -> dict:
    """Verify and run a bundle; returns the result dict (status PASS or FAIL). Raises BundleError.

    `max_prompts` checks only the first golden prompts (for slow emulated or remote runs); the
    result says how many of how many were checked. `verified`: the manifest, when the caller (the
    bundle's smoke.py, before importing this module) has verified the bundle already."""
    bundle = Path(bundle).resolve()
    t0 = time.perf_counter()
    manifest = verified
    if verified is None:  # run from a private copy of what was verified
        manifest, bundle = verified_copy(bundle, trust)
        log(f"checksums ok: {len(manifest['files'])} files ({time.perf_counter() - t0:.1f} s)")
    check_can_run(manifest)
    golden = read_golden(bundle)
    check_tokenizer(bundle, golden)
    t1 = time.perf_counter()
    engine = open_bundle_engine(bundle, manifest, device)
    _KEEP_ALIVE.append(engine)
    load_s = time.perf_counter() - t1
    log(f"loaded {manifest.get('backend')} engine on {getattr(engine, 'device', '?')} ({load_s:.1f} s)")
    rel = float(golden["tolerance"]["rel"])
    prompts = golden["prompts"][:max_prompts] if max_prompts else golden["prompts"]
    results = []
    for i, prompt in enumerate(prompts, 1):
        results.append(run_prompt(engine, prompt, rel))
        r = results[-1]
        log(f"prompt {i}/{len(prompts)}: {'ok' if r['ok'] else 'BAD'}, max err {r['max_err']:.4g}, "
            f"{r['agree']}/{r['steps']} tokens agree ({r['prefill_s'] + r['decode_s']:.1f} s)")
    out = summarize(results)
    out.update(bundle=manifest.get("name", bundle.name), target=manifest["target"].get("name"),
               backend=manifest.get("backend"), device=getattr(engine, "device", "?"),
               runtime=_runtime_info(engine, bundle), quality=manifest.get("quality"),
               load_seconds=round(load_s, 3), peak_rss_mb=peak_rss_mb(), prompts=results,
               prompts_checked=len(prompts), prompts_total=len(golden["prompts"]))
    return out


def _runtime_info(engine, bundle: Path) -> dict:
    """Which backend runtime ran, and whether it was the bundle's own copy."""
    info = dict(getattr(engine, "runtime_info", None) or {})
    path = info.pop("tvm_path", None)
    if path is not None:
        info["tvm_from"] = "bundle" if Path(path).resolve().is_relative_to(bundle) else path
    lib = info.get("tvm_library")
    if lib and Path(lib).is_relative_to(bundle):
        info["tvm_library"] = Path(lib).relative_to(bundle).as_posix()
    return info


def describe_quality(q) -> str:
    """The build's quality report (manifest summary of quality.json), for the smoke output. Never
    raises: the verdict of a smoke test does not depend on this line."""
    if not isinstance(q, dict):
        return "quality at build: unreadable in manifest.json"
    if isinstance(q.get("skipped"), str):
        return f"quality at build: not measured ({printable(q['skipped'])})"
    kl, ratio, n = q.get("kl"), q.get("ppl_ratio"), q.get("predictions")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (kl, ratio, n)):
        return "quality at build: unreadable in manifest.json"
    return (f"quality at build: KL {kl:.4g} nats/token, perplexity x{ratio:.4f} against the source "
            f"weights over {n} predictions (quality.json)")


def printable(text: str, limit: int = 200) -> str:
    """Bundle-supplied text for a terminal: no control characters (escapes), at most `limit` chars."""
    clean = "".join(c if c.isprintable() else " " for c in str(text))
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def terminal_text(text: str) -> str:
    """Model output for a terminal: newlines and tabs kept, every other control character (ESC
    starts a terminal escape sequence) shown as U+FFFD."""
    return "".join(c if c.isprintable() or c in "\n\t" else "\ufffd" for c in str(text))


def describe(result: dict) -> str:
    def rate(x):
        return "n/a" if x is None else f"{x:.1f}"

    mem = result.get("peak_rss_mb")
    widened = result.get("steps_widened")
    worst = result.get("worst_ratio")
    return (f"{result['status']} {result['bundle']} on {result['device']}: "
            f"max logit err {result['max_logit_err']:.4g} (tol {result['tolerance']:.4g}"
            + (f"; worst step {worst:.2f} of its tolerance" if worst is not None else "")
            + (f", {widened} of {result['tokens_total']} steps widened by the model's measured sensitivity" if widened else "")
            + "), "
            f"tokens {result['tokens_agree']}/{result['tokens_total']} agree, "
            f"prefill {rate(result['prefill_tok_s'])} tok/s, decode {rate(result['decode_tok_s'])} tok/s, "
            f"peak mem {'n/a' if mem is None else f'{mem:.0f} MB'}")


def main(argv=None, bundle: Path | None = None, verified: dict | None = None, args=None) -> int:
    """smoke.py's entry point. `args`: the options smoke.py parsed already; `verified`: the manifest
    of `bundle` (its verified private copy), which is then run without verifying it again."""
    from .manifest_check import smoke_arguments

    if args is None:
        args = smoke_arguments(argv, str(bundle or Path.cwd()))
    if verified is not None:
        args.bundle = str(bundle)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731 - progress on stderr, the result on stdout
    try:
        result = run_smoke(Path(args.bundle), args.device, log, args.prompts, trust=args.trust, verified=verified)
        code = 0 if result["status"] == "PASS" else 1
    except SmokeFailed as err:
        result, code = {"status": "FAIL", "error": str(err)}, 1
    except BundleError as err:
        result, code = {"status": "ERROR", "error": str(err)}, 2
    except Exception as err:  # noqa: BLE001 - malformed bundle data (consistent checksums, bad content)
        result, code = {"status": "ERROR", "error": f"unusable bundle: {type(err).__name__}: {err}"}, 2
    if args.json:
        print(json.dumps(result, indent=1, default=float))
    elif "error" in result:
        print(f"{result['status']}: {result['error']}" if code == 1 else f"error: {result['error']}", file=sys.stderr)
    else:
        print(describe(result))
        if result.get("quality"):
            print(describe_quality(result["quality"]))
    if str(result.get("device", "")).startswith("webgpu"):
        # Dawn on Mesa lavapipe segfaults while native objects are torn down (after every result is
        # out): leave without running destructors so the exit code is the smoke verdict.
        sys.stdout.flush()
        sys.stderr.flush()
        if verified is not None and Path(args.bundle).name.startswith(VERIFIED_PREFIX):
            shutil.rmtree(args.bundle, ignore_errors=True)  # our private copy: atexit does not run
        os._exit(code)
    return code
