"""The job envelope, schema version 1: typed class, codecs chosen by ``content-type``, precise validation.

The router never re-encodes a job: it validates the decoded envelope and republishes the original bytes.
Unknown fields are ignored (so producers may add fields before the schema does), wrong types are refused.
"""

from __future__ import annotations

import json
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

Scalar = str | int | float | bool | None
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


def content_type_of(headers: list[tuple[str, bytes]] | tuple[tuple[str, bytes], ...] | None) -> str:
    """The job's content type from its Kafka headers; MessagePack when absent."""
    if headers:
        for key, value in headers:
            if key == "content-type":
                return value.decode("latin-1").split(";", 1)[0].strip().lower()
    return MSGPACK


def decode_raw(raw: bytes, content_type: str = MSGPACK) -> Any:
    """Bytes to Python objects, or ``EnvelopeError(decode_error)`` saying what was wrong."""
    try:
        if content_type == MSGPACK:
            return msgpack.unpackb(raw, raw=False, strict_map_key=False)
        if content_type == JSON:
            return orjson.loads(raw)
    except (ValueError, msgpack.UnpackException, msgpack.ExtraData) as exc:
        kind = "MessagePack" if content_type == MSGPACK else "JSON"
        raise EnvelopeError(
            DeadLetterReason.DECODE_ERROR, f"not valid {kind}: {exc or type(exc).__name__}"
        ) from exc
    raise EnvelopeError(
        DeadLetterReason.DECODE_ERROR,
        f"unsupported content-type {content_type!r} (use one of {CONTENT_TYPES})",
    )


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "<envelope>"
        got = err.get("input")
        shown = "" if err["type"] == "missing" else f" (got {type(got).__name__} {str(got)[:40]!r})"
        parts.append(f"{where}: {err['msg']}{shown}")
    return "; ".join(parts)


def validate(obj: Any) -> Job:
    """Decoded object to a :class:`Job`, or ``EnvelopeError(schema_error)`` naming each bad field."""
    if not isinstance(obj, dict):
        raise EnvelopeError(
            DeadLetterReason.SCHEMA_ERROR, f"envelope must be a map, got {type(obj).__name__}"
        )
    try:
        return Job.model_validate(obj)
    except ValidationError as exc:
        raise EnvelopeError(DeadLetterReason.SCHEMA_ERROR, _describe(exc)) from exc


def decode_job(raw: bytes | None, content_type: str = MSGPACK, max_bytes: int | None = None) -> Job:
    """Decode and validate one job's bytes."""
    if raw is None:
        raise EnvelopeError(DeadLetterReason.DECODE_ERROR, "message has no value (tombstone)")
    if max_bytes is not None and len(raw) > max_bytes:
        raise EnvelopeError(DeadLetterReason.TOO_LARGE, f"{len(raw)} bytes exceeds the limit of {max_bytes}")
    return validate(decode_raw(raw, content_type))


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
