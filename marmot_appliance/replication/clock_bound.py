"""How far ahead of this node's clock a received version may lie (replication.max_clock_skew_s).

A version is a hybrid-logical-clock value, `ms << 16 | counter`, taken on the writing node. The
applier advances this node's clock to every version it applies, so that a later local write
outranks what the node has seen. Unbounded, one version from the future (a buggy or hostile
message with 2**63-1, an honest node whose clock is set a year ahead) drags every receiver's
clock along: last writer wins then favours that node until real time catches up, and at
2**63-1 the capture trigger's `hlc + 1` overflows and every application write fails.

So every row's version is classified against the receiver's wall clock before it is applied:

* within `max_clock_skew_s` ahead: applied as usual;
* further ahead, but less than ABSURD_SKEW_S: *held* (`_marmot_held`, with the reason, the
  origin and the moment it becomes acceptable) and applied once time catches up; it does not
  move the clock meanwhile;
* ABSURD_SKEW_S or more ahead, or outside SQLite's 64-bit range, or negative: no clock catches up
  with that: the row is dead-lettered with the reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

INT64_MAX = 2**63 - 1
# A version further ahead than this is not a clock that is merely off: nothing sensible waits a
# year for it (1 << 62 is some 2,200 years ahead, 2**63-1 twice that).
ABSURD_SKEW_S = 365 * 86_400.0
_COUNTER_BITS = 16


def version_time_s(version: int) -> float:
    """The wall-clock time (unix seconds) a version was taken at."""
    return (version >> _COUNTER_BITS) / 1000.0


@dataclass(frozen=True)
class ClockLimits:
    """The bounds for one transaction, computed once from the wall clock."""

    now_s: float
    max_skew_s: float
    hold_above: int  # versions above this are held (or rejected)
    reject_above: int  # versions above this are dead-lettered

    def ahead_s(self, version: int) -> float:
        return version_time_s(version) - self.now_s

    def due_at(self, version: int) -> float:
        """When (unix seconds) a held version comes within the allowed skew."""
        return version_time_s(version) - self.max_skew_s

    def hold_reason(self, version: int, origin: int) -> str:
        return (
            f"clock skew: version from node {origin} is {self.ahead_s(version):.1f}s ahead of this node's clock "
            f"(replication.max_clock_skew_s {self.max_skew_s:g}); held until time catches up"
        )

    def reject_reason(self, version: int, origin: int) -> str:
        if not 0 <= version <= INT64_MAX:
            return f"clock skew: version {version} from node {origin} is outside the 64-bit version range"
        return (
            f"clock skew: version from node {origin} is {self.ahead_s(version):.0f}s ahead of this node's clock, "
            f"beyond any plausible clock error ({ABSURD_SKEW_S:.0f}s): not applied"
        )


def clock_limits(max_skew_s: float, now_s: float | None = None) -> ClockLimits:
    now_s = time.time() if now_s is None else now_s

    def version_at(seconds: float) -> int:
        # The last version of that millisecond: a version taken exactly at the bound is accepted.
        return min(INT64_MAX, (int(seconds * 1000) << _COUNTER_BITS) | ((1 << _COUNTER_BITS) - 1))

    return ClockLimits(
        now_s=now_s,
        max_skew_s=max_skew_s,
        hold_above=version_at(now_s + max_skew_s),
        reject_above=version_at(now_s + ABSURD_SKEW_S),
    )
