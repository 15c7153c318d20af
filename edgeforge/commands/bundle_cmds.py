"""Product commands: build, smoke, run, bench, targets, doctor, plan."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import click

from ..errors import CheckFailed, EdgeforgeError, InternalError
from ..quant.schemes import SCHEMES
from ..runtime.backends import backend_names
from .compile_cmd import KV_CACHE_OPTION
from .quant_cmds import EMBED_BITS_OPTION


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=1, default=str))


def _echo_rows(rows: list[dict], as_json: bool, text_of) -> None:
    """A table command's output: the rows as JSON, or text_of(row) a row."""
    if as_json:
        _echo_json(rows)
        return
    for row in rows:
        click.echo(text_of(row))


def prompt_text(_ctx, param, value):
    """click callback for --prompt: non-empty, valid UTF-8 text (argv bytes that are not UTF-8 arrive
    as lone surrogates, which no tokenizer can encode)."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise click.BadParameter("is not valid UTF-8 text", param=param) from None
    if not value.strip():
        raise click.BadParameter("is empty", param=param)
    return value


class FiniteFloatRange(click.FloatRange):
    """A FloatRange that refuses nan and inf (click's lets nan through every bound, and an infinite
    temperature is no sampling setting): --temperature, --top-p."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return value


TEMPERATURE = FiniteFloatRange(0, None)
TOP_P = FiniteFloatRange(0, 1, min_open=True)


# ---- build ---------------------------------------------------------------------------------------

@click.command()
@click.argument("model")
@click.option("--quant", default=None, help=f"Quantization scheme: {' '.join(SCHEMES)} (bits per weight: "
              "`edgeforge quantize --help`; a config file may set it).")
@click.option("--target", "targets", multiple=True, help="Target preset (repeatable; see `edgeforge targets`). "
              "With a config file: build only these of its targets.")
@click.option("--backend", type=click.Choice(["auto", "all", *backend_names()]), default="auto", show_default=True,
              help="auto: the target's first backend; all: every backend the target lists.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Output folder for the bundles.")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=1, show_default=True, help="Compile this many bundles at once.")
@click.option("--archive", "make_archive", is_flag=True, help="Also write BUNDLE.tar.gz next to each bundle.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout (progress goes to stderr).")
@click.option("--no-smoke", "no_smoke", is_flag=True,
              help="Do not run each new bundle's smoke test on this machine (it runs by default where the "
                   "bundle can run here, and a FAIL fails the build).")
@click.option("--sign", "sign_key", type=click.Path(path_type=Path), default=None, metavar="KEY.pem",
              help="Sign every bundle with this ed25519 private key (openssl genpkey -algorithm ed25519 -out KEY.pem).")
@click.option("--quality-tokens", type=click.IntRange(2, 100_000), default=None, metavar="N",
              help="Tokens of the built-in text the quality report scores (KL and perplexity ratio against the "
                   "source, recorded in every bundle's quality.json) [default: 128].")
@click.option("--no-quality", "no_quality", default=None, metavar="REASON",
              help="Skip the quality report; REASON is recorded in quality.json (e.g. \"CI speed\").")
@EMBED_BITS_OPTION
@KV_CACHE_OPTION
def build(model, quant, targets, backend, output, jobs, make_archive, as_json, no_smoke, sign_key, quality_tokens,
          no_quality, embed_bits, kv_cache):
    """Build deployment bundles: quantize once, compile and bundle for each target.

    MODEL is a model name, an HF folder, a .gguf file, or a build config (.toml).

    \b
    Examples:
      edgeforge build smollm2-135m --quant q4f16 --target x86-cpu --target rpi5 -o dist
      edgeforge build examples/smollm2.toml                 # every target of the config
      edgeforge build examples/smollm2.toml --target rpi5   # one CI job
      edgeforge build smollm2-135m --target rpi5 --sign release.pem   # smoke --trust release.pub.pem
      edgeforge build ./llama-3-8b --target x86-cpu --no-quality "measured in the release job"
      edgeforge build ./llama-3.2-1b --quant q4f16 --target x86-cpu --backend onnx --kv-cache int8 -o dist
      edgeforge build smollm2-135m --quant q4f16 --embed-bits 4 --target rpi5   # smaller, faster, a little worse
    """
    from ..backends import with_kv_cache
    from ..bundle.build import run_build
    from ..bundle.config import make_plan

    plan = make_plan(model, quant, tuple(targets), backend, output)
    for target, job_backend in plan.jobs:  # refused before the model loads
        with_kv_cache(target, job_backend, kv_cache)
    plan.kv_cache = kv_cache
    if embed_bits is not None:  # the flag wins over a config file's embed_bits
        plan.embed_bits = embed_bits
    plan.smoke = not no_smoke
    if quality_tokens is not None:
        plan.quality_tokens = quality_tokens
    if no_quality is not None:
        reason = " ".join(no_quality.split())
        if not reason or reason.startswith("-") or len(reason) > 200 or not reason.isprintable():
            raise click.BadParameter(f"needs the reason for skipping it as its value (printable text, up to 200 "
                                     f"characters, not an option), got {no_quality[:40]!r}", param_hint="--no-quality")
        plan.quality_skip = reason
    if sign_key is not None:
        _check_signing_key(sign_key)
        plan.sign_key = sign_key
    summary = run_build(plan, jobs=jobs, make_archive=make_archive)
    failed = [b for b in summary["bundles"] if not b["ok"]]
    if as_json:
        _echo_json(summary)
    else:
        click.echo(f"built {len(summary['bundles']) - len(failed)}/{len(summary['bundles'])} bundles "
                   f"in {summary['seconds']} s -> {plan.output}")
    if failed:
        error = InternalError if any(b.get("internal") for b in failed) else EdgeforgeError  # 70: a bug
        raise error(f"{len(failed)} bundle(s) failed: " + "; ".join(
            f"{b['target']}/{b['backend']}: {b['error']}" for b in failed)
            + (" (a bug in edgeforge: rerun with --debug for the traceback and report it)" if error is InternalError else ""))


