"""Helpers for the bundle tests: run the CLI in-process, build tiny bundles, re-sign edited bundles."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeforge.cli import main
from edgeforge.runtime.manifest_check import write_manifest


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run `edgeforge ARGS` in this process; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def cli_without_gpu(*args) -> tuple[int, str, str]:
    """Run `edgeforge ARGS` in a child process that sees no CUDA device (CUDA_VISIBLE_DEVICES
    empty), so a "no GPU" case gives the same answer on a machine that has one."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "edgeforge.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def build_json(capsys, *args) -> dict:
    code, out, err = cli(capsys, "build", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def resign(bundle: Path, edit=None) -> dict:
    """Edit a bundle's manifest fields (edit(manifest) in place) and rewrite it with fresh checksums,
    as someone who changes a bundle on purpose would: verification then passes and only the
    behaviour checks can catch the change."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    if edit:
        edit(manifest)
    return write_manifest(bundle, manifest)


def copy_bundle(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


_BUILT: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def host_bundle(tiny_model, tmp_path_factory):
    """(bundle folder, archive, build summary): llama32 q4f32 for x86-cpu with the ONNX backend.

    Built once per test session (the fixture is imported by several modules; tests copy it before
    changing anything)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _BUILT:
        _BUILT[key] = _build_host_bundle(tiny_model, tmp_path_factory)
    return _BUILT[key]


def _build_host_bundle(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "edgeforge.cli", "build", str(tiny_model("llama32")),
                           "--quant", "q4f32", "--target", "x86-cpu", "--backend", "onnx", "-o", str(out),
                           "--archive", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    (b,) = summary["bundles"]
    return Path(b["path"]), Path(b["archive"]), summary


def assert_same_up_to_rounding(expected: list, got: list, where: str, atol: float = 5e-2) -> None:
    """`got` is `expected` ((token, logits) per step, greedy) up to the float rounding a reused prompt
    position may carry (runtime/prefix.py): logits within `atol`, the same tokens until a step where the
    expected top two are nearer than `atol` (there the answers may part, and the comparison ends)."""
    import numpy as np

    for step, ((token, seen), (want, logits)) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(seen, logits, rtol=0, atol=atol, err_msg=f"{where} step {step}")
        if token != want:
            top2 = np.sort(logits)[-2:]
            assert top2[1] - top2[0] < atol, f"{where} step {step}: {token} for {want}, not a near tie"
            return
