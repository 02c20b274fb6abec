"""Property tests: decoding a Kafka record is total.

Whatever the value bytes and headers, ``decode_job(value, content_type_of(headers))`` returns a ``Job`` or raises
``EnvelopeError`` with a dead-letter reason and a detail; never any other exception. Runs are derandomized (the
same examples every run, no example database), so CI is deterministic.
"""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.envelope import (
    JSON,
    MAX_DEPTH,
    MSGPACK,
    DeadLetterReason,
    EnvelopeError,
    Job,
    content_type_of,
    decode_job,
    encode_job,
)

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ENVELOPE = {"job_id": "j", "model_type": "m"}


def decode_is_total(raw: bytes | None, content_type: str | None, max_bytes: int | None = None) -> Job | None:
    """Decode; a Job, or None for a well-formed EnvelopeError. Any other exception fails the test."""
    try:
        return decode_job(raw, content_type, max_bytes)
    except EnvelopeError as exc:
        error = exc
    assert error.reason in (
        DeadLetterReason.DECODE_ERROR,
        DeadLetterReason.SCHEMA_ERROR,
        DeadLetterReason.TOO_LARGE,
    )
    assert isinstance(error.detail, str)
    assert error.detail
    return None


# --- (a) arbitrary bytes x arbitrary headers ---------------------------------------------------------------

header_names = st.one_of(st.sampled_from(["content-type", "x-job-id", "traceparent"]), st.text(max_size=12))
content_type_values = st.sampled_from(
    [
        b"application/msgpack",
        b"application/json",
        b"Application/JSON; charset=utf-8",
        b"",
        b";",
        b"text/plain",
    ]
)
header_values = st.one_of(
    st.none(), content_type_values, content_type_values.map(lambda b: b.decode()), st.binary(max_size=24),
    st.text(max_size=24),
)  # fmt: skip
headers = st.lists(st.tuples(header_names, header_values), max_size=4)
# Arbitrary bytes rarely look like anything: cut real jobs short, or put a few bytes before them, to get further.
real_jobs = st.sampled_from(
    [encode_job({**ENVELOPE, "payload": {"p": [1, 2.5, "x"]}}, ct) for ct in (MSGPACK, JSON)]
)
values = st.one_of(
    st.none(),
    st.binary(max_size=64),
    st.tuples(real_jobs, st.integers(0, 80), st.binary(max_size=8)).map(lambda t: t[0][: t[1]] + t[2]),
    st.tuples(st.binary(max_size=6), real_jobs).map(lambda t: t[0] + t[1]),
)


@settings(FUZZ, max_examples=1000)
@given(value=values, headers=headers, max_bytes=st.one_of(st.none(), st.integers(0, 100)))
def test_any_bytes_and_headers(
    value: bytes | None, headers: list[tuple[str, Any]], max_bytes: int | None
) -> None:
    ctype = content_type_of(headers)
    assert isinstance(ctype, str)
    decode_is_total(value, ctype, max_bytes)


# --- (b) arbitrary MessagePack documents -------------------------------------------------------------------

msgpack_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=8),
    st.binary(max_size=8),
)  # fmt: skip
msgpack_keys = st.one_of(
    msgpack_scalars.filter(lambda k: not (isinstance(k, float) and math.isnan(k))),  # NaN keys: below
    st.tuples(msgpack_scalars, msgpack_scalars),  # packs as an array: a key Python can not hold
)
msgpack_exotic = st.one_of(
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)),
    st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 999_999_999)),
    st.just(float("nan")),
)
msgpack_values = st.recursive(
    st.one_of(msgpack_scalars, msgpack_exotic),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(msgpack_keys, children, max_size=4),
        st.tuples(children, children).map(lambda t: {float("nan"): t[0], "v": t[1]}),
    ),
    max_leaves=24,
)


deep = st.one_of(st.just(0), st.integers(MAX_DEPTH - 4, MAX_DEPTH + 4))  # levels of arrays around a value


def _clean(obj: object, depth: int = 0) -> bool:
    """Nothing the decoder refuses: no extension type, no array as a map key, no nesting past the limit."""
    if isinstance(obj, msgpack.ExtType):
        return False
    if isinstance(obj, list | dict) and depth >= MAX_DEPTH:  # depth 0 is the envelope, level 1
        return False
    if isinstance(obj, list):
        return all(_clean(v, depth + 1) for v in obj)
    if isinstance(obj, dict):
        return all(not isinstance(k, tuple) and _clean(v, depth + 1) for k, v in obj.items())
    return True


