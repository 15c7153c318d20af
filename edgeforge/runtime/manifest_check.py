"""manifest.json: the canonical writer, the checksum verification and the signature check.

This module runs before any code of the bundle it checks: `edgeforge smoke` uses the installed copy,
and every bundle's smoke.py carries its text inline (bundle/layout.py), so `python smoke.py` checks
the runtime folder before importing from it. Hence: standard library only, no relative import
(the package fallbacks below), and nothing here imports anything from the bundle.

What it proves (docs/BUNDLES.md, "Integrity and authenticity"):
  - checksums: every file's sha256 and size against manifest.json, which hashes itself
    (`manifest_sha256`) and must be byte-for-byte canonical. This catches corruption and accidental
    edits. It is no proof of origin: anyone can rewrite a bundle and its manifest.
  - signature (`manifest.sig`, ed25519 over manifest.json's bytes): who made it. Checked when the
    user names a public key they trust (`--trust KEY.pem`); needs the `cryptography` package.
No file may be added: bytecode caches (__pycache__) included, since Python would load them.
"""

import argparse
import atexit
import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

try:
    from .bundle_errors import BundleError
except ImportError:  # inlined into a bundle's smoke.py

    class BundleError(Exception):
        exit_code = 2


MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"  # the raw 64-byte ed25519 signature of manifest.json (openssl pkeyutl -rawin)
CHECKSUMS = "SHA256SUMS"  # `sha256sum -c` format: every file but the three named here (docs/BUNDLES.md)
FORMAT = "edgeforge-bundle"
VERSION = 1
SELF_KEY = "manifest_sha256"
UNLISTED = {MANIFEST, SIGNATURE}  # the manifest cannot list itself, nor the signature over it
MAX_MANIFEST_BYTES = 64 << 20  # a manifest lists files; even a 100-shard model's is < 1 MB
MAX_KEY_BYTES = 64 << 10
VERIFIED_PREFIX = ".edgeforge-verified.tmp-"  # verified_copy's private folders (owned_temp_dir names)


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")


def list_files(root: Path) -> list:
    """Every file below root (POSIX relative paths, sorted), except manifest.json and manifest.sig."""
    out = []

    def unreadable(err: OSError):
        # os.walk skips a folder it cannot list (mode 0311 for a user who is not its owner), and an
        # unlisted file in it would go unseen: refuse the bundle instead
        raise BundleError(f"{err.filename}: cannot list this folder ({err.strerror}); every folder of a bundle "
                          "must be readable to verify that it holds only listed files")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames.sort()
        # os.walk does not descend into linked folders: list them so that they are refused.
        out.extend(Path(dirpath, d).relative_to(root).as_posix() for d in dirnames if Path(dirpath, d).is_symlink())
        for name in filenames:
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if rel not in UNLISTED:
                out.append(rel)
    return sorted(out)


def file_table(root: Path) -> dict:
    root = Path(root)
    return {rel: {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}
            for rel in list_files(root)}


def write_manifest(root: Path, data: dict) -> dict:
    """Add format, the file table and the self hash to `data`; write root/manifest.json."""
    root = Path(root)
    write_checksums(root)
    body = {k: v for k, v in data.items() if k != SELF_KEY}
    body.update(format=FORMAT, version=VERSION, files=file_table(root))
    body[SELF_KEY] = hashlib.sha256(canonical_bytes({k: v for k, v in body.items() if k != SELF_KEY})).hexdigest()
    (root / MANIFEST).write_bytes(canonical_bytes(body))
    return body


def write_checksums(root: Path) -> None:
    """SHA256SUMS: what `sha256sum --strict -c SHA256SUMS` checks on a device without edgeforge. It
    is listed (hashed) in manifest.json like any file, so a signature over the manifest covers it."""
    lines = [f"{sha256_file(Path(root) / rel)}  {rel}\n" for rel in list_files(root) if rel != CHECKSUMS]
    (Path(root) / CHECKSUMS).write_text("".join(lines), encoding="utf-8")


