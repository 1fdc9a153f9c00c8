"""Logging setup for the node process: human console lines or one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
import time

CONSOLE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record: ts (unix seconds), level, logger, msg, node, and exc if any."""

    def __init__(self, node: str | None = None):
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 6),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.node:
            entry["node"] = self.node
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(log_format: str = "console", level: str = "info", node: str | None = None, stream=None) -> None:
    """Replace the root logger's handlers. `level` is debug|info|warning|error."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLinesFormatter(node))
    else:
        prefix = f"[{node}] " if node else ""
        handler.setFormatter(logging.Formatter(prefix + CONSOLE_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # nats-py logs every reconnect attempt at error level; ours says it once, with context.
    logging.getLogger("nats").setLevel(logging.CRITICAL if level != "debug" else logging.DEBUG)
