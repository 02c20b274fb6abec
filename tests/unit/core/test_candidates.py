"""The lazy heap of a candidate set against a full scan: whatever mix of this router's picks, counts from Redis
that rose (no rebuild: the heap re-scores a head when it reaches it) and counts that fell (a new load epoch),
``best`` returns a head whose score is the best among the eligible ones, and None only when none is eligible."""

from __future__ import annotations

import random

import pytest

from router_worker.core.candidates import CandidateSet
from router_worker.core.model import RouterMemory
from tests.unit.core.sim import head


def _neg_load(h: object, load: float) -> float:
    return -load


@pytest.mark.parametrize("seed", range(40))
def test_best_is_the_full_scans_best_through_rises_falls_and_picks(seed: int) -> None:
    rng = random.Random(seed)
    heads = tuple(head(f"h{i}", capacity=rng.choice((1, 2, 4, 8))) for i in range(rng.randint(1, 12)))
    cs = CandidateSet.of(heads)
    mem = RouterMemory()
    limit = rng.choice((0.5, 0.8, 1.0))
    now = 1_000
    epochs = 0
    for _ in range(300):
        roll = rng.random()
        if roll < 0.15:  # counts from Redis: some rise, some fall (heads finished), or all only rise
            only_rise = rng.random() < 0.5
            counts = {h.head_id: max(0, mem.pending.get(h.head_id, 0) + rng.randint(0 if only_rise else -2, 2))
                      for h in heads}  # fmt: skip
            before = mem.epoch
            fell = any(counts[h] < n for h, n in mem.pending.items())
            mem.reset_pending(counts)
            assert (mem.epoch != before) == fell, "a new epoch exactly when a count fell"
            epochs += mem.epoch != before
        got = cs.best("least_loaded", _neg_load, mem, limit, now, rng)
        eligible = [h for h in heads if mem.load(h) < limit]
        if not eligible:
            assert got is None
            continue
        assert got is not None, "an eligible head exists"
        assert mem.load(got) < limit
        assert mem.load(got) == min(mem.load(h) for h in eligible), "the least loaded, as a full scan finds"
        mem.pending[got.head_id] = mem.pending.get(got.head_id, 0) + 1  # this router's pick


def test_counts_that_only_rose_keep_the_heap() -> None:
    mem = RouterMemory()
    mem.reset_pending({"a": 1, "b": 2})
    epoch = mem.epoch
    mem.reset_pending({"a": 1, "b": 3, "c": 1})
    assert mem.epoch == epoch, "nothing finished: no rebuild"
    mem.reset_pending({"a": 1, "c": 1})
    assert mem.epoch == epoch + 1, "b is gone from Redis's counts: its load fell to 0"
