"""README.md written into each bundle: what it is, what the device needs, how to check and use it."""

from __future__ import annotations

from pathlib import Path

from . import device_install
from .layout import requirement_line

TEMPLATE = """\
# {name}

{model_id} quantized with `{scheme}` ({model_dtype}), compiled by edgeforge {edgeforge} with
**{backend}** for target **{target}** ({description}).{kv_line}

## What the device needs

- {os} on {arch}{device_line}
- Python 3.10+ with the pinned packages of `requirements.txt`:

```
{requirements}
```

{install_size}
{extra}
## Check it on the device

```
pip install -r requirements.txt   # or --no-deps: it lists every package the runtime imports
python -I smoke.py         # PASS/FAIL, max logit error, token agreement, tok/s, peak memory
python -I smoke.py --json  # the same as one JSON object; exit 0 PASS, 1 FAIL, 2 unusable here
```

`smoke.py` first checks every file against `manifest.json` (sha256 and size) and refuses a modified or
incomplete bundle before any native code is loaded. `-I` keeps Python from reading PYTHON* variables and
the current folder while it starts, before smoke.py can check anything. It then runs the prompts of `golden.json` and
compares the logits with those of the numpy reference on the same quantized weights.

## Serve it

```
pip install starlette uvicorn
python3 -I serve.py --host 0.0.0.0 --api-key-file KEY   # an OpenAI-compatible API (/v1/chat/completions, ...)
```

`serve.py` checks every file the same way (`--trust PUB.pem`: and the signature) before it imports
anything from `runtime/`; its options are those of `edgeforge serve`.

## Use it from Python

```python
import sys; sys.path.insert(0, "runtime")
from edgeforge_runtime.loader import open_engine
engine = open_engine("artifact"{weights_arg})
logits = engine.prefill([1, 2, 3])   # float32 [vocab] for the last prompt position (numpy, or array('f') without numpy)
logits = engine.decode(max(range(len(logits)), key=logits.__getitem__))   # greedy
```

## Files

| path | what |
|---|---|
| manifest.json | model, scheme, target, backend, pinned requirements, toolchain versions, sha256 + size of every file |
| golden.json | prompts, expected greedy tokens and logits summary, tolerances |
| artifact/ | the compiled model (artifact.json describes it) |
{weights_row}| tokenizer/ | tokenizer.json and tokenizer_config.json (chat template) |
| runtime/edgeforge_runtime/ | edgeforge's device runtime (tokenizers, jinja2 + the backend runtime; numpy for ONNX bundles) |
| runtime/tvm/ | TVM bundles for Linux: TVM's runtime library and its _version.py (no compiler, no Python package: the engine uses tvm_ffi) |
| smoke.py | the smoke test above |
| serve.py | the server above |
"""


def render(m: dict) -> str:
    reqs = m["runtime_requirements"]
    dev_req = m.get("device_requirements") or {}
    device_line = f", device: {m['device']}" if m.get("device") and m["device"] != "cpu" else ""
    extra = "".join(f"- {k}: {v}\n" for k, v in sorted(dev_req.items()) if k not in ("os", "arch"))
    return TEMPLATE.format(
        name=m["name"], model_id=m["model"]["id"], scheme=m["scheme"], model_dtype=m["model_dtype"],
        edgeforge=m["toolchain"].get("edgeforge", "?"), backend=m["backend"], target=m["target"]["name"],
        description=m["target"].get("description", ""), os=m["target"]["os"], arch=m["target"]["arch"],
        device_line=device_line, requirements="\n".join(requirement_line(k, v) for k, v in reqs.items()),
        extra=("\nOther device requirements:\n\n" + extra) if extra else "",
        install_size=_sentence(device_install.summary(m.get("device_install"))) + (
            " The TVM runtime (without its compiler) is in `runtime/tvm/`, for this CPU and of the TVM version "
            "that compiled the model." if m.get("device_install", {}) and m["device_install"]["bundled_runtime_bytes"] else ""),
        kv_line=" KV cache: **int8** (static scales, keys per channel and values per KV head, calibrated at compile time)."
        if (m.get("kv_cache") or {}).get("dtype") == "int8" else "",
        weights_arg=', "weights"' if m.get("has_weights") else "",
        weights_row="| weights/ | quantized weights (QDIR layout) read by the TVM module |\n" if m.get("has_weights") else "",
    )


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def write_readme(bundle: Path, manifest_data: dict) -> None:
    (bundle / "README.md").write_text(render(manifest_data))
