"""The lab sequence printed in docs/deploy.md, read from the page itself.

tests/test_lab_newuser.py runs these commands (so the page cannot drift from what works) and
tests/test_docs_commands.py checks, without a lab, that each one is a valid command line.
"""

from __future__ import annotations

import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEPLOY_DOC = REPO / "docs" / "deploy.md"
MARKER = "<!-- lab-sequence -->"


def lab_sequence(doc: Path = DEPLOY_DOC) -> list[list[str]]:
    """argv of every command in the fenced block after the marker (`sudo` dropped)."""
    text = doc.read_text()
    start = text.index(MARKER)
    block = text[text.index("```sh\n", start) + len("```sh\n"):]
    block = block[:block.index("```")]
    commands = []
    for line in block.splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        if argv[0] == "sudo":
            argv = argv[1:]
        commands.append(argv)
    return commands


def kind(argv: list[str]) -> str:
    """`lab up`, `apply`, `lab exec` ...: what a documented command does, for the tests."""
    if argv[1] == "lab":
        return f"lab {argv[2]}"
    return argv[1]
