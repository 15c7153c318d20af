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

import base64
import hashlib
import json
import os
from pathlib import Path

try:
    from .bundle_errors import BundleError
except ImportError:  # inlined into a bundle's smoke.py

    class BundleError(Exception):
        exit_code = 2


MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FORMAT = "edgeforge-bundle"
SIGNATURE_FORMAT = "edgeforge-signature"
VERSION = 1
SELF_KEY = "manifest_sha256"
UNLISTED = {MANIFEST, SIGNATURE}  # the manifest cannot list itself, nor the signature over it


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
    for dirpath, dirnames, filenames in os.walk(root):
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
    body = {k: v for k, v in data.items() if k != SELF_KEY}
    body.update(format=FORMAT, version=VERSION, files=file_table(root))
    body[SELF_KEY] = hashlib.sha256(canonical_bytes({k: v for k, v in body.items() if k != SELF_KEY})).hexdigest()
    (root / MANIFEST).write_bytes(canonical_bytes(body))
    return body


def read_manifest(root: Path) -> dict:
    """Parse manifest.json and check its self hash; BundleError naming manifest.json otherwise."""
    path = Path(root) / MANIFEST
    if not path.is_file() or path.is_symlink():
        raise BundleError(f"{path}: missing: not a bundle, or an incomplete one")
    raw = path.read_bytes()
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


def verify_bundle(root: Path, trust=None) -> dict:
    """Check the signature (when `trust` names a public key file), manifest.json, then every file's
    presence, type, size and sha256; refuse extra files. Returns the manifest."""
    root = Path(root)
    if trust is not None:
        verify_signature(root, trust)
    manifest = read_manifest(root)
    files = manifest["files"]
    for rel, entry in sorted(files.items()):
        _check_file(root, rel, entry)
    extra = [rel for rel in list_files(root) if rel not in files]
    if extra:
        why = ("Python bytecode caches are never loaded from a bundle; delete the folder"
               if "__pycache__" in extra[0].split("/") else "unexpected file in the bundle")
        raise BundleError(f"{root / extra[0]}: not listed in manifest.json ({why})")
    if "golden.json" in files:
        check_tolerance(root, manifest)
    return manifest


# ---- the smoke tolerance a bundle may claim ------------------------------------------------------
# golden.json's tolerance ("rel", a fraction of the golden logit range at each step) comes from the
# bundle, so anyone who rewrites a bundle could claim any. The verifier allows at most what the
# bundle's compute path needs, from this table (measured: docs/BUNDLES.md, "Tolerances"), and
# refuses golden data computed for another arithmetic than the artifact's.
FLOAT32 = "float32"  # golden arithmetic: the numpy reference in float32 on the dequantized weights
INT8_ACTIVATIONS = "int8-activations"  # ... with every quantized matmul's input rounded to int8 blocks
TOLERANCES = {  # compute path -> (golden arithmetic, largest rel a bundle may claim)
    "float32": (FLOAT32, 1e-3),
    "float16": (FLOAT32, 2e-2),
    "webgpu-float16": (FLOAT32, 4e-2),
    "int8-activations-x86_64": (INT8_ACTIVATIONS, 3e-2),
    "int8-activations-aarch64": (FLOAT32, 1.2e-1),
}


def compute_path(artifact: dict, arch: str) -> str:
    """Which row of TOLERANCES an artifact computes by (artifact.json, the target's arch)."""
    onnx = artifact.get("onnx") if isinstance(artifact.get("onnx"), dict) else {}
    dtype = onnx.get("compute_dtype") or artifact.get("model_dtype") or FLOAT32
    if onnx.get("accuracy_level") == 4 and onnx.get("execution_provider", "CPUExecutionProvider") == "CPUExecutionProvider":
        return "int8-activations-x86_64" if arch == "x86_64" else "int8-activations-aarch64"
    if str(artifact.get("device", "")).startswith("webgpu") and dtype == "float16":
        return "webgpu-float16"
    return FLOAT32 if dtype == FLOAT32 else "float16"