def read_regular(path: Path, limit: int, what: str = "file", follow_links: bool = False) -> bytes:
    """The bytes of a regular file (not a device or fifo, and not a link unless `follow_links`:
    checked on the open descriptor), refused by name past `limit` bytes. Every file edgeforge reads
    whole goes through here (bundle files, keys, model configs, texts), so none can hang on a fifo
    or fill memory from /dev/zero."""
    path = Path(path)
    nofollow = 0 if follow_links else getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, os.O_RDONLY | nofollow | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise BundleError(f"{path}: missing") from None
    except OSError as err:
        raise BundleError(f"{path}: cannot open {what} ({err.strerror}"
                          + ("" if follow_links else "; links are refused") + ")") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"{path}: not a regular file ({what})")
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{path}: larger than {limit} bytes: not a {what}")
    return data


def read_manifest(root: Path, raw: bytes | None = None) -> dict:
    """Parse manifest.json (or `raw`, its bytes as read once) and check its self hash; BundleError
    naming manifest.json otherwise."""
    path = Path(root) / MANIFEST
    if raw is None:
        if not path.is_file() or path.is_symlink():
            raise BundleError(f"{path}: missing: not a bundle, or an incomplete one")
        raw = read_regular(path, MAX_MANIFEST_BYTES, "manifest")
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise BundleError(f"{path}: corrupt (not JSON: {err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{path}: not an edgeforge bundle manifest")
    if data.get("version") != VERSION:
        raise BundleError(f"{path}: bundle format version {data.get('version')!r}, this runtime reads {VERSION}")
    if not isinstance(data.get("files"), dict):
        raise BundleError(f"{path}: has no file table")
    claimed = data.get(SELF_KEY)
    body = {k: v for k, v in data.items() if k != SELF_KEY}
    if hashlib.sha256(canonical_bytes(body)).hexdigest() != claimed or canonical_bytes(data) != raw:
        raise BundleError(f"{path}: modified or corrupt (its self checksum does not match)")
    return data


def verify_bundle(root: Path, trust=None, copy_to=None) -> dict:
    """Check the signature (when `trust` names a public key file), manifest.json, then every file's
    presence, type, size and sha256; refuse extra files. Returns the manifest.

    copy_to: an empty private folder; every file is copied there from the very bytes that were
    hashed (manifest.json and manifest.sig too), so what is used afterwards (from the copy) is what
    was verified, whatever happens to `root` meanwhile. manifest.json is read once: the signature,
    the self hash and the file table are all checked on the same bytes."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file() or path.is_symlink():
        raise BundleError(f"{path}: missing: not a bundle, or an incomplete one")
    raw = read_regular(path, MAX_MANIFEST_BYTES, "manifest")
    signature = verify_signature(root, trust, raw) if trust is not None else None
    manifest = read_manifest(root, raw)
    files = manifest["files"]
    for rel, entry in sorted(files.items()):
        _check_file(root, rel, entry, copy_to)
    extra = [rel for rel in list_files(root) if rel not in files]
    if extra:
        why = ("Python bytecode caches are never loaded from a bundle; delete the folder"
               if "__pycache__" in extra[0].split("/") else "unexpected file in the bundle")
        raise BundleError(f"{root / extra[0]}: not listed in manifest.json ({why})")
    if copy_to is not None:
        Path(copy_to, MANIFEST).write_bytes(raw)
        if signature is not None:
            Path(copy_to, SIGNATURE).write_bytes(signature)
    if "golden.json" in files and "artifact/artifact.json" in files:
        check_tolerance(copy_to if copy_to is not None else root, manifest)
    return manifest


def verified_copy(root: Path, trust=None) -> tuple:
    """(manifest, folder): verify `root` into a new private temporary folder (mode 0700, under
    TMPDIR), removed when this process exits; load everything from that folder. Costs the bundle's
    size on disk while the process runs (the price of using exactly what was verified)."""
    parent = tempfile.gettempdir()
    clean_stale_temps(Path(parent))  # copies of runs killed with SIGKILL
    copy = held_temp_dir(f"{VERIFIED_PREFIX}{os.getpid()}-", parent)
    try:
        manifest = verify_bundle(root, trust, copy_to=copy)
    except BaseException:
        shutil.rmtree(copy, ignore_errors=True)
        raise
    return manifest, copy


# ---- private temporary folders ----------------------------------------------------------------
# Named `.NAME.tmp-PID-XXXX` (the PID for people only), each with a sibling `.NAME.tmp-PID-XXXX.lock`:
# a marker file edgeforge writes, flock'ed for as long as the folder is in use. A process killed with
# SIGKILL leaves both behind; the next run removes the folder only when the lock file is edgeforge's
# marker and its lock is free, which holds across containers and PID namespaces where a PID means
# nothing, and never touches a folder that merely looks like ours. (Here, not in edgeforge/fsutil.py,
# because the verified copies of bundles use them on devices too: this file is smoke.py's verifier.)

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[^/]+$")
LOCK_SUFFIX = ".lock"
MARKER = b"edgeforge temporary folder: removed by the next edgeforge run once unlocked\n"


@contextlib.contextmanager
def owned_temp_dir(prefix: str, parent: str | os.PathLike):
    """A new temporary folder in `parent`, marked as edgeforge's and locked while the block runs
    (its sibling lock file, see the module docstring); removed, with its lock file, at the end."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    lock = tmp.with_name(tmp.name + LOCK_SUFFIX)
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, MARKER)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when renamed into place
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)



