"""Issue 13: every build measures what quantization cost (KL and perplexity ratio against the source
weights on a built-in text) and records it in each bundle; smoke and inspect print it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def _edf(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "edgeforge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def _bundle(out: Path) -> Path:
    (bundle,) = [p for p in out.iterdir() if (p / "manifest.json").is_file()]
    return bundle


@pytest.fixture(scope="module")
def built(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    bundles = {}
    for scheme in ("q4f16", "q8f16"):
        proc = _edf("build", tiny_model("llama32"), "--quant", scheme, "--target", "x86-cpu", "--backend", "onnx",
                    "-o", root / scheme, "--quality-tokens", "96", "--no-smoke")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "[quality] KL" in proc.stderr
        bundles[scheme] = _bundle(root / scheme)
    return bundles


def test_every_bundle_records_its_quality(built):
    for scheme, bundle in built.items():
        q = json.loads((bundle / "quality.json").read_text())
        assert q["format"] == "edgeforge-quality" and q["scheme"] == scheme and q["source_format"] == "hf"
        assert q["tokens"] == 96 and q["predictions"] == 95
        assert q["kl"] >= 0 and q["ppl"] > 0 and q["ppl_source"] > 0
        assert q["ppl_ratio"] == pytest.approx(q["ppl"] / q["ppl_source"], rel=1e-3)
        manifest = json.loads((bundle / "manifest.json").read_text())
        assert manifest["quality"] == {"kl": q["kl"], "ppl_ratio": q["ppl_ratio"], "predictions": 95}
        assert "quality.json" in manifest["files"]  # checksummed like everything else
    # the numbers mean something: 8-bit weights lose less than 4-bit ones
    kl = {s: json.loads((b / "quality.json").read_text())["kl"] for s, b in built.items()}
    assert 0 < kl["q8f16"] < kl["q4f16"], kl


def test_smoke_and_inspect_print_it(built):
    bundle = built["q4f16"]
    kl = json.loads((bundle / "quality.json").read_text())["kl"]
    proc = _edf("smoke", bundle)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("PASS") and "quality at build: KL" in proc.stdout
    proc = _edf("smoke", bundle, "--json")
    assert json.loads(proc.stdout)["quality"]["kl"] == kl
    proc = subprocess.run([sys.executable, "smoke.py"], cwd=bundle, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "quality at build: KL" in proc.stdout  # the bundle's own smoke.py too
    proc = _edf("inspect", bundle)
    assert proc.returncode == 0, proc.stderr
    assert "checksums ok" in proc.stdout and "quality: KL" in proc.stdout and "device install" in proc.stdout
    data = json.loads(_edf("inspect", bundle, "--json").stdout)
    assert data["quality"]["kl"] == kl and data["manifest"]["name"] == bundle.name


def test_inspect_refuses_a_modified_bundle(built, tmp_path):
    import shutil

    bundle = Path(shutil.copytree(built["q4f16"], tmp_path / "b"))
    q = json.loads((bundle / "quality.json").read_text())
    (bundle / "quality.json").write_text(json.dumps(dict(q, kl=0.0)))  # a prettier number, unsigned
    proc = _edf("inspect", bundle)
    assert proc.returncode == 2 and "quality.json" in proc.stderr and "Traceback" not in proc.stderr


def test_quality_can_be_skipped_with_a_reason(tiny_model, tmp_path):
    proc = _edf("build", tiny_model("llama32"), "--quant", "q4f16", "--target", "x86-cpu", "--backend", "onnx",
                "-o", tmp_path / "d", "--no-quality", "measured in the release job")
    assert proc.returncode == 0, proc.stderr[-2000:]
    bundle = _bundle(tmp_path / "d")
    q = json.loads((bundle / "quality.json").read_text())
    assert q["skipped"] == "measured in the release job" and "kl" not in q
    proc = _edf("smoke", bundle)
    assert "quality at build: not measured (measured in the release job)" in proc.stdout
    proc = _edf("build", tiny_model("llama32"), "--quant", "q4f16", "--target", "x86-cpu", "-o", tmp_path / "e",
                "--no-quality", "  ")
    assert proc.returncode == 2 and "--no-quality" in proc.stderr and not (tmp_path / "e").exists()


def test_a_malformed_quality_record_never_changes_the_verdict(built, tmp_path):
    """A re-signed manifest whose quality summary is garbage: smoke still says PASS (exit 0) and
    calls the line unreadable; inspect refuses a malformed quality.json by file and key."""
    import shutil

    from bundle_helpers import resign

    bundle = Path(shutil.copytree(built["q4f16"], tmp_path / "b"))
    resign(bundle, lambda m: m.update(quality={"kl": None, "ppl_ratio": "x", "predictions": [1]}))
    proc = _edf("smoke", bundle)
    assert proc.returncode == 0 and "quality at build: unreadable" in proc.stdout, proc.stderr[-1000:]
    proc = subprocess.run([sys.executable, "smoke.py"], cwd=bundle, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "unreadable" in proc.stdout and "Traceback" not in proc.stderr
    q = json.loads((bundle / "quality.json").read_text())
    (bundle / "quality.json").write_text(json.dumps(dict(q, kl=None)))
    resign(bundle)
    proc = _edf("inspect", bundle)
    assert proc.returncode == 2 and "quality.json" in proc.stderr and "'kl'" in proc.stderr
    resign(bundle, lambda m: m.update(target="rpi5"))  # a string where a table belongs
    (bundle / "quality.json").write_text(json.dumps(q))
    resign(bundle)
    proc = _edf("inspect", bundle)
    assert proc.returncode == 2 and "manifest.json" in proc.stderr and "internal error" not in proc.stderr


def test_no_quality_does_not_swallow_the_next_option(tiny_model, tmp_path):
    proc = _edf("build", tiny_model("llama32"), "--quant", "q4f16", "--target", "x86-cpu", "-o", tmp_path / "d",
                "--no-quality", "--no-smoke")
    assert proc.returncode == 2 and "--no-quality" in proc.stderr and not (tmp_path / "d").exists()
