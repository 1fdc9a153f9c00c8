"""A tiny in-process metrics registry rendered in the Prometheus text format.

The node runtime's parts increment counters and set gauges here; the HTTP server in
`marmot_appliance.observability.http` renders them on `/metrics`. Kept dependency-free on
purpose: the hot path only does a dict lookup and an add.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

LabelKey = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@dataclass
class _Family:
    name: str
    kind: str  # "counter" | "gauge"
    help: str
    samples: dict[LabelKey, float] = field(default_factory=dict)


class Metrics:
    """Counters and gauges with labels. Thread-safe enough for asyncio plus one HTTP thread."""

    def __init__(self, prefix: str = "marmot"):
        self.prefix = prefix
        self._families: dict[str, _Family] = {}
        self._lock = threading.Lock()

    def _family(self, name: str, kind: str, help_text: str) -> _Family:
        full = f"{self.prefix}_{name}"
        family = self._families.get(full)
        if family is None:
            with self._lock:
                family = self._families.setdefault(full, _Family(full, kind, help_text))
        return family

    def declare(self, name: str, kind: str, help: str, labelled: bool = False) -> None:
        """Register a family up front so /metrics lists it before its first event (Prometheus
        rates and alerts need the series to exist from the start). An unlabelled family starts
        at zero; a labelled one gains its series as label values occur."""
        family = self._family(name, kind, help)
        family.help = family.help or help
        if not labelled and not family.samples:
            family.samples[()] = 0.0

    def inc(self, name: str, amount: float = 1.0, help: str = "", **labels: str) -> None:
        family = self._family(name, "counter", help)
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        family.samples[key] = family.samples.get(key, 0.0) + amount

    def set(self, name: str, value: float, help: str = "", **labels: str) -> None:
        family = self._family(name, "gauge", help)
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        family.samples[key] = float(value)

    def remove(self, name: str, **labels: str) -> None:
        """Drop one labelled series (e.g. a table that no longer exists)."""
        family = self._families.get(f"{self.prefix}_{name}")
        if family is not None:
            family.samples.pop(tuple(sorted((k, str(v)) for k, v in labels.items())), None)

    def get(self, name: str, **labels: str) -> float:
        family = self._families.get(f"{self.prefix}_{name}")
        if family is None:
            return 0.0
        return family.samples.get(tuple(sorted((k, str(v)) for k, v in labels.items())), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            families = list(self._families.values())
        for family in sorted(families, key=lambda f: f.name):
            sample_name = family.name + ("_total" if family.kind == "counter" else "")
            lines.append(f"# HELP {sample_name} {family.help or family.name}")
            lines.append(f"# TYPE {sample_name} {family.kind}")
            for key, value in sorted(dict(family.samples).items()):
                labels = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
                label_text = f"{{{labels}}}" if labels else ""
                lines.append(f"{sample_name}{label_text} {value!r}")
        return "\n".join(lines) + "\n"
