"""The Redis key layout. Every key carries the hash tag ``{prefix}``, so all of one deployment's keys live
in one Redis Cluster slot and the pipelines and scripts that touch several of them stay legal there.

| key | type | holds |
|---|---|---|
| ``{p}:heads`` | set | ids of registered heads |
| ``{p}:head:<id>`` | hash | one head's registration, status, load, stats and learned profile |
| ``{p}:slot:<topic>:<partition>`` | string | the head owning that model-topic partition (expires with it) |
| ``{p}:inflight`` | hash | head id -> jobs routed to it and not yet completed (routers add, heads release) |
| ``{p}:aff:<session>`` | string | the head a session is pinned to, shared by every router (expires) |
| ``{p}:models`` | hash | model id -> registered characteristics (JSON) |
| ``{p}:policy`` | string | the current policy (JSON) |
| ``{p}:policy:history`` | list | earlier policies, newest first (capped) |
| ``{p}:claims:<bucket>`` | hash | idempotency key -> the claim of the record a router is routing (see below) |
| ``{p}:done:<bucket>`` | hash | idempotency key -> where that job attempt ended (see below) |
| ``{p}:audit`` | stream | the audit records, one entry per batch, capped (``audit.py``) |
| ``{p}:events`` | pub/sub | head and policy change notifications to routers |
| ``{p}:seq:<writer>`` | string | the last in-flight change applied for a writer: replays are no-ops (expires) |
| ``{p}:dlq:*`` | various | dead-letter redrives: per dead letter, progress, a lock (``dlq/state.py``) |

Idempotency keys (``pipeline/marks.py``): ``<key>`` is ``j|<attempt>|<job_id>``, or ``r|topic|partition|offset``
for a record that is no job. A redriven job (header ``x-redrive``, a valid redrive id, see
``pipeline/outcomes.py``) is keyed ``jr|<redrive_id>|<attempt>|<job_id>``, so it routes afresh instead of meeting
the done mark of its dead-lettered attempt. A claim (``c|topic|partition|offset``) is a field of a claims hash,
kept at least ``claim_ttl_ms``; where the attempt ended (``d|routed|<head>``, ``d|retry|<tier>`` or
``d|dlq|<reason>``) a field of a done hash, kept at least ``dedupe_ttl_s``. The hashes are time-bucketed, a batch
costs a few commands whatever its size (``state/idempotency.py``).

A slot is only ever taken with SET NX, and renewed or deleted only while it holds the caller's head id, each
in one compare-and-set script (``state/heads.py``): a head that lapsed never overwrites its successor.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str

    @property
    def tag(self) -> str:
        return "{" + self.prefix + "}"

    @property
    def heads(self) -> str:
        return f"{self.tag}:heads"

    def head(self, head_id: str) -> str:
        return f"{self.tag}:head:{head_id}"

    def slot(self, topic: str, partition: int) -> str:
        return f"{self.tag}:slot:{topic}:{partition}"

    @property
    def inflight(self) -> str:
        return f"{self.tag}:inflight"

    def affinity(self, session_id: str) -> str:
        return f"{self.tag}:aff:{session_id}"

    @property
    def models(self) -> str:
        return f"{self.tag}:models"

    @property
    def policy(self) -> str:
        return f"{self.tag}:policy"

    @property
    def policy_history(self) -> str:
        return f"{self.tag}:policy:history"

    @property
    def events(self) -> str:
        return f"{self.tag}:events"

    def writer_seq(self, writer: str) -> str:
        return f"{self.tag}:seq:{writer}"
