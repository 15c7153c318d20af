"""Issue 11, as a careless user: outputs never destroy what edgeforge did not create, names from
files never become paths outside -o, and a killed run leaves nothing behind (or the next run cleans it)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bundle_helpers import cli, host_bundle  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def qdir(tiny_model, tmp_path_factory):
    from edgeforge.model.loader import load_model
    from edgeforge.quant.qdir import write_qdir

    out = tmp_path_factory.mktemp("outputs") / "qdir"
    write_qdir(load_model(tiny_model("llama32")), "q4f32", out)
    return out


def _precious(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    return folder


def test_compile_refuses_to_replace_an_unrelated_folder(qdir, tmp_path, capsys):
    precious = _precious(tmp_path / "project")
    code, _, err = cli(capsys, "compile", qdir, "--target", "x86-cpu", "--backend", "onnx", "-o", precious)
    assert code == 2 and "refusing to replace" in err and str(precious) in err
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_compile_refuses_to_replace_a_file(qdir, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep")
    code, _, err = cli(capsys, "compile", qdir, "--target", "x86-cpu", "--backend", "onnx", "-o", target)
    assert code == 2 and "not a folder" in err
    assert target.read_text() == "keep"


def test_compile_replaces_its_own_output_and_empty_folders(qdir, tmp_path, capsys):
    out = tmp_path / "art"
    out.mkdir()  # empty: fine
    for _ in range(2):  # the second run replaces the first run's artifact
        code, _, err = cli(capsys, "compile", qdir, "--target", "x86-cpu", "--backend", "onnx", "-o", out)
        assert code == 0, err
    assert (out / "artifact.json").is_file()


def test_build_refuses_an_unrelated_folder_with_a_bundles_name(tiny_model, tmp_path, capsys):
    dist = tmp_path / "dist"
    name = "tiny-llama320-q4f32-x86-cpu-onnx"
    precious = _precious(dist / name)
    code, _, err = cli(capsys, "build", tiny_model("llama32"), "--quant", "q4f32", "--target", "x86-cpu",
                       "--backend", "onnx", "-o", dist)
    assert code == 2 and "refusing to replace" in err
    assert (precious / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "", "x" * 65, ".hidden", "na me"])
def test_target_names_never_become_paths(tmp_path, name):
    import json

    t = tmp_path / "evil.toml"
    t.write_text(f"name = {json.dumps(name)}\nbackends = [\"onnx\"]\nrun = \"host\"\nos = \"linux\"\n"
                 "arch = \"x86_64\"\n[onnx]\nexecution_provider = \"CPUExecutionProvider\"\n")
    from edgeforge.errors import EdgeforgeError
    from edgeforge.targets import load_target_file

    with pytest.raises(EdgeforgeError, match="name .* must be"):
        load_target_file(t)


_KILLED_RUN = """
import os, signal, sys
from pathlib import Path
from edgeforge.fsutil import owned_temp_dir
with owned_temp_dir(sys.argv[2], sys.argv[1]) as tmp:
    (tmp / "half-written").write_text("x")
    if sys.argv[3] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    print(tmp.name, flush=True)
    sys.stdin.read()  # holds the folder (and its lock) until the test closes stdin
