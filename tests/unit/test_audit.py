"""Pure parts of the audit: sampling, fallback kinds, the stream entry a batch becomes, ``--since``, filters,
the readable line, and the per-batch metric tallies."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from router_worker.audit import (
    MODEL_FALLBACK,
    REGION_FALLBACK,
    STREAM_FIELD,
    AuditSink,
    audit_stream_key,
    fallback_kind,
    keep_decision,
    os_actor,
)
from router_worker.audit_tail import SinceError, TailFilter, id_before, parse_lines, parse_since
from router_worker.cli_audit import format_record
from router_worker.core.engine import HeadIndex, decide
from router_worker.core.model import RouterMemory
from router_worker.core.policy import Policy
from router_worker.metrics import lag, tally
from router_worker.pipeline.outcomes import DeadLettered, Duplicate, Incoming, Retried, Routed
from schemas.envelope import DeadLetterReason, Job
from tests.unit.core.sim import head


class _Recorder:
    """Records what is queued on a pipeline (the real pipeline is exercised by the integration tests)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def xadd(self, key: str, fields: dict[str, bytes], maxlen: int, approximate: bool) -> None:
        self.calls.append(("xadd", (key, fields, maxlen, approximate)))

    def publish(self, channel: str, data: bytes) -> None:
        self.calls.append(("publish", (channel, data)))

    def eval(self, script: str, numkeys: int, channel: str, *data: bytes) -> None:
        """The channel messages of a batch, published by one script call (one newline-joined argument):
        recorded as the PUBLISHes."""
        assert numkeys == 0
        assert "PUBLISH" in script.upper()
        assert len(data) == 1
        self.calls.extend(("publish", (channel, d)) for d in data[0].split(b"\n"))


@given(st.text(min_size=1, max_size=40), st.floats(min_value=0.0, max_value=1.0))
def test_sampling_is_deterministic_and_monotonic(job_id: str, rate: float) -> None:
    kept = keep_decision(job_id, rate)
    assert kept == keep_decision(job_id, rate)  # same answer in every router
    if kept:
        assert keep_decision(job_id, min(1.0, rate + 0.1))  # a higher rate keeps a superset
    assert keep_decision(job_id, 1.0)
    assert not keep_decision(job_id, 0.0)


def test_sampling_keeps_about_the_share_asked_and_never_other_events(tmp_path: Any) -> None:
    sink = AuditSink(None, "ch", str(tmp_path / "a.log"), sample=0.25)
    routes = [{"event": "route", "job_id": f"job-{i}"} for i in range(4000)]
    always = ("fallback", "retry", "dead_letter", "head_drained", "policy_changed", "breaker_opened")
    others = [{"event": e, "job_id": f"job-{i}"} for i, e in enumerate(always * 50)]
    lines = sink.write_file(routes + others)
    kept = [orjson.loads(x) for x in lines]
    n_routes = sum(1 for r in kept if r["event"] == "route")
    assert 800 < n_routes < 1200
    assert [r for r in kept if r["event"] != "route"] == others
    sink.close()
    assert (tmp_path / "a.log").read_bytes().count(b"\n") == len(lines)  # the file holds what is published


def test_one_stream_entry_per_batch_queued_before_the_channel_messages() -> None:
    sink = AuditSink(None, "audit:routing:logs", None, stream="{p}:audit", stream_maxlen=500)
    lines = [orjson.dumps({"event": "route", "n": i}) for i in range(3)]
    pipe = _Recorder()
    sink.publish_into(pipe, iter(lines))  # any iterable, as marks.py passes a deque
    assert pipe.calls[0] == ("xadd", ("{p}:audit", {STREAM_FIELD: b"\n".join(lines)}, 500, True))
    assert pipe.calls[1:] == [("publish", ("audit:routing:logs", x)) for x in lines]
    big = [b"{}"] * 2500  # a backlog written after an outage: one entry per thousand records
    pipe = _Recorder()
    sink.publish_into(pipe, big)
    assert [c[0] for c in pipe.calls].count("xadd") == 3
    nostream = AuditSink(None, "ch", None, stream="{p}:audit", stream_maxlen=0)
    pipe = _Recorder()
    nostream.publish_into(pipe, lines)
    assert [c[0] for c in pipe.calls] == ["publish"] * 3
    pipe = _Recorder()
    sink.publish_into(pipe, [])
    assert pipe.calls == []


def test_stream_key_and_actor() -> None:
    assert audit_stream_key("rw") == "{rw}:audit"
    assert os_actor()


