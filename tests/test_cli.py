"""The CLI surface: every command has --help with an example; errors are one line with exit 2."""

import subprocess
import sys

import pytest

from edgeforge.cli import COMMANDS


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "edgeforge.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_with_an_example(name):
    proc = run_cli(name, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Example" in proc.stdout and f"edgeforge {name}" in proc.stdout


def test_compile_refuses_a_folder_that_is_not_a_qdir(tmp_path):
    proc = run_cli("compile", str(tmp_path), "--target", "x86-cpu", "-o", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and str(tmp_path) in proc.stderr
