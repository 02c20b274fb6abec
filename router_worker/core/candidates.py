"""Candidate sets: the heads that pass the static filters for one (model, region, strategy, criteria,
policy) key, with the derived structures that make a pick cost O(log n) instead of a scan.

Within one *load epoch* (until a reconciliation with Redis lowers some head's in-flight count) a head's load
only rises, by this router's own picks or by counts from Redis that rose. So a heap of scores that fall as load
rises can be kept lazily: when the top entry was scored at an older load, re-score it and push it back; the
first fresh top is the true best.
Heads found over the load threshold or past their heartbeat are dropped for the rest of the epoch (they can
not recover within it). A new epoch (some head's count fell) rebuilds the heap in O(n), at most once per batch,
never once per job.
"""

from __future__ import annotations

import bisect
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from router_worker.core.model import Head, RouterMemory

ScoreFn = Callable[[Head, float], float]
"""(head, load) -> score; higher is better; must not rise when load rises."""

RING_REPLICAS = 32


@dataclass(slots=True)
class _Heap:
    epoch: int
    entries: list[tuple[float, float, int, int]]
    """(-score, tie-break, index into heads, in-flight the score was computed at)."""


@dataclass(slots=True)
class CandidateSet:
    heads: tuple[Head, ...]
    excluded: tuple[tuple[str, str], ...] = ()
    region_fallback: bool = False
    min_expiry_ms: int = 0
    heaps: dict[tuple[str, float], _Heap] = field(default_factory=dict)
    """One lazy heap per (strategy, load limit): jobs of different priorities see different limits."""
    memo: dict[str, object] = field(default_factory=dict)
    """Per-set derived data strategies compute once (cumulative weights, hash ring, best latency)."""

    @classmethod
    def of(cls, heads: tuple[Head, ...], excluded: tuple[tuple[str, str], ...] = (),
           region_fallback: bool = False) -> CandidateSet:  # fmt: skip
        return cls(heads, excluded, region_fallback, min((h.expires_at_ms for h in heads), default=0))

    def __len__(self) -> int:
        return len(self.heads)

    # --- eligibility --------------------------------------------------------------------------------------

    def ok(self, h: Head, mem: RouterMemory, limit: float, now_ms: int) -> bool:
        """Alive and under the load threshold: the dynamic part of health-aware filtering."""
        if now_ms > self.min_expiry_ms and h.expires_at_ms < now_ms:
            return False
        return mem.load(h) < limit

    # --- argmax through a lazy heap -----------------------------------------------------------------------

    def best(self, name: str, score: ScoreFn, mem: RouterMemory, limit: float, now_ms: int,
             rng: random.Random) -> Head | None:  # fmt: skip
        """The eligible head with the highest ``score``; ties broken at random. None: none eligible."""
        hkey = (name, limit)
        heap = self.heaps.get(hkey)
        heads = self.heads
        if heap is None or heap.epoch != mem.epoch:
            entries = []
            for i, h in enumerate(heads):
                if self.ok(h, mem, limit, now_ms):
                    infl = mem.inflight(h)
                    entries.append((-score(h, infl / h.capacity), rng.random(), i, infl))
            heapq.heapify(entries)
            heap = self.heaps[hkey] = _Heap(mem.epoch, entries)
        entries = heap.entries
        pending = mem.pending
        while entries:
            _neg, _tb, i, infl = entries[0]
            h = heads[i]
            if h.expires_at_ms < now_ms:
                heapq.heappop(entries)
                continue
            cur = pending.get(h.head_id, 0)  # mem.inflight(h), written out: this loop runs for every pick
            if h.reported_inflight > cur:
                cur = h.reported_inflight
            if cur != infl:
                if cur / h.capacity >= limit:
                    heapq.heappop(entries)
                else:
                    heapq.heapreplace(entries, (-score(h, cur / h.capacity), rng.random(), i, cur))
                continue
            return h
        return None

    # --- sampling with rejection ----------------------------------------------------------------------------

    def sample(self, mem: RouterMemory, limit: float, now_ms: int, rng: random.Random,
               weights: list[float] | None = None) -> Head | None:  # fmt: skip
        """A uniformly (or by cumulative ``weights``) random eligible head: a few O(1) tries, then a scan."""
        heads = self.heads
        n = len(heads)
        total = weights[-1] if weights else 0.0
        for _ in range(8):
            r = rng.random()
            i = min(n - 1, bisect.bisect_right(weights, r * total)) if weights else int(r * n)
            h = heads[i]
            if self.ok(h, mem, limit, now_ms):
                return h
        # Most heads are ineligible: draw among the eligible ones exactly.
        ok = [(i, h) for i, h in enumerate(heads) if self.ok(h, mem, limit, now_ms)]
        if not ok:
            return None
        if not weights:
            return ok[int(rng.random() * len(ok))][1]
        w = [weights[i] - (weights[i - 1] if i else 0.0) for i, _ in ok]
        r = rng.random() * sum(w)
        for (_, h), wi in zip(ok, w, strict=True):
            r -= wi
            if r < 0:
                return h
        return ok[-1][1]

    def cumulative(self, name: str, weight: Callable[[Head], float]) -> list[float]:
        cum = self.memo.get(name)
        if cum is None:
            acc = 0.0
            out = []
            for h in self.heads:
                acc += max(0.0, weight(h))
                out.append(acc)
            cum = self.memo[name] = out
        return cum  # type: ignore[return-value]

    # --- consistent hashing ---------------------------------------------------------------------------------

    def ring(self, hash_fn: Callable[[str], int]) -> tuple[list[int], list[int]]:
        """A hash ring of RING_REPLICAS points per head: (sorted points, head index of each point)."""
        ring = self.memo.get("ring")
        if ring is None:
            pts = sorted((hash_fn(f"{h.head_id}#{r}"), i) for i, h in enumerate(self.heads)
                         for r in range(RING_REPLICAS))  # fmt: skip
            ring = self.memo["ring"] = ([p for p, _ in pts], [i for _, i in pts])
        return ring  # type: ignore[return-value]
