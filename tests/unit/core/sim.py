"""A tiny deterministic simulation around the pure engine: decide, record, and heads that finish work."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable

from router_worker.core.engine import HeadIndex, decide, record
from router_worker.core.model import Decision, Head, RouterMemory
from router_worker.core.policy import Policy
from schemas.envelope import Job

FAR = 10**15


def head(head_id: str, model: str = "m", **kw: object) -> Head:
    kw.setdefault("expires_at_ms", FAR)
    return Head(head_id=head_id, model_id=model, **kw)  # type: ignore[arg-type]


def run(heads: Iterable[Head], jobs: Iterable[Job], policy: Policy | None = None, *, seed: int = 1,
        finish_p: float = 0.0, now_ms: int = 1_000, memory: RouterMemory | None = None
        ) -> tuple[Counter[str], list[Decision]]:  # fmt: skip
    """Route ``jobs``; after each, every head with work finishes one job with probability ``finish_p``."""
    rng = random.Random(seed)
    policy = policy or Policy()
    index = HeadIndex.build(heads)
    mem = memory or RouterMemory()
    picks: Counter[str] = Counter()
    decisions = []
    for job in jobs:
        d = decide(job, index, policy, mem, now_ms, rng)
        decisions.append(d)
        if d.head is not None:
            record(d, mem, job, policy, now_ms)
            picks[d.head.head_id] += 1
        if finish_p:
            done = {h: max(0, n - (1 if rng.random() < finish_p else 0)) for h, n in mem.pending.items()}
            mem.reset_pending(done)
    return picks, decisions


def jobs(n: int, model: str = "m", **kw: object) -> list[Job]:
    return [Job(job_id=f"j{i}", model_type=model, **kw) for i in range(n)]  # type: ignore[arg-type]
