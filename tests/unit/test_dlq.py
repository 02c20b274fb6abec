"""Dead letters, pure: parsing, filters, typos refused, the redrive plan, what is sent, pacing, and the router's
idempotency key for a redriven record."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import msgpack
import pytest
from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from router_worker.dlq.model import (
    MAX_RATE,
    Filter,
    Original,
    UsageError,
    Verdict,
    attempt_keys,
    check_original,
    new_redrive_id,
    pace,
    parse_dead_letter,
    parse_duration_ms,
    parse_filter,
    parse_rate,
    plan_item,
    redrive_record,
    summary,
    with_original,
)
from router_worker.pipeline.intake import decode_one
from router_worker.pipeline.outcomes import REDRIVE_ID, claim_key_of, redrive_of
from router_worker.pipeline.publish import dead_letter_record
from schemas.envelope import Job

TP = TopicPartition("router.requests", 3)
JOB = msgpack.packb({"job_id": "j-1", "model_type": "llama"})


def dead(value: bytes | None = JOB, reason: str = "unknown_model", *, key: bytes | None = b"k",
         headers: list[tuple[str, bytes | None]] | None = None, limit: int = 10_000, keep: int = 16,
         squeeze: bool = False, offset: int = 7, ts: int = 1_000, attempt: int = 3):  # type: ignore[no-untyped-def]  # fmt: skip
    """A dead letter made the way the router makes one, parsed back."""
    v, k, h = dead_letter_record(value, key, headers or [("traceparent", b"00-abc")], reason, "why", TP.topic,
                                 TP.partition, 41, attempt, limit=limit, keep=keep, squeeze=squeeze)  # fmt: skip
    return parse_dead_letter("router.dlq", 0, offset, ts, k, v, h)


# ------------------------------------------------------------- the router's key for a redriven record


def test_claim_key_without_a_redrive_is_unchanged() -> None:
    job = Job(job_id="a|b", model_type="m")
    assert claim_key_of(job, 2, TP, 5) == "j|2|a|b"
    assert claim_key_of(None, 2, TP, 5) == "r|router.requests|3|5"
    assert claim_key_of(None, 2, TP, 5, "rd-1") == "r|router.requests|3|5", (
        "a record that is no job: by place"
    )


def test_claim_key_of_a_redriven_job_holds_the_redrive_id() -> None:
    job = Job(job_id="a|b", model_type="m")
    assert claim_key_of(job, 1, TP, 5, "rd-x") == "jr|rd-x|1|a|b"
    assert claim_key_of(job, 1, TP, 5, "rd-x") != claim_key_of(job, 1, TP, 5)
    assert claim_key_of(job, 1, TP, 5, "rd-x") != claim_key_of(job, 1, TP, 5, "rd-y")


@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20), st.integers(1, 99), st.integers(1, 99),
       st.one_of(st.none(), st.from_regex(REDRIVE_ID, fullmatch=True)),
       st.one_of(st.none(), st.from_regex(REDRIVE_ID, fullmatch=True)))  # fmt: skip
def test_claim_keys_never_collide(
    id1: str, id2: str, a1: int, a2: int, r1: str | None, r2: str | None
) -> None:
    k1 = claim_key_of(Job(job_id=id1, model_type="m"), a1, TP, 0, r1)
    k2 = claim_key_of(Job(job_id=id2, model_type="m"), a2, TP, 0, r2)
    assert (k1 == k2) == ((id1, a1, r1) == (id2, a2, r2))


def test_redrive_header_is_taken_only_when_valid() -> None:
    assert redrive_of([("x-redrive", b"rd-20250101T000000-abc123")]) == "rd-20250101T000000-abc123"
    assert redrive_of([("x-redrive", b"a|b")]) is None, "a '|' would make keys ambiguous"
    assert redrive_of([("x-redrive", None)]) is None
    assert redrive_of([("x-redrive", b"x" * 65)]) is None
    assert redrive_of([("x-redrive", b"")]) is None
    assert redrive_of([]) is None
    assert REDRIVE_ID.fullmatch(new_redrive_id(1_700_000_000_000, b"\x01\x02\x03"))


def test_intake_keys_a_redriven_record_by_its_redrive() -> None:
    rec = SimpleNamespace(offset=9, key=None, value=JOB, headers=[("x-redrive", b"rd-1")])
    assert decode_one(rec, TP, 1, 1_000_000).claim_key == "jr|rd-1|1|j-1"
    plain = SimpleNamespace(offset=9, key=None, value=JOB, headers=[])
    assert decode_one(plain, TP, 1, 1_000_000).claim_key == "j|1|j-1"


# ------------------------------------------------------------- parsing


def test_parse_a_dead_letter() -> None:
    dl = dead()
    assert (dl.reason, dl.error, dl.job_id, dl.model, dl.attempt) == (
        "unknown_model",
        "why",
        "j-1",
        "llama",
        3,
    )
    assert (dl.orig_topic, dl.orig_partition, dl.orig_offset) == ("router.requests", 3, 41)
    assert dl.truncated_from is None
    assert not dl.squeezed
    assert dl.coord == "router.dlq|0|7"
    assert dl.as_row()["original_offset"] == 41


def test_parse_a_truncated_dead_letter() -> None:
    big = msgpack.packb({"job_id": "big", "model_type": "m", "payload": "x" * 500})
    dl = dead(big, "too_large", limit=100, keep=16)
    assert dl.truncated_from == len(big)
    assert dl.size == 16
    assert dl.squeezed
    assert dl.sha256 == hashlib.sha256(big).hexdigest()
    assert dl.job_id == "big", "the cut value says nothing, its x-job-id header does"
    assert dl.model is None, "nor of its model: a filter by model reads the original"
    orig = Original(b"k", big, [("traceparent", b"00-abc")])
    assert check_original(dl, orig) is None
    assert with_original(dl, orig).job_id == "big"
    assert "sha256 differs" in (check_original(dl, Original(b"k", big[:-1] + b"y", [])) or "")
    assert "holds" in (check_original(dl, Original(b"k", big + b"y", [])) or "")


@given(st.binary(max_size=200), st.one_of(st.none(), st.binary(max_size=20)),
       st.lists(st.tuples(st.text(max_size=12), st.one_of(st.none(), st.binary(max_size=12))), max_size=6))  # fmt: skip
def test_parsing_is_total(value: bytes, key: bytes | None, headers: list[tuple[str, bytes | None]]) -> None:
    dl = parse_dead_letter("t", 0, 0, 0, key, value, headers)
    assert isinstance(dl.reason, str)
    dl.as_row()


# ------------------------------------------------------------- filters and typos


def test_filters() -> None:
    f = parse_filter(["unknown_model,no_capacity"], "llama", "1h", now_ms=10_000_000)
    assert f.reasons == {"unknown_model", "no_capacity"}
    assert f.since_ms == 10_000_000 - 3_600_000
    assert not f.matches(dead(ts=1))
    assert f.matches(dead(ts=10_000_000))
    assert not f.matches(dead(reason="expired", ts=10_000_000))
    assert not parse_filter(model="other", now_ms=0).matches(dead())
    assert Filter().matches(dead())
    assert summary([dead(), dead(), dead(reason="expired")]) == {"unknown_model": 2, "expired": 1}


@pytest.mark.parametrize(("fn", "arg", "says"), [
    (lambda a: parse_filter([a], now_ms=0), "unknwon_model", "unknown reason 'unknwon_model'"),
    (lambda a: parse_filter(since=a, now_ms=0), "1 hour", "bad duration"),
    (lambda a: parse_filter(since=a, now_ms=0), "h", "bad duration"),
    (lambda a: parse_filter(since=a, now_ms=0), "0s", "positive"),
    (parse_rate, "fast", "bad rate"),
    (parse_rate, "0/s", "above 0"),
    (parse_rate, "-5/s", "bad rate"),
    (parse_rate, f"{MAX_RATE * 2:g}/s", "at most"),
])  # fmt: skip
def test_typos_are_refused_with_a_clear_message(fn, arg: str, says: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UsageError, match=says):
        fn(arg)


def test_durations_and_rates() -> None:
    assert parse_duration_ms("1h30m") == 5_400_000
    assert parse_duration_ms("250ms") == 250
    assert parse_duration_ms("2d") == 172_800_000
    assert parse_rate("50/s") == 50.0
    assert parse_rate("50") == 50.0
    assert parse_rate("600/m") == 10.0


# ------------------------------------------------------------- the redrive plan and what it sends


def test_plan_item_verdicts() -> None:
    dl = dead()
    assert (
        plan_item(dl, None, [None, "d|retry|1", "d|dlq|unknown_model"], "rd-2", False).verdict is Verdict.SEND
    )
    done = plan_item(dl, "s|rd-1", [], "rd-2", False)
    assert done.verdict is Verdict.DONE
    assert done.redrive_id == "rd-1"
    resumed = plan_item(dl, "p|rd-1", [], "rd-2", False)
    assert resumed.verdict is Verdict.RESEND
    assert resumed.redrive_id == "rd-1", "the same id: a duplicate at the router if it got there"
    delivered = plan_item(dl, None, ["d|routed|h1", "d|dlq|max_attempts"], "rd-2", False)
    assert delivered.verdict is Verdict.DELIVERED
    assert "h1" in delivered.why
    bad = dead(b"\xc1", "decode_error")
    assert plan_item(bad, None, [], "rd-2", False).verdict is Verdict.REFUSED
    assert "--force" in plan_item(bad, None, [], "rd-2", False).why
    assert plan_item(bad, None, [], "rd-2", True).verdict is Verdict.SEND


def test_attempt_keys_follow_the_generation() -> None:
    # From the dead-lettered attempt on: the attempts before it reached heads and failed there.
    assert attempt_keys(dead(attempt=2), 2) == ["j|2|j-1"]
    assert attempt_keys(dead(attempt=1), 3) == ["j|1|j-1", "j|2|j-1", "j|3|j-1"]
    again = dead(headers=[("x-redrive", b"rd-9")], attempt=1)
    assert again.redrive == "rd-9"
    assert attempt_keys(again, 2) == ["jr|rd-9|1|j-1", "jr|rd-9|2|j-1"]
    assert attempt_keys(dead(b"\xc1", "decode_error"), 3) == []


def test_redrive_record_sends_the_original_bytes_and_the_producers_headers() -> None:
    dl = dead(headers=[("traceparent", b"00-abc"), ("content-type", b"application/msgpack"),
                       ("x-redrive", b"rd-old")])  # fmt: skip
    out = redrive_record(dl, None, "rd-new")
    assert out.value == JOB
    assert out.key == b"k"
    names = [k for k, _ in out.headers]
    assert ("x-redrive", b"rd-new") in out.headers
    assert names.count("x-redrive") == 1
    assert ("traceparent", b"00-abc") in out.headers
    assert (
        "content-type",
        b"application/msgpack",
    ) in out.headers
    assert not [n for n in names if n.startswith(("x-dlq-", "x-route-", "x-original-"))], names


def test_redrive_record_of_a_squeezed_dead_letter_uses_the_original() -> None:
    big = msgpack.packb({"job_id": "big", "model_type": "m", "payload": "x" * 500})
    dl = dead(big, "too_large", key=b"K" * 400, squeeze=True, limit=100)
    assert dl.key_truncated
    assert dl.headers_dropped
    orig = Original(b"K" * 400, big, [("traceparent", b"00-abc")])
    out = redrive_record(dl, orig, "rd-1")
    assert out.value == big
    assert out.key == b"K" * 400
    assert out.headers == [("traceparent", b"00-abc"), ("x-redrive", b"rd-1")]


@given(st.integers(0, 10_000), st.floats(0.1, 1000), st.floats(0, 100))
def test_pace_never_exceeds_the_rate(sent: int, rate: float, elapsed: float) -> None:
    wait = pace(sent, rate, 0.0, elapsed)
    assert wait >= 0
    assert sent <= rate * (elapsed + wait) + 1e-6
