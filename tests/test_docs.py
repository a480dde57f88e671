"""The user documentation cannot rot: its links resolve and its `zsd` command lines parse.

Every relative link in README.md and docs/*.md must name an existing file (and, for a Markdown
file, an existing heading anchor). Every `zsd ...` line in their code blocks must name a real
command with options it accepts, parsed by the CLI's own click parser without running anything:
no callback is invoked and path types are not checked against this machine's files.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import click
import pytest

from zsd.cli import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~)(.*)$")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
# Fences whose lines are not commands to run: synopses with [optional] parts, printed output.
NOT_COMMANDS = {"text", "json", "python", "bibtex", "console-output"}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _blocks(text: str):
    """(info string, [(line number, line)]) of every fenced code block."""
    block, info = None, ""
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line.strip())
        if m and block is None:
            block, info = [], m.group(2).strip().lower()
        elif m:
            yield info, block
            block = None
        elif block is not None:
            block.append((n, line))


def _prose(text: str) -> str:
    """The page without its code blocks and inline code, where links live."""
    out, inside = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            inside = not inside
            continue
        if not inside:
            out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\*", "", heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    inside = False
    for line in page.read_text().splitlines():
        if FENCE.match(line.strip()):
            inside = not inside
            continue
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m and not inside:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links():
    for page in PAGES:
        for m in LINK.finditer(_prose(page.read_text())):
            target = m.group(1) or m.group(2)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, mailto: ... are not checked here
                yield pytest.param(page, target, id=f"{_rel(page)}->{target}")


@pytest.mark.parametrize("page,target", list(links()))
def test_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    assert dest.exists(), f"{_rel(page)}: link {target} names a missing file"
    if anchor and dest.suffix == ".md":
        assert anchor in anchors(dest), f"{_rel(page)}: link {target}: no heading with anchor #{anchor} in {_rel(dest)}"


def command_lines():
    """Every `zsd ...` command in a code block, with its page and line number."""
    for page in PAGES:
        for info, block in _blocks(page.read_text()):
            if info in NOT_COMMANDS:
                continue
            joined, start = "", None
            for n, line in block:  # join backslash continuations
                start = start or n
                if line.rstrip().endswith("\\"):
                    joined += line.rstrip()[:-1] + " "
                    continue
                joined += line
                for part in re.split(r"&&|;|\|\|", joined):
                    words = shlex.split(part, comments=True)
                    if words[:1] == ["$"]:
                        words = words[1:]
                    if "zsd" in words:  # zsd ..., python -m zsd ..., torchrun ... -m zsd ...
                        i = words.index("zsd")
                        if i == 0 or words[i - 1] == "-m":
                            yield pytest.param(words[i + 1:], id=f"{_rel(page)}:{start}")
                joined, start = "", None


def parse_only(command: click.Command) -> click.Command:
    """A copy of the command whose parameters convert their values but run no callback and touch no file."""
    params = []
    for p in command.params:
        p = copy.copy(p)
        p.callback = None
        if isinstance(p.type, click.Path):
            p.type = click.STRING
        params.append(p)
    return click.Command(command.name, params=params, context_settings=command.context_settings)


@pytest.mark.parametrize("words", list(command_lines()))
def test_command_line_parses(words, monkeypatch):
    assert words, "a bare `zsd` line"
    name, args = words[0], words[1:]
    assert name in cli.commands, f"`zsd {name}` is not a command (commands: {', '.join(sorted(cli.commands))})"
    if "--help" in args or "-h" in args:
        return
    # Shell variables stand for values a scheduler fills in: SLURM_ARRAY_TASK_ID, for one.
    args = [re.sub(r"^\$\{?\w+\}?$", "0", a) for a in args]
    parse_only(cli.commands[name]).make_context(f"zsd {name}", args, resilient_parsing=False)


def test_the_checker_rejects_what_the_cli_rejects():
    """The parse above can fail: unknown commands, unknown options, bad choices and missing options."""
    assert "frobnicate" not in cli.commands
    train = parse_only(cli.commands["train"])
    for bad in (["--targets", "x", "--out", "r", "--no-such-option"],
                ["--targets", "x", "--out", "r", "--precision", "fp8"],
                ["--targets", "x"]):
        with pytest.raises(click.UsageError):
            train.make_context("zsd train", bad, resilient_parsing=False)
    train.make_context("zsd train", ["--targets", "x", "--out", "r", "--precision", "fp32"], resilient_parsing=False)


def test_the_link_checker_sees_headings_as_github_does():
    assert slug("Pixel cache (`--pixel-cache auto|yes|no`)") == "pixel-cache---pixel-cache-autoyesno"
    assert slug("Robustness: `zsd robustness`") == "robustness-zsd-robustness"
    assert slug("Class prototypes (`--classes-from`)") == "class-prototypes---classes-from"


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
