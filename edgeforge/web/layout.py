"""A web bundle's own files: the page (index.html at the top, web/*.mjs) and web/vendor/ (the
pinned npm files), in place of the Python runtime, smoke.py and requirements.txt of other bundles.

  BUNDLE/index.html   web/app.mjs engine.mjs tokenizer.mjs golden.mjs style.css
  BUNDLE/web/vendor/  ort.webgpu.min.mjs, ort-wasm-simd-threaded.asyncify.{mjs,wasm},
                      tokenizers.min.mjs, jinja.mjs and the licenses
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import EdgeforgeError
from . import NPM_PACKAGES, assets

SITE = Path(__file__).resolve().parent / "site"
PAGE_FILES = ("app.mjs", "engine.mjs", "tokenizer.mjs", "golden.mjs", "style.css")

# Browsers cap one WebAssembly memory at 4 GiB (wasm32). The graph and its data are copied into it
# and ONNX Runtime repacks the MatMulNBits weights while loading, so the data file must stay well
# under: a Llama-3.2-1B q4f16 data file (~0.9 GiB) loads, an 8B one (~4.5 GiB) never can.
MAX_DATA_BYTES = 2 << 30


def check_fits(qdir: Path, target_name: str) -> None:
    """Refuse, by name, a model whose weights cannot load in a browser tab (see MAX_DATA_BYTES)."""
    index = Path(qdir) / "model.safetensors.index.json"
    try:
        size = int(json.loads(index.read_text())["metadata"]["total_size"])
    except (OSError, ValueError, KeyError, TypeError):
        raise EdgeforgeError(f"{index}: cannot read the quantized weights' total size") from None
    if size > MAX_DATA_BYTES:
        raise EdgeforgeError(f"{qdir}: {size / 2**30:.2f} GiB of quantized weights is too large for target '{target_name}': "
                             f"a browser's WebAssembly memory is 4 GiB (wasm32) and a web bundle's weights must stay "
                             f"under {MAX_DATA_BYTES / 2**30:.0f} GiB (Llama-3.2-1B at q4f16 fits; use a smaller model "
                             "or scheme)")


def device_requirements(base: dict) -> dict:
    """What the phone or computer must have: a browser, not a Python."""
    out = {k: v for k, v in base.items() if k != "python"}
    out["browser"] = ("WebGPU (Chrome/Edge 113+ incl. Android, Safari 26+ incl. iOS) or, slower, WebAssembly "
                      "SIMD; threads need cross-origin isolation (COOP/COEP headers) and a secure context")
    return dict(sorted(out.items()))


def add_site(bundle: Path, toolchain: Path | None = None) -> dict[str, str]:
    """Copy the page and the vendor files into `bundle` (a private temp folder being built); returns
    the pinned npm packages (the manifest's runtime_requirements)."""
    if toolchain is None:
        from ..toolchains import ensure_web

        toolchain = ensure_web()
    web = bundle / "web"
    (web / "vendor").mkdir(parents=True)
    shutil.copyfile(SITE / "index.html", bundle / "index.html")
    for name in PAGE_FILES:
        shutil.copyfile(SITE / name, web / name)
    for src, name in assets.vendor_sources(toolchain):
        shutil.copyfile(src, web / "vendor" / name)
    return dict(NPM_PACKAGES)


README = """\
# {name}

{model_id} quantized with `{scheme}`, compiled by edgeforge {edgeforge} for target **web**: a static
site that runs the model in a browser with onnxruntime-web {ort}: on the GPU through WebGPU where
the browser has it, else on the CPU with WebAssembly (SIMD, and threads when the page is
cross-origin isolated). A phone needs nothing but the URL.

## Serve it

```
edgeforge serve {name}                                  # http://127.0.0.1:8000/ on this computer
edgeforge serve {name} --host 0.0.0.0 --port 8443 --certfile cert.pem --keyfile key.pem   # the LAN, HTTPS
python -m edgeforge.web.server {name} --port 8000       # the same server without the CLI
```

Any static server works if it sends `Cross-Origin-Opener-Policy: same-origin`,
`Cross-Origin-Embedder-Policy: require-corp` (WASM threads) and `.wasm` as `application/wasm`,
`.mjs` as `text/javascript`. Browsers allow WebGPU, WebCrypto (the checksum check) and threads
only in a secure context: https, or http on localhost. On Android, `adb reverse tcp:8000 tcp:8000`
makes the computer's server `http://localhost:8000/` on the phone.

## What the page does

Before anything runs it fetches every file it uses and checks its size and sha256 (WebCrypto)
against `manifest.json`; a modified file is refused by name. `index.html?mode=smoke` also checks
every listed file and runs the golden prompts (what `edgeforge smoke` runs in headless Chromium);
`?ep=wasm` or `?ep=webgpu` forces an execution provider.

## Files

| path | what |
|---|---|
| index.html, web/*.mjs, web/style.css | the chat page, the engine (embedding rows from the data file, KV cache, greedy and sampled decoding), the golden check |
| web/vendor/ | pinned npm files: {vendor} |
| artifact/ | model.onnx + model.onnx.data (artifact.json describes them) |
| tokenizer/ | tokenizer.json and tokenizer_config.json (chat template) |
| manifest.json, golden.json, quality.json | checksums and versions, golden tokens and logits, quality at build |
"""


def write_readme(bundle: Path, m: dict) -> None:
    vendor = ", ".join(f"{k} {v}" for k, v in NPM_PACKAGES.items())
    (bundle / "README.md").write_text(README.format(
        name=m["name"], model_id=m["model"]["id"], scheme=m["scheme"], edgeforge=m["toolchain"].get("edgeforge", "?"),
        ort=NPM_PACKAGES["onnxruntime-web"], vendor=vendor))
