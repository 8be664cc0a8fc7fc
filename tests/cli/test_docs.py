"""The docs hold to the code: every command and flag of the parser is in docs/cli.md, under its
command's heading; every relative link in the README and docs/ resolves to a file in the repo."""
import argparse
import re
from pathlib import Path

import pytest

from lstm_export.cli.main import build_parser

REPO = Path(__file__).resolve().parents[2]
CLI_MD = REPO / "docs" / "cli.md"


def _commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _sections(text: str) -> dict[str, str]:
    """`## \\`lstm-export NAME\\`` heading -> the text up to the next heading."""
    parts = re.split(r"^## `lstm-export (\S+)`\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_command_and_flag_is_documented(command):
    sections = _sections(CLI_MD.read_text())
    assert command in sections, f"docs/cli.md has no section for `lstm-export {command}`"
    body = sections[command]
    missing = [opt for a in _commands()[command]._actions if a.help != argparse.SUPPRESS
               for opt in a.option_strings if opt.startswith("--") and opt != "--help"
               and not re.search(re.escape(opt) + r"(?![\w-])", body)]
    assert not missing, f"docs/cli.md, `lstm-export {command}`: undocumented flags {missing}"


def test_no_section_for_a_command_that_is_gone():
    assert set(_sections(CLI_MD.read_text())) <= set(_commands())


def test_the_check_finds_a_missing_flag():
    text = "## `lstm-export run`\n| `--runtime` |\n"
    assert "--outputs" not in _sections(text)["run"]


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code is not a link
    text = re.sub(r"`[^`]*`", "", text)
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)  # markdown links and images
    broken = [link for link in links if "://" not in link and not (page.parent / link).exists()]
    assert not broken, f"{page.relative_to(REPO)} links to missing files: {broken}"
