"""The job envelope, schema version 1: typed class, codecs chosen by ``content-type``, precise validation.

The router never re-encodes a job: it validates the decoded envelope and republishes the original bytes.
Unknown fields are ignored (so producers may add fields before the schema does), wrong types are refused.

Decoding is total: whatever the bytes and headers of a record, :func:`decode_job` returns a :class:`Job` or raises
:class:`EnvelopeError` (a dead-letter reason and a human-readable detail), never anything else. Input is bounded:
maps and arrays nest at most :data:`MAX_DEPTH` levels and hold at most :data:`MAX_CONTAINER_LEN` items.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Final

import msgpack
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION: Final = 1
MSGPACK: Final = "application/msgpack"
JSON: Final = "application/json"
CONTENT_TYPES: Final = (MSGPACK, JSON)
SCHEMA_FILE: Final = Path(__file__).with_name("job.v1.schema.json")
MAX_DEPTH: Final = 32
"""Maps and arrays may nest this many levels (the envelope itself is level 1); deeper is ``decode_error``."""
MAX_CONTAINER_LEN: Final = 100_000
"""A map or array may hold this many items; more is ``decode_error``, refused before it is built."""

Scalar = str | int | float | bool | None
HeaderValue = bytes | bytearray | memoryview | str | None
"""A Kafka header value as clients deliver it: bytes, null, or (some clients) str."""
MetadataValue = Scalar | list[Scalar]


class DeadLetterReason(StrEnum):
    """Why a job went to the dead-letter topic (the ``x-dlq-reason`` header)."""

    DECODE_ERROR = "decode_error"
    SCHEMA_ERROR = "schema_error"
    TOO_LARGE = "too_large"
    EXPIRED = "expired"
    UNKNOWN_MODEL = "unknown_model"
    NO_CAPACITY = "no_capacity"
    MAX_ATTEMPTS = "max_attempts"
    PUBLISH_ERROR = "publish_error"


class EnvelopeError(ValueError):
    """A job that can not be routed as it stands. ``reason`` is a dead-letter reason, ``detail`` says why."""

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class Job(BaseModel):
    """One inference job as producers publish it (schema version 1)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True, title="RouterJobV1")

    v: Annotated[int, Field(ge=1, le=SCHEMA_VERSION, description="Schema version.")] = SCHEMA_VERSION
    job_id: Annotated[str, Field(min_length=1, max_length=128, description="Idempotency key.")]
    model_type: Annotated[str, Field(min_length=1, max_length=256, description="Model or model family.")]
    payload: Annotated[Any, Field(description="Opaque to the router, passed through unchanged.")] = None
    region: Annotated[str | None, Field(max_length=64, description="Preferred region.")] = None
    strategy: Annotated[str | None, Field(max_length=64, description="Per-job strategy override.")] = None
    session_id: Annotated[str | None, Field(max_length=256, description="Session affinity key.")] = None
    tenant: Annotated[str | None, Field(max_length=128, description="Who the job is for.")] = None
    prefix_hash: Annotated[str | None, Field(max_length=256, description="Hash of a prompt prefix.")] = None
    metadata: Annotated[
        dict[str, MetadataValue] | None,
        Field(description="Model-specific criteria (min context, tags, ...)."),
    ] = None
    estimated_tokens: Annotated[int | None, Field(ge=0, description="Size hint.")] = None
    priority: Annotated[int | None, Field(description="Higher first.")] = None
    deadline_ms: Annotated[int | None, Field(ge=0, description="Epoch ms; after it the job expires.")] = None
    reply_to: Annotated[str | None, Field(min_length=1, max_length=249, description="Completion topic.")] = (
        None
    )
    created_at: Annotated[int | None, Field(ge=0, description="Epoch ms, set by the producer SDK.")] = None


_CANONICAL: Final = {MSGPACK.encode(): MSGPACK, JSON.encode(): JSON}


def content_type_of(headers: Iterable[tuple[str | bytes, HeaderValue]] | None) -> str:
    """The job's content type from its Kafka headers, lower-cased and without parameters (``; charset=...``).

    * No ``content-type`` header: MessagePack, the contract's default.
    * Header values may be bytes (any bytes: decoded as Latin-1, which never fails) or str (some clients).
    * A ``content-type`` header with a null value (Kafka allows ``None``), or an empty one, is *not* taken
      for an absent header: a producer that sends the header but says nothing has a bug that the default
      would hide. It gives ``""``, which :func:`decode_job` refuses as ``decode_error`` "content-type header
      has no value".
    * The first ``content-type`` header wins.

    Never raises: the router calls it outside its error handling; every bad value is refused by the decoder.
    """
    if headers:
        for key, value in headers:
            if key == "content-type" and type(value) is bytes and value in _CANONICAL:  # the common spelling
                return _CANONICAL[value]
            if (key if isinstance(key, str) else bytes(key).decode("latin-1")) == "content-type":
                if value is None:
                    return ""
                if isinstance(value, bytes | bytearray | memoryview):
                    value = bytes(value).decode("latin-1")
                elif not isinstance(value, str):
                    return f"<{type(value).__name__} value>"
                return value.split(";", 1)[0].strip().lower()
    return MSGPACK


