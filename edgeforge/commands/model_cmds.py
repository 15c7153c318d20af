"""Model commands: fetch-model, inspect, generate (numpy reference, or a bundle's engine)."""

from __future__ import annotations

import collections
import json
import logging
from pathlib import Path

import click

from ..errors import EdgeforgeError
from .bundle_cmds import TEMPERATURE, TOP_P, open_verified


logger = logging.getLogger(__name__)


def resolve(spec: str) -> Path:
    """MODEL argument: a registry name or HF repo id (fetched), or a path."""
    from ..models import resolve_model_path

    return resolve_model_path(spec)


# ---- engines -------------------------------------------------------------------------------------
def open_engine_for(path: Path, device: str | None = None, trust: Path | None = None):
    """(engine, tokenizer, info) for a model path: the one place that decides what runs a MODEL.

    HF folders, GGUF files and QDIRs run on the numpy reference; a BUNDLE (folder with
    manifest.json) runs on its own compiled engine through the device-side runtime. Extend here
    for new kinds of input.
    """
    path = Path(path)
    if path.is_dir() and (path / "manifest.json").exists():
        return open_bundle(path, device, trust)
    if trust is not None:
        raise EdgeforgeError(f"--trust: {path} is not a bundle (only bundles are signed)")
    if device not in (None, "cpu"):
        raise EdgeforgeError(f"--device {device}: a model runs on the numpy reference (cpu); build a bundle for {device}")
    from ..model.loader import load_model
    from ..model.reference import ReferenceModel

    model = load_model(path)
    info = {"engine": "reference", "format": model.source["format"], "model_id": model.source["model_id"]}
    return ReferenceModel(model), model.tokenizer, info


def open_bundle(bundle: Path, device: str | None = None, trust: Path | None = None):
    """A bundle's engine and tokenizer, opened (verified first, the signature too with `trust`) the way
    every bundle command opens them."""
    session = open_verified(bundle, trust=trust, device=device)
    manifest = session.manifest
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    info = {"engine": "bundle", "format": "bundle", "model_id": model.get("id")}
    return session.engine, session.tokenizer, info


# ---- fetch-model ---------------------------------------------------------------------------------
@click.command("fetch-model")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print {name, path} as JSON.")
def fetch_model(name, as_json):
    """Download a named model (or an HF repo ORG/NAME) into the cache and print its path.

    \b
    Example:
      edgeforge fetch-model smollm2-135m
      edgeforge fetch-model HuggingFaceTB/SmolLM2-135M-Instruct --json
    """
    from ..model.loader import load_model
    from ..models import fetch_model as fetch

    path = fetch(name)
    load_model(path)  # a folder (local or fetched) that is no model is refused by name, not printed
    if as_json:
        click.echo(json.dumps({"name": name, "path": str(path)}))
    else:
        click.echo(str(path))


# ---- inspect -------------------------------------------------------------------------------------
def describe(model) -> dict:
    names = model.tensors.names()
    dtypes = collections.Counter(_stored_dtype(model.tensors, n) for n in names)
    params = sum(int(_prod(model.tensors.shape(n))) for n in names)
    tok = model.tokenizer
    return {
        "path": model.source["path"],
        "format": model.source["format"],
        "model_id": model.source.get("model_id"),
        "sha256": model.source.get("sha256"),
        "architecture": model.config.architecture,
        "config": model.config.to_dict(),
        "parameters": params,
        "tensors": len(names),
        "tensor_dtypes": dict(sorted(dtypes.items())),
        "tokenizer": {
            "kind": tokenizer_kind(tok),
            "vocab_size": tok.vocab_size,
            "bos_token_id": tok.bos_token_id,
            "eos_token_ids": tok.eos_token_ids,
            "add_bos_token": tok.add_bos_token,
            "chat_template": bool(tok.chat_template),
        },
    }


def _stored_dtype(tensors, name: str) -> str:
    """How a tensor is stored: dtype() for HF/GGUF sources, the storage format for a QDIR."""
    if hasattr(tensors, "dtype"):
        return tensors.dtype(name)
    if hasattr(tensors, "format"):
        return getattr(tensors.format(name), "name", "?")
    return "?"


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def tokenizer_kind(tok) -> str:
    """"byte-level BPE" / "sentencepiece BPE" / ..., from the tokenizers JSON."""
    spec = json.loads(tok.tok.to_str())
    model = (spec.get("model") or {}).get("type", "?")
    text = json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder"))
    if "ByteLevel" in text:
        return f"byte-level {model}"
    if "Metaspace" in text or (spec.get("model") or {}).get("byte_fallback"):
        return f"sentencepiece {model}"
    return model


@click.command("inspect")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print everything as one JSON object.")
def inspect(model, as_json):
    """Show a model's architecture, normalized config, parameters, tensor types and tokenizer; or a
    bundle's model, target, toolchain, device install and the quality report recorded at build.

    MODEL is a registry name, an HF repo id, an HF folder, a .gguf file, a QDIR or a bundle folder.

    \b
    Example:
      edgeforge inspect smollm2-135m
      edgeforge inspect ./Llama-3.2-1B-Instruct --json
      edgeforge inspect dist/smollm2-135m-q4f16-rpi5-tvm
    """
    from ..model.loader import load_model
    from ..runtime.smoke import printable

    if (Path(model) / "manifest.json").is_file():
        _inspect_bundle(Path(model), as_json)
        return

    info = describe(load_model(resolve(model)))
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    c = info["config"]
    t = info["tokenizer"]
    lines = [
        f"model:        {info['model_id']} ({info['format']}) {info['path']}",
        f"sha256:       {info['sha256']}",
        f"architecture: {info['architecture']}",
        f"parameters:   {info['parameters']:,} in {info['tensors']} tensors "
        f"({', '.join(f'{k} x{v}' for k, v in info['tensor_dtypes'].items())})",
        f"layers:       {c['num_layers']}, hidden {c['hidden_size']}, intermediate {c['intermediate_size']}",
        f"attention:    {c['num_heads']} heads, {c['num_kv_heads']} KV heads, head_dim {c['head_dim']}",
        f"rope:         theta {c['rope_theta']:g}, scaling {c['rope_scaling'] or 'none'}",
        f"vocab:        {c['vocab_size']}, tied embeddings: {c['tie_word_embeddings']}, context {c['context_length']}",
        f"tokenizer:    {t['kind']}, bos {t['bos_token_id']} (added: {t['add_bos_token']}), eos {t['eos_token_ids']}, "
        f"chat template: {'yes' if t['chat_template'] else 'no'}",
    ]
    click.echo("\n".join(printable(line, 2000) for line in lines))  # model metadata: no terminal escapes