def test_fallback_kinds_from_the_real_engine() -> None:
    now = 1_000
    heads = [head("small-1", "small", region="eu"), head("big-us", "big", region="us")]
    index = HeadIndex.build(heads)
    policy = Policy.model_validate({"fallback_models": {"huge": ["small"]}})
    model_fb = decide(
        Job(job_id="a", model_type="huge"), index, policy, RouterMemory(), now, random.Random(1)
    )
    assert model_fb.routed
    assert fallback_kind(model_fb) == MODEL_FALLBACK
    geo = Policy.model_validate({"default_strategy": "geo_preferred"})
    region_fb = decide(Job(job_id="b", model_type="big", region="eu"), index, geo, RouterMemory(), now,
                       random.Random(1))  # fmt: skip
    assert region_fb.routed
    assert region_fb.head is not None
    assert region_fb.head.head_id == "big-us"
    assert fallback_kind(region_fb) == REGION_FALLBACK
    plain = decide(Job(job_id="c", model_type="big", region="us"), index, geo, RouterMemory(), now,
                   random.Random(1))  # fmt: skip
    assert plain.routed
    assert fallback_kind(plain) is None


def test_parse_since() -> None:
    now = 10_000_000_000
    assert parse_since("10m", now) == now - 600_000
    assert parse_since("1h30m", now) == now - 5_400_000
    assert parse_since("500ms", now) == now - 500
    assert parse_since("2d", now) == now - 2 * 86_400_000
    assert parse_since("2025-01-31T12:00:00Z", now) == 1738324800000
    for bad in ("", "ten minutes", "10x", "m10", "-5m"):
        with pytest.raises(SinceError, match="--since"):
            parse_since(bad, now)


def test_id_before_is_just_below_the_first_id_of_that_ms() -> None:
    assert id_before(1000) == "999-18446744073709551615"
    assert id_before(0) == "0-0"


def test_parse_lines_skips_what_is_not_a_record() -> None:
    data = b'{"event":"route"}\n\nnot json\n[1,2]\n{"event":"retry"}'
    assert parse_lines(data) == [{"event": "route"}, {"event": "retry"}]
    assert parse_lines(data.decode()) == parse_lines(data)


def test_filters() -> None:
    rec = {"event": "route", "model_type": "chat", "model_id": "llama", "head_id": "h1", "job_id": "j1",
           "tenant": "acme"}  # fmt: skip
    assert TailFilter().matches(rec)
    assert TailFilter(events=frozenset({"route", "retry"})).matches(rec)
    assert not TailFilter(events=frozenset({"retry"})).matches(rec)
    assert TailFilter(models=frozenset({"llama"})).matches(rec)
    assert TailFilter(models=frozenset({"chat"})).matches(rec)
    assert not TailFilter(models=frozenset({"resnet"})).matches(rec)
    assert TailFilter(heads=frozenset({"h1"}), jobs=frozenset({"j1"}), tenants=frozenset({"acme"})).matches(
        rec
    )
    assert not TailFilter(tenants=frozenset({"globex"})).matches(rec)
    assert not TailFilter(heads=frozenset({"h1"})).matches({"event": "policy_changed"})


def test_readable_line_names_the_event_and_fields_without_markup_injection() -> None:
    line = format_record(
        {"ts": 1_700_000_000_123, "event": "head_drained", "head_id": "[red]x", "actor": "ann"}
    )
    assert "head_drained" in line
    assert "actor=" in line
    assert "ann" in line
    assert "\\[red]x" in line  # escaped: a value can not restyle the terminal
    assert format_record({"event": "route"}).startswith("[dim]?")


def _inc(job: Job | None = None) -> Incoming:
    return Incoming(TopicPartition("t", 0), 0, None, b"", [], "application/json", 1, job, None, "k")


def test_tally_counts_only_settled_outcomes() -> None:
    job = Job(job_id="j", model_type="m")
    outcomes = [
        Routed(_inc(job), final=True, fallback=MODEL_FALLBACK),
        Routed(_inc(job), final=True, fallback=REGION_FALLBACK),
        Routed(_inc(job), final=True),
        Routed(_inc(job), final=False, fallback=MODEL_FALLBACK),
        Retried(_inc(job), final=True, tier=2),
        Retried(_inc(job), final=False, tier=1),
        DeadLettered(_inc(None), final=True, reason=DeadLetterReason.DECODE_ERROR),
        Duplicate(_inc(job), final=True),
    ]
    t = tally(outcomes)
    assert dict(t.fallbacks) == {("m", MODEL_FALLBACK): 1, ("m", REGION_FALLBACK): 1}
    assert dict(t.retries) == {2: 1}
    assert dict(t.dead) == {"decode_error": 1}


def test_lag() -> None:
    assert lag(300, 201) == 99
    assert lag(5, 7) == 0
    assert lag(None, 1) is None
    assert lag(1, None) is None


def test_the_demo_summary_says_where_to_look(tmp_path: Any) -> None:
    from router_worker.demo import where_to_look
    from router_worker.settings import load_settings

    rows = dict(where_to_look(load_settings(admin_port=9100, audit_file=str(tmp_path / "a.log"))))
    assert rows["metrics"] == "http://127.0.0.1:9100/metrics"
    assert rows["audit file"].startswith(str(tmp_path / "a.log"))
    assert rows["audit replay"].startswith("router-worker audit tail --since 10m")
    assert "ROUTER_ADMIN_PORT" in dict(where_to_look(load_settings(admin_port=0)))["metrics"]
