"""Target presets: one declarative TOML file per target in targets/ (users add their own).

Search order, later wins on equal names: the built-in presets shipped with edgeforge, ./targets in
the current folder, then every folder in $EDGEFORGE_TARGETS (os.pathsep-separated).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import EdgeforgeError
from .runtime.backends import BACKENDS
from .runtime.bundle_errors import BundleError
from .runtime.files import read_text

RUN_MODES = ("host", "qemu", "cuda", "vulkan", "browser", "none")
# edgeforge/_targets is a link to the project's top-level targets/ folder: the same files in a
# checkout and, copied in, inside the wheel.
BUILTIN_DIR = Path(__file__).parent / "_targets"


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    backends: tuple[str, ...]
    run: str
    os: str
    arch: str
    tvm: dict = field(default_factory=dict)
    onnx: dict = field(default_factory=dict)
    path: Path | None = None
    backend_why: str = ""  # why `backends` lists its first (what --backend auto takes) first
    cpu: str = ""  # the device's CPU core (qemu's name); `smoke --emulate` runs as that core
    raw: dict = field(default_factory=dict)

    def pick_backend(self, backend: str) -> str:
        """Resolve `auto` to the target's first backend; refuse one the target does not support."""
        if backend in ("auto", None):
            return self.backends[0]
        if backend not in self.backends:
            raise EdgeforgeError(
                f"target '{self.name}' ({self.path}) cannot be built with --backend {backend}; it supports: {', '.join(self.backends)}"
            )
        return backend


def _search_dirs() -> list[Path]:
    dirs = [BUILTIN_DIR, Path.cwd() / "targets"]
    extra = os.environ.get("EDGEFORGE_TARGETS", "")
    dirs += [Path(p) for p in extra.split(os.pathsep) if p]
    seen, out = set(), []
    for d in dirs:
        key = d.resolve() if d.exists() else d
        if key not in seen and d.is_dir():
            seen.add(key)
            out.append(d)
    return out


# Target names become parts of bundle folder names: letters, digits, '.', '_' and '-' only.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CPU_RE = re.compile(r"[a-z0-9][a-z0-9.-]{0,40}")  # the same check smoke makes of a manifest's target cpu


def load_target_file(path: Path) -> Target:
    try:
        raw = tomllib.loads(read_text(path, 1 << 20, "target file"))
    except (BundleError, tomllib.TOMLDecodeError) as err:
        raise EdgeforgeError(f"target file {path}: {err}") from None
    known = ("name", "description", "backends", "backend_why", "run", "os", "arch", "cpu", *BACKENDS)
    unknown = sorted(k for k in raw if k not in known)
    if unknown:  # a typo (`bakends`, `[tvn]`) would otherwise be ignored silently
        raise EdgeforgeError(f"target file {path}: unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"a target file has {', '.join(known)}")
    for key in ("name", "backends", "run", "os", "arch"):
        if key not in raw:
            raise EdgeforgeError(f"target file {path}: missing key '{key}'")
    for key in ("name", "run", "os", "arch", "description", "backend_why", "cpu"):
        if key in raw and not isinstance(raw[key], str):
            raise EdgeforgeError(f"target file {path}: '{key}' must be a string, got {type(raw[key]).__name__}")
    if "cpu" in raw and not CPU_RE.fullmatch(raw["cpu"]):  # it goes on qemu's command line (smoke --emulate)
        raise EdgeforgeError(f"target file {path}: cpu {raw['cpu'][:60]!r} must be a CPU core name such as "
                             "'cortex-a72' (lowercase letters, digits, '.' and '-')")
    if not NAME_RE.match(raw["name"]) or ".." in raw["name"]:
        raise EdgeforgeError(f"target file {path}: name {raw['name']!r} must be 1-64 letters, digits, '.', '_' "
                             "or '-' (it becomes part of the bundle's folder name)")
    for table in BACKENDS:
        if not isinstance(raw.get(table, {}), dict):
            raise EdgeforgeError(f"target file {path}: [{table}] must be a table")
    if not isinstance(raw["backends"], list) or not all(isinstance(b, str) for b in raw["backends"]):
        raise EdgeforgeError(f"target file {path}: backends must be a list of names, got {raw['backends']!r}")
    backends = tuple(raw["backends"])
    bad = [b for b in backends if b not in BACKENDS]
    if not backends or bad:
        raise EdgeforgeError(f"target file {path}: backends must be a non-empty list of {tuple(BACKENDS)}, got {list(backends)}")
    if raw["run"] not in RUN_MODES:
        raise EdgeforgeError(f"target file {path}: run must be one of {RUN_MODES}, got '{raw['run']}'")
    for name in backends:
        if BACKENDS[name].target_required not in raw.get(name, {}):
            raise EdgeforgeError(f"target file {path}: lists backend {name} but has no [{name}] {BACKENDS[name].target_required}")
    return Target(
        name=raw["name"], description=raw.get("description", ""), backends=backends, run=raw["run"],
        os=raw["os"], arch=raw["arch"], tvm=raw.get("tvm", {}), onnx=raw.get("onnx", {}), path=path, raw=raw,
        backend_why=raw.get("backend_why", ""), cpu=raw.get("cpu", ""),
    )


def list_targets() -> list[Target]:
    found: dict[str, Target] = {}
    for d in _search_dirs():
        for path in sorted(d.glob("*.toml")):
            t = load_target_file(path)
            found[t.name] = t
    return [found[k] for k in sorted(found)]


def get_target(name: str) -> Target:
    if name.endswith(".toml") and Path(name).is_file():
        return load_target_file(Path(name))
    targets = {t.name: t for t in list_targets()}
    if name not in targets:
        raise EdgeforgeError(f"unknown target '{name}'; known targets: {', '.join(sorted(targets))} (or pass a .toml file)")
    return targets[name]
