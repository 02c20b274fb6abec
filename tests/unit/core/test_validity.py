"""split_valid: a head is addressable only if its partition exists in its model topic, as far as is known."""

from __future__ import annotations

from router_worker.core.model import Head
from router_worker.core.validity import METADATA_UNKNOWN, partition_problem, split_valid


def _topic(model_id: str) -> str:
    return f"model.{model_id}"


def test_in_range_heads_are_valid_and_order_is_kept() -> None:
    heads = [Head("a", "m1", partition=0), Head("b", "m2", partition=2), Head("c", "m1", partition=7)]
    valid, invalid = split_valid(heads, {"model.m1": 8, "model.m2": 3}.get, _topic)
    assert [h.head_id for h in valid] == ["a", "b", "c"]
    assert invalid == []


def test_out_of_range_and_negative_partitions_are_invalid_with_a_reason() -> None:
    heads = [Head("ok", "m1", partition=1), Head("big", "m1", partition=2), Head("ghost", "m1", partition=999),
             Head("neg", "m1", partition=-1)]  # fmt: skip
    valid, invalid = split_valid(heads, {"model.m1": 2}.get, _topic)
    assert [h.head_id for h in valid] == ["ok"]
    reasons = {h.head_id: r for h, r in invalid}
    assert reasons["big"] == "partition 2 out of range: model.m1 has 2 partitions"
    assert reasons["ghost"] == "partition 999 out of range: model.m1 has 2 partitions"
    assert reasons["neg"] == "partition -1 is negative"


def test_unknown_count_means_invalid_never_sent_blind() -> None:
    heads = [Head("a", "m1", partition=0), Head("b", "m2", partition=0)]
    valid, invalid = split_valid(heads, {"model.m2": 1}.get, _topic)
    assert [h.head_id for h in valid] == ["b"]
    assert [(h.head_id, r) for h, r in invalid] == [("a", METADATA_UNKNOWN)]
    assert METADATA_UNKNOWN == "model topic metadata not known yet"


def test_partitions_of_is_asked_once_per_topic_and_topic_of_is_used() -> None:
    asked: list[str] = []

    def partitions_of(topic: str) -> int | None:
        asked.append(topic)
        return 4

    heads = [Head(f"h{i}", "meta-llama/L", partition=i) for i in range(6)]
    valid, invalid = split_valid(heads, partitions_of, lambda m: "t." + m.replace("/", "_2f"))
    assert asked == ["t.meta-llama_2fL"]
    assert [h.partition for h in valid] == [0, 1, 2, 3]
    assert [h.partition for h, _ in invalid] == [4, 5]


def test_empty_and_single_partition_wording() -> None:
    assert split_valid([], lambda _t: 1, _topic) == ([], [])
    assert partition_problem(0, "t", 1) is None
    assert partition_problem(1, "t", 1) == "partition 1 out of range: t has 1 partition"
