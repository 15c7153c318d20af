"""The docs match the code: every `edgeforge COMMAND --option` that README.md and docs/*.md name
exists in the CLI (asked by click introspection, so commands added later are checked too), every
scheme and target in examples/*.toml is registered, and the scheme and backend tables list exactly
the registries' entries."""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import click
import pytest

from edgeforge.cli import cli
from edgeforge.quant.schemes import SCHEMES
from edgeforge.runtime.backends import BACKENDS
from edgeforge.targets import get_target

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCED = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`(edgeforge [^`\n]+)`")
BLOCK_LINE = re.compile(r"^\s*(?:\$ )?(edgeforge [^\n#]+)", re.M)  # a command line in a code block, comment cut
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])\b")


def mentions(text: str) -> list[str]:
    """`edgeforge ...` in inline code, and the lines of fenced code blocks that start with it."""
    blocks = FENCED.findall(text)
    prose = FENCED.sub("", text)
    return INLINE.findall(prose) + [m for block in blocks for m in BLOCK_LINE.findall(block)]


def resolve(words: list[str]) -> tuple[list[click.Command], list[str]]:
    """The chain of click commands the words name (group first), and the words left after them."""
    chain: list[click.Command] = [cli]
    ctx = click.Context(cli)
    rest = list(words)
    while rest and isinstance(chain[-1], click.Group):
        sub = chain[-1].get_command(ctx, rest[0].split("|")[0])
        if sub is None:
            break
        chain.append(sub)
        rest.pop(0)
    return chain, rest


def known_options(chain: list[click.Command]) -> set[str]:
    ctx = click.Context(cli)
    found = set(ctx.help_option_names)
    for cmd in chain:
        for param in cmd.get_params(ctx):
            found.update(getattr(param, "opts", []) + getattr(param, "secondary_opts", []))
    return found


def problems_in(path: Path) -> list[str]:
    problems = []
    for mention in mentions(path.read_text()):
        mention = mention.strip()
        words = mention.split()[1:]
        group_options = list(itertools.takewhile(lambda w: w.startswith("-"), words))  # `edgeforge -q build`
        problems += [f"{path.name}: `{mention}`: edgeforge has no {w}" for w in group_options
                     if w not in known_options([cli])]
        words = words[len(group_options):]
        if not words:
            continue
        for command in re.split(r"[/|]", words[0]):  # `edgeforge smoke/run/bench --trust`: each of them
            problems += _mention_problems(path.name, mention, [command, *words[1:]])
    return problems


def _mention_problems(doc: str, mention: str, words: list[str]) -> list[str]:
    chain, _ = resolve(words)
    if len(chain) == 1:
        return [f"{doc}: `{mention}`: no command {words[0]!r}"]
    options = known_options(chain)
    return [f"{doc}: `{mention}`: {' '.join(c.name for c in chain[1:])} has no {option}"
            for option in OPTION.findall(" ".join(words)) if option not in options]


def test_every_command_and_option_the_docs_name_exists():
    problems = [p for doc in DOCS for p in problems_in(doc)]
    assert not problems, "\n".join(problems)


def test_the_docs_check_catches_a_wrong_option_and_a_wrong_command(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("Run `edgeforge smoke B --emulate` and `edgeforge generate M --emulate`.\n"
                   "`edgeforge run/bench --trust K.pem`, `edgeforge smoke/plan --ssh H`, `edgeforge -x build`\n"
                   "edgeforge builds bundles (prose, not a command)\n\n"
                   "```sh\nedgeforge fly --high   # --comment\nedgeforge -q toolchains install arm64 -v\n```\n")
    assert problems_in(doc) == ["x.md: `edgeforge generate M --emulate`: generate has no --emulate",
                                "x.md: `edgeforge smoke/plan --ssh H`: plan has no --ssh",
                                "x.md: `edgeforge -x build`: edgeforge has no -x",
                                "x.md: `edgeforge fly --high`: no command 'fly'"]


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_name_registered_schemes_and_targets(example):
    raw = tomllib.loads(example.read_text())
    assert raw["quant"] in SCHEMES
    targets = raw["targets"]
    for name, backends in (targets.items() if isinstance(targets, dict) else ((t, "auto") for t in targets)):
        target = get_target(name)  # raises, naming the known ones, for an unregistered target
        if isinstance(backends, list):
            assert set(backends) <= set(target.backends) <= set(BACKENDS), (name, backends)
    # the comment that lists the schemes lists the registry's
    listed = re.search(r"^quant = .*#\s*(.*)$", example.read_text(), re.M).group(1).split("(")[0].split()
    assert set(listed) == set(SCHEMES), listed


def table_column(text: str, heading: str) -> list[str]:
    """The names in the first column of the first markdown table after the line `heading` starts
    ("a, b" cells give both)."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = lines[start + 2:end]  # past the header and the |---| line
    return [name.strip().strip("`") for row in rows for name in row.split("|")[1].split(",")]


def test_scheme_tables_list_the_registry():
    readme = (ROOT / "README.md").read_text()
    internals = (ROOT / "docs" / "INTERNALS.md").read_text()
    assert sorted(table_column(readme, "Schemes (`edgeforge quantize --help`")) == sorted(SCHEMES)
    assert sorted(table_column(internals, "### Schemes (quant/schemes.py)")) == sorted(SCHEMES)


def test_backend_table_lists_the_registry():
    internals = (ROOT / "docs" / "INTERNALS.md").read_text()
    assert table_column(internals, "### Backend registry") == list(BACKENDS)