def held_temp_dir(prefix: str, parent) -> Path:
    """owned_temp_dir for the rest of this process: removed at exit (atexit; a SIGKILL leaves it to
    the next run's clean_stale_temps)."""
    owned = owned_temp_dir(prefix, parent)
    folder = owned.__enter__()
    atexit.register(owned.__exit__, None, None, None)
    return folder


def clean_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary folders in `folder` that edgeforge made and nobody uses any more (their
    lock file is edgeforge's marker and unlocked), and such lock files left without a folder."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if entry.name.endswith(LOCK_SUFFIX):
            continue
        if _TMP_RE.match(entry.name) and entry.is_dir() and not entry.is_symlink():
            if _remove_if_abandoned(entry, entry.with_name(entry.name + LOCK_SUFFIX)):
                removed.append(entry)
    for entry in entries:  # a run killed between removing its folder and its lock file
        if entry.name.endswith(LOCK_SUFFIX) and _TMP_RE.match(entry.name[: -len(LOCK_SUFFIX)]) \
                and not entry.with_name(entry.name[: -len(LOCK_SUFFIX)]).exists():
            _remove_if_abandoned(None, entry)
    return removed


def _remove_if_abandoned(folder: Path | None, lock: Path) -> bool:
    """Remove `folder` and `lock` when `lock` is a regular file holding MARKER whose flock is free."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False  # no marker: not ours (or not ours to judge)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or os.read(fd, len(MARKER) + 1) != MARKER:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # in use by a live run, here or in another container
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            lock.unlink()
        return True
    finally:
        os.close(fd)


# ---- the smoke tolerance a bundle may claim ------------------------------------------------------
# golden.json's tolerance ("rel", a fraction of the golden logit range at each step) comes from the
# bundle, so anyone who rewrites a bundle could claim any. The verifier allows at most what the
# bundle's compute path needs, from this table (measured: docs/BUNDLES.md, "Tolerances"), and
# refuses golden data computed for another arithmetic than the artifact's.
FLOAT32 = "float32"  # golden arithmetic: the numpy reference in float32 on the dequantized weights
INT8_ACTIVATIONS = "int8-activations"  # ... with every quantized matmul's input rounded to int8 blocks
INT8_ACTIVATIONS_ARM = "int8-activations-arm"  # ... as ONNX Runtime's aarch64 kernels round them (below)
INT8_KV = "+int8-kv"  # ... and keys/values rounded as the int8 KV cache stores them (artifact kv_dtype int8)
# A compute path's tolerance: (golden arithmetic, largest rel a bundle may claim, dither). rel is a
# fraction of each step's golden logit range. `dither` (None: no widening) is the relative noise the
# engine's rounded inputs may carry beyond what the golden arithmetic follows (float order of the
# kernels, float16 activations): golden.json then records, per step, the `spread` of K reference runs
# whose rounded inputs were dithered by it (bundle/golden.py). A model that amplifies that noise shows
# it there, and that step's tolerance widens to SPREAD_FACTOR x spread (at most WIDEST of the range).
# The verifier bounds the widening: at least 1 - MAX_WIDENED_SHARE of the steps keep `rel`, and no
# step widens past WIDEST, so an artifact that is wrong everywhere (wrong weights, norms, rope) still
# fails (docs/BUNDLES.md).
TOLERANCES = {
    "float32": (FLOAT32, 1e-3, None),
    "float16": (FLOAT32, 2e-2, None),
    "webgpu-float16": (FLOAT32, 4e-2, None),
    # x86: the golden data rounds like MLAS's int8 blocks to 8e-6 per matmul; an input within a few
    # ulps of a rounding boundary may still flip (a sum in another order), which some models amplify.
    # The dither is wider than that noise because a run must flip the same code as the engine: at
    # 1e-5 and 3e-5, 8 runs missed it on one of 72 models (docs/notes/bundle.md, Session 11)
    "int8-activations-x86_64": (INT8_ACTIVATIONS, 3e-2, 1e-4),
    # aarch64 with the dot-product extension (what `smoke --emulate` runs: qemu cortex-a76): 4-bit
    # weights without zero points go through KleidiAI (input: one asymmetric int8 grid per row;
    # weight scales cut to bfloat16), 4-bit with zero points and 8-bit through MLAS's int8 blocks
    # (like x86). The golden data follows that to 4e-8 per matmul; the 8-bit kernel adds ~8e-6 of
    # float noise (docs/notes/bundle.md, Session 10)
    "int8-activations-aarch64": (INT8_ACTIVATIONS_ARM, 8e-2, 1e-4),
    # ... computing in float16 (rpi5's default for *f16 schemes): activations carry float16's
    # rounding (half an ulp: 4.9e-4), which no golden arithmetic follows: a dither of twice that
    "int8-activations-aarch64-float16": (INT8_ACTIVATIONS_ARM, 8e-2, 1e-3),
    # web bundles: float32 graph, MatMulNBits accuracy_level 0; measured ~1e-6 of the range on WASM
    # (SmolLM2 q4f16) and on WebGPU (SwiftShader, tiny models): docs/notes/web.md
    "browser-float32": (FLOAT32, 1e-3, None),
    # int8 KV cache (ONNX CPU, float32 compute): the golden data rounds K/V the same way
    # (model/kv_int8.py), so the bound is that of the same path with a float cache
    "float32" + INT8_KV: (FLOAT32 + INT8_KV, 1e-3, None),
    "int8-activations-x86_64" + INT8_KV: (INT8_ACTIVATIONS + INT8_KV, 3e-2, 1e-4),
    "int8-activations-aarch64" + INT8_KV: (INT8_ACTIVATIONS_ARM + INT8_KV, 8e-2, 1e-4),
}
SPREAD_FACTOR = 2.0  # a step's tolerance: max(rel, SPREAD_FACTOR x its spread), at most WIDEST
WIDEST = 0.5  # of the step's logit range
# of all golden steps: the rest are checked at the path's own rel. Measured on 72 outlier models: at
# most 79% widened (x86), 38% typical; a wrong artifact exceeded its tolerance on >= 12% of the steps
MAX_WIDENED_SHARE = 0.9


def step_rel(rel: float, spread) -> float:
    """The tolerance of one golden step (fraction of its range): the path's rel, widened where the
    golden data measured that the model amplifies its compute path's rounding noise."""
    return max(rel, min(SPREAD_FACTOR * float(spread or 0.0), WIDEST))


def compute_path(artifact: dict, arch: str) -> str:
    """Which row of TOLERANCES an artifact computes by (artifact.json, the target's arch)."""
    onnx = artifact.get("onnx") if isinstance(artifact.get("onnx"), dict) else {}
    if onnx.get("kv_dtype") == "int8":
        path = _float_kv_path(artifact, onnx, arch) + INT8_KV
        if path not in TOLERANCES:  # compile.py builds int8 caches only on float32 CPU graphs
            raise BundleError(f"artifact.json: an int8 KV cache with the {path[: -len(INT8_KV)]} compute path is not supported")
        return path
    return _float_kv_path(artifact, onnx, arch)


def _float_kv_path(artifact: dict, onnx: dict, arch: str) -> str:
    dtype = onnx.get("compute_dtype") or artifact.get("model_dtype") or FLOAT32
    if artifact.get("device") == "browser":
        return "browser-float32" if dtype == FLOAT32 else "float16"
    if onnx.get("accuracy_level") == 4 and onnx.get("execution_provider", "CPUExecutionProvider") == "CPUExecutionProvider":
        if arch == "x86_64":
            return "int8-activations-x86_64"
        return "int8-activations-aarch64-float16" if dtype == "float16" else "int8-activations-aarch64"
    if str(artifact.get("device", "")).startswith("webgpu") and dtype == "float16":
        return "webgpu-float16"
    return FLOAT32 if dtype == FLOAT32 else "float16"


def check_tolerance(root: Path, manifest: dict) -> None:
    """golden.json's tolerance and arithmetic must be what the artifact's compute path allows."""
    root = Path(root)
    try:
        artifact = json.loads((root / "artifact" / "artifact.json").read_bytes())
        golden = json.loads((root / "golden.json").read_bytes())
        golden["tolerance"]["rel"]  # noqa: B018 - present, or refused below as unreadable
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        raise BundleError(f"{root / 'golden.json'}: unreadable tolerance or artifact.json ({err})") from None
    target = manifest.get("target")
    if not isinstance(target, dict) or not isinstance(artifact, dict) or not isinstance(golden, dict):
        raise BundleError(f"{root / MANIFEST}: malformed target, golden.json or artifact.json (expected JSON objects)")
    onnx = artifact.get("onnx") if isinstance(artifact.get("onnx"), dict) else {}
    claimed = manifest.get("kv_cache", {}).get("dtype") if isinstance(manifest.get("kv_cache"), dict) else None
    if onnx and claimed is not None and claimed != onnx.get("kv_dtype"):
        raise BundleError(f"{root / MANIFEST}: kv_cache dtype {claimed!r}, but artifact.json's is {onnx.get('kv_dtype')!r}")
    check_golden(root / "golden.json", golden, compute_path(artifact, str(target.get("arch", ""))))


def check_golden(where, golden: dict, path: str) -> None:
    """Golden data (`where` names it in errors) must be what compute path `path` allows: its
    arithmetic, a tolerance within the path's cap, and per-step spreads within _check_spreads' bounds.
    `build` runs this too, before writing a bundle the verifier would refuse."""
    arithmetic, cap, dither = TOLERANCES[path]
    if golden.get("arithmetic", FLOAT32) != arithmetic:
        raise BundleError(f"{where}: computed with {golden.get('arithmetic', FLOAT32)!r} arithmetic, but "
                          f"the artifact computes by {path!r}, which needs {arithmetic!r} golden data (rebuild the bundle)")
    rel = golden["tolerance"]["rel"]
    per_ep = golden["tolerance"].get("per_ep", {})  # web bundles: one bound per execution provider
    if not isinstance(per_ep, dict):
        raise BundleError(f"{where}: tolerance per_ep must be an object")
    for value in [rel, *per_ep.values()]:
        _check_claimed(where, value, cap, path)
    _check_spreads(where, golden, rel, dither, path)
    _check_steps(where, golden)


MAX_TOP_K = 64  # golden.json keeps the top 8 logits a step (bundle/golden.py TOP_K)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_steps(where, golden: dict) -> None:
    """Each step must be what bundle/golden.py's step_summary writes of real logits, so that no
    rewrite of golden.json makes a comparison vacuous: top_k distinct ids and their values, falling,
    the first one the greedy token and the step's max, the min below them all; one step per golden
    token (the widening cap counts the steps that are compared), and at least one decode step."""
    top_k = golden.get("top_k")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise BundleError(f"{where}: top_k {top_k!r} is not an integer in [1, {MAX_TOP_K}]")
    prompts = golden.get("prompts")
    if not isinstance(prompts, list) or not prompts:
        raise BundleError(f"{where}: no golden prompts")
    for n, prompt in enumerate(prompts):
        at = f"{where}: prompt {n}"
        if not isinstance(prompt, dict):
            raise BundleError(f"{at}: malformed (expected an object)")
        tokens, steps, ids = prompt.get("tokens"), prompt.get("steps"), prompt.get("prompt_ids")
        if not isinstance(ids, list) or not ids or not all(_token(t) for t in ids):
            raise BundleError(f"{at}: prompt_ids must be a non-empty list of token ids")
        if not isinstance(tokens, list) or not tokens or not all(_token(t) for t in tokens):
            raise BundleError(f"{at}: tokens must be a non-empty list of token ids")
        if not isinstance(steps, list) or len(steps) != len(tokens):
            raise BundleError(f"{at}: {len(steps) if isinstance(steps, list) else 'no'} steps for {len(tokens)} "
                              "tokens (one step a token)")
        for i, (token, step) in enumerate(zip(tokens, steps)):
            _check_step(f"{at} step {i}", step, token, top_k)
    if all(len(p["tokens"]) < 2 for p in prompts):
        raise BundleError(f"{where}: no prompt has a decode step (every prompt stops at its first token), so "
                          "a smoke test would check the prefill alone")


def _token(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def _check_step(at: str, step, token: int, top_k: int) -> None:
    if not isinstance(step, dict):
        raise BundleError(f"{at}: malformed (expected an object)")
    ids, values, top, low = step.get("top_ids"), step.get("top_logits"), step.get("max"), step.get("min")
    if not (isinstance(ids, list) and len(ids) == top_k and all(_token(t) for t in ids) and len(set(ids)) == top_k):
        raise BundleError(f"{at}: top_ids must be {top_k} distinct token ids")
    if not (isinstance(values, list) and len(values) == top_k and all(_number(v) for v in values)
            and all(a >= b for a, b in zip(values, values[1:]))):
        raise BundleError(f"{at}: top_logits must be {top_k} finite numbers, largest first")
    if not (_number(top) and _number(low) and top == values[0] and low <= values[-1]):
        raise BundleError(f"{at}: max must be the first top logit and min at most the last "
                          f"(got max {top!r}, min {low!r}): the tolerance is a fraction of max - min")
    if ids[0] != token:
        raise BundleError(f"{at}: the golden token {token} is not the step's top id {ids[0]}")


def _check_spreads(where, golden: dict, rel: float, dither, path: str) -> None:
    """Per-step spreads (see TOLERANCES): numbers >= 0, measured with the path's own dither, and
    widening at most MAX_WIDENED_SHARE of the steps, so that no model hides a wrong artifact
    behind its own sensitivity."""
    prompts = golden.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, dict) and isinstance(p.get("steps"), list) for p in prompts):
        raise BundleError(f"{where}: malformed prompts (expected a list of objects with steps)")
    steps = [s for p in prompts for s in p["steps"]]
    if not all(isinstance(s, dict) for s in steps):
        raise BundleError(f"{where}: malformed steps (expected objects)")
    spreads = [s["spread"] for s in steps if "spread" in s]
    if not spreads:
        return
    measured = golden.get("sensitivity", {}).get("dither") if isinstance(golden.get("sensitivity"), dict) else None
    if dither is None or measured != dither:
        raise BundleError(f"{where}: per-step spreads measured with dither {measured!r}, but a {path} bundle's is "
                          f"{dither!r} (rebuild the bundle)")
    if len(spreads) != len(steps) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf") for v in spreads):
        raise BundleError(f"{where}: every step's spread must be a finite number >= 0")
    widened = sum(step_rel(rel, v) > rel for v in spreads)
    if widened > MAX_WIDENED_SHARE * len(steps):
        raise BundleError(
            f"{where}: {widened} of {len(steps)} golden steps need a tolerance wider than {rel} (the most is "
            f"{MAX_WIDENED_SHARE:.0%}): this model amplifies the rounding of the {path} compute path so much that a "
            "smoke test could not tell a wrong artifact from it; compile it to compute in float32 "
            "([onnx] accuracy_level = 1 in a target file) or use another quantization scheme")