def _text(value: object, limit: int = 40) -> str:
    """``str(value)`` cut to ``limit`` characters; never raises (huge ints, deep nesting, hostile ``__str__``)."""
    try:
        text = str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _exc_text(exc: BaseException) -> str:
    message = _text(exc, 200)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _as_bytes(raw: object) -> bytes:
    if isinstance(raw, bytes):
        return raw
    if isinstance(raw, bytearray | memoryview):
        return bytes(raw)
    raise EnvelopeError(
        DeadLetterReason.DECODE_ERROR, f"message value must be bytes, got {type(raw).__name__}"
    )


def _too_deep(max_depth: int) -> EnvelopeError:
    return EnvelopeError(
        DeadLetterReason.DECODE_ERROR, f"nested deeper than the limit of {max_depth} levels (max_depth)"
    )


def _too_long(n: int, max_len: int) -> EnvelopeError:
    return EnvelopeError(
        DeadLetterReason.DECODE_ERROR,
        f"a map or array of {n} items exceeds the limit of {max_len} (max_container_len)",
    )


def _check_shape(obj: Any, max_depth: int, max_len: int, level: int = 1) -> None:
    """Enforce the nesting depth and container length limits on ``obj``, found at nesting ``level`` (1: the
    document itself). Iterative: nothing to exhaust the interpreter's recursion limit."""
    if type(obj) is not dict and type(obj) is not list:
        return
    stack: list[tuple[Any, int]] = [(obj, level)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise _too_deep(max_depth)
        if len(node) > max_len:
            raise _too_long(len(node), max_len)
        for child in node.values() if type(node) is dict else node:
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))


def _refuse_ext(code: int, data: bytes) -> Any:
    raise EnvelopeError(
        DeadLetterReason.DECODE_ERROR, f"unsupported MessagePack extension type {code} ({len(data)} bytes)"
    )


_DECLARED_LEN: Final = re.compile(r"(\d+) exceeds max_(str|bin|array|map|ext)_len")


def _decode_msgpack(raw: bytes, max_depth: int, max_len: int) -> Any:
    """MessagePack to objects. Lengths are checked from each header, before anything is allocated; the depth
    is left to the caller (msgpack's own limit is 1024)."""
    try:
        if len(raw) <= max_len:  # msgpack's defaults already bound every length by len(raw)
            return msgpack.unpackb(raw, raw=False, strict_map_key=False, ext_hook=_refuse_ext)
        return msgpack.unpackb(raw, raw=False, strict_map_key=False, ext_hook=_refuse_ext,
                               max_array_len=max_len, max_map_len=max_len)  # fmt: skip
    except EnvelopeError:
        raise
    except Exception as exc:  # malformed input: it must never escape as a crash
        raise _msgpack_error(exc, len(raw), max_depth, max_len) from exc


def _msgpack_error(exc: Exception, size: int, max_depth: int, max_len: int) -> EnvelopeError:
    if isinstance(exc, msgpack.StackError):  # deeper than msgpack's own limit (1024), so deeper than ours
        return _too_deep(max_depth)
    return EnvelopeError(DeadLetterReason.DECODE_ERROR, _msgpack_problem(exc, size, max_len))


def _msgpack_problem(exc: Exception, size: int, max_len: int) -> str:
    """A human-readable detail for whatever the MessagePack decoder raised."""
    message = _text(exc, 200)
    declared = _DECLARED_LEN.match(message)
    if declared:
        n, kind = int(declared[1]), declared[2]
        if kind in ("array", "map") and n > max_len:
            return _too_long(n, max_len).detail
        article = "an" if kind[0] in "ae" else "a"
        if kind in ("array", "map"):
            what = f"{article} {kind} declares {n} items but the message has only {size} bytes"
        else:  # msgpack does not always report these lengths right: say only what is sure
            what = f"{article} {kind} declares more bytes than the message has ({size})"
    elif isinstance(exc, msgpack.ExtraData):
        n = len(exc.extra)
        what = f"{n} extra byte{'' if n == 1 else 's'} after the value"
    elif isinstance(exc, msgpack.FormatError):
        what = "a byte that starts no MessagePack value"
    elif isinstance(exc, TypeError) and "unhashable" in message:
        what = "a map key is an array or a map"
    elif "incomplete input" in message:
        what = "the message ends inside a value"
    else:
        return f"not valid MessagePack: {_exc_text(exc)}"
    return f"not valid MessagePack: {what} ({_exc_text(exc)})"


