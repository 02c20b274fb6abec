"""The circuit breaker of one head, as a pure state machine over plain data (time is passed in).

    closed ──(error rate ≥ threshold over the window, volume ≥ min_volume)──► open
    open ──(cool-down elapsed)──► half-open (a bounded number of probe jobs may go)
    half-open ──(a success)──► closed          half-open ──(a failure)──► open

Outcomes (successes and failures: publish errors, nacks, completion timeouts) are counted in buckets of
:data:`BUCKET_MS`; the window sums the buckets that started within ``window_ms``. The cool-down is monotone:
``open_until_ms`` never decreases, so a new failure (or a shorter cool-down in a new policy) can extend an open
breaker but never shorten it. Half-open probes are *leased* to a router (``lease``) so that all routers together
send at most ``half_open_probes``; a lease lapses after the cool-down, so a router that died holding one does not
wedge the breaker.

The Redis adapter (:mod:`router_worker.state.breakers`) stores exactly these fields and applies a transition by
compare-and-set on ``version``: whichever router evaluates first applies it, once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import IntEnum

BUCKET_MS = 500
"""Width of a counting bucket: a window is a whole number of them (rounded up)."""


class BreakerState(IntEnum):
    """The values are the contract's ``circuit_breaker_state`` gauge values."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    window_ms: int = 10_000
    min_volume: int = 20
    """Fewer outcomes than this in the window never open the breaker."""
    error_threshold: float = 0.5
    """Share of failures (0..1] over the window that opens it."""
    cooldown_ms: int = 30_000
    half_open_probes: int = 1

    def __post_init__(self) -> None:
        if self.window_ms < BUCKET_MS:
            raise ValueError(f"window_ms must be at least {BUCKET_MS}")
        if self.min_volume < 1:
            raise ValueError("min_volume must be at least 1")
        if not 0.0 < self.error_threshold <= 1.0:
            raise ValueError("error_threshold must be in (0, 1]")
        if self.cooldown_ms < 0:
            raise ValueError("cooldown_ms must not be negative")
        if self.half_open_probes < 1:
            raise ValueError("half_open_probes must be at least 1")


@dataclass(frozen=True, slots=True)
class Breaker:
    """One head's breaker. ``window`` holds ``(bucket start, ok, err)`` in ascending bucket order."""

    state: BreakerState = BreakerState.CLOSED
    version: int = 0
    """Bumped by every transition and every lease: the compare-and-set token."""
    open_until_ms: int = 0
    since_ms: int = 0
    """When the current state was entered."""
    floor_ms: int = 0
    """Buckets starting before this do not count (set on closing, so old failures do not re-open it)."""
    leased: int = 0
    """Half-open probes handed out (to any router)."""
    lease_until_ms: int = 0
    total_ok: int = 0
    total_err: int = 0
    """Monotone totals: half-open judges the outcomes since it began by their difference to ``base_*``."""
    base_ok: int = 0
    base_err: int = 0
    window: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Transition:
    """A state change, with the counts that caused it (what the audit record carries)."""

    from_state: BreakerState
    to_state: BreakerState
    at_ms: int
    ok: int
    err: int
    open_until_ms: int

    @property
    def event(self) -> str:
        return {
            BreakerState.OPEN: "breaker_opened",
            BreakerState.HALF_OPEN: "breaker_half_open",
            BreakerState.CLOSED: "breaker_closed",
        }[self.to_state]


def bucket_of(now_ms: int) -> int:
    return now_ms - now_ms % BUCKET_MS


def record(b: Breaker, now_ms: int, ok: int = 0, err: int = 0) -> Breaker:
    """Count outcomes at ``now_ms`` (what a head or a router adds; no transition happens here)."""
    if ok < 0 or err < 0:
        raise ValueError("counts must not be negative")
    if not ok and not err:
        return b
    start = bucket_of(now_ms)
    window = list(b.window)
    for i, (s, o, e) in enumerate(window):
        if s == start:
            window[i] = (s, o + ok, e + err)
            break
    else:
        window.append((start, ok, err))
        window.sort()
    return replace(b, window=tuple(window), total_ok=b.total_ok + ok, total_err=b.total_err + err)


