"""Progress through `logging`: -q / -v on the real CLI, the progress helper on terminals and in
logs, --json stays pure JSON, and library code never imports edgeforge.commands."""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgeforge import progress as P

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "edgeforge"


def edgeforge(*args, env=None):
    """`python -m edgeforge.cli ARGS` in a child: logging configured exactly as for a user, stderr a pipe."""
    env = dict(os.environ if env is None else env)
    env.pop("EDGEFORGE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "edgeforge.cli", *map(str, args)], capture_output=True,
                          text=True, env=env)


# ---- the CLI: -q, default, -v ----------------------------------------------------------------------

def test_quantize_default_prints_about_ten_progress_lines(tiny_model, tmp_path):
    proc = edgeforge("quantize", tiny_model("llama32"), "--quant", "q8f16", "-o", tmp_path / "q")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    progress = [line for line in lines if line.startswith("[quantize] ")]
    n = len(json.loads((tmp_path / "q" / "quantization.json").read_text())["tensors"])
    assert 5 <= len(progress) <= 11, proc.stderr
    assert progress[-1].startswith(f"[quantize] {n}/{n} tensors (") and progress[-1].endswith(" s)")
    assert "\r" not in proc.stderr  # a pipe gets plain lines, never a bar
    assert not [line for line in lines if line.startswith("[1/")]  # per-tensor details are DEBUG
    assert proc.stdout.startswith(f"wrote {tmp_path / 'q'}: q8f16")


def test_quantize_quiet_prints_no_progress_but_writes(tiny_model, tmp_path):
    model = tiny_model("llama32")
    for out, cmd in ((tmp_path / "before", ["-q", "quantize", model, "--quant", "q4f32", "-o", tmp_path / "before"]),
                     (tmp_path / "after", ["quantize", model, "--quant", "q4f32", "-o", tmp_path / "after", "--quiet"])):
        proc = edgeforge(*cmd)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == "", proc.stderr  # neither [calibrate] nor [quantize] lines, nor a bar
        assert proc.stdout.startswith(f"wrote {out}: q4f32")
        assert (out / "quantization.json").is_file() and (out / "model.safetensors.index.json").is_file()


def test_quantize_verbose_adds_per_tensor_debug_lines(tiny_model, tmp_path):
    for args in (["-v", "quantize", tiny_model("llama32")], ["quantize", tiny_model("llama32"), "--verbose"]):
        out = tmp_path / f"q{len(list(tmp_path.iterdir()))}"
        proc = edgeforge(*args, "--quant", "q8f16", "-o", out)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stderr.splitlines()
        tensors = json.loads((out / "quantization.json").read_text())["tensors"]
        details = [line for line in lines if line.startswith("[") and "] model." in line and " -> " in line]
        assert len(details) == len(tensors), proc.stderr
        assert f"[1/{len(tensors)}] model.embed_tokens.weight [384, 128] -> q8" in details
        assert any(line.startswith("[quantize] ") for line in lines)  # INFO progress is still there


def test_errors_still_show_with_quiet(tmp_path):
    proc = edgeforge("-q", "quantize", tmp_path / "missing", "--quant", "q8f16", "-o", tmp_path / "q")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "missing" in proc.stderr


