"""`edgeforge quantize` (MODEL -> QDIR) and `edgeforge eval` (perplexity and KL per scheme)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import EdgeforgeError
from ..quant.schemes import SCHEMES, check_embed_bits, get_scheme, scheme_help

SCHEME_HELP = "quantization scheme: " + ", ".join(SCHEMES)


def _load(spec: str):
    """MODEL (registry name, HF repo id, file or folder) -> LoadedModel."""
    from ..model.loader import load_model
    from ..models import fetch_model

    return load_model(fetch_model(spec))


# Shared by quantize and build: the storage of embed_tokens / lm_head, over the scheme's own choice.
EMBED_BITS_OPTION = click.option(
    "--embed-bits", type=click.Choice(["4", "8"]), default=None, callback=lambda c, p, v: int(v) if v else None,
    help="Store embed_tokens/lm_head as q4 or q8 whatever the scheme says (q4 is what ORT GenAI's int4 and "
         "llama.cpp's Q4_0 ship for the embedding; BENCHMARKS.md weighs bytes against quality).")


@click.command("quantize", epilog=scheme_help())
@click.argument("model")
@click.option("--quant", "scheme", required=True, metavar="SCHEME", help=SCHEME_HELP)
@EMBED_BITS_OPTION
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="QDIR folder to write")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary on stdout (progress goes to stderr)")
def quantize(model, scheme, embed_bits, output, as_json):
    """Quantize MODEL into a QDIR (safetensors shards + quantization.json + tokenizer).

    MODEL is a registry name (smollm2-135m), an HF folder, a .gguf file or an HF repo id. The
    output appears whole or not at all; the same input always gives byte-identical files.

    \b
    Example:
      edgeforge quantize smollm2-135m --quant q4f16 -o out/smollm2-q4f16
      edgeforge quantize ./Llama-3.2-1B --quant q4f16 --embed-bits 4 -o out/l32-q4 --json
    """
    from ..quant.qdir import write_qdir

    scheme = get_scheme(scheme)  # bad options fail before any download or load
    check_embed_bits(embed_bits)
    loaded = _load(model)
    summary = write_qdir(loaded, scheme, Path(output), embed_bits=embed_bits)
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        click.echo(
            f"wrote {summary['path']}: {summary['scheme']} ({summary['tensors']} tensors, {summary['shards']} shard(s), "
            f"{summary['bytes'] / 2**20:.1f} MiB, {summary['bits_per_weight']} bits per weight) in {summary['seconds']:.1f} s"
        )


@click.command("eval")
@click.argument("model")
@click.option("--quant", "schemes", multiple=True, required=True, metavar="SCHEME",
              help=SCHEME_HELP + " (repeat to compare several)")
@click.option("--text", "text_file", required=True, type=click.Path(dir_okay=False), help="UTF-8 text to score")
@click.option("--max-tokens", type=click.IntRange(min=2), default=256, show_default=True,
              help="score only the first N tokens of the text (the numpy reference is slow on big models)")
@click.option("--embed-bits", type=click.Choice(["4", "8"]), default=None, callback=lambda c, p, v: int(v) if v else None,
              help="quantize embed_tokens/lm_head as q4 or q8 in every scheme")
@click.option("--compare", "others", multiple=True, metavar="CHECKPOINT",
              help="also score this checkpoint of the same model as it is (e.g. a llama.cpp-quantized GGUF; repeat)")
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON on stdout")
def eval_cmd(model, schemes, text_file, max_tokens, embed_bits, others, as_json):
    """Perplexity of MODEL in float and in each --quant scheme, with KL(float || scheme).

    Runs the numpy reference with teacher forcing over the text (chunked to the context length)
    on weights quantized in memory exactly as `edgeforge quantize` stores them. --compare scores
    other checkpoints of the same model (dequantized, same tokens and positions) in the same table.

    \b
    Example:
      edgeforge eval smollm2-135m --quant q8f16 --quant q4f16 --text bench/data/eval-long.txt
      edgeforge eval ./model.gguf --quant q4f16 --text book.txt --max-tokens 512 --json
      edgeforge eval f32.gguf --quant q4f16 --compare Q4_K_M.gguf --text bench/data/eval-long.txt
    """
    from ..quant.eval import evaluate, format_table

    for s in schemes:
        get_scheme(s)
    check_embed_bits(embed_bits)
    text = _read_text(text_file)
    loaded = _load(model)
    compare = {}
    for other in others:  # labelled by file name, or by the path given when two names collide
        compare[other if Path(other).name in compare else Path(other).name] = _load(other)
    result = evaluate(loaded, schemes, text, max_tokens=max_tokens, embed_bits=embed_bits, compare=compare)
    result["model"] = model
    click.echo(json.dumps(result, indent=1) if as_json else format_table(result))


def _read_text(path: str) -> str:
    from ..runtime.bundle_errors import BundleError
    from ..runtime.files import read_text

    if not Path(path).exists():
        raise EdgeforgeError(f"--text {path}: no such file")
    try:
        return read_text(path, what="text")  # bounded, a regular file (not a fifo or /dev/zero)
    except BundleError as err:
        raise EdgeforgeError(f"--text {err}") from None

