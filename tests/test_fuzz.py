"""Issue 11: a bounded fuzz run over CLI arguments and bundle / manifest / archive mutations.

Every case must end with exit 0, 1 or 2, print no Python traceback, touch no file outside its own
output folder, and stay under an 8 GiB address-space limit. The seed is fixed (reproducible); EDGEFORGE_FUZZ_CASES scales the run. The count
of cases and the result are printed (-s) for the notes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bundle_helpers import copy_bundle, host_bundle, resign  # noqa: F401 (fixture)

CASES = int(os.environ.get("EDGEFORGE_FUZZ_CASES", "60"))
TIME_BUDGET = float(os.environ.get("EDGEFORGE_FUZZ_SECONDS", "150"))

GARBAGE = ["", " ", "-1", "0", "1e309", "nan", "../../etc/passwd", "/dev/null", "/dev/zero", "\u202e", "x" * 5000,
           "--help", "{}", "[1,", "a\tb", "caf\u00e9", "999999999999999999999", "-", "~", "*"]
COMMANDS = {
    "inspect": [["--json"]],
    "quantize": [["--quant", "G"], ["-o", "OUT"], ["--embed-bits", "G"]],
    "compile": [["--target", "G"], ["--backend", "G"], ["-o", "OUT"]],
    "build": [["--quant", "G"], ["--target", "G"], ["-o", "OUT"], ["--jobs", "G"], ["--sign", "G"], ["--embed-bits", "G"]],
    "smoke": [["--json"], ["--prompts", "G"], ["--port", "G"], ["--trust", "G"], ["--known-hosts", "G"]],
    "run": [["--prompt", "G"], ["-n", "G"], ["--temperature", "G"], ["--top-p", "G"], ["--ctx", "G"]],
    "bench": [["-p", "G"], ["-n", "G"], ["-r", "G"], ["--trust", "G"]],
    "generate": [["--prompt", "G"], ["-n", "G"], ["--system", "G"]],
    "eval": [["--quant", "G"], ["--text", "G"], ["--compare", "G"]],
    "targets": [["--json"]],
    "plan": [["--matrix", "G"]],
}


# ONNX Runtime keeps a session-id file in TMPDIR across runs by design: not a leftover of ours.
FOREIGN_TMP = {".ses"}


def _leftovers(work: Path) -> list:
    return [p.name for p in (work / "tmp").iterdir() if p.name not in FOREIGN_TMP]


def _snapshot(root: Path, skip: Path) -> dict:
    out = {}
    for p in root.rglob("*"):
        if skip in p.parents or p == skip:
            continue
        try:
            st = p.lstat()
        except OSError:
            continue
        out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def _check(proc, case: str) -> None:
    assert proc.returncode in (0, 1, 2), f"{case}: exit {proc.returncode}\n{proc.stderr[-1500:]}"
    assert "Traceback (most recent call last)" not in proc.stderr, f"{case}: traceback\n{proc.stderr[-3000:]}"


# Every case runs under an address-space limit: an allocation that grows with hostile input fails
# the case (MemoryError or a kill is not exit 0/1/2) instead of passing unnoticed.
MEMORY_LIMIT = 8 << 30


def _limit_memory():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _edf(args, cwd, timeout=120):
    env = dict(os.environ, TMPDIR=str(cwd / "tmp"))
    (cwd / "tmp").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "edgeforge.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env, stdin=subprocess.DEVNULL, preexec_fn=_limit_memory)


@pytest.mark.slow
def test_fuzz_cli_arguments(tmp_path, host_bundle):
    rng = random.Random(11)
    bundle = copy_bundle(host_bundle[0], tmp_path / "bundle")
    start, n = time.monotonic(), 0
    for i in range(CASES):
        if time.monotonic() - start > TIME_BUDGET / 3:
            break
        cmd = rng.choice(sorted(COMMANDS))
        work = tmp_path / f"case{i}"
        work.mkdir()
        args = [cmd, rng.choice([str(bundle), rng.choice(GARBAGE), str(work / "missing")])]
        for opt in rng.sample(COMMANDS[cmd], k=rng.randint(0, len(COMMANDS[cmd]))):
            args += [str(work / "out") if a == "OUT" else rng.choice(GARBAGE) if a == "G" else a for a in opt]
        before = _snapshot(tmp_path, work)
        proc = _edf(args, work, timeout=300)
        _check(proc, " ".join(args)[:300])
        assert _snapshot(tmp_path, work) == before, f"{args}: touched files outside its folder"
        assert not _leftovers(work), f"{args}: left temporary files"
        n += 1
    print(f"\nfuzz: {n} CLI cases, all exit 0/1/2, no traceback, nothing touched outside")
    assert n >= 10


def _mutations(rng: random.Random, bundle: Path):
    """(description, function) pairs that damage a bundle the ways a bad disk, a careless user or an
    attacker would; some rewrite the manifest so that the damage gets past the checksums."""
    files = sorted(p for p in bundle.rglob("*") if p.is_file())

    def flip(p):
        data = bytearray(p.read_bytes())
        if data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        p.write_bytes(bytes(data))

    def truncate(p):
        p.write_bytes(p.read_bytes()[: rng.randrange(max(p.stat().st_size, 1))])

    def json_poison(rel):
        def go(b):
            path = b / rel
            data = json.loads(path.read_text())
            keys = list(data) if isinstance(data, dict) else []
            if keys:
                key = rng.choice(keys)
                data[key] = rng.choice([None, -1, "x", [], {}, 1e308, [None], {"a": 1}])
            path.write_text(json.dumps(data))
            resign(b)
        return go

    out = []
    for _ in range(6):
        f = rng.choice(files)
        out.append((f"flip a bit of {f.relative_to(bundle)}", lambda b, r=f.relative_to(bundle): flip(b / r)))
        out.append((f"truncate {f.relative_to(bundle)}", lambda b, r=f.relative_to(bundle): truncate(b / r)))
        out.append((f"delete {f.relative_to(bundle)}", lambda b, r=f.relative_to(bundle): (b / r).unlink()))
    for rel in ("golden.json", "artifact/artifact.json", "tokenizer/tokenizer_config.json", "manifest.json"):
        for _ in range(3):
            out.append((f"poison {rel} (re-signed)", json_poison(rel)))
    out.append(("add a file", lambda b: (b / "extra.py").write_text("print('x')")))
    out.append(("link a file", lambda b: (b / "link").symlink_to("/etc/passwd")))
    out.append(("manifest not JSON", lambda b: (b / "manifest.json").write_text("{")))
    out.append(("manifest empty", lambda b: (b / "manifest.json").write_bytes(b"")))
    out.append(("golden not JSON (re-signed)", lambda b: ((b / "golden.json").write_text("[1,"), resign(b))))
    out.append(("tokenizer garbage (re-signed)", lambda b: ((b / "tokenizer" / "tokenizer.json").write_bytes(
        bytes(rng.randrange(256) for _ in range(200))), resign(b))))
    rng.shuffle(out)
    return out


@pytest.mark.slow
def test_fuzz_bundle_and_archive_mutations(tmp_path, host_bundle):
    rng = random.Random(12)
    start, n, outcomes = time.monotonic(), 0, {}
    for i, (what, mutate) in enumerate(_mutations(rng, host_bundle[0])):
        if time.monotonic() - start > TIME_BUDGET / 3 or i >= CASES:
            break
        work = tmp_path / f"m{i}"
        work.mkdir()
        bundle = copy_bundle(host_bundle[0], work / host_bundle[0].name)
        try:
            mutate(bundle)
        except (OSError, ValueError):
            continue
        before = _snapshot(tmp_path, work)
        for args in (["smoke", bundle, "--json"], ["run", bundle, "--prompt", "hi", "-n", "2"]):
            proc = _edf(args, work, timeout=300)
            _check(proc, f"{what}: {args[0]}")
            outcomes[proc.returncode] = outcomes.get(proc.returncode, 0) + 1
        assert _snapshot(tmp_path, work) == before
        n += 1
    # archives: random byte damage to a packed bundle
    data = host_bundle[1].read_bytes()
    m = 0
    while time.monotonic() - start < TIME_BUDGET and m < CASES // 2:
        work = tmp_path / f"a{m}"
        work.mkdir()
        bad = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        if rng.random() < 0.3:
            bad = bad[: rng.randrange(len(bad))]
        archive = work / "b.tar.gz"
        archive.write_bytes(bytes(bad))
        proc = _edf(["smoke", archive, "--json"], work, timeout=300)
        _check(proc, f"archive case {m}")
        assert not _leftovers(work), "the extracted bundle was left in TMPDIR"
        outcomes[proc.returncode] = outcomes.get(proc.returncode, 0) + 1
        m += 1
    print(f"\nfuzz: {n} bundle mutations (smoke + run each) and {m} damaged archives; exit codes {outcomes}; "
          f"no traceback, nothing touched outside, no temporary files left")
    assert n >= 10 and m >= 5
    shutil.rmtree(tmp_path, ignore_errors=True)
