"""The metrics registry: families declared up front appear before their first event."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from marmot_appliance.node.runtime import LABELLED_NODE_METRICS, NODE_METRICS, UNSAMPLED_NODE_METRICS
from marmot_appliance.observability.metrics import Metrics

# The families the /metrics contract promises (docs/appliance.md, issue 5).
CONTRACT = {
    "rows_published", "batches_published", "rows_applied", "batches_applied",
    "bytes_uncompressed", "bytes_compressed", "stream_lag", "dead_letters", "errors",
}


def test_node_declares_every_contract_family():
    declared = {name for name, _, _ in NODE_METRICS + LABELLED_NODE_METRICS}
    assert CONTRACT <= declared


def test_declared_families_render_before_any_event_and_parse():
    metrics = Metrics()
    for name, kind, help_text in NODE_METRICS:
        metrics.declare(name, kind, help_text)
    for name, kind, help_text in LABELLED_NODE_METRICS:
        metrics.declare(name, kind, help_text, labelled=True)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render())}
    assert families["marmot_rows_published"].type == "counter"
    assert [s.value for s in families["marmot_rows_published"].samples] == [0.0]
    assert families["marmot_errors"].samples == []  # labelled: no fake unlabelled series

    metrics.inc("rows_published", 5)
    metrics.inc("errors", kind="publish_timeout")
    metrics.set("stream_lag", 3, stream="marmot-changes-1")
    families = {f.name: f for f in text_string_to_metric_families(metrics.render())}
    assert [s.value for s in families["marmot_rows_published"].samples] == [5.0]
    (error,) = families["marmot_errors"].samples
    assert error.labels == {"kind": "publish_timeout"} and error.value == 1.0
    (lag,) = families["marmot_stream_lag"].samples
    assert lag.labels == {"stream": "marmot-changes-1"} and lag.value == 3.0


def test_every_metric_docs_replication_md_names_exists_from_start_up():
    """The `GET /metrics` list in docs/replication.md: each family is on /metrics before its
    first event (declared by the node runtime), not only after it happened once."""
    import re
    from pathlib import Path

    from marmot_appliance.node import waiting_rows

    doc = (Path(__file__).resolve().parents[1] / "docs" / "replication.md").read_text()
    paragraph = doc[doc.index("`GET /metrics`:"):]
    paragraph = paragraph[:paragraph.index("\n\n")]
    documented = set(re.findall(r"`(marmot_[a-z_]+)", paragraph))
    metrics = Metrics()
    for name, kind, help_text in NODE_METRICS:
        metrics.declare(name, kind, help_text)
    for name, kind, help_text in LABELLED_NODE_METRICS:
        metrics.declare(name, kind, help_text, labelled=True)
    for name, kind, help_text in UNSAMPLED_NODE_METRICS:
        metrics.declare(name, kind, help_text, labelled=True)
    waiting_rows.declare_metrics(metrics)
    from marmot_appliance.verify.continuous import METRICS as VERIFY_METRICS  # declared when it runs

    for name, kind, help_text in VERIFY_METRICS:
        metrics.declare(name, kind, help_text, labelled=True)
    rendered = set(re.findall(r"^# TYPE (\S+)", metrics.render(), re.M))
    assert documented and documented - rendered == set()
