"""How long a held partition stays paused: the plan says why it holds, this says until when, with no I/O.

Every hold is paid for when the partition resumes: the consumer fetches again from the held record (a paused
partition's fetched records are dropped), and the router decodes the first of them again. The embedded broker
charges such a fetch by the partition's length (13 ms of its CPU at 150,000 records). Two kinds of hold would
otherwise repeat far more often than anything can change:

* ``saturated``: every head the job may use is at its load limit and nothing behind it can go. The first hold
  is ``backpressure_ms`` (a head frees a slot soon); while the partition stays stuck at the same record the
  hold doubles, up to ``backpressure_max_ms``. Without this, each partition of a model saturated for minutes (a
  retry tier full of its jobs, typically) was fetched again after every 5 ms pause: 187 fetches in two seconds
  against 20 with it (``tests/integration/test_hold_backoff.py``).
* ``not_due``: a retry tier's next record is due at its ``x-retry-not-before``, and the record after it a
  moment later, and so on: pausing until each one's exact time resumes the partition once per record. A hold
  lasts at least a tenth of the tier's back-off instead, and at most ``NOT_DUE_MAX_SLACK_MS`` longer than its
  record needs: a waiting job goes at most that much late. (Not more: a throttled job waits in the first tier
  whose back-off covers its delay, with its token's exact time, so a tenth of a long tier could hold a job
  due in seconds for a minute, and jobs paced at a tenant's rate would leave in clumps.)

The other holds (a gap, a claim held elsewhere, an unsent publish) keep the plan's time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from aiokafka import TopicPartition

from router_worker.pipeline.outcomes import Hold

NOT_DUE_SLACK = 10
"""A not-due hold lasts at least the tier's back-off divided by this ..."""
NOT_DUE_MAX_SLACK_MS = 100
"""... but never more than this beyond the time its record is due."""
_MAX_DOUBLINGS = 30


class HoldTimes:
    """Per partition, how many saturated holds in a row stopped it at the same record."""

    def __init__(
        self, backpressure_ms: int, backpressure_max_ms: int, tier_backoff_ms: Mapping[str, int]
    ) -> None:
        self.backpressure_ms = backpressure_ms
        self.backpressure_max_ms = max(backpressure_ms, backpressure_max_ms)
        self.min_not_due_ms = {
            topic: min(ms // NOT_DUE_SLACK, NOT_DUE_MAX_SLACK_MS) for topic, ms in tier_backoff_ms.items()
        }
        self._stuck: dict[TopicPartition, tuple[int, int]] = {}
        """Partition -> (the offset its last saturated hold stopped at, saturated holds in a row there)."""

    def until(self, h: Hold, now: int) -> int:
        """When the partition ``h`` holds may be read again."""
        if h.why == "saturated":
            prev = self._stuck.get(h.tp)
            streak = prev[1] + 1 if prev is not None and prev[0] == h.offset else 1
            self._stuck[h.tp] = (h.offset, streak)
            wait = self.backpressure_ms << min(streak - 1, _MAX_DOUBLINGS)
            return now + min(wait, self.backpressure_max_ms)
        if h.why == "not_due":
            return max(h.until_ms, now + self.min_not_due_ms.get(h.tp.topic, 0))
        return h.until_ms

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        """Partitions this router no longer owns (their streaks start again if they come back)."""
        for tp in tps:
            self._stuck.pop(tp, None)

    def streak(self, tp: TopicPartition) -> int:
        """Saturated holds in a row at the partition's current stop (0: none)."""
        prev = self._stuck.get(tp)
        return prev[1] if prev is not None else 0
