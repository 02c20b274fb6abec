"""Adversarial review of issue 8 (fault handling): pure checks of keys and plans."""

from __future__ import annotations

from aiokafka import TopicPartition

from router_worker.pipeline.fault_headers import H_ADMIT_AT, H_THROTTLE_N
from router_worker.pipeline.faults import restore_waited
from router_worker.pipeline.outcomes import H_REDRIVE, Incoming, claim_key_of
from schemas.envelope import Job


def _waited(topic: str, headers: list[tuple[str, bytes | None]]) -> Incoming:
    job = Job(job_id="j1", model_type="m", tenant="acme")
    tp = TopicPartition(topic, 0)
    return Incoming(tp, 7, b"j1", b"{}", headers, "application/json", 2, job, None,
                    claim_key_of(job, 2, tp, 7, None))  # fmt: skip


def test_a_redriven_jobs_return_from_an_admission_wait_is_keyed_within_its_redrive() -> None:
    """A job throttled once (trip key ``j|1t1|j1``, marked done for the dedupe TTL) and later dead-lettered is
    redriven; over its limit again, it waits again. Back from that wait its key must not be ``j|1t1|j1`` again:
    that key is done, so the redriven job would be skipped as a duplicate and lost."""
    throttle = [(H_ADMIT_AT, b"1"), (H_THROTTLE_N, b"1"), ("x-route-attempt", b"1")]
    plain = _waited("router.retry.1", list(throttle))
    redriven = _waited("router.retry.1", [*throttle, (H_REDRIVE, b"rd-20250101T000000Z-abcdef")])
    restore_waited([(plain.tp, [plain]), (redriven.tp, [redriven])], frozenset({"router.retry.1"}))
    assert plain.attempt == redriven.attempt == 1
    assert plain.claim_key == "j|1t1|j1"
    assert redriven.claim_key != plain.claim_key
    assert redriven.claim_key.startswith("jr|rd-20250101T000000Z-abcdef|")