"""


def test_stale_temporary_folders_of_dead_runs_are_cleaned(qdir, tmp_path, capsys):
    """Only folders edgeforge marked (its lock file) and nobody holds are removed: not a look-alike
    folder of a dead PID, not one whose marker is a link, not one a live run (any PID namespace:
    the lock, not the PID, decides) still holds."""
    run = [sys.executable, "-c", _KILLED_RUN, str(tmp_path)]
    killed = subprocess.run([*run, ".art.tmp-1-", "kill"], capture_output=True)
    assert killed.returncode == -9
    (stale,) = [p for p in tmp_path.glob(".art.tmp-1-*") if p.is_dir()]
    assert (stale / "half-written").exists() and stale.with_name(stale.name + ".lock").exists()
    lookalike = tmp_path / ".mine.tmp-1-keep"  # a user's folder, named like ours, of a dead PID
    lookalike.mkdir()
    (lookalike / "precious").write_text("x")
    linked = tmp_path / ".linked.tmp-1-keep"
    linked.mkdir()
    (tmp_path / "marker").write_bytes(stale.with_name(stale.name + ".lock").read_bytes())
    linked.with_name(linked.name + ".lock").symlink_to(tmp_path / "marker")
    holder = subprocess.Popen([*run, ".held.tmp-99999999-", "hold"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    held = tmp_path / holder.stdout.readline().strip()
    try:
        code, _, err = cli(capsys, "compile", qdir, "--target", "x86-cpu", "--backend", "onnx", "-o", tmp_path / "art")
        assert code == 0, err
        assert not stale.exists() and not stale.with_name(stale.name + ".lock").exists()
        assert (lookalike / "precious").exists() and linked.exists() and held.exists()
    finally:
        holder.communicate("")
    assert not held.exists()  # its owner removed it on the way out


def test_config_output_is_relative_to_the_config(tiny_model, tmp_path, monkeypatch):
    from edgeforge.bundle.config import make_plan

    folder = tmp_path / "project"
    folder.mkdir()
    config = folder / "build.toml"
    config.write_text(f'model = "{tiny_model("llama32")}"\nquant = "q4f32"\noutput = "out"\n'
                      '[targets]\nx86-cpu = "onnx"\n')
    monkeypatch.chdir(tmp_path)
    plan = make_plan(str(config), None, (), "auto", None)
    assert plan.output == folder / "out"
    assert make_plan(str(config), None, (), "auto", "elsewhere").output == Path("elsewhere")  # -o wins, as given


def _wait_for(pred, timeout=120):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_build_leaves_nothing(tiny_model, tmp_path, sig):
    dist = tmp_path / "dist"
    # A job started in the background by a non-interactive shell (as CI may run us) inherits SIGINT
    # ignored, and Python keeps it so: give the build the default disposition, as a terminal would.
    proc = subprocess.Popen([sys.executable, "-m", "edgeforge.cli", "build", str(tiny_model("llama32")), "--quant",
                             "q4f32", "--target", "x86-cpu", "--backend", "tvm", "-o", str(dist)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # wait until the build is under way (its private work folder exists), then stop it
    assert _wait_for(lambda: dist.is_dir() and any(p.name.startswith(".") for p in dist.iterdir())), \
        proc.communicate(timeout=60)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (130, 128 + signal.SIGTERM), err
    assert "Traceback" not in err
    assert list(dist.iterdir()) == [], f"left behind: {list(dist.iterdir())}"


def test_signal_during_archive_smoke_removes_the_extracted_bundle(host_bundle, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    proc = subprocess.Popen([sys.executable, "-m", "edgeforge.cli", "smoke", str(host_bundle[1])], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: any(p.name.startswith(".edgeforge-smoke.tmp-") for p in tmp.iterdir())), \
        proc.communicate(timeout=60)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 128 + signal.SIGTERM), err  # 0: it finished first
    assert "Traceback" not in err
    assert not [p for p in tmp.iterdir() if p.name != ".ses"], f"left in TMPDIR: {list(tmp.iterdir())}"


def read_only_command(folder: Path, argv: list[str]) -> list[str]:
    """`argv` run with `folder` mounted read-only over itself, in a private mount namespace of a
    user namespace (`unshare -rm`): writes there fail with EROFS for root as for anyone, where a
    chmod'ed folder stops only non-root users (CI runs as root)."""
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    return ["unshare", "-rm", "sh", "-c", script, str(folder), *argv]