def window_counts(b: Breaker, cfg: BreakerConfig, now_ms: int) -> tuple[int, int]:
    """(ok, err) in the window ending at ``now_ms`` (buckets past the floor only)."""
    lo = max(now_ms - cfg.window_ms, b.floor_ms)
    ok = err = 0
    for start, o, e in b.window:
        if start + BUCKET_MS > lo and start <= now_ms:
            ok += o
            err += e
    return ok, err


def error_rate(b: Breaker, cfg: BreakerConfig, now_ms: int) -> float:
    ok, err = window_counts(b, cfg, now_ms)
    return err / (ok + err) if ok + err else 0.0


def prune(b: Breaker, cfg: BreakerConfig, now_ms: int) -> Breaker:
    """Drop buckets that ended before the window (they can never count again)."""
    lo = now_ms - cfg.window_ms
    kept = tuple(w for w in b.window if w[0] + BUCKET_MS > lo)
    return b if len(kept) == len(b.window) else replace(b, window=kept)


def _open(b: Breaker, cfg: BreakerConfig, now_ms: int) -> Breaker:
    # Monotone: never earlier than an open_until already set.
    return replace(b, state=BreakerState.OPEN, version=b.version + 1, since_ms=now_ms, leased=0,
                   lease_until_ms=0, open_until_ms=max(b.open_until_ms, now_ms + cfg.cooldown_ms))  # fmt: skip


def evaluate(b: Breaker, cfg: BreakerConfig, now_ms: int) -> tuple[Breaker, Transition | None]:
    """The breaker after looking at its counts at ``now_ms``, and the transition made (at most one)."""
    state = b.state
    if state is BreakerState.CLOSED:
        ok, err = window_counts(b, cfg, now_ms)
        if ok + err >= cfg.min_volume and err >= cfg.error_threshold * (ok + err):
            nb = _open(b, cfg, now_ms)
            return nb, Transition(state, BreakerState.OPEN, now_ms, ok, err, nb.open_until_ms)
        return b, None
    if state is BreakerState.OPEN:
        if now_ms >= b.open_until_ms:
            nb = replace(b, state=BreakerState.HALF_OPEN, version=b.version + 1, since_ms=now_ms, leased=0,
                         lease_until_ms=0, base_ok=b.total_ok, base_err=b.total_err)  # fmt: skip
            return nb, Transition(state, BreakerState.HALF_OPEN, now_ms, 0, 0, b.open_until_ms)
        return b, None
    ok, err = b.total_ok - b.base_ok, b.total_err - b.base_err
    if err > 0:
        nb = _open(b, cfg, now_ms)
        return nb, Transition(state, BreakerState.OPEN, now_ms, ok, err, nb.open_until_ms)
    if ok > 0:
        nb = replace(b, state=BreakerState.CLOSED, version=b.version + 1, since_ms=now_ms, leased=0,
                     lease_until_ms=0, floor_ms=bucket_of(now_ms) + BUCKET_MS)  # fmt: skip
        return nb, Transition(state, BreakerState.CLOSED, now_ms, ok, err, b.open_until_ms)
    return b, None


def probes_left(b: Breaker, cfg: BreakerConfig, now_ms: int) -> int:
    """Half-open probes that may still be leased now (leases lapse after the cool-down)."""
    if b.state is not BreakerState.HALF_OPEN:
        return 0
    leased = b.leased if now_ms < b.lease_until_ms else 0
    return max(0, cfg.half_open_probes - leased)


def lease(b: Breaker, cfg: BreakerConfig, now_ms: int, want: int) -> tuple[Breaker, int]:
    """Take up to ``want`` half-open probes; returns the breaker and how many were granted."""
    left = probes_left(b, cfg, now_ms)
    granted = max(0, min(want, left))
    if not granted:
        return b, 0
    leased = (b.leased if now_ms < b.lease_until_ms else 0) + granted
    return replace(b, version=b.version + 1, leased=leased,
                   lease_until_ms=now_ms + max(cfg.cooldown_ms, BUCKET_MS)), granted  # fmt: skip


def routable(b: Breaker) -> bool:
    """Whether jobs may go to the head without a probe lease."""
    return b.state is BreakerState.CLOSED