def _decode_json(raw: bytes, max_depth: int) -> Any:
    """JSON to objects. orjson has no length limits: the caller checks them, and the depth (orjson's own limit
    is 1024)."""
    try:
        return orjson.loads(raw)
    except Exception as exc:
        raise _json_error(exc, max_depth) from exc


def _json_error(exc: Exception, max_depth: int) -> EnvelopeError:
    if "depth limit exceeded" in str(exc):  # deeper than orjson's own limit (1024), so deeper than ours
        return _too_deep(max_depth)
    return EnvelopeError(DeadLetterReason.DECODE_ERROR, f"not valid JSON: {_exc_text(exc)}")


def _decode(raw: bytes, content_type: str | None, max_depth: int, max_len: int) -> Any:
    """The codec alone: the shape limits are not all checked yet (see decode_raw and decode_job)."""
    if content_type == MSGPACK:
        return _decode_msgpack(raw, max_depth, max_len)
    if content_type == JSON:
        return _decode_json(raw, max_depth)
    if not content_type:
        raise EnvelopeError(DeadLetterReason.DECODE_ERROR, "content-type header has no value")
    raise EnvelopeError(
        DeadLetterReason.DECODE_ERROR,
        f"unsupported content-type {_text(content_type, 80)!r} (use one of {CONTENT_TYPES})",
    )


def decode_raw(
    raw: bytes,
    content_type: str | None = MSGPACK,
    *,
    max_depth: int = MAX_DEPTH,
    max_container_len: int = MAX_CONTAINER_LEN,
) -> Any:
    """Bytes to Python objects, or ``EnvelopeError(decode_error)`` saying what was wrong. Total: any input
    gives an object or that error, never another exception.

    Limits: maps and arrays nest at most ``max_depth`` levels and hold at most ``max_container_len`` items.
    MessagePack extension types are refused (timestamps, the one standard extension, are decoded to
    ``msgpack.Timestamp``); a map key that is itself an array or a map is refused (it can not be a Python key).
    A ``content_type`` of ``""`` or ``None`` (a content-type header with no value) is refused.
    """
    obj = _decode(_as_bytes(raw), content_type, max_depth, max_container_len)
    _check_shape(obj, max_depth, max_container_len)
    return obj


def _describe(exc: ValidationError) -> str:
    try:
        parts = []
        for err in exc.errors(include_url=False):
            where = ".".join(_text(p) for p in err["loc"]) or "<envelope>"
            got = err.get("input")
            shown = "" if err["type"] == "missing" else f" (got {type(got).__name__} {_text(got)!r})"
            parts.append(f"{where}: {err['msg']}{shown}")
        return "; ".join(parts)
    except Exception:  # never let the error report itself fail
        return f"{exc.error_count()} invalid field(s)"


def validate(obj: Any) -> Job:
    """Decoded object to a :class:`Job`, or ``EnvelopeError(schema_error)`` naming each bad field.

    Every key of the envelope map must be a string (MessagePack allows any key; a non-string one is refused
    rather than silently ignored as an unknown field).
    """
    if not isinstance(obj, dict):
        raise EnvelopeError(
            DeadLetterReason.SCHEMA_ERROR, f"envelope must be a map, got {type(obj).__name__}"
        )
    _check_keys(obj)
    try:
        return Job.model_validate(obj)
    except Exception as exc:
        raise _schema_error(exc) from exc


