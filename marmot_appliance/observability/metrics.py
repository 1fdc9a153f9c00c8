"""A node's metrics in a prometheus_client registry of its own, rendered on `/metrics`.

Each `Metrics` holds its own `CollectorRegistry` (never the library's global one): tests run
several node runtimes in one process, and each must export only its own counts. Every family is
declared up front from observability/families.py, so /metrics lists it before its first event
(Prometheus rates and alerts need the series from the start). The runtime's parts call
`inc` / `set` / `observe` by family name with label values as keywords; a name that is not
declared is a programming error (KeyError; tests/test_metrics.py checks every call site).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from marmot_appliance.observability.families import NODE_FAMILIES, Family

_KINDS = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}


class _UnsampledGauge:
    """An unlabelled gauge listed from start-up without a sample until it is first set
    (prometheus_client's Gauge starts at 0, which for an age would claim "just now")."""

    def __init__(self, name: str, documentation: str):
        self.name = name
        self.documentation = documentation
        self.value: float | None = None

    def set(self, value: float) -> None:
        self.value = float(value)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation)
        if self.value is not None:
            family.add_metric([], self.value)
        yield family


class _WithoutCreated:
    """The registry as rendered: without the `_created` series prometheus_client adds to each
    counter and histogram (a second series per counter that no rule or dashboard here reads)."""

    def __init__(self, registry: CollectorRegistry):
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class Metrics:
    """Counters, gauges and histograms by family name. Thread-safe (prometheus_client locks each
    value): the database threads observe apply times while the event loop counts."""

    def __init__(self, families: Iterable[Family] = NODE_FAMILIES, prefix: str = "marmot"):
        self.prefix = prefix
        self.registry = CollectorRegistry(auto_describe=True)
        self._metrics: dict[str, Any] = {}
        self._families: dict[str, Family] = {}
        # (name, label items) -> the labelled child: prometheus_client's labels() checks and
        # locks on every call (twice the old hand-written registry's cost per labelled update,
        # paid per applied message for the stream lag); a dict lookup finds it again.
        self._children: dict[tuple, Any] = {}
        self._view = _WithoutCreated(self.registry)
        self.declare_all(families)

    def declare_all(self, families: Iterable[Family]) -> None:
        """Register families; one already declared is kept as it is (a part started again)."""
        for family in families:
            if family.name in self._families:
                continue
            full = f"{self.prefix}_{family.name}"
            if family.unsampled:
                metric: Any = _UnsampledGauge(full, family.help)
                self.registry.register(metric)
            elif family.kind == "histogram":
                metric = Histogram(full, family.help, family.labels, registry=self.registry, buckets=family.buckets)
            else:
                metric = _KINDS[family.kind](full, family.help, family.labels, registry=self.registry)
            self._metrics[family.name] = metric
            self._families[family.name] = family

    def _series(self, name: str, labels: dict[str, Any]) -> Any:
        if not labels:
            return self._metrics[name]
        key = (name, tuple(labels.items()))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._metrics[name].labels(**labels)
        return child

    def inc(self, name: str, amount: float = 1.0, **labels: Any) -> None:
        self._series(name, labels).inc(amount)

    def set(self, name: str, value: float, **labels: Any) -> None:
        self._series(name, labels).set(value)

    def observe(self, name: str, value: float, **labels: Any) -> None:
        self._series(name, labels).observe(value)

    def remove(self, name: str, **labels: Any) -> None:
        """Drop one labelled series (e.g. a table that no longer exists)."""
        values = {label: str(value) for label, value in labels.items()}
        for key in [key for key in self._children if key[0] == name and
                    {label: str(value) for label, value in key[1]} == values]:
            self._children.pop(key, None)
        self._metrics[name].remove(*(labels[label] for label in self._families[name].labels))

    def get(self, name: str, **labels: Any) -> float:
        """A counter's or gauge's current value (0 when the series does not exist yet)."""
        family = self._families[name]
        sample = f"{self.prefix}_{name}" + ("_total" if family.kind == "counter" else "")
        value = self.registry.get_sample_value(sample, {k: str(v) for k, v in labels.items()})
        return 0.0 if value is None else value

    def render(self) -> str:
        """The Prometheus text format (version 0.0.4)."""
        return generate_latest(self._view).decode()
