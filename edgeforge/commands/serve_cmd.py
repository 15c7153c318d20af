"""`edgeforge serve BUNDLE`: an OpenAI-compatible endpoint (runtime/server.py) for a verified bundle."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import EdgeforgeError
from ..runtime.server import MAX_PROMPT_CACHE_MIB, PROMPT_CACHE_MIB
from .bundle_cmds import TRUST_OPTION, is_web_bundle, open_verified, verified_web


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 serves the whole network (use an API key then).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on; 0 picks a free one (the address is printed on stderr).")
@click.option("--api-key", default=None, envvar="EDGEFORGE_API_KEY", metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on every /v1 route (or set EDGEFORGE_API_KEY, "
                   "which other users cannot read from the process list).")
@click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="Read the API key from the first line of FILE.")
@click.option("--parallel", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Engines opened, each with its own KV cache: requests answered at once.")
@click.option("--batch/--no-batch", default=True, show_default=True,
              help="Decode the --parallel requests together, one call a step for all of them (ONNX bundles "
                   "built since batched decoding; others decode one call per request either way).")
@click.option("--batch-invariant", is_flag=True, default=False,
              help="A request's answer never depends on what is decoded with it, bit for bit. On CPUs where ONNX "
                   "Runtime's one-row kernel rounds otherwise (AVX2), a lone sequence then decodes next to a "
                   "scratch row (~1.4x its step time on SmolLM2); without it, answers under traffic equal those "
                   "alone up to float rounding there. The startup line says which.")
@click.option("--prompt-cache", "prompt_cache", type=click.IntRange(0, MAX_PROMPT_CACHE_MIB), default=PROMPT_CACHE_MIB,
              show_default=True, metavar="MIB",
              help="A prompt that begins like an earlier one (a system prompt, a conversation's earlier turns) "
                   "prefills only the rest; batched servers keep earlier prompts' KV in at most this many MiB. "
                   "0 turns it off (clients share the cache: timing tells one whether another sent the same beginning). "
                   "Answers are the same either way, up to float rounding.")
@click.option("--queue", "queue_limit", type=click.IntRange(0, 100_000), default=16, show_default=True,
              help="Requests that may wait for an engine; the next one gets 429 with Retry-After.")
@click.option("--ctx", type=click.IntRange(2), default=None,
              help="Most tokens a request may hold (prompt + answer); default the model's context length. "
                   "TVM reserves its KV cache for this many tokens per engine.")
@click.option("--drain", type=click.FloatRange(0, 3600), default=10.0, show_default=True, metavar="SECONDS",
              help="On SIGTERM or Ctrl-C, how long requests in flight may take to finish before they are stopped.")
@click.option("--certfile", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Web bundles: serve HTTPS with this certificate (phones allow WebGPU and WASM threads only "
                   "over HTTPS or on localhost).")
@click.option("--keyfile", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Web bundles: the certificate's private key.")
@TRUST_OPTION
def serve(bundle, host, port, api_key, api_key_file, parallel, batch, batch_invariant, prompt_cache, queue_limit, ctx, drain,
          certfile, keyfile, trust):
    """Serve a bundle over HTTP with OpenAI's API: /v1/chat/completions, /v1/completions, /v1/models,
    /health and /metrics (Prometheus). The bundle is verified before anything of it is loaded.

    Runs until SIGTERM (exit 143) or Ctrl-C (exit 130), letting requests in flight finish (--drain).
    Needs the serve extra: pip install 'edgeforge[serve]'.

    A web bundle (--target web) is served as its static page instead, with the headers WASM threads
    need (COOP/COEP) and the right MIME types, for a phone's browser.

    \b
    Examples:
      edgeforge serve dist/smollm2-135m-q4f16-x86-cpu-onnx
      edgeforge serve dist/smollm2-135m-q4f16-x86-cpu-onnx --parallel 4     # 4 requests decoded in one batch
      edgeforge serve dist/smollm2-135m-q4f16-web-onnx --host 0.0.0.0 --port 8443 --certfile cert.pem --keyfile key.pem
      edgeforge serve dist/smollm2-135m-q4f16-rpi5-tvm --host 0.0.0.0 --api-key-file key.txt --parallel 2
      curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
           -d '{"model": "smollm2-135m-q4f16-x86-cpu-onnx", "messages": [{"role": "user", "content": "Hi"}]}'
    """
    from ..runtime.bundle_errors import BundleError
    from ..runtime.server import check_api_key, read_api_key_file, serve_session

    if is_web_bundle(bundle):
        _serve_web(bundle, host, port, certfile, keyfile, trust)
        return
    if certfile is not None or keyfile is not None:
        raise EdgeforgeError("--certfile/--keyfile apply to web bundles only")
    _check_server_packages()
    if api_key is not None and api_key_file is not None:
        raise EdgeforgeError("--api-key and --api-key-file exclude each other")
    try:
        # an empty --api-key or EDGEFORGE_API_KEY is a mistake, never "no key"
        key = (read_api_key_file(api_key_file) if api_key_file is not None
               else check_api_key(api_key, "--api-key") if api_key is not None else None)
    except BundleError as err:
        raise EdgeforgeError(str(err)) from None
    sock = _bind(host, port)
    first = open_verified(bundle, max_length=ctx, trust=trust)
    serve_session(first, sock, key, parallel, queue_limit, drain, lambda message: click.echo(message, err=True),
                  batch=batch, prompt_cache_mib=prompt_cache, batch_invariant=batch_invariant)


def _serve_web(bundle: Path, host: str, port: int, certfile, keyfile, trust) -> None:
    """A web bundle's page from the verified private copy (the page checks every file once more)."""
    from ..web.server import serve_static

    if (certfile is None) != (keyfile is None):
        raise EdgeforgeError("--certfile and --keyfile go together")
    with verified_web(bundle, trust) as (_, copy):
        serve_static(copy, host, port, certfile, keyfile)


def _check_server_packages() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise EdgeforgeError(f"serve needs starlette and uvicorn ({err}): pip install 'edgeforge[serve]'") from None


def _bind(host: str, port: int):
    from ..runtime.bundle_errors import BundleError
    from ..runtime.server import bind

    try:
        return bind(host, port)
    except BundleError as err:
        raise EdgeforgeError(str(err)) from None
