"""Command-line entry point (placeholder until the CLI package lands)."""


def main(argv=None) -> int:
    return 0
