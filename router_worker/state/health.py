"""Whether Redis answers, as every part of a router saw it last: one small record, shared by reference."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class RedisHealth:
    """Failures and successes reported by the router's Redis calls.

    ``last_ok_ms`` is when Redis last answered; while it does not, routers judge heads' heartbeats as of
    that moment (they could not read newer ones) and pause once the outage outlasts their window.
    """

    last_ok_ms: int = 0
    down_since_ms: int | None = None
    failures: int = 0
    recovered_ms: int = 0
    """When Redis last came back after an outage (0: never down)."""

    def ok(self, now_ms: int) -> None:
        self.last_ok_ms = now_ms
        if self.down_since_ms is not None:
            self.recovered_ms = now_ms
        self.down_since_ms = None

    def failed(self, now_ms: int) -> None:
        self.failures += 1
        if self.down_since_ms is None:
            self.down_since_ms = now_ms

    @property
    def up(self) -> bool:
        return self.down_since_ms is None

    def down_for_ms(self, now_ms: int) -> int:
        return 0 if self.down_since_ms is None else now_ms - self.down_since_ms

    def heads_clock(self, now_ms: int) -> int:
        """The time heads' heartbeat deadlines are compared with: now, or the last moment Redis answered."""
        return now_ms if self.down_since_ms is None else min(now_ms, self.last_ok_ms)