def _check_signing_key(path: Path) -> None:
    """Fail before a long build when the signing key is unusable."""
    from ..runtime.bundle_errors import BundleError
    from ..runtime.manifest_check import load_private_key

    try:
        load_private_key(path)
    except BundleError as err:
        raise EdgeforgeError(f"--sign: {err}") from None


EP_OPTION = click.option(
    "--ep", type=click.Choice(["all", "wasm", "webgpu"]), default=None,
    help="Web bundles: the onnxruntime-web execution provider(s) to run in headless Chromium (default: all; "
         "webgpu uses Chromium's software adapter here).")


def _eps(ep: str | None) -> tuple[str, ...] | None:
    return None if ep is None else ("wasm", "webgpu") if ep == "all" else (ep,)


TRUST_OPTION = click.option(
    "--trust", type=click.Path(path_type=Path), default=None, metavar="PUBKEY.pem",
    help="Refuse the bundle unless manifest.sig is a valid signature by this ed25519 public key "
         "(checked before anything else). Checksums alone prove integrity, not who made the bundle.")


# ---- verify --------------------------------------------------------------------------------------

@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--trust", type=click.Path(path_type=Path), default=None, metavar="PUBKEY.pem",
              help="Also require manifest.sig to be a valid signature by this ed25519 public key.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def verify(bundle, trust, as_json):
    """Verify a bundle with this installed edgeforge, running none of the bundle's own code.

    Checks, in order: the signature of manifest.json (with --trust), manifest.json's self hash and
    canonical form, every file's type, size and sha256, no unlisted file, and the smoke tolerance
    golden.json claims against what its compute path allows. BUNDLE is a folder or a .tar.gz.
    Exit codes: 0 verified, 2 refused (the message names the file).

    \b
    Examples:
      edgeforge verify dist/smollm2-135m-q4f16-rpi5-onnx --trust release.pub.pem
      edgeforge verify dist/smollm2-135m-q4f16-rpi5-onnx.tar.gz --json
    """
    import hashlib

    from ..bundle.smoke_run import opened_bundle, verified
    from ..runtime.manifest_check import load_public_key, raw_public_key

    with opened_bundle(bundle) as opened, verified(opened, trust) as (manifest, _copy):
        out = {"bundle": str(bundle), "status": "OK", "files": len(manifest["files"]),
               "manifest_sha256": manifest.get("manifest_sha256"), "signed_by": None}
    if trust is not None:
        out["signed_by"] = hashlib.sha256(raw_public_key(load_public_key(trust))).hexdigest()[:16]
    if as_json:
        _echo_json(out)
        return
    signed = f", signature by {out['signed_by']} ok" if trust else " (signature not checked: no --trust)"
    click.echo(f"OK {bundle}: {out['files']} files, checksums ok{signed}")


# ---- smoke ---------------------------------------------------------------------------------------

