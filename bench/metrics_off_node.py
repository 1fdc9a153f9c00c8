"""`marmot-appliance node ...` with the metrics' hot-path work switched off, for
bench/metrics_overhead.py (the baseline its ratios are measured against). Never for production.

Switched off: every Metrics.inc / set / observe (a no-op), the publish-ack timer's callbacks and
the consumer's timing around each apply transaction. What stays is the runtime without metrics.
Each switch is applied only where the code has it, so the same file also measures an older
checkout (before the histograms existed).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from marmot_appliance.observability import metrics  # noqa: E402
from marmot_appliance.replication import consumer, sending  # noqa: E402


def _nothing(*_args, **_kwargs) -> None:
    return None


for method in ("inc", "set", "observe"):
    if hasattr(metrics.Metrics, method):
        setattr(metrics.Metrics, method, _nothing)
if hasattr(sending, "RoundAckTimer"):  # the publisher's per-round ack timer
    sending.RoundAckTimer = _nothing
if hasattr(consumer.ShardConsumer, "_apply_timed"):
    consumer.ShardConsumer._apply_timed = lambda self, items: self.applier.apply_many(items)

from marmot_appliance.cli import main  # noqa: E402

raise SystemExit(main())