def test_json_stays_pure_json_with_progress_on_stderr(tiny_model, tmp_path):
    proc = edgeforge("quantize", tiny_model("llama32"), "--quant", "q4f32", "-o", tmp_path / "q", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # nothing but the JSON object on stdout
    assert summary["scheme"] == "q4f32" and summary["tensors"] > 0
    assert "[calibrate] " in proc.stderr and "[quantize] " in proc.stderr
    proc = edgeforge("-v", "compile", tmp_path / "q", "--target", "x86-cpu", "--backend", "onnx",
                     "-o", tmp_path / "art", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["backend"] == "onnx"
    assert "onnx: building" in proc.stderr and "onnx: wrote" in proc.stderr


def test_in_process_runs_do_not_inherit_quiet(tiny_model, tmp_path, capsys):
    """main() resets the level each run (tests and embedders call it more than once)."""
    from bundle_helpers import cli

    code, _, err = cli(capsys, "-q", "quantize", tiny_model("llama32"), "--quant", "q8f16", "-o", tmp_path / "a")
    assert code == 0 and err == ""
    code, _, err = cli(capsys, "quantize", tiny_model("llama32"), "--quant", "q8f16", "-o", tmp_path / "b")
    assert code == 0 and "[quantize] " in err
    assert len([h for h in logging.getLogger("edgeforge").handlers if isinstance(h, P._StderrHandler)]) == 1


def test_verbosity_flags_do_not_eat_option_values(tiny_model, capsys):
    """`--prompt -v` is a prompt: -q/-v are real click options, not filtered out of argv."""
    from bundle_helpers import cli

    code, out, _ = cli(capsys, "generate", tiny_model("llama32"), "--prompt", "-v", "-n", 2, "--json")
    assert code == 0
    assert json.loads(out)["prompt_tokens"] > 0


def test_help_documents_quiet_and_verbose():
    proc = edgeforge("--help")
    assert proc.returncode == 0
    assert "-q, --quiet" in proc.stdout and "-v, --verbose" in proc.stdout and "terminal" in proc.stdout
    proc = edgeforge("bench", "--help")  # bench's own -n/-p/-r stay as they are
    assert "-n, --n-gen" in proc.stdout and "-q, --quiet" in proc.stdout


# ---- the progress helper ---------------------------------------------------------------------------

class FakeTTY(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def info_logger():
    """A logger under "edgeforge" (the tests set its level with caplog.at_level)."""
    return logging.getLogger("edgeforge.tests.progress")


def test_terminal_gets_one_updating_bar(info_logger, monkeypatch, caplog):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setattr(P.Progress, "MIN_REDRAW_S", 0.0)
    tty = FakeTTY()
    with caplog.at_level(logging.INFO, logger="edgeforge"):
        with P.progress(100, "[work]", unit="items", logger=info_logger, stream=tty) as bar:
            for i in range(100):
                bar.advance(1, f"item {i}")
    text = tty.getvalue()
    assert text.count("\r") >= 100 and text.endswith("\n") and text.count("\n") == 1  # one line, redrawn
    last = text.rstrip("\n").split("\r")[-1]
    assert last.startswith("[work] [####################] 100/100 items 100% 0:00 ")
    assert "items/s" in last and "item 99" in last
    assert "[work] [##########..........] 50/100 items  50%" in text
    assert not [r for r in caplog.records if r.getMessage().startswith("[work]")]  # no plain lines as well


def test_a_long_detail_is_cut_from_the_left_to_fit_the_terminal(info_logger, monkeypatch):
    """On a narrow terminal a tensor name must keep its distinguishing end, not `model.`."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    with P.progress(10, "[quantize]", unit="tensors", logger=info_logger, stream=FakeTTY()) as bar:
        bar.advance(1, "model.layers.27.self_attn.q_proj.weight")
        line = bar.text(width=100)
    assert len(line) <= 100 and line.endswith("q_proj.weight") and "..." in line, line


@pytest.mark.parametrize("env", [{"CI": "true"}, {"TERM": "dumb"}])
def test_ci_or_dumb_terminal_gets_plain_lines(info_logger, monkeypatch, caplog, env):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    tty = FakeTTY()
    with caplog.at_level(logging.INFO, logger="edgeforge"):
        with P.progress(100, "[work]", unit="items", logger=info_logger, stream=tty) as bar:
            for _ in range(100):
                bar.advance()
    assert tty.getvalue() == ""
    assert len([r for r in caplog.records if r.getMessage().startswith("[work]")]) == 10


def test_non_terminal_logs_about_every_tenth(info_logger, caplog):
    stream = io.StringIO()  # a pipe or a file: no bar
    with caplog.at_level(logging.INFO, logger="edgeforge"):
        with P.progress(100, "[work]", unit="items", logger=info_logger, stream=stream) as bar:
            for _ in range(100):
                bar.advance(1, "detail")
    lines = [r.getMessage() for r in caplog.records]
    assert stream.getvalue() == ""
    assert len(lines) == 10 and lines[0].startswith("[work] 10/100 items (") and lines[-1].startswith("[work] 100/100 items (")
    assert all(r.levelno == logging.INFO for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edgeforge"):
        with P.progress(7, "[few]", unit="tensors", logger=info_logger, stream=stream) as bar:
            for _ in range(7):
                bar.advance()
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [f"[few] {i}/7 tensors" for i in range(1, 8)]


def test_a_loop_that_ends_early_reports_its_last_count(info_logger, caplog):
    with caplog.at_level(logging.INFO, logger="edgeforge"):
        with P.progress(100, "[work]", logger=info_logger, stream=io.StringIO()) as bar:
            bar.advance(15)
            bar.advance(2)  # stops at 17 (a generation that hit its stop token)
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["[work] 15/100 items", "[work] 17/100 items"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edgeforge"), pytest.raises(KeyError):
        with P.progress(100, "[work]", logger=info_logger, stream=io.StringIO()) as bar:
            bar.advance(5)
            raise KeyError("failed")
    assert caplog.records == []  # a failed loop adds no "done" line


def test_quiet_draws_and_logs_nothing(monkeypatch, caplog):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    log = logging.getLogger("edgeforge.tests.progress")
    tty = FakeTTY()
    with caplog.at_level(logging.WARNING, logger="edgeforge"):
        with P.progress(10, "[work]", logger=log, stream=tty) as bar:
            for _ in range(10):
                bar.advance()
    assert tty.getvalue() == "" and not caplog.records


def test_configure_installs_one_handler_and_sets_levels():
    root = logging.getLogger("edgeforge")
    old = root.level
    try:
        for verbosity, level in ((-1, logging.WARNING), (0, logging.INFO), (1, logging.DEBUG), (2, logging.DEBUG)):
            P.configure(verbosity)
            assert root.level == level
        assert len([h for h in root.handlers if isinstance(h, P._StderrHandler)]) == 1
    finally:
        root.setLevel(old)


def test_log_records_take_the_bar_off_its_line(monkeypatch, capsys):
    """A record written while a bar is drawn clears the bar first and redraws it after."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    root = logging.getLogger("edgeforge")
    old = root.level
    monkeypatch.setattr(P.Progress, "MIN_REDRAW_S", 0.0)
    P.configure(0)
    try:
        tty = FakeTTY()
        log = logging.getLogger("edgeforge.tests.progress")
        with P.progress(4, "[work]", logger=log, stream=tty) as bar:
            bar.advance(1)
            log.info("a message")
            bar.advance(3)
        assert capsys.readouterr().err == "a message\n"
        text = tty.getvalue()
        cleared = re.search(r"\r +\r", text).start()
        assert "1/4" in text[:cleared] and "1/4" in text[cleared:] and "4/4" in text[cleared:]
    finally:
        root.setLevel(old)


# ---- library code never imports edgeforge.commands --------------------------------------------------

def _imports(path: Path) -> list[str]:
    """Absolute module names `path` imports (relative imports resolved against its package)."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names += [module] + [f"{module}.{a.name}" for a in node.names]
    return names


def test_library_code_never_imports_commands():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "commands" or rel.as_posix() == "cli.py":
            continue
        offenders += [f"{rel}: {name}" for name in _imports(path) if name.startswith("edgeforge.commands")]
    assert offenders == []
    # relative imports are resolved (pack.py once imported compile_qdir from ..commands.compile_cmd)
    assert "edgeforge.backends.compile_qdir" in _imports(PACKAGE / "bundle" / "pack.py")
    assert "edgeforge.backends.compile_qdir" in _imports(PACKAGE / "commands" / "compile_cmd.py")


def test_runtime_stays_self_contained():
    """edgeforge/runtime/ is copied into bundles: it imports only itself and outside packages."""
    for path in sorted((PACKAGE / "runtime").rglob("*.py")):
        for name in _imports(path):
            if name.startswith("edgeforge"):
                assert name.startswith("edgeforge.runtime"), f"{path.name} imports {name}"
