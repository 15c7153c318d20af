"""`edgeforge compile`: QDIR -> compiled artifact for one target with one backend."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..backends import compile_qdir, is_artifact  # noqa: F401 - re-exported (older import path)
from ..runtime.backends import backend_names

KV_CACHE_OPTION = click.option(
    "--kv-cache", "kv_cache", type=click.Choice(["float", "int8"]), default=None,
    help="KV cache storage: float (the compute dtype) or int8 (ONNX on CPU with float32 compute: half the "
         "KV bytes of fp16, a quarter of fp32; static scales calibrated at compile time: keys per channel, values per KV head; tvm "
         "refuses it). Default: the target file's [onnx] kv_cache, else float.")


@click.command("compile")
@click.argument("qdir", type=click.Path(path_type=Path))
@click.option("--target", "target_name", required=True, help="Target preset name (see `edgeforge targets`) or a .toml file.")
@click.option("--backend", type=click.Choice(["auto", *backend_names()]), default="auto", show_default=True,
              help="Compiler backend; auto picks the target file's first backend.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output folder (replaced atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print artifact.json's content as JSON.")
@KV_CACHE_OPTION
def compile_cmd(qdir, target_name, backend, out, as_json, kv_cache):
    """Compile a quantized model folder (QDIR) for one target.

    \b
    Example:
      edgeforge quantize smollm2-135m --quant q4f16 -o out/q4f16
      edgeforge compile out/q4f16 --target rpi5 --backend tvm -o out/rpi5-tvm
      edgeforge compile out/q4f16 --target x86-cpu --backend onnx --kv-cache int8 -o out/x86-kv8
    """
    artifact = compile_qdir(qdir, target_name, backend, out, kv_cache=kv_cache)
    if as_json:
        click.echo(json.dumps(artifact, indent=1, sort_keys=True))
    else:
        click.echo(f"compiled {qdir} for {artifact.get('target', target_name)} with {artifact.get('backend', backend)} "
                   f"in {artifact['compile_seconds']} s -> {out}")
