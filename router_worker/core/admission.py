"""Admission control: token buckets per tenant and per model, as pure functions (time is passed in).

A bucket is kept in the GCRA form (generic cell rate algorithm): one number per bucket, its *theoretical
arrival time* ``tat``. With emission interval ``T = 1000 / rate`` ms and tolerance ``tau = (burst - 1) * T``, a
job may go at ``max(now, tat - tau)``; taking it moves ``tat`` to ``max(tat, at) + T``. This is a token bucket of
``burst`` tokens refilled at ``rate`` per second, and it hands out *reservations*: a job over its limit gets the
exact time its token will be there (``not_before``) and keeps it, so 500 jobs at 50/s leave at 50/s, each once,
instead of all retrying together. A job needs a token from each of its buckets (its tenant's and its model's);
it goes when both have one.

:func:`schedule` is the reference of the Redis script in :mod:`router_worker.state.admission` (a test runs
both on the same inputs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limit:
    rate: float
    """Jobs per second, > 0."""
    burst: int
    """Jobs that may go at once after a quiet spell, >= 1."""

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError("rate must be a positive number of jobs per second")
        if self.burst < 1:
            raise ValueError("burst must be at least 1")

    @property
    def interval_ms(self) -> float:
        return 1000.0 / self.rate

    @property
    def tolerance_ms(self) -> float:
        return (self.burst - 1) * self.interval_ms


EPSILON_MS = 1e-6
"""Waits shorter than this are rounding, not a missing token."""


def tenant_key(tenant: str) -> str:
    return f"t|{tenant}"


def model_key(model: str) -> str:
    return f"m|{model}"


def schedule(tats: Mapping[str, float], limits: Mapping[str, Limit], jobs: Sequence[Sequence[str]],
             now_ms: float) -> tuple[dict[str, float], list[float]]:  # fmt: skip
    """When each job may go (ms), in order, and the buckets' new ``tat``. ``jobs[i]`` names the buckets job i
    needs (keys of ``limits``); a job that needs none goes now."""
    state = dict(tats)
    out: list[float] = []
    for keys in jobs:
        at = now_ms
        for k in keys:
            lim = limits[k]
            wait = max(state.get(k, 0.0), now_ms) - now_ms - lim.tolerance_ms
            if wait > EPSILON_MS:  # within rounding of now: a token is there
                at = max(at, now_ms + wait)
        for k in keys:
            state[k] = max(state.get(k, 0.0), at) + limits[k].interval_ms
        out.append(at)
    return state, out


def tokens(tat: float, limit: Limit, now_ms: float) -> float:
    """Tokens a bucket holds at ``now_ms`` (negative: reserved ahead), never more than ``burst``."""
    return (limit.tolerance_ms + limit.interval_ms - (max(tat, now_ms) - now_ms)) / limit.interval_ms


def retry_tier_for(delay_ms: float, backoff_ms: Sequence[int]) -> int:
    """The retry tier (1-based) a job delayed by ``delay_ms`` waits in: the first whose back-off covers it, else
    the last. Short delays do not queue behind long ones in one tier partition."""
    for i, b in enumerate(backoff_ms):
        if b >= delay_ms:
            return i + 1
    return len(backoff_ms)
