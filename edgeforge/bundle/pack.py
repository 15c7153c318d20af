"""Assemble one bundle: compile into it, add weights/tokenizer/golden/runtime, write the manifest last.

Everything is built in a private temporary folder renamed into place (fsutil.atomic_output_dir), so a
failed or concurrent build never leaves a partial or mixed bundle at the destination.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..backends import compile_qdir
from ..fsutil import atomic_output_dir, is_json_of_format
from ..runtime.loader import read_artifact
from ..runtime.manifest_check import check_golden, compute_path, sign_bundle
from . import device_install, layout, readme
from .golden import golden_of, tolerance_for
from .manifest import manifest_data, write_manifest

logger = logging.getLogger(__name__)


def bundle_name(model_name: str, scheme: str, target: str, backend: str) -> str:
    return f"{model_name}-{scheme}-{target}-{backend}"


def is_bundle(path: Path) -> bool:
    """An edgeforge bundle folder (what a new build of the same name may replace)."""
    return is_json_of_format(Path(path) / "manifest.json", "edgeforge-bundle")


def make_bundle(dest: Path, qdir: Path, target, backend: str, golden: dict, sign_key: Path | None = None,
                quality: dict | None = None, kv_cache: str | None = None) -> dict:
    """Build the bundle at `dest` for (target, backend); returns its manifest. `golden`: one golden
    data set or {arithmetic: golden} (the one in the artifact's arithmetic is used; golden.golden_of).
    `quality`: quality.json's content (edgeforge.quant.quality), summarized in the manifest too.
    `kv_cache`: --kv-cache (backends.with_kv_cache)."""
    dest = Path(dest)
    with atomic_output_dir(dest, is_bundle, "bundle") as tmp:
        web = target.run == "browser"
        if web:  # refused by name before the compile: a browser's WebAssembly memory is 4 GiB
            from ..web import layout as web_layout

            web_layout.check_fits(qdir, target.name)
        compile_qdir(qdir, str(target.path) if target.path else target.name, backend, tmp / "artifact", kv_cache=kv_cache)
        artifact = read_artifact(tmp / "artifact")
        has_weights = bool(artifact.get("needs_weights"))
        if has_weights:
            layout.copy_weights(qdir, tmp)
        layout.copy_tokenizer(qdir, tmp)
        golden = dict(golden_of(golden, qdir, artifact, target.arch, tmp / "artifact"),
                      tolerance=tolerance_for(artifact, target.arch))
        # refused here as the verifier would refuse it later (a model too sensitive to be checked)
        check_golden(f"bundle {dest.name}: golden data", golden, compute_path(artifact, target.arch))
        (tmp / "golden.json").write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        if web:  # a static site: the page and the pinned npm files instead of the Python runtime
            reqs = web_layout.add_site(tmp)
        else:
            layout.copy_runtime(tmp)
            bundled = layout.copy_backend_runtime(artifact, tmp)
            layout.write_smoke_py(tmp)
            layout.write_serve_py(tmp)
            reqs = layout.requirements(artifact)
            layout.write_requirements(tmp, reqs)
        data = manifest_data(dest.name, qdir, target, artifact, reqs, has_weights)
        if web:
            data["device_requirements"] = web_layout.device_requirements(data["device_requirements"])
        else:
            data["device_install"] = device_install.measure(reqs, target.os, target.arch, bundled)
        if quality is not None:
            (tmp / "quality.json").write_text(json.dumps(quality, indent=1, sort_keys=True) + "\n")
            data["quality"] = {k: quality[k] for k in ("kl", "ppl_ratio", "predictions", "skipped") if k in quality}
        (web_layout.write_readme if web else readme.write_readme)(tmp, data)
        manifest = write_manifest(tmp, data)
        logger.debug(f"bundle: manifest of {len(manifest['files'])} files written for {dest.name}")
        if sign_key is not None:
            sig = sign_bundle(tmp, sign_key)
            logger.info(f"signed with ed25519 key {sig['key_id']}")
    return manifest
