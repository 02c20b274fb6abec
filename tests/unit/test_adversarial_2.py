"""Second adversarial review (pure: no broker). Each test states the promise it checks and failed
before its fix."""

from __future__ import annotations

import time
from types import SimpleNamespace

import msgpack
from aiokafka import TopicPartition

from router_worker.pipeline.gaps import GapGuard
from router_worker.pipeline.intake import intake


def _rec(offset: int, value: bytes, headers: list[tuple[str, bytes | None]]) -> SimpleNamespace:
    return SimpleNamespace(offset=offset, key=None, value=value, headers=headers)


def test_a_far_future_not_before_is_not_re_held_every_time_the_capped_hold_ends() -> None:
    """Finding (stall; the 14ef182 fix is incomplete): intake.py:72-76. The hold of a retry record is capped at
    now + the longest back-off, but when the cap elapses and the router reads the record again, its
    x-retry-not-before is still in the future, so it is held again, for another cap, and so on until the
    header's date (ten years here). Every legit nack behind it on that retry partition waits with it. The
    regression test of 14ef182 looks at the first hold only. Here: the router's loop, simulated for an hour of
    capped holds."""
    tp = TopicPartition("router.retry.1", 0)
    now = int(time.time() * 1000)
    ten_years = now + 10 * 365 * 86_400_000
    poison = _rec(0, msgpack.packb({"job_id": "j", "model_type": "m"}),
                  [("x-route-attempt", b"1"), ("x-retry-not-before", str(ten_years).encode())])  # fmt: skip
    legit = _rec(1, msgpack.packb({"job_id": "k", "model_type": "m"}),
                 [("x-route-attempt", b"1"), ("x-retry-not-before", b"0")])  # fmt: skip
    longest = 10_000
    gaps = GapGuard(3000)
    t = now
    admitted: list[int] = []
    for _ in range(360):  # an hour of re-reads, each when the previous hold ends
        gaps.expect(tp, 0)
        parts, holds = intake({tp: [poison, legit]}, gaps, frozenset({tp.topic}), t, 1 << 20, longest)
        admitted = [inc.offset for _, items in parts for inc in items]
        if admitted:
            break
        assert holds
        assert holds[0].until_ms <= t + longest
        t = holds[0].until_ms + 1
    assert admitted, (
        f"after {(t - now) / 60_000:.0f} minutes of capped holds the record with a not-before ten years ahead "
        f"is still held, and the legit nack behind it with it: the cap bounds each pause, not the stall"
    )
