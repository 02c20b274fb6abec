"""The hot path's shortcuts give what the plain code gives: audit lines encoded a batch at a time, routed headers
of a producer's plain record, the size bound a routed send carries, the canonical content types, memoised
model topic names. Pure: no broker, no Redis."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any

import msgpack
import orjson
from aiokafka import TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from router_worker.audit import encode_lines
from router_worker.core.engine import HeadIndex, decide, record
from router_worker.core.model import Decision, Head, Outcome, RouterMemory, Scores, _r4
from router_worker.core.policy import STRATEGIES, Policy
from router_worker.pipeline.fault_headers import with_refusals
from router_worker.pipeline.gaps import GapGuard
from router_worker.pipeline.intake import intake
from router_worker.pipeline.messages import ROUTED_HEADERS_MAX, decided_at, headers_size, routed_headers
from router_worker.pipeline.outcomes import Routed
from router_worker.pipeline.plan import PlanConfig, Stats, plan
from router_worker.topics import Topics, escape_model_id
from schemas.envelope import MSGPACK, Job, content_type_of

TOPICS = Topics(prefix="", requests="req", model_prefix="model.", retry_prefix="retry.", dlq="dlq",
                results="res")  # fmt: skip
NOW = 1_000_000

# --- audit lines -----------------------------------------------------------------------------------------

_text = st.text(alphabet=st.sampled_from(list('ab},{"\\\n\u00e9[]:')), max_size=12)
_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False,
                  allow_infinity=False), _text)  # fmt: skip
_value = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                      max_leaves=8)  # fmt: skip
_record = st.dictionaries(_text, _value, max_size=5)


@settings(max_examples=400, deadline=None)
@given(st.lists(_record, max_size=12))
def test_a_batch_encodes_to_the_lines_each_record_encodes_to_alone(records: list[dict[str, Any]]) -> None:
    assert encode_lines(records) == [orjson.dumps(r) for r in records]


def test_a_string_holding_the_cut_falls_back_to_one_call_per_record() -> None:
    records = [{"job_id": "a},{b", "n": 1}, {"job_id": "c", "n": [{}, {}]}, {}]
    assert encode_lines(records) == [orjson.dumps(r) for r in records]
    assert encode_lines([]) == []


def test_a_record_nested_to_the_encoder_s_limit_is_encoded_alone() -> None:
    """One level deeper in the batch's list than alone: the batch call refuses it, each record alone does not."""
    deep: Any = 1
    for _ in range(254):
        try:
            orjson.dumps({"d": [deep]})
        except orjson.JSONEncodeError:
            break
        deep = [deep]
    records = [{"d": deep}, {"e": 1}]
    assert encode_lines(records) == [orjson.dumps(r) for r in records]


# --- routed headers of a plain record --------------------------------------------------------------------


def _decision(head_id: str, strategy: str, attempt: int, fallback: bool) -> Decision:
    return Decision(Outcome.ROUTED, strategy, "r", Head(head_id=head_id, model_id="m"), "m", attempt=attempt,
                    fallback=fallback)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([[], [("content-type", b"application/msgpack")], [("content-type", b"application/json")],
                     [("content-type", b"Application/JSON; charset=utf-8")], [("content-type", None)]]),
    st.text(min_size=1, max_size=20), st.text(max_size=10), st.sampled_from(["least_loaded", "ab_test"]),
    st.integers(-3, 40), st.booleans(), st.integers(0, 2**45),
)  # fmt: skip
def test_plain_routed_headers_are_the_general_path_s(original: list[tuple[str, bytes | None]], job_id: str,
                                                     head_id: str, strategy: str, attempt: int, fallback: bool,
                                                     ms: int) -> None:  # fmt: skip
    d = _decision(head_id, strategy, attempt, fallback)
    ctype = content_type_of(original)
    general = routed_headers(original, job_id, d, ctype, ms)
    assert routed_headers(original, job_id, d, ctype, ms, plain=True) == general
    assert routed_headers(original, job_id, d, ctype, ms, plain=True, stamp=decided_at(ms)) == general
    assert general[-1] == ("x-route-decided-at", str(ms).encode())
    assert ("x-route-attempt", str(attempt).encode()) in general


# --- the size bound of a routed send ---------------------------------------------------------------------


@dataclass
class _Rec:
    offset: int
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes | None]]


