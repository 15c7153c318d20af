"""`edgeforge compile`: QDIR -> compiled artifact for one target with one backend."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ..backends import get_backend
from ..errors import EdgeforgeError
from ..fsutil import atomic_output_dir, is_json_of_format
from ..targets import get_target


def is_artifact(path: Path) -> bool:
    """A folder `edgeforge compile` wrote (what a new compile may replace)."""
    return is_json_of_format(Path(path) / "artifact.json", "edgeforge-artifact")


def compile_qdir(qdir: Path, target_name: str, backend: str, out: Path, log=click.echo) -> dict:
    """Compile a QDIR for a target into `out` (written atomically). Returns artifact.json's content."""
    qdir = Path(qdir)
    if not (qdir / "quantization.json").is_file():
        raise EdgeforgeError(f"{qdir}: not a quantized model folder (no quantization.json); run `edgeforge quantize` first")
    target = get_target(target_name)
    backend = target.pick_backend(backend)
    module = get_backend(backend)
    start = time.time()
    with atomic_output_dir(out, is_artifact, "compiled artifact") as tmp:
        artifact = module.compile_model(qdir, target, Path(tmp), log)
        if not (Path(tmp) / "artifact.json").is_file():
            (Path(tmp) / "artifact.json").write_text(json.dumps(artifact, indent=1, sort_keys=True))
    artifact = dict(artifact, compile_seconds=round(time.time() - start, 1))
    return artifact


@click.command("compile")
@click.argument("qdir", type=click.Path(path_type=Path))
@click.option("--target", "target_name", required=True, help="Target preset name (see `edgeforge targets`) or a .toml file.")
@click.option("--backend", type=click.Choice(["auto", "tvm", "onnx"]), default="auto", show_default=True,
              help="Compiler backend; auto picks the target file's first backend.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output folder (replaced atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print artifact.json's content as JSON.")
def compile_cmd(qdir, target_name, backend, out, as_json):
    """Compile a quantized model folder (QDIR) for one target.

    \b
    Example:
      edgeforge quantize smollm2-135m --quant q4f16 -o out/q4f16
      edgeforge compile out/q4f16 --target rpi5 --backend tvm -o out/rpi5-tvm
    """
    log = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    artifact = compile_qdir(qdir, target_name, backend, out, log=log)
    if as_json:
        click.echo(json.dumps(artifact, indent=1, sort_keys=True))
    else:
        click.echo(f"compiled {qdir} for {artifact.get('target', target_name)} with {artifact.get('backend', backend)} "
                   f"in {artifact['compile_seconds']} s -> {out}")
