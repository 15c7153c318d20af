"""The device-side files of a bundle: runtime copy, smoke.py, requirements.txt, README.md.

Bundle layout (see docs/BUNDLES.md):
  manifest.json  golden.json  artifact/  weights/ (TVM only)  tokenizer/
  runtime/edgeforge_runtime/  runtime/tvm/ (TVM bundles for Linux)  smoke.py  requirements.txt  README.md
"""

from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path

from .. import runtime as _runtime_pkg
from ..errors import EdgeforgeError

RUNTIME_SRC = Path(_runtime_pkg.__file__).resolve().parent
RUNTIME_DEST = Path("runtime") / "edgeforge_runtime"
# What every bundle's runtime imports besides the backend runtime (see edgeforge/runtime/__init__.py).
# markupsafe (jinja2's one dependency) is listed so that `pip install --no-deps -r requirements.txt` is
# complete: it skips huggingface-hub and its ~20 MB of dependencies that tokenizers declares but the
# runtime never imports (it reads tokenizer.json from the bundle).
BASE_REQUIREMENTS = ("numpy", "tokenizers", "jinja2", "markupsafe")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
WEIGHT_GLOBS = ("config.json", "quantization.json", "*.safetensors", "model.safetensors.index.json")

# What smoke.py and serve.py do before anything else: take the bundle off the import path, then the
# verifier (manifest_check.py) follows inline.
_PRELUDE = '''\
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# Nothing may come from the bundle before it is verified: take this folder off the import path, and
# never read Python bytecode caches from the bundle (nor write any into it).
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]  # '' is the current folder
sys.dont_write_bytecode = True
sys.pycache_prefix = os.devnull  # caches are looked up under a path that holds none

# ---- the verifier: edgeforge/runtime/manifest_check.py, copied in when the bundle was built ----
'''

SMOKE_HEAD = '''\
#!/usr/bin/env python3
"""Smoke-test this edgeforge bundle on this machine: `python smoke.py [--json] [--trust KEY.pem]`.

Needs only what requirements.txt lists (and the `cryptography` package for --trust). Exit codes:
0 PASS, 1 FAIL, 2 unusable bundle or machine. Every file is checked against manifest.json (and the
signature against the trusted key) by the code in this file and copied, as hashed, into a private
temporary folder that everything then runs from. This file ships inside the bundle: someone who can
rewrite the bundle can rewrite it too. Check a bundle you did not make with a verifier from outside
it first: `edgeforge verify BUNDLE --trust KEY.pem`, or openssl and sha256sum (docs/BUNDLES.md).
"""
''' + _PRELUDE

SERVE_HEAD = '''\
#!/usr/bin/env python3
"""Serve this edgeforge bundle over an OpenAI-compatible HTTP API on a device without edgeforge:
`python3 -I serve.py [--trust KEY.pem] [--host H] [--port P] [--api-key-file F] [...]` (the options of
`edgeforge serve`; `pip install starlette uvicorn` besides requirements.txt).

Every file is checked against manifest.json (and the signature against the trusted key) by the code in
this file before anything of runtime/ is imported (-I: no PYTHON* variables, no current folder on the
path), and the server then loads the model from a private verified copy. This file ships inside the
bundle: someone who can rewrite the bundle can rewrite it too. Check a bundle you did not make from
outside it first: `edgeforge verify BUNDLE --trust KEY.pem`, or openssl and sha256sum (docs/BUNDLES.md).
"""
''' + _PRELUDE

SMOKE_TAIL = '''
# ---- end of the verifier ----


def _verify_then_run():
    import json as _json

    args = smoke_arguments(sys.argv[1:], HERE)  # strict: exit 2 on any option it does not know
    try:
        # the runtime below is imported from a private copy of the very bytes verified here
        manifest, copy = verified_copy(Path(args.bundle), args.trust)
    except BundleError as err:
        if args.json:
            print(_json.dumps({"status": "ERROR", "error": str(err)}, indent=1))
        else:
            print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"checksums ok: {len(manifest['files'])} files" + (", signature ok" if args.trust else ""), file=sys.stderr)
    sys.path.insert(0, os.path.join(str(copy), "runtime"))
    from edgeforge_runtime.smoke import main

    return main(args=args, bundle=copy, verified=manifest)


if __name__ == "__main__":
    sys.exit(_verify_then_run())
'''