def _check_keys(obj: dict[Any, Any]) -> None:
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        named = ", ".join(f"{type(k).__name__} key {_text(k)}" for k in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise EnvelopeError(
            DeadLetterReason.SCHEMA_ERROR, f"envelope map keys must be strings, got {named}{more}"
        )


def _schema_error(exc: Exception) -> EnvelopeError:
    if isinstance(exc, ValidationError):
        return EnvelopeError(DeadLetterReason.SCHEMA_ERROR, _describe(exc))
    # pydantic reports problems as ValidationError; anything else is still the input's fault, not a crash
    return EnvelopeError(DeadLetterReason.SCHEMA_ERROR, f"envelope could not be validated: {_exc_text(exc)}")


_TYPED_DEPTH: Final = 3  # the deepest the typed fields nest: envelope, metadata, a list in it
_CONTAINERS: Final = frozenset((dict, list))


_validate_job: Final[Callable[[Any], Job]] = Job.__pydantic_validator__.validate_python
"""``Job.model_validate`` without its wrapper: the same validator, a fifth less per job on the hot path."""


def decode_job(
    raw: bytes | None,
    content_type: str | None = MSGPACK,
    max_bytes: int | None = None,
    *,
    max_depth: int = MAX_DEPTH,
    max_container_len: int = MAX_CONTAINER_LEN,
) -> Job:
    """Decode and validate one job's bytes: a :class:`Job`, or :class:`EnvelopeError` with a detail naming the
    problem: ``too_large`` (over ``max_bytes``), ``decode_error`` (see :func:`decode_raw`, limits included) or
    ``schema_error`` (see :func:`validate`). Total: never another exception."""
    if raw is None:
        raise EnvelopeError(DeadLetterReason.DECODE_ERROR, "message has no value (tombstone)")
    if type(raw) is not bytes:
        raw = _as_bytes(raw)
    if max_bytes is not None and len(raw) > max_bytes:
        raise EnvelopeError(DeadLetterReason.TOO_LARGE, f"{len(raw)} bytes exceeds the limit of {max_bytes}")
    if content_type == MSGPACK and len(raw) <= max_container_len:  # the hot path: _decode_msgpack, inlined
        try:
            obj = msgpack.unpackb(raw, raw=False, strict_map_key=False, ext_hook=_refuse_ext)
        except EnvelopeError:
            raise
        except Exception as exc:
            raise _msgpack_error(exc, len(raw), max_depth, max_container_len) from exc
    elif content_type == JSON:  # _decode_json, inlined
        try:
            obj = orjson.loads(raw)
        except Exception as exc:
            raise _json_error(exc, max_depth) from exc
        if len(raw) > max_container_len:  # long enough to hold an over-long container: check them all
            _check_shape(obj, max_depth, max_container_len)
    else:  # a long MessagePack message (whose lengths it checks), or a content type to refuse
        obj = _decode(raw, content_type, max_depth, max_container_len)
    if type(obj) is not dict or max_depth < _TYPED_DEPTH:
        _check_shape(obj, max_depth, max_container_len)
        return validate(obj)
    # The hot path. The typed fields refuse nesting past _TYPED_DEPTH levels, so only the opaque payload and
    # unknown fields can break the depth limit: check the payload first (most hold no map or array at all), and
    # the whole map and its keys only if it has fields the model does not know. This spares a walk of every field.
    payload = obj.get("payload")
    if (type(payload) is dict and not _CONTAINERS.isdisjoint(map(type, payload.values()))) or (
        type(payload) is list and not _CONTAINERS.isdisjoint(map(type, payload))
    ):
        _check_shape(payload, max_depth, max_container_len, level=2)
    try:
        job = _validate_job(obj)
    except Exception as exc:
        _check_keys(obj)  # "keys must be strings" says more than "job_id: Field required" for b"job_id"
        raise _schema_error(exc) from exc
    if len(job.__pydantic_fields_set__) != len(obj):  # unknown fields, maybe not even str keys
        _check_shape(obj, max_depth, max_container_len)
        _check_keys(obj)
    return job


def encode_job(job: Job | dict[str, Any], content_type: str = MSGPACK) -> bytes:
    """Encode a job for publishing. JSON can not carry a bytes payload: use MessagePack for that."""
    data = job.model_dump(exclude_none=True) if isinstance(job, Job) else job
    if content_type == MSGPACK:
        return msgpack.packb(data, use_bin_type=True)  # type: ignore[no-any-return]
    if content_type == JSON:
        try:
            return orjson.dumps(data)
        except TypeError as exc:
            raise EnvelopeError(
                DeadLetterReason.SCHEMA_ERROR, f"not JSON-encodable ({exc}); bytes payloads need MessagePack"
            ) from exc
    raise ValueError(f"unsupported content-type {content_type!r}")


def json_schema() -> dict[str, Any]:
    """The machine-readable JSON Schema of the envelope (what ``schemas/job.v1.schema.json`` holds)."""
    schema = Job.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://router-worker.dev/schemas/job.v1.schema.json"
    schema["description"] = (
        "router-worker job envelope, schema version 1. Encoded as MessagePack (content-type "
        "application/msgpack, the default) or JSON (application/json). Unknown fields are ignored."
    )
    return schema


def write_json_schema(path: Path = SCHEMA_FILE) -> None:
    path.write_text(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")