def _inspect_bundle(bundle: Path, as_json: bool) -> None:
    """A bundle's manifest facts and quality.json, after verifying its checksums."""
    from ..quant.quality import read as read_quality
    from ..runtime.manifest_check import verify_bundle

    manifest = verify_bundle(bundle)
    quality = read_quality(bundle / "quality.json") if (bundle / "quality.json").is_file() else None
    if as_json:
        click.echo(json.dumps({"bundle": str(bundle), "manifest": manifest, "quality": quality}, indent=1))
        return
    try:
        lines = _bundle_lines(manifest, quality)
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise EdgeforgeError(f"{bundle / 'manifest.json'}: malformed ({type(err).__name__}: {err})") from None
    click.echo("\n".join(lines))


def _bundle_lines(manifest: dict, quality: dict | None) -> list[str]:
    from ..bundle.device_install import summary as install_summary
    from ..quant.quality import summary as quality_summary
    from ..runtime.smoke import printable

    m, t = manifest, manifest["target"]
    return [printable(line, 2000) for line in [
        f"bundle:       {m['name']} ({len(m['files'])} files, checksums ok)",
        f"model:        {m['model'].get('id') or '?'} ({m['model'].get('source_format') or '?'}), scheme {m['scheme']} "
        f"({m.get('model_dtype')})",
        f"target:       {t['name']} ({t.get('os')} {t.get('arch')}), backend {m['backend']} on {m.get('device')}",
        f"toolchain:    {', '.join(f'{k} {v}' for k, v in sorted(m.get('toolchain', {}).items()))}",
        f"requires:     {', '.join(f'{k}={v}' for k, v in sorted(m.get('device_requirements', {}).items()))}",
        install_summary(m.get("device_install")),
        quality_summary(quality),
    ]]


# ---- generate ------------------------------------------------------------------------------------
@click.command("generate")
@click.argument("model")
@click.option("--prompt", "-p", required=True, callback=lambda c, p, v: _prompt_text(c, p, v),
              help="The prompt text (the user message with --chat).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--system", default=None, help="System message (with --chat).")
@click.option("--max-tokens", "-n", default=64, show_default=True, type=click.IntRange(1, 1 << 20))
@click.option("--temperature", "-t", default=0.0, show_default=True, type=TEMPERATURE,
              help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=TOP_P)
@click.option("--seed", default=0, show_default=True, type=int, help="Sampling seed (temperature > 0).")
@click.option("--device", default=None, help="Device for a bundle's engine (bundles only).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: prompt_tokens, prompt_ids, tokens, text, timings, device.")
@click.option("--trust", type=click.Path(path_type=Path), default=None, metavar="PUBKEY.pem",
              help="BUNDLE only: refuse it unless manifest.sig is a valid signature by this ed25519 public key.")
def generate(model, prompt, chat, system, max_tokens, temperature, top_p, seed, device, as_json, trust):
    """Generate text with the numpy reference (MODEL, QDIR) or a bundle's engine (BUNDLE).

    Streams the text to stdout as it is generated; --json prints one object at the end.

    \b
    Example:
      edgeforge generate smollm2-135m --chat --prompt "What is the capital of France?"
      edgeforge generate ./qdir-q4f16 -p "Once upon a time" -n 32 -t 0.8 --top-p 0.95 --seed 1 --json
      edgeforge generate dist/smollm2-135m-q4f16-x86-cpu-onnx -p "Hello" --trust release.pub.pem
    """
    from ..bundle.chat import echo_model_text
    from ..runtime.bundle_errors import BundleError
    from ..runtime.session import Session

    engine, tok, info = open_engine_for(resolve(model), device, trust)
    session = Session(Path(model), {}, tok, engine)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    try:
        ids = session.encode(messages if chat else prompt)
    except BundleError as err:
        raise EdgeforgeError(f"{model}: {err}") from None
    done = session.generate(ids, max_tokens, temperature, top_p, seed, on_text=None if as_json else echo_model_text)
    result = done.result
    if as_json:
        click.echo(json.dumps({
            "prompt_tokens": len(ids), "prompt_ids": ids, "tokens": done.ids, "text": done.text,
            "stopped": result.stopped, "timings": result.timings(), "device": engine.device, **info,
        }))
    else:
        click.echo()
        logger.info(f"[{len(ids)} prompt tokens, {len(done.ids)} generated; prefill "
                    f"{result.prefill_tokens_per_second:.1f} tok/s, decode {result.decode_tokens_per_second:.1f} tok/s "
                    f"on {engine.device}]")


def _prompt_text(ctx, param, value):
    from .bundle_cmds import prompt_text

    return prompt_text(ctx, param, value)