def check_tolerance(root: Path, manifest: dict) -> None:
    """golden.json's tolerance and arithmetic must be what the artifact's compute path allows."""
    root = Path(root)
    try:
        artifact = json.loads((root / "artifact" / "artifact.json").read_bytes())
        golden = json.loads((root / "golden.json").read_bytes())
        rel = golden["tolerance"]["rel"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BundleError(f"{root / 'golden.json'}: unreadable tolerance or artifact.json ({err})") from None
    path = compute_path(artifact if isinstance(artifact, dict) else {}, (manifest.get("target") or {}).get("arch", ""))
    arithmetic, cap = TOLERANCES[path]
    if golden.get("arithmetic", FLOAT32) != arithmetic:
        raise BundleError(f"{root / 'golden.json'}: computed with {golden.get('arithmetic', FLOAT32)!r} arithmetic, but "
                          f"the artifact computes by {path!r}, which needs {arithmetic!r} golden data (rebuild the bundle)")
    if isinstance(rel, bool) or not isinstance(rel, (int, float)) or not 0 < rel <= cap:
        raise BundleError(f"{root / 'golden.json'}: tolerance {rel!r} is not in (0, {cap}], the most a {path} "
                          "bundle may claim (docs/BUNDLES.md, Tolerances)")


def _check_file(root: Path, rel: str, entry) -> None:
    path = root / rel
    if not isinstance(rel, str) or not isinstance(entry, dict) or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise BundleError(f"{root / MANIFEST}: file entry {rel!r} is malformed or leaves the bundle")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise BundleError(f"{path}: not a regular file (links and devices are refused)")
    if not path.exists():
        raise BundleError(f"{path}: missing (incomplete bundle)")
    size = path.stat().st_size
    if size != entry.get("size"):
        raise BundleError(f"{path}: size {size} bytes, manifest says {entry.get('size')} (truncated or modified)")
    if sha256_file(path) != entry.get("sha256"):
        raise BundleError(f"{path}: sha256 does not match manifest.json (modified or corrupt)")


# ---- signatures -------------------------------------------------------------------------------

def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise BundleError("checking a signature needs the 'cryptography' package (pip install cryptography)") from None
    return serialization, ed25519


def _raw_public(key) -> bytes:
    serialization, _ = _crypto()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public_key(path):
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as err:
        raise BundleError(f"{path}: cannot read the public key ({err.strerror})") from None
    except ValueError as err:
        raise BundleError(f"{path}: not a PEM public key ({err})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise BundleError(f"{path}: not an ed25519 public key (make one with `openssl genpkey -algorithm ed25519`)")
    return key


def load_private_key(path):
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as err:
        raise BundleError(f"{path}: cannot read the signing key ({err.strerror})") from None
    except (ValueError, TypeError) as err:
        raise BundleError(f"{path}: not an unencrypted PEM private key ({err})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise BundleError(f"{path}: not an ed25519 private key (make one with `openssl genpkey -algorithm ed25519`)")
    return key


def sign_bundle(root: Path, key_path) -> dict:
    """Write manifest.sig: an ed25519 signature over manifest.json's bytes (which hash every file)."""
    root = Path(root)
    key = load_private_key(key_path)
    public = _raw_public(key.public_key())
    sig = {"format": SIGNATURE_FORMAT, "version": VERSION, "algorithm": "ed25519", "signed": MANIFEST,
           "public_key": base64.b64encode(public).decode(), "key_id": hashlib.sha256(public).hexdigest()[:16],
           "signature": base64.b64encode(key.sign((root / MANIFEST).read_bytes())).decode()}
    (root / SIGNATURE).write_bytes(canonical_bytes(sig))
    return sig


def verify_signature(root: Path, trust) -> dict:
    """Refuse an unsigned bundle, one signed by another key, or a bad signature; by name."""
    root = Path(root)
    key = load_public_key(trust)
    path = root / SIGNATURE
    if not path.is_file() or path.is_symlink():
        raise BundleError(f"{root}: not signed (no {SIGNATURE}); --trust {trust} accepts signed bundles only")
    try:
        sig = json.loads(path.read_bytes())
        signature = base64.b64decode(sig["signature"], validate=True)
        signer = base64.b64decode(sig["public_key"], validate=True)
    except (ValueError, KeyError, TypeError) as err:
        raise BundleError(f"{path}: malformed signature file ({err})") from None
    if not isinstance(sig, dict) or sig.get("format") != SIGNATURE_FORMAT or sig.get("algorithm") != "ed25519":
        raise BundleError(f"{path}: not an edgeforge ed25519 signature")
    trusted = _raw_public(key)
    if signer != trusted:
        raise BundleError(f"{path}: signed by key {hashlib.sha256(signer).hexdigest()[:16]}, not by the trusted key "
                          f"{trust} ({hashlib.sha256(trusted).hexdigest()[:16]})")
    manifest = root / MANIFEST
    if not manifest.is_file() or manifest.is_symlink():
        raise BundleError(f"{manifest}: missing: not a bundle, or an incomplete one")
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(signature, manifest.read_bytes())
    except InvalidSignature:
        raise BundleError(f"{path}: the signature does not match manifest.json (modified after signing)") from None
    return sig
