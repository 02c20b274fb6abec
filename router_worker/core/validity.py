"""Whether a head can be addressed at all: its partition must exist in its model topic. Pure, no I/O.

A head registers the partition of ``model.<model_id>`` it consumes. The producer refuses to send to a
partition the topic does not have (aiokafka: ``AssertionError: Unrecognized partition``), so a router must
never pick a head whose partition is out of range, and must not guess while the topic's partition count is
not known yet. :func:`split_valid` sorts heads into the addressable ones and the rest, each with a reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from router_worker.core.model import Head

METADATA_UNKNOWN = "model topic metadata not known yet"
"""The reason given for a head whose model topic's partition count is not known (never sent to blind)."""


def partition_problem(partition: int, topic: str, count: int | None) -> str | None:
    """Why ``partition`` of ``topic`` (with ``count`` partitions, None when unknown) can not be addressed;
    None when it can."""
    if partition < 0:
        return f"partition {partition} is negative"
    if count is None:
        return METADATA_UNKNOWN
    if partition >= count:
        return f"partition {partition} out of range: {topic} has {count} partition{'' if count == 1 else 's'}"
    return None


def split_valid(
    heads: Iterable[Head],
    partitions_of: Callable[[str], int | None],
    topic_of: Callable[[str], str],
) -> tuple[list[Head], list[tuple[Head, str]]]:
    """Split heads into those whose partition exists in their model topic and ``(head, reason)`` for the rest.

    ``topic_of`` maps a model id to its topic (``Topics.model``); ``partitions_of`` gives a topic's partition
    count, or None when it is not known (then the head is invalid: :data:`METADATA_UNKNOWN`). Order is kept.
    ``partitions_of`` is asked once per distinct topic.
    """
    valid: list[Head] = []
    invalid: list[tuple[Head, str]] = []
    counts: dict[str, int | None] = {}
    for head in heads:
        topic = topic_of(head.model_id)
        if topic not in counts:
            counts[topic] = partitions_of(topic)
        problem = partition_problem(head.partition, topic, counts[topic])
        if problem is None:
            valid.append(head)
        else:
            invalid.append((head, problem))
    return valid, invalid
