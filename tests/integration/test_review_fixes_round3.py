"""Review of 6dcd994 (a cut dead letter's x-job-id, the producer's size check, a head's background audit).
Each test is one attack; those that reproduce a bug still open are ``xfail(strict=True)``."""

from __future__ import annotations

import tracemalloc

import msgpack
import pytest

from router_worker.pipeline.messages import H_JOB_ID, Headers, header
from router_worker.pipeline.publish import dead_letter_record

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------- x-job-id of a cut dead letter


def _hostile() -> bytes:
    """A MessagePack job of about 600 KB whose payload is 600 000 empty maps (every container within the
    decoder's limits): cheap to send, a Python object per byte to decode."""
    raw: bytes = msgpack.packb({"job_id": "J", "model_type": "m", "payload": [[{}] * 50_000] * 12})
    return raw


def test_the_job_id_of_a_cut_dead_letter_is_found_without_decoding_the_whole_value() -> None:
    value = _hostile()
    limit = 64 * 1024  # the record is ten times over it: dead-lettered as too_large, its value cut
    assert len(value) > 8 * limit
    tracemalloc.start()
    try:
        out_value, _, headers = dead_letter_record(
            value, b"J", [("content-type", b"application/msgpack")], "too_large", "over the limit",
            "router.requests", 0, 7, 1, limit=limit, keep=4096,
        )  # fmt: skip
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out_value is not None
    assert len(out_value) == 4096, "the value is cut"
    assert header(headers, H_JOB_ID) == b"J", "the cut dead letter names its job"
    # Cutting and hashing the value needs next to nothing; building the whole document needs tens of MB.
    assert peak < 8 << 20, (
        f"dead-lettering a {len(value)}-byte record peaked at {peak} bytes of Python objects"
    )


def test_a_producers_own_x_job_id_never_reaches_a_dead_letter() -> None:
    value = msgpack.packb({"job_id": "real", "model_type": "m", "payload": b"x" * 5000})
    origin: Headers = [
        ("x-original-topic", b"t"),
        ("x-original-partition", b"0"),
        ("x-original-offset", b"1"),
    ]
    forgeries: list[Headers] = [[(H_JOB_ID, b"forged")], [(H_JOB_ID, b"forged"), *origin]]
    for forged in forgeries:
        for limit, want in ((2000, [b"real"]), (100_000, [])):  # cut (named from the value) / whole (none)
            _, _, headers = dead_letter_record(
                value, b"k", forged, "no_capacity", "e", "router.requests", 0, 1, 1, limit=limit, keep=4096
            )
            assert [v for k, v in headers if k == H_JOB_ID] == want
