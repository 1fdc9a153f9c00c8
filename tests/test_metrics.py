"""The metrics registry: families declared up front appear before their first event, each
runtime has a registry of its own, and every call site names a declared family of its kind."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from marmot_appliance.observability.families import NODE_FAMILIES, VERIFY_FAMILIES
from marmot_appliance.observability.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
# The families the /metrics contract promises (docs/appliance.md, issue 5).
CONTRACT = {
    "rows_published", "batches_published", "rows_applied", "batches_applied",
    "bytes_uncompressed", "bytes_compressed", "stream_lag", "dead_letters", "errors",
}


def _families(metrics: Metrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(metrics.render())}


def test_node_declares_every_contract_family():
    assert CONTRACT <= {family.name for family in NODE_FAMILIES}


def test_declared_families_render_before_any_event_and_parse():
    metrics = Metrics()
    families = _families(metrics)
    assert families["marmot_rows_published"].type == "counter"
    assert [s.value for s in families["marmot_rows_published"].samples] == [0.0]
    assert families["marmot_errors"].samples == []  # labelled: no fake unlabelled series
    assert families["marmot_snapshot_age_seconds"].samples == []  # no age before there is a snapshot

    metrics.inc("rows_published", 5)
    metrics.inc("errors", kind="publish_timeout")
    metrics.set("stream_lag", 3, stream="marmot-changes-1")
    metrics.set("snapshot_age_seconds", 12.5)
    families = _families(metrics)
    assert [s.value for s in families["marmot_rows_published"].samples] == [5.0]
    (error,) = families["marmot_errors"].samples
    assert error.labels == {"kind": "publish_timeout"} and error.value == 1.0
    (lag,) = families["marmot_stream_lag"].samples
    assert lag.labels == {"stream": "marmot-changes-1"} and lag.value == 3.0
    assert [s.value for s in families["marmot_snapshot_age_seconds"].samples] == [12.5]
    assert metrics.get("rows_published") == 5 and metrics.get("stream_lag", stream="marmot-changes-1") == 3
    metrics.remove("stream_lag", stream="marmot-changes-1")
    assert _families(metrics)["marmot_stream_lag"].samples == []
    metrics.set("stream_lag", 4, stream="marmot-changes-1")  # a series removed comes back when set again
    assert [s.value for s in _families(metrics)["marmot_stream_lag"].samples] == [4.0]


def test_no_created_series_and_histograms_render_their_buckets():
    metrics = Metrics()
    metrics.observe("apply_transaction_seconds", 0.003)
    metrics.observe("apply_transaction_seconds", 0.2)
    text = metrics.render()
    assert "_created" not in text  # prometheus_client's extra series per counter stay out
    assert "# TYPE marmot_apply_transaction_seconds histogram" in text
    assert 'marmot_apply_transaction_seconds_bucket{le="0.005"} 1.0' in text
    assert 'marmot_apply_transaction_seconds_bucket{le="+Inf"} 2.0' in text
    assert "marmot_apply_transaction_seconds_count 2.0" in text


def test_each_runtime_counts_in_its_own_registry():
    """Tests run several node runtimes in one process: one's counts never show on another's."""
    first, second = Metrics(), Metrics()
    first.inc("rows_applied", 7)
    assert first.get("rows_applied") == 7 and second.get("rows_applied") == 0
    second.declare_all(VERIFY_FAMILIES)
    second.declare_all(VERIFY_FAMILIES)  # a part started again: kept, not registered twice
    assert "marmot_verify_checks_total" in second.render() and "marmot_verify_checks" not in first.render()


def test_every_call_site_names_a_declared_family_of_its_kind():
    """A misspelt or undeclared name, or a keyword that is not one of the family's labels (the
    old registry took `help=`), would raise on a rarely taken path (a forged message, a failed
    restore); every metrics call in the package is checked here instead."""
    families = {family.name: family for family in NODE_FAMILIES + VERIFY_FAMILIES}
    wanted = {"inc": {"counter"}, "set": {"gauge"}, "observe": {"histogram"}, "remove": {"gauge", "counter"}}
    seen = 0
    for path in (REPO / "marmot_appliance").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in wanted):
                continue
            target = node.func.value
            if (target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")) not in (
                    "metrics", "_metrics"):
                continue
            seen += 1
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            name = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
            assert name in families, f"{where}: {node.func.attr}({name!r}) is not declared in families.py"
            family = families[name]
            assert family.kind in wanted[node.func.attr], f"{where}: {node.func.attr}() on a {family.kind} {name!r}"
            keywords = {keyword.arg for keyword in node.keywords}
            assert keywords == set(family.labels), f"{where}: {name!r} takes labels {family.labels}, got {keywords}"
    assert seen > 50


def test_every_metric_docs_replication_md_names_exists_from_start_up():
    """The `GET /metrics` list in docs/replication.md: each family is on /metrics before its
    first event (declared by the node runtime), not only after it happened once; and each
    family a node declares is documented there."""
    doc = (REPO / "docs" / "replication.md").read_text()
    paragraph = doc[doc.index("`GET /metrics`:"):]
    paragraph = paragraph[:paragraph.index("\n\n")]
    documented = set(re.findall(r"`(marmot_[a-z_]+)", paragraph))
    metrics = Metrics()
    metrics.declare_all(VERIFY_FAMILIES)  # declared where the continuous check runs
    rendered = set(re.findall(r"^# TYPE (\S+)", metrics.render(), re.M))
    assert documented and documented - rendered == set()
    assert rendered - documented == set(), "declared but not listed in docs/replication.md"
