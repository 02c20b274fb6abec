"""The job envelope: codecs, precise validation errors, and the shipped JSON Schema kept in sync."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import msgpack
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.envelope import (
    JSON,
    MAX_CONTAINER_LEN,
    MAX_DEPTH,
    MSGPACK,
    SCHEMA_FILE,
    DeadLetterReason,
    EnvelopeError,
    Job,
    content_type_of,
    decode_job,
    decode_raw,
    encode_job,
    json_schema,
    validate,
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


# --- Decoding is total: every input gives a Job or an EnvelopeError naming the problem ----------------------

ENVELOPE: dict[Any, Any] = {"job_id": "j", "model_type": "m"}


def _decode_error(raw: bytes | None, ctype: str | None = MSGPACK, **limits: int) -> str:
    with pytest.raises(EnvelopeError) as info:
        decode_job(raw, ctype, **limits)
    assert info.value.reason is DeadLetterReason.DECODE_ERROR, info.value
    return info.value.detail


def _schema_error(raw: bytes, ctype: str = MSGPACK) -> str:
    with pytest.raises(EnvelopeError) as info:
        decode_job(raw, ctype)
    assert info.value.reason is DeadLetterReason.SCHEMA_ERROR, info.value
    return info.value.detail


def _with_payload(packed_payload: bytes) -> bytes:
    """A valid envelope whose payload is the given MessagePack bytes, spliced in as they are."""
    return b"\x83\xa6job_id\xa1j\xaamodel_type\xa1m\xa7payload" + packed_payload


@pytest.mark.parametrize(
    ("raw", "key_kind"),
    [
        (bytes.fromhex("81910101"), "list"),  # {[1]: 1}: msgpack raised TypeError (unhashable), a crash
        (bytes.fromhex("818001"), "dict"),  # {{}: 1}
        (_with_payload(bytes.fromhex("8192010201")), "list"),  # deep inside the payload
    ],
)
def test_a_map_key_that_is_an_array_or_a_map_is_a_decode_error(raw: bytes, key_kind: str) -> None:
    detail = _decode_error(raw)
    assert "a map key is an array or a map" in detail
    assert f"unhashable type: '{key_kind}'" in detail


@pytest.mark.parametrize(
    "raw",
    [b"\xd4\x05\x01", _with_payload(b"\xc7\x02\x07ab"), _with_payload(b"\x81\xd4\x01\x00\x01")],
    ids=["top-level", "payload", "map-key"],
)
def test_msgpack_extension_types_are_refused(raw: bytes) -> None:
    assert "unsupported MessagePack extension type" in _decode_error(raw)


def test_msgpack_timestamps_are_a_payload_like_any_other() -> None:
    raw = msgpack.packb({**ENVELOPE, "payload": msgpack.Timestamp(1_700_000_000, 5)})
    assert decode_job(raw).payload == msgpack.Timestamp(1_700_000_000, 5)
    assert "invalid timestamp data" in _decode_error(
        _with_payload(b"\xd5\xff\x00\x00")
    )  # 2 bytes: no such form
    with pytest.raises(EnvelopeError) as info:  # a timestamp where the schema wants an int
        decode_job(msgpack.packb({**ENVELOPE, "created_at": msgpack.Timestamp(1, 0)}))
    assert info.value.reason is DeadLetterReason.SCHEMA_ERROR
    assert "created_at" in info.value.detail


def test_nesting_deeper_than_msgpacks_own_limit_is_a_decode_error() -> None:
    # msgpack raises StackError with no message past 1024 levels
    assert "nested deeper than the limit of 32 levels (max_depth)" in _decode_error(b"\x91" * 2000 + b"\x01")


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"\xdd\xff\xff\xff\xff", "a map or array of 4294967295 items exceeds the limit of 100000"),
        (b"\xdf\xff\xff\xff\xff", "a map or array of 4294967295 items exceeds the limit of 100000"),
        (b"\xdd\x00\x00\x00\x09", "an array declares 9 items but the message has only 5 bytes"),
        (b"\xdb\xff\xff\xff\xff", "the message ends inside a value"),
        (b"\xc6\xff\xff\xff\xff", "the message ends inside a value"),
        (b"\xc9\xff\xff\xff\xff\x05", "an ext declares more bytes than the message has (6)"),
        (b"\xc1", "a byte that starts no MessagePack value"),
        (b"\x01\x02", "1 extra byte after the value"),
        (b"", "the message ends inside a value"),
    ],
)
def test_malformed_msgpack_says_what_is_wrong(raw: bytes, problem: str) -> None:
    assert problem in _decode_error(raw)


@pytest.mark.parametrize(
    ("doc", "shown"),
    [
        ({**ENVELOPE, 7: "x"}, "int key 7"),
        ({**ENVELOPE, b"region": "eu"}, "bytes key b'region'"),
        ({**ENVELOPE, float("nan"): 1}, "float key nan"),
        ({**ENVELOPE, None: 1}, "NoneType key None"),
        ({**ENVELOPE, True: 1}, "bool key True"),
    ],
)
def test_envelope_keys_that_are_not_strings_are_a_schema_error(doc: dict[object, object], shown: str) -> None:
    detail = _schema_error(msgpack.packb(doc, use_bin_type=True))
    assert f"envelope map keys must be strings, got {shown}" in detail
    with pytest.raises(EnvelopeError, match="envelope map keys must be strings"):
        validate(doc)


def test_validate_names_several_bad_keys_at_once() -> None:
    with pytest.raises(EnvelopeError) as info:
        validate({1: 1, 2: 2, 3: 3, 4: 4, "job_id": "j"})
    assert (
        info.value.detail
        == "envelope map keys must be strings, got int key 1, int key 2, int key 3 and 1 more"
    )


@pytest.mark.parametrize("key", [b"k", 3, float("nan")])
def test_metadata_keys_must_be_strings(key: object) -> None:
    detail = _schema_error(msgpack.packb({**ENVELOPE, "metadata": {key: 1}}, use_bin_type=True))
    assert detail.startswith("metadata.")
    assert "[key]: Input should be a valid string" in detail


def test_validate_reports_values_it_can_not_print() -> None:
    # str() of an int over 4300 digits raises ValueError: the report used to crash on it
    with pytest.raises(EnvelopeError) as info:
        validate({"job_id": 10**5000, "model_type": "m"})
    assert info.value.reason is DeadLetterReason.SCHEMA_ERROR
    assert info.value.detail == "job_id: Input should be a valid string (got int '<unprintable int>')"
    with pytest.raises(EnvelopeError, match=r"metadata\.<unprintable int"):
        validate({**ENVELOPE, "metadata": {10**5000: 1}})


PAYLOADS = [
    None, True, -(2**63), 2**64 - 1, 1.5, float("inf"), "", "τ", b"\x00\xff", [], {},
    {1: "int key", b"k": "bytes key", None: [1, [2, [3]]], 2.5: {"x": b"y"}, False: True},
    [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],  # 30 levels + the envelope: 31
]  # fmt: skip


@pytest.mark.parametrize("payload", PAYLOADS, ids=range(len(PAYLOADS)))
def test_any_msgpack_value_is_an_opaque_payload(payload: object) -> None:
    job = decode_job(msgpack.packb({**ENVELOPE, "payload": payload}, use_bin_type=True))
    assert job.payload == payload


def test_a_nan_payload_passes() -> None:
    job = decode_job(msgpack.packb({**ENVELOPE, "payload": {"x": float("nan")}}))
    assert job.payload["x"] != job.payload["x"]


# --- content-type headers ----------------------------------------------------------------------------------


def test_a_null_content_type_header_is_an_explicit_empty_value() -> None:
    # Kafka allows a header with no value: it is not taken for an absent header (the MessagePack default)
    assert content_type_of([("content-type", None)]) == ""
    assert content_type_of([("content-type", b"")]) == ""
    raw = encode_job(ENVELOPE)
    assert _decode_error(raw, content_type_of([("content-type", None)])) == "content-type header has no value"
    assert _decode_error(raw, content_type_of([("content-type", b" ; charset=x")])) == (
        "content-type header has no value"
    )
    assert _decode_error(raw, None) == "content-type header has no value"
    assert content_type_of([("x-other", None), ("content-type", b"application/json")]) == JSON


def test_content_type_header_values_may_be_str_or_any_bytes() -> None:
    assert content_type_of([("content-type", "Application/JSON; charset=utf-8")]) == JSON
    assert content_type_of((("content-type", bytearray(b"application/msgpack")),)) == MSGPACK
    assert content_type_of([(b"content-type", b"application/json")]) == JSON
    odd = content_type_of([("content-type", b"\xff\xfe\x00")])  # not UTF-8: Latin-1 never fails
    assert "unsupported content-type" in _decode_error(encode_job(ENVELOPE), odd)
    assert (
        content_type_of([("content-type", b"application/json"), ("content-type", b"x")]) == JSON
    )  # first wins


def test_a_value_that_is_not_bytes_is_a_decode_error() -> None:
    assert _decode_error("{}", JSON) == "message value must be bytes, got str"  # type: ignore[arg-type]
    assert decode_job(bytearray(encode_job(ENVELOPE))).job_id == "j"  # type: ignore[arg-type]
    assert decode_job(memoryview(encode_job(ENVELOPE, JSON)), JSON).job_id == "j"  # type: ignore[arg-type]


# --- JSON --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b'{"job_id": "j", "model_type": "m", "priority": 1' + b"0" * 400 + b"}", "number is infinity"),
        (b"[" * 2000 + b"]" * 2000, "nested deeper than the limit of 32 levels"),  # past orjson's own 1024
        (b'{"job_id": "\xff", "model_type": "m"}', "not valid UTF-8"),
        (b'\xef\xbb\xbf{"job_id": "j", "model_type": "m"}', "byte order mark"),
        (b'{"job_id": "\\ud800", "model_type": "m"}', "surrogate"),
        (b'{"job_id": "j", "model_type": "m", "priority": NaN}', "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
def test_malformed_json_says_what_is_wrong(raw: bytes, problem: str) -> None:
    assert problem in _decode_error(raw, JSON)


def test_json_ints_past_64_bits() -> None:
    # orjson reads an int past 64 bits as a float: the schema then refuses it where an int is required
    assert "priority: Input should be a valid integer" in _schema_error(
        b'{"job_id": "j", "model_type": "m", "priority": 18446744073709551616}', JSON
    )
    assert decode_job(
        b'{"job_id": "j", "model_type": "m", "payload": 18446744073709551615}', JSON
    ).payload == (2**64 - 1)


# --- bounded input -----------------------------------------------------------------------------------------


def _nested(levels: int) -> object:
    """``levels`` levels of maps and arrays, the envelope included (it is level 1)."""
    payload: object = "leaf"
    for i in range(levels - 1):
        payload = [payload] if i % 2 else {"k": payload}
    return {**ENVELOPE, "payload": payload}


@pytest.mark.parametrize("ctype", [MSGPACK, JSON])
def test_nesting_depth_limit(ctype: str) -> None:
    assert decode_job(encode_job(_nested(MAX_DEPTH), ctype), ctype).job_id == "j"  # type: ignore[arg-type]
    detail = _decode_error(encode_job(_nested(MAX_DEPTH + 1), ctype), ctype)  # type: ignore[arg-type]
    assert detail == f"nested deeper than the limit of {MAX_DEPTH} levels (max_depth)"
    raw = encode_job(_nested(4), ctype)  # type: ignore[arg-type]
    assert decode_raw(raw, ctype, max_depth=4)["job_id"] == "j"
    assert "limit of 3 levels" in _decode_error(raw, ctype, max_depth=3)
    assert "limit of 3 levels" in _decode_error(
        encode_job({**ENVELOPE, "zz": [[[1]]]}, ctype), ctype, max_depth=3
    )


@pytest.mark.parametrize("ctype", [MSGPACK, JSON])
def test_every_field_counts_toward_the_depth_limit(ctype: str) -> None:
    tags = encode_job({**ENVELOPE, "metadata": {"tags": ["a"]}}, ctype)  # 3 levels
    assert decode_job(tags, ctype, max_depth=3).metadata == {"tags": ["a"]}
    assert "limit of 2 levels" in _decode_error(tags, ctype, max_depth=2)
    deep_extra = encode_job(
        {**ENVELOPE, "zz": _nested(MAX_DEPTH)}, ctype
    )  # an unknown field, ignored but bounded
    assert f"limit of {MAX_DEPTH} levels" in _decode_error(deep_extra, ctype)
    assert f"limit of {MAX_DEPTH} levels" in _decode_error(encode_job(_nested(MAX_DEPTH + 1), ctype), ctype)


@pytest.mark.parametrize("ctype", [MSGPACK, JSON])
def test_container_length_limit(ctype: str) -> None:
    at_limit = encode_job({**ENVELOPE, "payload": [0] * MAX_CONTAINER_LEN}, ctype)
    assert len(decode_job(at_limit, ctype).payload) == MAX_CONTAINER_LEN
    over = encode_job({**ENVELOPE, "payload": [0] * (MAX_CONTAINER_LEN + 1)}, ctype)
    assert _decode_error(over, ctype) == (
        f"a map or array of {MAX_CONTAINER_LEN + 1} items exceeds the limit of {MAX_CONTAINER_LEN}"
        " (max_container_len)"
    )
    small = encode_job({**ENVELOPE, "payload": {"a": 1, "b": 2, "c": 3}}, ctype)
    assert "a map or array of 3 items exceeds the limit of 2" in _decode_error(
        small, ctype, max_container_len=2
    )


def test_msgpack_refuses_an_over_long_array_from_its_header_alone() -> None:
    # 2**32 - 1 items declared in 5 bytes: refused before anything is allocated, whatever the real size
    assert "4294967295 items exceeds the limit" in _decode_error(b"\xdd\xff\xff\xff\xff" + b"\x00" * 200_000)


def test_limits_do_not_refuse_long_strings_or_binaries() -> None:
    raw = encode_job({**ENVELOPE, "payload": b"\x00" * (MAX_CONTAINER_LEN * 3)})
    assert len(decode_job(raw).payload) == MAX_CONTAINER_LEN * 3


def test_publish_error_is_a_dead_letter_reason() -> None:
    assert DeadLetterReason("publish_error") is DeadLetterReason.PUBLISH_ERROR
