"""Every command and every flag of `marmot-appliance` is documented (sqlite-utils' docs test).

The parsers are walked as argparse builds them, so a new command or flag fails here until README.md
or a docs/ page names it. A command is documented where a page writes `marmot-appliance <command>`
(`schema plan|apply` names both); a flag is documented when a page that documents its command
writes it, so `--timeout` on `verify`'s page does not count for `apply`. Only the long spelling
is required: the seed's single-dash forms (`-node-id`) are aliases of documented flags.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from marmot_appliance.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
PAGES = {path.relative_to(REPO).as_posix(): path.read_text() for path in
         [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]}
PROGRAM = "marmot-appliance"


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


COMMANDS = dict(_commands(build_parser()))


def _long_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings
            if option.startswith("--") and option != "--help"]


def _names_command(text: str, path: tuple[str, ...]) -> bool:
    """`marmot-appliance a b`, where each word may stand in an alternation like `plan|apply`."""
    word = r"(?:[\w-]+\\?\|)*{}(?:\\?\|[\w-]+)*(?![\w-])"
    pattern = r"\s+".join([re.escape(PROGRAM), *(word.format(re.escape(part)) for part in path)])
    return re.search(pattern, text) is not None


def _pages_of(path: tuple[str, ...]) -> list[str]:
    return [name for name, text in PAGES.items() if _names_command(text, path)]


def _label(path: tuple[str, ...]) -> str:
    return " ".join((PROGRAM, *path))


@pytest.mark.parametrize("path", list(COMMANDS), ids=_label)
def test_command_is_documented(path):
    assert _pages_of(path), f"`{_label(path)}` appears in neither README.md nor docs/*.md"


def _undocumented_flags(path: tuple[str, ...], parser: argparse.ArgumentParser) -> list[str]:
    pages = _pages_of(path)
    return [flag for flag in _long_flags(parser)
            if not any(re.search(re.escape(flag) + r"(?![\w-])", PAGES[page]) for page in pages)]


@pytest.mark.parametrize("path", [path for path in COMMANDS if _long_flags(COMMANDS[path])], ids=_label)
def test_every_flag_is_documented_with_its_command(path):
    missing = _undocumented_flags(path, COMMANDS[path])
    assert not missing, f"`{_label(path)}`: {missing} undocumented in the pages that name it ({_pages_of(path)})"


def test_the_checks_can_fail():
    """The walk reaches nested commands, and a flag added without docs is reported."""
    assert ("snapshot", "restore") in COMMANDS and ("lab", "link") in COMMANDS
    parser = dict(_commands(build_parser()))[("apply",)]
    parser.add_argument("--surely-not-in-the-docs")
    assert _undocumented_flags(("apply",), parser) == ["--surely-not-in-the-docs"]
    assert not _pages_of(("no-such-command",))
    # `--timeout` is documented for `apply`, but `--timeout-s` would not be (whole flags only).
    assert _undocumented_flags(("apply",), _with_flag("--timeout-s")) == ["--timeout-s"]
    assert _names_command("run `marmot-appliance schema plan|apply SPEC`", ("schema", "apply"))
    assert not _names_command("marmot-appliance schema planner", ("schema", "plan"))


def _with_flag(flag: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument(flag)
    return parser
