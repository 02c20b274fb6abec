"""The functional core: head snapshots, policy, strategies and the engine. Plain data in, decisions out."""

from router_worker.core.engine import EMPTY_INDEX, HeadIndex, decide, record, resolve_strategy
from router_worker.core.model import Decision, Head, HeadStatus, Outcome, Pick, RouterMemory, Scores
from router_worker.core.policy import DEFAULT_POLICY, STRATEGIES, Goal, Policy

__all__ = [
    "DEFAULT_POLICY",
    "EMPTY_INDEX",
    "STRATEGIES",
    "Decision",
    "Goal",
    "Head",
    "HeadIndex",
    "HeadStatus",
    "Outcome",
    "Pick",
    "Policy",
    "RouterMemory",
    "Scores",
    "decide",
    "record",
    "resolve_strategy",
]
