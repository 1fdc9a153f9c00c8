"""Placeholder: this command group's owner fills it in."""


def register(subparsers) -> None:
    return None
