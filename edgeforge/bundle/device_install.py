"""What a bundle installs on its device, measured: every package pip brings for requirements.txt
(the pinned ones and what they pull in), plus the runtime files the bundle carries itself.

Installed bytes come from this machine's copy of the same version (its RECORD) when this machine has
the device's CPU or the package is pure Python; else from the package's wheel for the device's CPU
(the aarch64 ones are cached by scripts/setup-arm64.sh, others downloaded into that cache once when
PyPI is reachable): download bytes = the wheel, installed bytes = its unpacked files. A package measured neither way is listed with
null sizes and named in `unmeasured`, never counted as zero silently.
"""

from __future__ import annotations

import logging
import re
import zipfile
from importlib import metadata
from pathlib import Path

from .. import toolchains
from ..runtime.hostcheck import cpu_arch, host_arch

logger = logging.getLogger(__name__)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(pinned: dict[str, str]) -> dict[str, str]:
    """{name: version}: the pinned packages and everything they require (no extras), with the
    versions installed here (what this machine tested with). A requirement not installed here keeps
    the version it was given ('' when none)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # packaging is everywhere pip is; without it list only the pinned packages
        return {_norm(n): v for n, v in pinned.items()}
    out: dict[str, str] = {}
    todo = list(pinned.items())
    while todo:
        name, version = todo.pop()
        key = _norm(name)
        if key in out:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            out[key] = version
            continue
        out[key] = version if version and version[0] in "<>=!~" else dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append((req.name, ""))
    return dict(sorted(out.items()))


def _wheel_sizes(wheel: Path) -> tuple[int, int]:
    with zipfile.ZipFile(wheel) as zf:
        return wheel.stat().st_size, sum(i.file_size for i in zf.infolist())


def _installed_size(name: str, version: str, pure_only: bool) -> int | None:
    """Bytes of this machine's installed copy (RECORD), when it is that version; with `pure_only`
    only for a pure-Python wheel (tag none-any), whose files are the same on every CPU."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != version or not dist.files:
        return None
    if pure_only and "-none-any" not in (dist.read_text("WHEEL") or "").replace("Tag: ", "-"):
        return None
    return sum(f.size or 0 for f in dist.files)


_DOWNLOAD_FAILED: set[str] = set()  # arches whose wheel download failed in this process: not retried


def _device_wheels(specs: list[tuple[str, str]], arch: str) -> dict:
    """Cached wheels for `specs`; the missing ones downloaded once (a failure is logged, remembered for
    this process, and leaves those packages unmeasured)."""
    if arch in _DOWNLOAD_FAILED:
        return toolchains.arch_wheels(arch)
    found = toolchains.ensure_arch_wheels(specs, arch)
    if "error" in found:
        _DOWNLOAD_FAILED.add(arch)
        logger.warning(f"device install: could not download {arch} wheels ({found['error']}); "
                       "those packages are listed as not measured")
    return found


# `pip install edgeforge[serve]`'s server stack (edgeforge serve; the bundle's runtime/server.py): what a
# device adds to serve a bundle over HTTP, measured apart from what requirements.txt brings.
SERVE_PACKAGES = {"starlette": "", "uvicorn": ""}


def measure(pinned: dict[str, str], os_name: str, arch: str, bundled_bytes: int) -> dict | None:
    """The manifest's `device_install` entry for a bundle whose device runs `os_name` on CPU `arch`
    (None for devices other than Linux: their packages are not the manylinux wheels measured here).
    Its "serve" entry: the packages serving adds (those not already installed for the bundle)."""
    if os_name != "linux":
        return None
    arch = cpu_arch(arch)
    closure = dependency_closure(pinned)
    packages, unmeasured = _measure_packages(closure, arch)
    installed = sum(p["installed_bytes"] or 0 for p in packages.values())
    downloads = [p["download_bytes"] for p in packages.values()]
    serve_packages, serve_unmeasured = _measure_packages(dependency_closure(SERVE_PACKAGES), arch)
    return {
        "arch": arch, "python": "cp311",
        "packages": packages,
        "bundled_runtime_bytes": bundled_bytes,
        "installed_bytes": installed + bundled_bytes,
        "download_bytes": None if None in downloads else sum(downloads),
        "unmeasured": unmeasured,
        # installed_bytes: the server stack with everything it needs; added_bytes: the part that
        # requirements.txt's own closure does not bring already
        "serve": {"packages": serve_packages, "unmeasured": serve_unmeasured,
                  "installed_bytes": sum(p["installed_bytes"] or 0 for p in serve_packages.values()),
                  "added_bytes": sum(p["installed_bytes"] or 0 for n, p in serve_packages.items() if n not in closure)},
    }


def _measure_packages(closure: dict[str, str], arch: str) -> tuple[dict, list[str]]:
    """({name: {version, download_bytes, installed_bytes, measured_from}}, names not measured)."""
    local = host_arch() == arch
    wheels = {}
    if not local and arch == "aarch64":
        wheels = _device_wheels([(n, v) for n, v in closure.items() if v[:1].isdigit()], arch)
    packages, unmeasured = {}, []
    for name, version in closure.items():
        entry = {"version": version, "download_bytes": None, "installed_bytes": None}
        exact = version[:1].isdigit()
        wheel = wheels.get(toolchains.wheel_key(name, version))
        size = _installed_size(name, version, pure_only=not local) if exact and wheel is None else None
        if wheel is not None:
            entry["download_bytes"], entry["installed_bytes"] = _wheel_sizes(wheel)
            entry["measured_from"] = f"{arch} wheel"
        elif size is not None:
            entry["installed_bytes"] = size
            entry["measured_from"] = "installed here" if local else "installed here (pure Python, any CPU)"
        else:
            unmeasured.append(name)
        packages[name] = entry
    return packages, unmeasured


def summary(info: dict | None) -> str:
    """One line for build output and the bundle README."""
    if not info:
        return "device install: not measured"
    mb = 1e6
    top = sorted(info["packages"].items(), key=lambda kv: -(kv[1]["installed_bytes"] or 0))[:3]
    biggest = ", ".join(f"{n} {(p['installed_bytes'] or 0) / mb:.0f} MB" for n, p in top)
    down = "" if info["download_bytes"] is None else f", {info['download_bytes'] / mb:.1f} MB to download"
    least = "at least " if info["unmeasured"] else ""
    bundled = f", {info['bundled_runtime_bytes'] / mb:.1f} MB of it carried in the bundle" if info["bundled_runtime_bytes"] else ""
    missing = f"; not measured: {', '.join(info['unmeasured'])}" if info["unmeasured"] else ""
    serve = info.get("serve")
    served = (f"; serving over HTTP (edgeforge[serve]: starlette, uvicorn) adds {serve['added_bytes'] / mb:.1f} MB "
              f"({serve['installed_bytes'] / mb:.1f} MB with all it needs)" if serve and not serve["unmeasured"] else "")
    return (f"device install ({info['arch']}): {least}{info['installed_bytes'] / mb:.1f} MB on disk{bundled}{down} "
            f"(largest: {biggest}){missing}{served}")
