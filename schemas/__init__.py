"""Wire types of router-worker: the job envelope (v1), its codecs and its JSON Schema."""

from schemas.envelope import (
    CONTENT_TYPES,
    JSON,
    MSGPACK,
    SCHEMA_FILE,
    SCHEMA_VERSION,
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

__all__ = [
    "CONTENT_TYPES",
    "JSON",
    "MSGPACK",
    "SCHEMA_FILE",
    "SCHEMA_VERSION",
    "DeadLetterReason",
    "EnvelopeError",
    "Job",
    "content_type_of",
    "decode_job",
    "decode_raw",
    "encode_job",
    "json_schema",
    "validate",
]
