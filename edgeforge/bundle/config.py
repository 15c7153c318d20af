"""Build configs: `edgeforge build MODEL --quant ... --target ...` or `edgeforge build FILE.toml`.

A config file (examples/smollm2.toml):
    model = "smollm2-135m"          # registry name, HF folder, .gguf or QDIR
    quant = "q4f16"
    output = "dist"
    prompts = ["What is the capital of France?"]   # optional golden prompts
    golden_tokens = 12                              # optional
    [targets]                        # target -> backends ("auto" or a list)
    x86-cpu = ["tvm", "onnx"]
    cuda = "auto"
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..errors import EdgeforgeError
from ..runtime.bundle_errors import BundleError
from ..runtime.files import read_text
from ..targets import get_target
from ..quant.quality import DEFAULT_TOKENS as QUALITY_TOKENS
from .golden import DEFAULT_PROMPTS, DEFAULT_TOKENS


@dataclass
class BuildPlan:
    model: str
    quant: str
    output: Path
    jobs: list[tuple[object, str]] = field(default_factory=list)  # (Target, backend)
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    golden_tokens: int = DEFAULT_TOKENS
    embed_bits: int | None = None  # storage bits of the embedding (None: the scheme's choice)
    source: Path | None = None  # the config file, when there was one
    smoke: bool = True  # run each new bundle's smoke test here when this machine can run it
    sign_key: Path | None = None  # ed25519 private key (PEM): every bundle gets a manifest.sig
    quality_tokens: int = QUALITY_TOKENS  # tokens of the built-in text the quality report scores
    quality_skip: str | None = None  # why the quality report is not measured (recorded in quality.json)
    kv_cache: str | None = None  # --kv-cache: "float" | "int8" | None (each target file's choice)


def is_config(arg: str) -> bool:
    return arg.endswith(".toml") and Path(arg).is_file()


def read_config(path: Path) -> dict:
    try:
        raw = tomllib.loads(read_text(path, 1 << 20, "build config"))
    except (BundleError, tomllib.TOMLDecodeError) as err:
        raise EdgeforgeError(f"build config {path}: {err}") from None
    for key in ("model", "quant", "targets"):
        if key not in raw:
            raise EdgeforgeError(f"build config {path}: missing key '{key}'")
    known = {"model", "quant", "output", "prompts", "golden_tokens", "targets", "embed_bits"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise EdgeforgeError(f"build config {path}: unknown key(s) {unknown}; known: {sorted(known)}")
    _check_values(raw, f"build config {path}")
    return raw


MAX_GOLDEN_TOKENS = 256


def _check_values(raw: dict, where: str) -> None:
    """Every value that would build an unusable bundle is refused here, before any work, by key."""
    for key in ("model", "quant"):
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise EdgeforgeError(f"{where}: '{key}' must be a non-empty string, got {raw[key]!r}")
    if "output" in raw and (not isinstance(raw["output"], str) or not raw["output"].strip()):
        raise EdgeforgeError(f"{where}: 'output' must be a non-empty path, got {raw['output']!r}")
    if "prompts" in raw:
        prompts = raw["prompts"]
        if not isinstance(prompts, list) or not prompts:
            raise EdgeforgeError(f"{where}: 'prompts' must be a non-empty list of strings")
        bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
        if bad:
            raise EdgeforgeError(f"{where}: 'prompts' has an empty or non-text entry: {bad[0]!r}")
    if "golden_tokens" in raw:
        n = raw["golden_tokens"]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_GOLDEN_TOKENS:
            raise EdgeforgeError(f"{where}: 'golden_tokens' must be an integer from 1 to {MAX_GOLDEN_TOKENS}, got {n!r}")
    if "embed_bits" in raw:
        from ..quant.schemes import check_embed_bits

        if isinstance(raw["embed_bits"], bool) or not isinstance(raw["embed_bits"], int):
            raise EdgeforgeError(f"{where}: 'embed_bits' must be an integer, got {raw['embed_bits']!r}")
        try:
            check_embed_bits(raw["embed_bits"])
        except EdgeforgeError as err:
            raise EdgeforgeError(f"{where}: 'embed_bits': {err}") from None


def expand(target_name: str, backends, where: str) -> list[tuple[object, str]]:
    """(Target, backend) pairs for one target; backends: 'auto', 'all', a name or a list."""
    target = get_target(target_name)
    if isinstance(backends, str):
        backends = list(target.backends) if backends == "all" else [backends]
    if not backends:
        raise EdgeforgeError(f"{where}: target '{target_name}' has an empty backend list")
    return [(target, target.pick_backend(b)) for b in backends]


def config_targets(raw: dict, path: Path) -> dict[str, object]:
    targets = raw["targets"]
    if isinstance(targets, list):
        return {t: "auto" for t in targets}
    if isinstance(targets, dict):
        return targets
    raise EdgeforgeError(f"build config {path}: 'targets' must be a list of names or a table name -> backends")


def make_plan(spec: str, quant, targets: tuple[str, ...], backend: str, output) -> BuildPlan:
    """Merge a config file (when spec is one) with command-line options; the options win."""
    if is_config(spec):
        raw, where = read_config(Path(spec)), spec
        wanted = config_targets(raw, Path(spec))
        if targets:  # --target picks a subset of the config's targets (one CI job per target)
            missing = [t for t in targets if t not in wanted]
            if missing:
                raise EdgeforgeError(f"--target {missing[0]}: not in build config {spec} (it has {', '.join(wanted)})")
            wanted = {t: wanted[t] for t in targets}
        if backend != "auto":
            wanted = {t: backend for t in wanted}
        plan = BuildPlan(model=raw["model"], quant=quant or raw["quant"],
                         output=Path(output) if output else Path(spec).parent / raw.get("output", "dist"),
                         source=Path(spec),  # a config's output, like its model path, is relative to it
                         prompts=tuple(raw.get("prompts", DEFAULT_PROMPTS)),
                         golden_tokens=int(raw.get("golden_tokens", DEFAULT_TOKENS)),
                         embed_bits=raw.get("embed_bits"))
        if not Path(plan.model).is_absolute() and (Path(spec).parent / plan.model).exists():
            plan.model = str(Path(spec).parent / plan.model)  # paths in a config are relative to it
    else:
        if not quant:
            raise EdgeforgeError("--quant is required when building from a model (e.g. --quant q4f16)")
        if not targets:
            raise EdgeforgeError("--target is required when building from a model (see `edgeforge targets`)")
        if output is None:
            raise EdgeforgeError("-o/--output is required when building from a model (e.g. -o dist)")
        wanted, where = {t: backend for t in targets}, "--target"
        plan = BuildPlan(model=spec, quant=quant, output=Path(output))
    from ..quant.schemes import get_scheme

    try:
        get_scheme(plan.quant)  # before the model loads (a large one takes minutes)
    except EdgeforgeError as err:
        raise EdgeforgeError(f"--quant: {err}") from None
    for name, backends in wanted.items():
        plan.jobs.extend(expand(name, backends, where))
    if not plan.jobs:
        raise EdgeforgeError(f"{where}: no targets to build")
    return plan
