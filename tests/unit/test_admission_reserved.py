"""The router's memory of admission verdicts for records not yet settled, and of records settled before a rewind:
bounded, newest kept, forgotten once settled (no broker, no Redis: the methods on a bare object)."""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

from router_worker.pipeline.faults import FaultGate
from router_worker.pipeline.plan import Admission


def test_verdicts_are_kept_until_settled_and_bounded_newest_first() -> None:
    g: FaultGate = SimpleNamespace(reserved=OrderedDict(), spent=OrderedDict(), kept_max=3)  # type: ignore[assignment]
    for i in range(5):
        FaultGate.reserve(g, f"k{i}", Admission(i), ())
    assert list(g.reserved) == ["k2", "k3", "k4"], "the oldest go first"
    FaultGate.settled(g, ["k3", "unknown"])
    assert list(g.reserved) == ["k2", "k4"]
    FaultGate.spend(g, ["a", "b", "c", "d"])
    assert list(g.spent) == ["b", "c", "d"]
