"""The files a web bundle ships from the npm packages (edgeforge.web.NPM_PACKAGES), and where the
toolchain put them. Only what the page loads is copied: ORT-web's WebGPU build (its WASM EP is in
the same binary) is one .mjs loader, one .mjs glue file and one .wasm (28.7 MB; the other dist
files are 145 MB)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import EdgeforgeError
from . import NPM_PACKAGES

# (npm package, file inside it, name under the bundle's web/vendor/)
VENDOR_FILES = (
    ("onnxruntime-web", "dist/ort.webgpu.min.mjs", "ort.webgpu.min.mjs"),
    ("onnxruntime-web", "dist/ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.mjs"),
    ("onnxruntime-web", "dist/ort-wasm-simd-threaded.asyncify.wasm", "ort-wasm-simd-threaded.asyncify.wasm"),
    ("@huggingface/tokenizers", "dist/tokenizers.min.mjs", "tokenizers.min.mjs"),
    ("@huggingface/tokenizers", "LICENSE", "LICENSE.tokenizers"),
    ("@huggingface/jinja", "dist/index.js", "jinja.mjs"),
    ("@huggingface/jinja", "LICENSE", "LICENSE.jinja"),
)


def node_modules(base: Path) -> Path:
    """The toolchain's node_modules, with every pinned package at its pinned version (else an error
    that says how to install them)."""
    modules = Path(base) / "node_modules"
    for name, version in NPM_PACKAGES.items():
        meta = modules / name / "package.json"
        try:
            found = json.loads(meta.read_text()).get("version")
        except (OSError, ValueError):
            found = None
        if found != version:
            raise EdgeforgeError(f"{meta}: need {name}@{version} (found {found or 'nothing'}); "
                                 "run `edgeforge toolchains install web`")
    return modules


def vendor_sources(base: Path) -> list[tuple[Path, str]]:
    """(source file, name under web/vendor/) for every file the page needs."""
    modules = node_modules(base)
    out = []
    for package, inside, name in VENDOR_FILES:
        path = modules / package / inside
        if not path.is_file():
            raise EdgeforgeError(f"{path}: missing from {package}@{NPM_PACKAGES[package]}; "
                                 "run `edgeforge toolchains install web --force`")
        out.append((path, name))
    return out
