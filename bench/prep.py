"""Model files for the peers, made once from edgeforge's own source model and cached.

Under ${EDGEFORGE_CACHE}/peers/models/<model>/:
  f32.gguf                  the float weights edgeforge starts from (bench/float_gguf.py)
  Q4_0.gguf, Q8_0.gguf ...  llama-quantize from f32.gguf
  hf/                       HF folder converted from the source GGUF by transformers
  genai-int4/, genai-int8/  ONNX Runtime GenAI builder output from hf/

Every output is written next to its final name and renamed, so an interrupted run never leaves a
half-written file that a later run would trust.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import peers  # noqa: E402
from float_gguf import write_f32_gguf  # noqa: E402


def models_dir(name: str) -> Path:
    path = peers.cache_root() / "models" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def f32_gguf(src: Path, name: str) -> Path:
    out = models_dir(name) / "f32.gguf"
    if not out.exists():
        peers.log(f"writing {out} from {src}")
        write_f32_gguf(src, out)
    return out


def llama_quant(src: Path, name: str, qtype: str, threads: int = 2) -> Path:
    """`llama-quantize f32.gguf <qtype>`; needs llama.cpp built (bench/peers.py)."""
    out = models_dir(name) / f"{qtype}.gguf"
    if out.exists():
        return out
    exe = peers.llama_tool("llama-quantize")
    if exe is None:
        raise RuntimeError("llama.cpp is not installed: run python bench/peers.py llama.cpp")
    part = out.with_name(out.name + ".part")
    subprocess.run(peers._nice([exe, f32_gguf(src, name), part, qtype, str(threads)]), check=True,
                   capture_output=True)
    os.replace(part, out)
    return out


def hf_folder(src: Path, name: str) -> Path:
    """HF folder of the same float weights: ORT GenAI's builder reads only HF checkpoints."""
    out = models_dir(name) / "hf"
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peers.log(f"converting {src} to an HF folder with transformers")
    tmp = Path(tempfile.mkdtemp(prefix=".hf-", dir=out.parent))
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype="float32")
    # transformers marks a GGUF-loaded model as "quantized" and refuses to save it: copy the
    # (already dequantized, float32) weights into a plain model of the same config instead.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(tmp)
    os.rename(tmp, out)
    return out


def genai_model(src: Path, name: str, precision: str) -> Path:
    """ORT GenAI CPU model at int4 (block 32, accuracy level 4) or int8, built from hf/."""
    out = models_dir(name) / f"genai-{precision}"
    if (out / "genai_config.json").exists():
        return out
    py = peers.genai_python()
    if py is None:
        raise RuntimeError("onnxruntime-genai is not installed: run python bench/peers.py ort-genai")
    hf = hf_folder(src, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".genai-{precision}-", dir=out.parent))
    extra = ["int4_block_size=32", "int4_accuracy_level=4"] if precision == "int4" else []
    cmd = [py, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", tmp / "model", "-p", precision,
           "-e", "cpu", "-c", tmp / "cache"]
    if extra:
        cmd += ["--extra_options", *extra]
    peers.log(f"building ORT GenAI {precision} model")
    subprocess.run(peers._nice(cmd), check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    os.rename(tmp / "model", out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out
