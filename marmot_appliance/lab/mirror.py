"""Find the Debian mirror this machine already uses, so no host name is written into the repo."""

from __future__ import annotations

import os
import re
from pathlib import Path

from marmot_appliance.errors import MarmotError

APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")
APT_SOURCES_LIST = Path("/etc/apt/sources.list")


def _deb822_uris(text: str) -> list[str]:
    """`URIs:` values of deb822 stanzas that carry the main Debian suite (not -security)."""
    uris: list[str] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields = dict(
            (key.strip().lower(), value.strip())
            for key, _, value in (line.partition(":") for line in stanza.splitlines())
            if not key.startswith("#") and value
        )
        types = fields.get("types", "").split()
        suites = fields.get("suites", "").split()
        if "deb" in types and any(not s.endswith("-security") for s in suites):
            uris += fields.get("uris", "").split()
    return uris


def _one_line_uris(text: str) -> list[str]:
    """URIs of `deb [options] URI suite components` lines, skipping security suites."""
    uris = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        body = line[4:].strip()
        if body.startswith("["):
            body = body.split("]", 1)[1] if "]" in body else ""
        parts = body.split()
        if len(parts) >= 2 and not parts[1].endswith("-security"):
            uris.append(parts[0])
    return uris


def debian_mirror(sources_dir: Path = APT_SOURCES_DIR, sources_list: Path = APT_SOURCES_LIST) -> str:
    """The first Debian archive URI from the apt configuration (deb822 files first).

    MARMOT_LAB_MIRROR overrides it (e.g. a local mirror on an air-gapped machine).
    """
    override = os.environ.get("MARMOT_LAB_MIRROR")
    if override:
        return override
    candidates: list[str] = []
    if sources_dir.is_dir():
        for path in sorted(sources_dir.glob("*.sources")):
            candidates += _deb822_uris(path.read_text(errors="replace"))
        for path in sorted(sources_dir.glob("*.list")):
            candidates += _one_line_uris(path.read_text(errors="replace"))
    if sources_list.is_file():
        candidates += _one_line_uris(sources_list.read_text(errors="replace"))
    for uri in candidates:
        if uri.startswith(("http://", "https://", "file:/")):
            return uri
    raise MarmotError(
        f"no Debian mirror found in {sources_dir}/*.sources or {sources_list}; "
        "configure apt (or set MARMOT_LAB_MIRROR) before building the lab image"
    )
