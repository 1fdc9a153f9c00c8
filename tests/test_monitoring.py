"""The monitoring kit (monitoring/, docs/monitoring.md):

- every metric the Grafana dashboard and the alert rules query is one a real node exports on
  /metrics from start-up (a real node process against a real nats-server);
- every alert has a runbook entry in docs/monitoring.md;
- `promtool test rules` passes on the synthetic series of monitoring/alerts.test.yml (Debian's
  `prometheus` package; skipped without it, a failure under MARMOT_REQUIRE_LAB=1).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.conftest import skip_or_fail
from tests.harness import free_ports
from tests.replication_cluster import SubprocessNode, external_nats_spec

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "monitoring"
METRIC_NAME = re.compile(r"\bmarmot_[a-z0-9_]+")
PROMETHEUS_OWN = {"up"}


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    return exprs


def _alert_rules() -> list[dict]:
    groups = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _exported_names(metrics_text: str) -> set[str]:
    """Sample names a node exports: `# TYPE` lines list every family, also a labelled one with
    no series yet (counters carry the `_total` suffix on their samples; a histogram's samples
    are its `_bucket`, `_sum` and `_count`)."""
    names = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
    return names


async def test_dashboard_and_alerts_query_only_metrics_a_node_exports(nats_server, wal_db, tmp_path):
    db = wal_db("n1.db", "CREATE TABLE t (k TEXT PRIMARY KEY, v);")
    port = free_ports(1)[0]
    spec = tmp_path / "cluster.yaml"
    spec.write_text(external_nats_spec("monitoring", nats_server.urls[:1], {"n1": db}, {"n1": port},
                                       snapshots="{enabled: true}"))
    node = SubprocessNode.from_spec(spec, "n1", db, tmp_path / "n1.log", port).start()
    try:
        await node.wait_healthy(120)
        exported = _exported_names(node.metrics())
    finally:
        node.terminate()
    assert "marmot_healthy" in exported, sorted(exported)

    queried = {}
    for expr in _dashboard_exprs():
        for name in METRIC_NAME.findall(expr):
            queried.setdefault(name, f"dashboard: {expr}")
    for rule in _alert_rules():
        for name in METRIC_NAME.findall(rule["expr"]):
            queried.setdefault(name, f"alert {rule['alert']}: {rule['expr']}")
    unknown = {name: where for name, where in queried.items() if name not in exported}
    assert not unknown, f"queried but not exported by a node: {unknown}; exported: {sorted(exported)}"
    assert len(queried) >= 20, sorted(queried)


def test_every_alert_has_a_runbook_entry():
    runbook = (REPO / "docs" / "monitoring.md").read_text()
    headings = {line[4:].strip() for line in runbook.splitlines() if line.startswith("### ")}
    for rule in _alert_rules():
        assert rule["alert"] in headings, f"docs/monitoring.md has no '### {rule['alert']}' runbook entry"
        assert rule["annotations"]["runbook"] == f"docs/monitoring.md#{rule['alert'].lower()}"
    expected = {"MarmotNodeDown", "MarmotNodeUnhealthy", "MarmotLagGrowing", "MarmotStreamGap", "MarmotDiverged",
                "MarmotClockSkew", "MarmotDeadLetters", "MarmotApplyBlocked", "MarmotChangeLogNotDraining",
                "MarmotBookkeepingGrowing"}
    assert expected <= {rule["alert"] for rule in _alert_rules()}


def test_alert_rules_pass_promtool_on_synthetic_series(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        skip_or_fail("promtool not installed (Debian package prometheus)")
    for name in ("alerts.yml", "alerts.test.yml"):
        shutil.copy(MONITORING / name, tmp_path / name)
    checked = subprocess.run([promtool, "check", "rules", "alerts.yml"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([promtool, "test", "rules", "alerts.test.yml"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Every alert is exercised by at least one firing case.
    cases = yaml.safe_load((MONITORING / "alerts.test.yml").read_text())["tests"]
    fired = {case["alertname"] for test in cases for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert fired == {rule["alert"] for rule in _alert_rules()}, fired