def _check_claimed(where, rel, cap: float, path: str) -> None:
    if isinstance(rel, bool) or not isinstance(rel, (int, float)) or not 0 < rel <= cap:
        raise BundleError(f"{where}: tolerance {rel!r} is not in (0, {cap}], the most a {path} "
                          "bundle may claim (docs/BUNDLES.md, Tolerances)")


def _check_file(root: Path, rel: str, entry, copy_to=None) -> None:
    if not isinstance(rel, str) or not isinstance(entry, dict) or Path(rel).is_absolute() or ".." in Path(rel).parts \
            or rel in UNLISTED or not rel:
        raise BundleError(f"{root / MANIFEST}: file entry {rel!r} is malformed or leaves the bundle")
    path = root / rel
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise BundleError(f"{path}: not a regular file (links and devices are refused)")
    if not path.exists():
        raise BundleError(f"{path}: missing (incomplete bundle)")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise BundleError(f"{path}: cannot open ({err.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # swapped for a folder, device or fifo since the check above
        os.close(fd)
        raise BundleError(f"{path}: not a regular file (links and devices are refused)")
    with os.fdopen(fd, "rb") as f:
        if info.st_size != entry.get("size"):
            raise BundleError(f"{path}: size {info.st_size} bytes, manifest says {entry.get('size')} (truncated or modified)")
        digest = _hash_and_copy(f, Path(copy_to) / rel if copy_to is not None else None, info.st_mode)
    if digest != entry.get("sha256"):
        raise BundleError(f"{path}: sha256 does not match manifest.json (modified or corrupt)")


def _hash_and_copy(f, dest, mode: int, chunk: int = 1 << 20) -> str:
    """sha256 of an open file, writing the same bytes to `dest` (when given) as they are hashed."""
    h = hashlib.sha256()
    out = None
    if dest is not None:
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        out = open(dest, "xb")
    try:
        while block := f.read(chunk):
            h.update(block)
            if out is not None:
                out.write(block)
    finally:
        if out is not None:
            out.flush()
            start_writeback(out.fileno())
            out.close()
            os.chmod(dest, 0o700 if mode & 0o111 else 0o600)
    return h.hexdigest()


def start_writeback(fd: int) -> None:
    """Ask the kernel to write a just-written file back now and to drop what is already clean
    (POSIX_FADV_DONTNEED: Linux starts the writeback without waiting for it to be durable).

    Why: the engine maps the verified copy's weights, and while ONNX Runtime packs them it hands the
    mapping's pages back (PageOutWhileLoading). The kernel can drop only clean pages, and a fresh copy
    stays dirty for ~30 s (dirty_expire_centisecs), so its pages stayed resident on top of the packed
    weights. 1B q4f16: decode peak 1179 MiB from a fresh copy, 1120 MiB with this (Session 15). A
    copy on tmpfs is RAM either way; elsewhere (no posix_fadvise) this does nothing."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


# ---- signatures -------------------------------------------------------------------------------

def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise BundleError("checking a signature needs the 'cryptography' package (pip install cryptography)") from None
    return serialization, ed25519


def raw_public_key(key) -> bytes:
    serialization, _ = _crypto()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public_key(path):
    serialization, ed25519 = _crypto()
    try:
        # the user names the key (a link such as keys/current.pem is theirs to make); a bundle never does
        key = serialization.load_pem_public_key(read_regular(path, MAX_KEY_BYTES, "public key file", follow_links=True))
    except ValueError as err:
        raise BundleError(f"{path}: not a PEM public key ({err})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise BundleError(f"{path}: not an ed25519 public key (make one with `openssl genpkey -algorithm ed25519`)")
    return key


def load_private_key(path):
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(read_regular(path, MAX_KEY_BYTES, "signing key file", follow_links=True),
                                                 password=None)
    except (ValueError, TypeError) as err:
        raise BundleError(f"{path}: not an unencrypted PEM private key ({err})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise BundleError(f"{path}: not an ed25519 private key (make one with `openssl genpkey -algorithm ed25519`)")
    return key


def sign_bundle(root: Path, key_path) -> dict:
    """Write manifest.sig: the raw ed25519 signature of manifest.json's bytes (which hash every
    file), as `openssl pkeyutl -sign -rawin` makes and `-verify -rawin` checks it."""
    root = Path(root)
    key = load_private_key(key_path)
    public = raw_public_key(key.public_key())
    (root / SIGNATURE).write_bytes(key.sign((root / MANIFEST).read_bytes()))
    return {"algorithm": "ed25519", "key_id": hashlib.sha256(public).hexdigest()[:16]}


def verify_signature(root: Path, trust, manifest_bytes: bytes | None = None) -> bytes:
    """Refuse an unsigned bundle or a signature that is not the trusted key's over manifest.json
    (`manifest_bytes`: its bytes as the caller read them, so that what is signed is what is used).
    Returns the signature."""
    root = Path(root)
    key = load_public_key(trust)
    path = root / SIGNATURE
    if not path.is_file() or path.is_symlink():
        raise BundleError(f"{root}: not signed (no {SIGNATURE}); --trust {trust} accepts signed bundles only")
    signature = read_regular(path, 64, "signature (64 bytes of ed25519)")
    if manifest_bytes is None:
        manifest_bytes = read_regular(root / MANIFEST, MAX_MANIFEST_BYTES, "manifest")
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(signature, manifest_bytes)
    except InvalidSignature:
        raise BundleError(f"{path}: not a signature of manifest.json by the trusted key {trust} "
                          f"({hashlib.sha256(raw_public_key(key)).hexdigest()[:16]}): signed by another key, "
                          "or modified after signing") from None
    return signature


# ---- smoke.py's command line (parsed here: smoke.py carries this file inline) ------------------

class _Once(argparse.Action):
    """An option that may be given once: a second --trust must not silently replace the first."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} given twice")
        setattr(namespace, self.dest, values)


def smoke_arguments(argv, default_bundle: str) -> argparse.Namespace:
    """smoke.py's options, strictly: no abbreviations (--tru), unknown options are errors (exit 2),
    --trust at most once and with a value. Every spelling that names --trust gets it checked."""
    ap = argparse.ArgumentParser(prog="smoke.py", allow_abbrev=False,
                                 description="Smoke-test this edgeforge bundle on this machine.")
    ap.add_argument("bundle", nargs="?", default=default_bundle, help="bundle folder (default: this one)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--device", default=None, help="device override, e.g. cuda:1")
    ap.add_argument("--prompts", type=int, default=None, metavar="N", help="check only the first N golden prompts")
    ap.add_argument("--trust", action=_Once, default=None, metavar="KEY.pem",
                    help="refuse the bundle unless signed by this ed25519 key (for a check the bundle cannot "
                         "subvert, run `edgeforge verify` or the openssl recipe of docs/BUNDLES.md instead)")
    args = ap.parse_args(argv)
    if args.prompts is not None and args.prompts < 1:
        ap.error("--prompts must be at least 1")
    return args