SERVE_TAIL = '''
# ---- end of the verifier ----


def _refuse(message):
    print(f"serve.py: {message}", file=sys.stderr)
    sys.exit(2)


def _trust_of(argv):
    """--trust KEY or --trust=KEY, at most once. The server's own parser would also read an abbreviation
    (--tr KEY) as --trust: refused here, so that the key checked before the import is the key it gets."""
    trust, seen = None, 0
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        name = arg.split("=", 1)[0]
        if name == "--trust":
            seen += 1
            trust = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
        elif len(name) > 2 and "--trust".startswith(name):
            _refuse(f"write --trust in full (got {arg!r})")
    if seen > 1:
        _refuse("--trust given twice")
    if seen and not trust:
        _refuse("--trust needs a public key file")
    return trust


def _verify_then_serve():
    argv = sys.argv[1:]
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    trust = _trust_of(argv)
    try:
        manifest = verify_bundle(Path(HERE), trust)  # runtime/ included: authentic before it is imported
    except BundleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"checksums ok: {len(manifest['files'])} files" + (", signature ok" if trust else ""), file=sys.stderr)
    sys.path.insert(0, os.path.join(HERE, "runtime"))
    from edgeforge_runtime.server import main

    return main([HERE, *argv])


if __name__ == "__main__":
    sys.exit(_verify_then_serve())
'''


def serve_py_text() -> str:
    """serve.py: the same verifier inline, then the bundle's own server."""
    return SERVE_HEAD + (RUNTIME_SRC / "manifest_check.py").read_text() + SERVE_TAIL


def write_serve_py(bundle: Path) -> None:
    path = bundle / "serve.py"
    path.write_text(serve_py_text())
    path.chmod(0o755)


def smoke_py_text() -> str:
    """smoke.py: the verifier's source inline between a header and the entry point."""
    return SMOKE_HEAD + (RUNTIME_SRC / "manifest_check.py").read_text() + SMOKE_TAIL


def copy_runtime(bundle: Path) -> None:
    """Copy edgeforge/runtime (sources only) to BUNDLE/runtime/edgeforge_runtime."""
    dest = bundle / RUNTIME_DEST
    shutil.copytree(RUNTIME_SRC, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo"))


def copy_backend_runtime(artifact: dict, bundle: Path) -> int:
    """The backend runtime a bundle carries itself (a runtime-only TVM for the device's CPU, instead
    of the ~300 MB compiler wheel); returns its bytes, 0 when the backend needs none."""
    spec = artifact.get("bundled_runtime")
    if not spec:
        return 0
    if spec.get("package") != "tvm":
        raise EdgeforgeError(f"artifact.json: unknown bundled runtime {spec.get('package')!r}")
    from ..backends.tvm.device_runtime import copy_runtime

    return copy_runtime(spec, bundle / "runtime")


def copy_tokenizer(qdir: Path, bundle: Path) -> None:
    (bundle / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(qdir / name, bundle / "tokenizer" / name)


def copy_weights(qdir: Path, bundle: Path) -> None:
    (bundle / "weights").mkdir()
    for pattern in WEIGHT_GLOBS:
        for path in sorted(qdir.glob(pattern)):
            shutil.copyfile(path, bundle / "weights" / path.name)


def pinned(dist: str) -> str:
    try:
        return f"{dist}=={metadata.version(dist)}"
    except metadata.PackageNotFoundError:
        return dist


def requirements(artifact: dict) -> dict[str, str]:
    """Pinned device requirements: the base libraries as installed here plus the backend runtime.
    A TVM bundle that carries its runtime needs no numpy (runtime/tvm_engine.py reads weights and
    logits without it): numpy is ~56 MB installed, more than all the rest of its device install."""
    reqs = {}
    numpy_free = bool(artifact.get("bundled_runtime")) and artifact.get("backend") == "tvm"
    for dist in BASE_REQUIREMENTS:
        if numpy_free and dist == "numpy":
            continue
        spec = pinned(dist)
        reqs[dist] = spec.split("==")[1] if "==" in spec else ""
    reqs.update(artifact.get("runtime") or {})
    return dict(sorted(reqs.items()))


def requirement_line(name: str, version: str) -> str:
    """`name==1.2.3` for a version; a specifier the backend gave (">=1.27") is kept as it is."""
    if not version:
        return name
    return f"{name}{version}" if version[0] in "<>=!~" else f"{name}=={version}"


def write_requirements(bundle: Path, reqs: dict[str, str]) -> None:
    lines = [requirement_line(name, ver) for name, ver in reqs.items()]
    (bundle / "requirements.txt").write_text("\n".join(lines) + "\n")


def write_smoke_py(bundle: Path) -> None:
    path = bundle / "smoke.py"
    path.write_text(smoke_py_text())
    path.chmod(0o755)
