"""Argument types shared by every command, so a count or a duration means the same everywhere.

argparse puts the flag in front of the message ("argument --shards: must be >= 1, got 0") and
the CLI turns it into exit 1. A value accepted here may still be refused by the command's own
checks (node_config names the flag), which is why the node's flags accept 0 at this stage.
"""

from __future__ import annotations

import argparse
from typing import Callable


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
# For the node's seed flags: --metrics-port 0 asks for any free port, and node_config checks
# the others' lower bounds with messages of its own.
non_negative_int = int_at_least(0)


def positive_seconds(text: str) -> float:
    """An argparse type: a duration in seconds, greater than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value