@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--emulate", is_flag=True, help="Run an aarch64 Linux bundle under qemu in the arm64 root.")
@click.option("--ssh", "ssh", metavar="USER@HOST", default=None, help="Copy the bundle to a device and run smoke.py there.")
@click.option("--port", type=click.IntRange(1, 65535), default=22, show_default=True, help="ssh port.")
@click.option("--identity", "-i", type=click.Path(exists=True, dir_okay=False), default=None, help="ssh private key.")
@click.option("--known-hosts", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Accept only host keys from this file (default: accept a new host key, like accept-new).")
@click.option("--remote-python", default="python3", show_default=True, help="Python command on the ssh device.")
@click.option("--prompts", type=click.IntRange(min=1), default=None, metavar="N",
              help="Check only the first N golden prompts (slow emulation or devices); the result says N of M.")
@EP_OPTION
@TRUST_OPTION
def smoke(bundle, as_json, emulate, ssh, port, identity, known_hosts, remote_python, prompts, ep, trust):
    """Verify a bundle's checksums, run its golden prompts, print PASS or FAIL.

    Exit codes: 0 PASS, 1 FAIL, 2 unusable bundle or machine (the message says which).

    \b
    Examples:
      edgeforge smoke dist/smollm2-135m-q4f16-x86-cpu-tvm
      edgeforge smoke dist/smollm2-135m-q4f16-rpi5-tvm --emulate
      edgeforge smoke dist/smollm2-135m-q4f16-rpi5-onnx.tar.gz --ssh pi@raspberrypi.local --json
      edgeforge smoke dist/smollm2-135m-q4f16-web-onnx --ep wasm   # its page in headless Chromium
    """
    from ..bundle.smoke_run import smoke as run_smoke
    from ..runtime.smoke import describe, describe_quality

    if emulate and ssh:
        raise EdgeforgeError("--emulate and --ssh exclude each other")
    code, result = run_smoke(bundle, emulate, ssh, port, identity, remote_python, known_hosts,
                             prompts=prompts, trust=trust, eps=_eps(ep))
    if as_json:
        _echo_json(result)
    if code == 2:
        raise EdgeforgeError(result.get("error", "bundle unusable here"))
    if not as_json:
        for run in result.get("runs", [result]):  # a web bundle: one run per execution provider
            click.echo(describe(run) if "max_logit_err" in run else f"{run['status']}: {run.get('error')}")
        if result.get("quality"):
            click.echo(describe_quality(result["quality"]))
    if code == 1:
        raise CheckFailed(f"smoke FAIL: {bundle}")


# ---- run / generate ------------------------------------------------------------------------------

def open_verified(bundle: Path, max_length: int | None = None, trust: Path | None = None, device: str | None = None):
    """A verified, opened bundle folder (runtime.session.Session: manifest, tokenizer, engine); max_length
    sizes the KV cache. The one way every command opens a bundle."""
    from ..runtime.bundle_errors import BundleError
    from ..runtime.session import open_session

    try:
        return open_session(Path(bundle), max_length=max_length, trust=trust, device=device)
    except BundleError as err:
        raise EdgeforgeError(str(err)) from None


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", default=None, callback=prompt_text,
              help="Prompt text; without it (and a terminal) an interactive chat starts.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--max-tokens", "-n", type=click.IntRange(1), default=128, show_default=True)
@click.option("--temperature", type=TEMPERATURE, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=TOP_P, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--ctx", type=click.IntRange(2), default=None,
              help="Most tokens a conversation may hold (prompt + answers); default the model's context length. "
                   "TVM reserves its KV cache for this many tokens when the bundle opens.")
@click.option("--json", "as_json", is_flag=True, help="No streaming: print tokens, text and timings as JSON.")
@TRUST_OPTION
def run(bundle, prompt, chat, max_tokens, temperature, top_p, seed, ctx, as_json, trust):
    """Generate text with a bundle, streaming tokens as they come.

    \b
    Examples:
      edgeforge run dist/smollm2-135m-q4f16-x86-cpu-onnx --chat -p "What is the capital of France?"
      edgeforge run dist/smollm2-135m-q4f16-x86-cpu-onnx        # interactive chat on a terminal
      edgeforge run dist/smollm2-135m-q4f16-rpi5-tvm --ctx 1024 -p "Hello"   # at most 1024 tokens
    """
    from ..bundle.chat import answer_json, chat_loop, stream_answer

    session = open_verified(bundle, max_length=ctx, trust=trust)
    opts = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if as_json:
        if prompt is None:
            raise EdgeforgeError("--json needs --prompt")
        _echo_json(answer_json(session, prompt, chat, **opts))
        return
    if prompt is None:
        if not sys.stdin.isatty():
            raise EdgeforgeError("--prompt is required when stdin is not a terminal")
        chat_loop(session, **opts)
        return
    stream_answer(session, [{"role": "user", "content": prompt}] if chat else prompt, **opts)


