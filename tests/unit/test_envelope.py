"""The job envelope: codecs, precise validation errors, and the shipped JSON Schema kept in sync."""

from __future__ import annotations

import json

import jsonschema
import msgpack
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.envelope import (
    JSON,
    MSGPACK,
    SCHEMA_FILE,
    DeadLetterReason,
    EnvelopeError,
    Job,
    content_type_of,
    decode_job,
    encode_job,
    json_schema,
)


def test_shipped_json_schema_matches_the_types() -> None:
    shipped = json.loads(SCHEMA_FILE.read_text())
    assert shipped == json.loads(json.dumps(json_schema())), (
        "schemas/job.v1.schema.json is stale: run python -c 'from schemas.envelope import write_json_schema; "
        "write_json_schema()'"
    )


@pytest.mark.parametrize("ctype", [MSGPACK, JSON])
def test_round_trip_in_both_encodings(ctype: str) -> None:
    doc = {"job_id": "j1", "model_type": "llama", "payload": {"prompt": "hi"}, "region": "eu", "priority": 3,
           "metadata": {"min_context": 8192, "tags": ["a", "b"]}, "estimated_tokens": 12}  # fmt: skip
    job = decode_job(encode_job(doc, ctype), ctype)
    assert job.model_dump(exclude_none=True) == {"v": 1, **doc}


def test_bytes_payload_needs_msgpack() -> None:
    assert (
        decode_job(encode_job({"job_id": "b", "model_type": "m", "payload": b"\x00\x01"})).payload
        == b"\x00\x01"
    )
    with pytest.raises(EnvelopeError, match="bytes payloads need MessagePack"):
        encode_job({"job_id": "b", "model_type": "m", "payload": b"\x00"}, JSON)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"model_type": "m"}, "job_id: Field required"),
        ({"job_id": "", "model_type": "m"}, "job_id: String should have at least 1 character"),
        ({"job_id": "x" * 129, "model_type": "m"}, "job_id: String should have at most 128 characters"),
        ({"job_id": 5, "model_type": "m"}, "job_id: Input should be a valid string (got int '5')"),
        ({"job_id": "a"}, "model_type: Field required"),
        (
            {"job_id": "a", "model_type": "m", "estimated_tokens": -1},
            "estimated_tokens: Input should be greater",
        ),
        (
            {"job_id": "a", "model_type": "m", "estimated_tokens": "3"},
            "estimated_tokens: Input should be a valid int",
        ),
        ({"job_id": "a", "model_type": "m", "priority": True}, "priority: Input should be a valid integer"),
        ({"job_id": "a", "model_type": "m", "metadata": {"k": {"nested": 1}}}, "metadata.k"),
        ({"job_id": "a", "model_type": "m", "v": 2}, "v: Input should be less than or equal to 1"),
    ],
)
def test_validation_names_the_field_and_what_was_wrong(doc: dict[str, object], message: str) -> None:
    with pytest.raises(EnvelopeError) as info:
        decode_job(msgpack.packb(doc))
    assert info.value.reason is DeadLetterReason.SCHEMA_ERROR
    assert message in info.value.detail


def test_decode_errors_and_size_limit() -> None:
    with pytest.raises(EnvelopeError, match="decode_error: not valid MessagePack"):
        decode_job(b"\xc1")
    with pytest.raises(EnvelopeError, match="decode_error: not valid JSON"):
        decode_job(b"{", JSON)
    with pytest.raises(EnvelopeError, match="unsupported content-type"):
        decode_job(b"{}", "text/plain")
    with pytest.raises(EnvelopeError, match="tombstone"):
        decode_job(None)
    with pytest.raises(EnvelopeError) as info:
        decode_job(b"x" * 100, max_bytes=99)
    assert info.value.reason is DeadLetterReason.TOO_LARGE


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    job = decode_job(orjson.dumps({"job_id": "a", "model_type": "m", "future_field": 1}), JSON)
    assert job.job_id == "a"


def test_content_type_header() -> None:
    assert content_type_of(None) == MSGPACK
    assert content_type_of([("content-type", b"application/json; charset=utf-8")]) == JSON
    assert content_type_of([("x", b"y")]) == MSGPACK


scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.text(max_size=10))


@given(
    job_id=st.text(min_size=1, max_size=128),
    model=st.text(min_size=1, max_size=40),
    tokens=st.one_of(st.none(), st.integers(0, 10**9)),
    meta=st.one_of(
        st.none(),
        st.dictionaries(st.text(max_size=8), st.one_of(scalars, st.lists(scalars, max_size=3)), max_size=4),
    ),
)
def test_the_json_schema_accepts_what_the_types_accept(job_id: str, model: str, tokens: int | None,
                                                       meta: dict[str, object] | None) -> None:  # fmt: skip
    doc = {"job_id": job_id, "model_type": model, "estimated_tokens": tokens, "metadata": meta}
    doc = {k: v for k, v in doc.items() if v is not None}
    Job.model_validate(doc)
    jsonschema.validate(doc, json_schema())


def test_the_json_schema_refuses_what_the_types_refuse() -> None:
    for bad in ({"model_type": "m"}, {"job_id": "", "model_type": "m"}, {"job_id": "a", "model_type": 3}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, json_schema())