def test_unwritable_output_is_one_error_line(qdir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    if not shutil.which("unshare"):
        pytest.skip("unshare (util-linux) not installed: no read-only mount to test with")
    probe = subprocess.run(read_only_command(locked, ["touch", str(locked / "x")]), capture_output=True, text=True)
    if "Read-only file system" not in probe.stderr:
        pytest.skip(f"no user namespaces here (unshare -rm): {probe.stderr.strip()[-200:]}")
    argv = [sys.executable, "-m", "edgeforge.cli", "compile", str(qdir), "--target", "x86-cpu", "--backend", "onnx",
            "-o", str(locked / "art")]
    proc = subprocess.run(read_only_command(locked, argv), capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err.startswith("error:") and "locked" in err and len(err.splitlines()) == 1, err
    assert list(locked.iterdir()) == []


def test_output_under_a_file_is_one_error_line(qdir, tmp_path, capsys):
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    code, _, err = cli(capsys, "compile", qdir, "--target", "x86-cpu", "--backend", "onnx", "-o", blocker / "art")
    assert code == 2 and err.startswith("error:") and "plain-file" in err and "Traceback" not in err
    assert blocker.read_text() == "x"


def test_a_bundle_that_fails_its_own_smoke_fails_the_build(host_bundle, tmp_path):
    """build reports success only for bundles that reproduce their golden outputs here."""
    import json

    from bundle_helpers import copy_bundle, resign
    from edgeforge.bundle.build import _smoke_here

    bundle = copy_bundle(host_bundle[0], tmp_path / "b")
    golden = json.loads((bundle / "golden.json").read_text())
    for prompt in golden["prompts"]:  # the engine will disagree with every step
        for step in prompt["steps"]:
            step["top_logits"] = [v + 100.0 for v in step["top_logits"]]
            step["max"], step["min"] = step["max"] + 100.0, step["min"] + 100.0  # consistent, so the verifier lets it run
    (bundle / "golden.json").write_text(json.dumps(golden))
    resign(bundle)
    result = {"ok": True, "path": str(bundle), "target": "x86-cpu", "backend": "onnx"}
    _smoke_here(result)
    assert result["ok"] is False and result["smoke"] == "FAIL" and "its own smoke test" in result["error"]


@pytest.mark.parametrize("step", ["extracting", "verifying"])
def test_sigkilled_archive_smoke_is_cleaned_by_the_next_run(host_bundle, tmp_path, step):
    """SIGKILL (nothing runs on the way out) while smoke extracts an archive or holds a verified
    copy: the next smoke removes what it left in TMPDIR, and only that."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp / ".mine.tmp-1-keep").mkdir()  # looks like ours, is not: kept
    env = dict(os.environ, TMPDIR=str(tmp))
    want = ".edgeforge-smoke.tmp-" if step == "extracting" else ".edgeforge-verified.tmp-"
    # its own session: SIGKILL reaches smoke and the bundle's smoke.py it may have started (a child left
    # running would hold its verified copy's lock, rightly kept by the next run, and the test would race it)
    proc = subprocess.Popen([sys.executable, "-m", "edgeforge.cli", "smoke", str(host_bundle[1])], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert _wait_for(lambda: any(p.name.startswith(want) for p in tmp.iterdir())), proc.communicate(timeout=60)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    left = {p.name for p in tmp.iterdir()} - {".mine.tmp-1-keep", ".ses"}
    assert left, "SIGKILL should have left something to clean"
    code = subprocess.run([sys.executable, "-m", "edgeforge.cli", "smoke", str(host_bundle[1])], env=env,
                          capture_output=True, text=True, timeout=300).returncode
    assert code == 0
    assert {p.name for p in tmp.iterdir()} - {".ses"} == {".mine.tmp-1-keep"}


def _children(pid: int) -> set[int]:
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(c) for c in (task / "children").read_text().split()}
    return out


# A linker that waits: a target's [tvm] cross_compiler is the program that links model.so (any C++
# driver the user names). This one hands every other call (--version) to g++, and for the link itself
# leaves a marker and waits until the process that started it (a --jobs worker) is gone. A build using
# it cannot finish a TVM bundle: whatever the machine's load, the workers are inside the compile step,
# their temporary folders open, when the test acts.
WAITING_LINKER = """#!{python}
import os, sys, time
if "-o" not in sys.argv[1:]:
    os.execvp("g++", ["g++", *sys.argv[1:]])
parent = os.getppid()
open(os.path.join({markers!r}, f"linking-{{os.getpid()}}"), "w").close()
deadline = time.monotonic() + 900
while os.getppid() == parent and time.monotonic() < deadline:
    time.sleep(0.05)
sys.exit(1)
"""


def _waiting_linker_targets(folder: Path, names: tuple[str, ...]) -> tuple[list[str], Path]:
    """Target files like x86-cpu's TVM side whose .so is linked by WAITING_LINKER; and the folder
    where each link that started leaves its marker (linking-PID)."""
    markers = folder / "linking"
    markers.mkdir()
    linker = folder / "waiting-g++"
    linker.write_text(WAITING_LINKER.format(python=sys.executable, markers=str(markers)))
    linker.chmod(0o755)
    paths = []
    for name in names:
        path = folder / f"{name}.toml"
        path.write_text(f'name = "{name}"\ndescription = "x86-64, linked by a linker that waits"\n'
                        'backends = ["tvm"]\nrun = "host"\nos = "linux"\narch = "x86_64"\n\n[tvm]\n'
                        'host = { kind = "llvm", mtriple = "x86_64-linux-gnu", mcpu = "x86-64-v3" }\n'
                        f'export = "so"\ncross_compiler = "{linker}"\n')
        paths.append(str(path))
    return paths, markers


def _running(pid: int) -> bool:
    """The process exists and has not exited (a zombie waiting for its reaper has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_sigterm_stops_jobs_workers_and_renames_nothing(tiny_model, tmp_path):
    """build --jobs 2: SIGTERM to the build while both workers are inside their compile step: exit 143,
    no traceback, every worker gone (not left compiling), nothing in -o, no temporary folder left.

    Deterministic under any load: the two bundles' .so are linked by WAITING_LINKER, so neither bundle
    can be renamed into -o before the signal (a signal sent after watching -o raced the bundle that
    finished first); the signal goes once both links have started."""
    dist = tmp_path / "dist"
    targets, markers = _waiting_linker_targets(tmp_path, ("link-a", "link-b"))
    proc = subprocess.Popen([sys.executable, "-m", "edgeforge.cli", "build", str(tiny_model("llama32")), "--quant",
                             "q4f32", "--target", targets[0], "--target", targets[1], "--backend", "tvm", "--jobs", "2",
                             "--no-smoke", "--no-quality", "test", "-o", str(dist)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # both workers are in their compile step once both links have started (they never end by themselves)
        assert _wait_for(lambda: len(list(markers.iterdir())) >= 2 or proc.poll() is not None, timeout=600)
        assert proc.poll() is None, proc.communicate(timeout=60)
        bundles = [p.name for p in dist.iterdir() if p.is_dir() and "-link-" in p.name]
        assert len(bundles) == 2 and all(name.startswith(".") and ".tmp-" in name for name in bundles), bundles
        workers = _children(proc.pid)
        assert len(workers) >= 2
        linkers = [int(p.name.split("-")[1]) for p in markers.iterdir()]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "Traceback" not in err
        assert _wait_for(lambda: not any(Path(f"/proc/{w}").exists() for w in workers), timeout=30), "a worker survived"
        assert _wait_for(lambda: not any(_running(pid) for pid in linkers), timeout=30), "a link survived"
        assert list(dist.iterdir()) == [], f"left behind: {list(dist.iterdir())}"
    finally:  # whatever is left of the build (on a failure), all in its own session: its workers and links
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.communicate(timeout=60)


# issue 21 (session 9): SIGTERM inside each build step. The build is stopped (SIGSTOP) as soon as a
# line from inside the step arrives, sent SIGTERM, then continued: the signal is acted on in that step.
BUILD_STEPS = {  # the first line of each step's progress (regular expressions)
    "quantize": r"\[quantize\] 2/",
    "golden": r"\[golden\] \d+/\d+ tokens",
    "quality": r"\[quality\] KL and perplexity",
    "compile": r"onnx: building",
}


def _sigterm_at(proc, pattern: str, step: str) -> None:
    """Stop the build (SIGSTOP) at its first stderr line matching `pattern`, send SIGTERM, continue
    it: the signal is acted on inside that step. Then: exit 143 and no traceback."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if re.search(pattern, line):
            proc.send_signal(signal.SIGSTOP)
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)
            break
    else:
        pytest.fail(f"the build never reached its {step} step:\n{''.join(seen)[-2000:]}")
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, rest[-2000:]
    assert "Traceback" not in rest


@pytest.mark.parametrize("step", sorted(BUILD_STEPS))
def test_sigterm_inside_each_build_step(tiny_model, tmp_path, step):
    dist = tmp_path / "dist"
    proc = subprocess.Popen([sys.executable, "-m", "edgeforge.cli", "build", str(tiny_model("llama32")), "--quant",
                             "q4f32", "--target", "x86-cpu", "--backend", "onnx", "--archive", "-o", str(dist)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _sigterm_at(proc, BUILD_STEPS[step], step)
    left = list(dist.iterdir()) if dist.exists() else []
    assert left == [], f"left in -o after SIGTERM in {step}: {left}"


def test_sigterm_while_archiving_leaves_the_bundle_and_no_partial_archive(tiny_model, tmp_path):
    """SIGTERM in the archive step (after the bundle was renamed into -o): exit 143, no traceback, the
    finished bundle stays, and neither a .tar.gz nor its temporary file is left."""
    dist = tmp_path / "dist"
    proc = subprocess.Popen([sys.executable, "-m", "edgeforge.cli", "build", str(tiny_model("llama32")), "--quant",
                             "q4f32", "--target", "x86-cpu", "--backend", "onnx", "--archive", "--no-smoke",
                             "--no-quality", "test", "-o", str(dist)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _sigterm_at(proc, r"\[archive\]", "archive")
    left = sorted(p.name for p in dist.iterdir())
    assert left == ["tiny-llama320-q4f32-x86-cpu-onnx"], left