def is_web_bundle(bundle: Path) -> bool:
    """Whether `bundle` says it is a web bundle (its page runs in a browser, not here). Only routes the
    command: the path taken verifies the bundle, and checks this again on the verified manifest."""
    from ..runtime.bundle_errors import BundleError
    from ..runtime.files import read_json
    from ..web.run import is_web

    try:
        return is_web(read_json(Path(bundle) / "manifest.json"))
    except BundleError:
        return False  # not a bundle folder, or an unreadable manifest: the verifier says which


@contextlib.contextmanager
def verified_web(bundle: Path, trust):
    """(manifest, private verified copy) of a web bundle."""
    from ..bundle.smoke_run import verified
    from ..web.run import is_web

    with verified(Path(bundle), trust) as (manifest, copy):
        if not is_web(manifest):
            raise EdgeforgeError(f"{bundle}: not a web bundle (its manifest changed while it was read?)")
        yield manifest, copy


# ---- bench ---------------------------------------------------------------------------------------

@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-p", "--n-prompt", type=click.IntRange(0), default=512, show_default=True, help="Prompt tokens (pp test).")
@click.option("-n", "--n-gen", type=click.IntRange(0), default=128, show_default=True, help="Generated tokens (tg test).")
@click.option("-r", "--repetitions", type=click.IntRange(1), default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print llama-bench style JSON records.")
@EP_OPTION
@TRUST_OPTION
def bench(bundle, n_prompt, n_gen, repetitions, as_json, ep, trust):
    """Measure prefill (ppN) and decode (tgN) speed of a bundle, like llama-bench.

    \b
    Example:
      edgeforge bench dist/smollm2-135m-q4f16-x86-cpu-tvm -p 512 -n 128 -r 3 --json
      edgeforge bench dist/smollm2-135m-q4f16-web-onnx --ep webgpu   # in headless Chromium
    """
    from ..bundle.bench import run_bench

    if is_web_bundle(bundle):
        from ..web import run as web_run

        with verified_web(bundle, trust) as (manifest, copy):
            records = web_run.bench(copy, manifest, n_prompt, n_gen, repetitions, _eps(ep) or web_run.EPS)
    else:
        if ep:
            raise EdgeforgeError("--ep applies to web bundles only")
        # A cache for what the tests need, as llama-bench sizes its context to n_prompt + n_gen.
        session = open_verified(bundle, max_length=max(n_prompt, n_gen + 1), trust=trust)
        records = run_bench(session.engine, session.manifest, n_prompt, n_gen, repetitions)
    if as_json:
        _echo_json(records)
        return
    click.echo(f"{'bundle':<44} {'device':<14} {'test':>8} {'t/s':>20}")
    for r in records:
        click.echo(f"{r['bundle']:<44} {r['device']:<14} {r['test']:>8} {r['avg_ts']:>11.2f} ± {r['stddev_ts']:<7.2f}")


# ---- targets / doctor / plan ---------------------------------------------------------------------

@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def targets(as_json):
    """List target presets: backends, and whether this machine can build and run each.

    \b
    Example:
      edgeforge targets --json
    """
    from ..bundle.doctor import target_rows

    _echo_rows(target_rows(), as_json, _target_text)


def _target_text(r: dict) -> str:
    build = ", ".join(f"{b}:{'yes' if ok else 'no'}" for b, ok in r["can_build"].items())
    return (f"{r['name']:<15} {r['run']:<7} build [{build}] run: {'yes' if r['can_run'] else 'no'}"
            + (f"  (missing: {'; '.join(r['missing'])})" if r["missing"] else "") + f"\n{'':<15} {r['description']}"
            + (f"\n{'':<15} --backend auto: {r['auto_backend']}: {r['auto_why']}" if r["auto_why"] else ""))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor(as_json):
    """Check toolchains and runtimes: nvcc, aarch64 gcc, qemu, arm64 root, lavapipe, tvm, onnxruntime, GPU.

    \b
    Example:
      edgeforge doctor --json
    """
    from ..bundle.doctor import checks

    _echo_rows(checks(), as_json, lambda r: f"{'ok ' if r['ok'] else '-- '} {r['name']:<22} {r['detail']}")


@click.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--matrix", type=click.Choice(["github"]), default="github", show_default=True)
def plan(config, matrix):
    """Print a CI job matrix (JSON) with one job per target of a build config.

    \b
    Example:
      edgeforge plan examples/smollm2.toml --matrix github
    """
    from ..bundle.doctor import github_matrix

    click.echo(json.dumps(github_matrix(config)))
