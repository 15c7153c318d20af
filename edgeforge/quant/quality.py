"""The quality report every build records in its bundles (quality.json, and a summary in the manifest).

What quantization cost, measured on the weights the bundle actually ships: the mean KL(source ‖
quantized) of the next-token distributions and the perplexity ratio, both by the numpy reference
(teacher forcing) on a built-in original text (edgeforge/data/quality.txt) cut to a token budget.
"Source" is the checkpoint the build started from, as edgeforge's loader reads it: float weights for
safetensors, the dequantized values for a quantized GGUF (the report names the source format, so a
KL against an already-quantized source is read for what it is).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

FORMAT = "edgeforge-quality"
TEXT = Path(__file__).resolve().parents[1] / "data" / "quality.txt"
DEFAULT_TOKENS = 128  # ~30 s for a 1B model on 2 cores (two reference forwards); see docs/notes/quant.md


def measure(source, qdir: Path, max_tokens: int = DEFAULT_TOKENS, text_path: Path = TEXT) -> dict:
    """quality.json's content for the QDIR `qdir` quantized from the loaded model `source`."""
    from .eval import evaluate
    from .qdir import load_qdir

    text = Path(text_path).read_text(encoding="utf-8")
    quantized = load_qdir(qdir)
    scheme = quantized.source.get("scheme")
    t0 = time.perf_counter()
    logger.info(f"[quality] KL and perplexity of {scheme} against the source on {max_tokens} tokens of "
                f"{Path(text_path).name} ...")
    result = evaluate(source, [], text, max_tokens=max_tokens, compare={scheme: quantized})
    ref, row = result["rows"][0], result["rows"][-1]
    report = {
        "format": FORMAT, "version": 1, "scheme": scheme,
        "source_format": (getattr(source, "source", None) or {}).get("format"),
        "text": Path(text_path).name, "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "tokens": result["tokens"], "predictions": result["predictions"],
        "kl": round(row["kl"], 6), "ppl_source": round(ref["ppl"], 4), "ppl": round(row["ppl"], 4),
        "ppl_ratio": round(row["ppl_ratio"], 5), "seconds": round(time.perf_counter() - t0, 1),
        "method": "numpy reference, teacher forcing, mean KL(source || quantized) in nats per predicted token",
    }
    logger.info(f"[quality] {summary(report).removeprefix('quality: ')} ({report['seconds']} s)")
    return report


def skipped(reason: str) -> dict:
    return {"format": FORMAT, "version": 1, "skipped": reason}


NUMBERS = ("kl", "ppl", "ppl_source", "ppl_ratio", "predictions", "tokens")


def read(path: Path) -> dict:
    """A bundle's quality.json, checked: the format, then a reason or every number (EdgeforgeError
    naming the file and the key otherwise)."""
    from ..errors import EdgeforgeError
    from ..runtime.bundle_errors import BundleError
    from ..runtime.files import read_json

    try:
        report = read_json(path, FORMAT, 1)
    except BundleError as err:
        raise EdgeforgeError(str(err)) from None
    if "skipped" in report:
        if not isinstance(report["skipped"], str):
            raise EdgeforgeError(f"{path}: 'skipped' must be the reason (text)")
        return report
    for key in NUMBERS:
        value = report.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
            raise EdgeforgeError(f"{path}: '{key}' must be a non-negative number, got {value!r}")
    return report


def summary(report: dict | None) -> str:
    """One line for build output and inspect (of a report made here or checked by read())."""
    from ..runtime.smoke import printable

    if not report:
        return "quality: not recorded (bundle built before quality reports)"
    if "skipped" in report:
        return f"quality: not measured ({printable(report['skipped'])})"
    src = f", source {printable(report['source_format'])}" if report.get("source_format") else ""
    return (f"quality: KL {report['kl']:.4g} nats/token, perplexity x{report['ppl_ratio']:.4f} "
            f"({report['ppl']:.3f} vs {report['ppl_source']:.3f}) over {report['predictions']} predictions "
            f"of the built-in text ({printable(report.get('scheme', '?'))}{src})")