def test_a_routed_send_stays_within_the_size_it_carries() -> None:
    """The worst case the bound must hold: a record read back from a retry tier (its headers are the router's
    own and a wait's), a 128-character job id of 4-byte characters, a long head id, refusals counted."""
    job_id = "\U0001f600" * 128
    head_id = "\u00e9" * 200
    value = msgpack.packb({"job_id": job_id, "model_type": "m", "payload": "x" * 300})
    headers: list[tuple[str, bytes | None]] = [
        ("x-route-attempt", b"3"), ("x-retry-not-before", b"1"), ("x-route-refusals", b"2"),
        ("x-throttle-n", b"1"), ("traceparent", b"00-" + b"a" * 50), ("content-type", b"application/msgpack"),
    ]  # fmt: skip
    tp = TopicPartition("retry.1", 0)
    gaps = GapGuard(wait_ms=1000)
    gaps.expect(tp, 0)
    parts, _ = intake({tp: [_Rec(0, value, job_id.encode(), headers)]}, gaps, frozenset({"retry.1"}), NOW,
                      1_000_000)  # fmt: skip
    index = HeadIndex.build([Head(head_id=head_id, model_id="m", capacity=100, expires_at_ms=10**15)])
    cfg = PlanConfig(router_id="r", topics=TOPICS, max_attempts=9, retry_backoff_ms=(100,),
                     max_message_bytes=1_000_000)  # fmt: skip
    p = plan(parts, {}, index, Policy(), RouterMemory(), NOW, NOW, random.Random(1), cfg, Stats())
    (o,) = p.outcomes
    assert isinstance(o, Routed)
    assert o.send is not None
    s = o.send
    exact = len(s.value or b"") + len(s.key or b"") + headers_size(s.headers)
    assert 0 <= exact <= s.size, (exact, s.size)


# --- content types and model topics ----------------------------------------------------------------------


def test_canonical_content_types_read_as_the_general_path_reads_them() -> None:
    for value in (b"application/msgpack", b"application/json"):
        assert content_type_of([("content-type", value)]) == value.decode()
        assert (
            content_type_of([("content-type", bytearray(value))]) == value.decode()
        )  # unhashable: no shortcut
        assert content_type_of([(b"content-type", value)]) == value.decode()  # type: ignore[list-item]
    assert content_type_of([("content-type", b"application/msgpack "), ("content-type", b"x")]) == (
        "application/msgpack"
    )


def test_model_topic_names_are_the_same_memoised_and_stay_bounded() -> None:
    t = Topics(prefix="", requests="r", dlq="d", results="x", model_prefix="model.", retry_prefix="retry.")
    for i in range(5000):
        name = f"m/{i}"
        assert t.model(name) == "model." + escape_model_id(name)
    assert len(t._names) <= 4096
    assert t == Topics(
        prefix="", requests="r", dlq="d", results="x", model_prefix="model.", retry_prefix="retry."
    )


def test_routed_fields_keep_the_order_the_plan_passes_them_in() -> None:
    """``plan._routed`` builds its outcome positionally (once per routed job): a field moved or added before
    ``probe`` must move there too."""
    assert [f.name for f in dataclasses.fields(Routed)] == [
        "src", "send", "audit", "final", "head_id", "region", "strategy", "pin", "new_pin", "fallback", "probe",
    ]  # fmt: skip


def test_the_routed_headers_bound_covers_the_longest_values_the_schema_allows() -> None:
    """``ROUTED_HEADERS_MAX`` rests on limits kept elsewhere (the job id's length, the strategy names, an
    attempt of at most ten digits): a limit raised there must fail here, not undercount a send's size."""
    (id_chars,) = [m.max_length for m in Job.model_fields["job_id"].metadata if hasattr(m, "max_length")]
    longest = max(STRATEGIES, key=len)
    d = Decision(Outcome.ROUTED, longest, "r", Head(head_id="", model_id="m"), "m", attempt=10**10 - 1,
                 fallback=True)  # fmt: skip
    worst = routed_headers([], "\U0001f600" * id_chars, d, MSGPACK, 2**63 - 1)
    worst = with_refusals(worst, 10**10 - 1)
    assert headers_size(worst) <= ROUTED_HEADERS_MAX


_score = st.one_of(st.floats(), st.sampled_from([0.0, -0.0, 1.0, 0.5, 1e12, -1e12, 2.5e-5, 0.00015]))


@settings(max_examples=500, deadline=None)
@given(st.tuples(_score, _score, _score, _score, _score, _score))
def test_scores_round_as_each_score_rounds_alone(xs: tuple[float, float, float, float, float, float]) -> None:
    got = Scores(*xs).as_dict()
    for (name, value), x in zip(got.items(), xs, strict=True):
        want = _r4(x)
        if math.isnan(want):
            assert math.isnan(value), name
        else:
            assert value == want, name
            assert math.copysign(1.0, value) == math.copysign(1.0, want), name


def test_the_least_loaded_reason_is_the_formatted_load_memoised_or_not() -> None:
    heads = [Head(head_id=f"h{i}", model_id="m", capacity=7, expires_at_ms=10**15) for i in range(5)]
    index = HeadIndex.build(heads)
    memory = RouterMemory()
    policy = Policy(default_strategy="least_loaded")
    rng = random.Random(3)
    for i in range(2000):
        job = Job(job_id=f"j{i}", model_type="m")
        d = decide(job, index, policy, memory, NOW, rng)
        if d.head is None:
            memory.reset_pending({})
            continue
        load = memory.load(d.head)
        assert d.reason == f"lowest load {load:.2f} of 5"
        record(d, memory, job, policy, NOW)


def test_header_names_count_as_the_bytes_they_are_sent_as() -> None:
    """A name of non-ASCII characters takes more bytes than characters: the size checks (a record too large to
    route, a send that fits a batch) count what the producer sends."""
    assert headers_size([("\u00e9" * 10, b"v")]) == 21
    assert headers_size([("x-a", b"12"), ("x-b", None)]) == 8
    assert headers_size(None) == 0