@st.composite
def msgpack_documents(draw: st.DrawFn) -> tuple[str, object]:
    """A value and where it goes: the whole document, the payload, the metadata, or an unknown field."""
    where = draw(st.sampled_from(["document", "payload", "metadata", "extra"]))
    value = draw(msgpack_values)
    for _ in range(draw(deep)):
        value = [value]
    if where == "document":
        return where, value
    if where == "extra":
        return where, {**ENVELOPE, draw(msgpack_keys): value}
    return where, {**ENVELOPE, where: value}


@settings(FUZZ, max_examples=500)
@given(msgpack_documents())
def test_any_msgpack_document(case: tuple[str, object]) -> None:
    where, doc = case
    raw = msgpack.packb(doc, use_bin_type=True)
    job = decode_is_total(raw, MSGPACK)
    if where == "payload":
        # the payload is opaque: what the decoder does not refuse passes, unchanged (NaN included), and only that
        assert (job is not None) == _clean(doc, 0)
        if job is None:
            return
        assert isinstance(doc, dict)
        assert msgpack.packb(job.payload, use_bin_type=True) == msgpack.packb(
            doc["payload"], use_bin_type=True
        )


# --- (c) arbitrary JSON documents --------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=8),  # big ints, NaN, Infinity too
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.text(max_size=6), st.integers(), st.booleans(), st.none()), children, max_size=4
        ),  # json.dumps turns these keys into strings
    ),
    max_leaves=24,
)


@st.composite
def json_texts(draw: st.DrawFn) -> tuple[str, bytes]:
    where = draw(st.sampled_from(["document", "payload", "metadata", "extra"]))
    value = draw(json_values)
    for _ in range(draw(deep)):
        value = [value]
    doc: object = value if where == "document" else {**ENVELOPE, (where if where != "extra" else "zz"): value}
    text = json.dumps(doc)  # stdlib: writes NaN, Infinity and ints of any size, which orjson refuses
    mangle = draw(st.sampled_from(["none", "bom", "truncate", "latin-1"]))
    if mangle == "bom":
        return where, b"\xef\xbb\xbf" + text.encode()
    if mangle == "truncate":
        return where, text.encode()[: draw(st.integers(0, len(text)))]
    if mangle == "latin-1":
        return where, text.encode("latin-1", "replace")
    return where, text.encode()


@settings(FUZZ, max_examples=500)
@given(json_texts())
def test_any_json_document(case: tuple[str, bytes]) -> None:
    where, raw = case
    job = decode_is_total(raw, JSON)
    if where == "payload":
        try:
            payload = orjson.loads(raw)["payload"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            assert job is None
            return
        # a payload orjson reads passes unless it nests too deep, and then it does not
        assert (job is not None) == _clean(payload, 1)
        assert job is None or job.payload == payload


# --- (d) valid envelopes round-trip -------------------------------------------------------------------------

ints64 = st.integers(-(2**63), 2**63 - 1)
meta_scalars = st.one_of(st.none(), st.booleans(), ints64, st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=8))  # fmt: skip
json_payloads = st.recursive(
    st.one_of(st.none(), st.booleans(), ints64, st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8)),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children,
                                                                               max_size=3)),
    max_leaves=12,
)  # fmt: skip
optional = {
    "payload": json_payloads,
    "region": st.text(max_size=64),
    "strategy": st.text(max_size=64),
    "session_id": st.text(max_size=256),
    "tenant": st.text(max_size=128),
    "prefix_hash": st.text(max_size=256),
    "metadata": st.dictionaries(st.text(max_size=8), st.one_of(meta_scalars, st.lists(meta_scalars, max_size=3)),
                                max_size=4),
    "estimated_tokens": st.integers(0, 2**63 - 1),
    "priority": ints64,
    "deadline_ms": st.integers(0, 2**63 - 1),
    "reply_to": st.text(min_size=1, max_size=249),
    "created_at": st.integers(0, 2**63 - 1),
    "v": st.just(1),
}  # fmt: skip
envelopes = st.fixed_dictionaries(
    {"job_id": st.text(min_size=1, max_size=128), "model_type": st.text(min_size=1, max_size=256)},
    optional=optional,
)


@settings(FUZZ, max_examples=300)
@given(doc=envelopes, content_type=st.sampled_from([MSGPACK, JSON]), binary=st.booleans())
def test_valid_envelopes_round_trip(doc: dict[str, Any], content_type: str, binary: bool) -> None:
    if binary and content_type == MSGPACK:
        doc = {**doc, "payload": orjson.dumps(doc.get("payload"))}  # bytes payloads need MessagePack
    job = Job.model_validate(doc)
    for encoded in (encode_job(job, content_type), encode_job(doc, content_type)):
        again = decode_job(encoded, content_type)
        assert again == job
        assert again.model_dump() == job.model_dump()
