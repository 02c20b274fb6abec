"""The router's fault handling around a batch: circuit breakers, admission control, publish fallback.

Before the plan (:meth:`FaultGate.before_plan`, at most one Redis round trip, none when nothing asks for it):

- records back from an admission wait get their attempt and trip-keyed claim back (a wait is not an attempt);
- the breakers that matter are read (every one that is not closed, and those that counted a failure), and the
  outcomes this router counted (publish failures) are added, in the same round trip, when there is news: a
  change event arrived (the state cache refreshed), this router has counts to add, an open breaker's cool-down
  ended, or ``breaker_poll_ms`` passed; each transition and half-open probe lease is then written by
  compare-and-set (a second round trip, only then) and the one router that wins audits it;
- the jobs an admission limit applies to are scheduled by the bucket script in that same round trip.

After the first publish (:meth:`FaultGate.publish`): a routed job whose publish to its head failed for good or
stayed unsent while the broker took other records goes to the next candidate, then to the policy's fallback
models; its headers (``x-route-fallback: 1``), its audit record and ``routing_fallbacks_total`` say so.

While Redis does not answer, the last breaker view stands and admission lets every job through (the router
routes from its last snapshot anyway; a limit is not worth stopping the stream for).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter as Tally
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    CorruptRecordException,
    InvalidMessageError,
    InvalidTimestampError,
    LeaderNotAvailableError,
    MessageSizeTooLargeError,
    NotEnoughReplicasAfterAppendError,
    NotEnoughReplicasError,
    NotLeaderForPartitionError,
    ProducerClosed,
    RecordListTooLargeError,
    RecordTooLargeError,
    UnknownTopicOrPartitionError,
)
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from router_worker.audit import AuditSink
from router_worker.core.admission import Limit, model_key, tenant_key
from router_worker.core.breaker import (
    Breaker,
    BreakerConfig,
    BreakerState,
    evaluate,
    lease,
    probes_left,
    prune,
)
from router_worker.core.model import RouterMemory
from router_worker.core.policy import Policy
from router_worker.pipeline.fault_headers import (
    H_THROTTLE_N,
    THROTTLE_HEADERS,
    THROTTLE_REASON,
    admit_at,
    throttle_claim_key,
    throttle_trips,
)
from router_worker.pipeline.intake import Parts
from router_worker.pipeline.messages import H_RETRY_REASON, header
from router_worker.pipeline.outcomes import Plan, Retried, Routed, redrive_of
from router_worker.pipeline.plan import Admission, PlanConfig, reroute
from router_worker.pipeline.publish import PublishReport, RetryBudget, Send, describe, publish
from router_worker.settings import Settings
from router_worker.state.admission import Buckets
from router_worker.state.breakers import BreakerStore, Write
from router_worker.state.breakers import describe as describe_breaker
from router_worker.state.cache import StateCache
from router_worker.state.keys import Keys
from router_worker.state.scripts import LoadedScript

log = logging.getLogger(__name__)

RECORD_ERRORS = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError, CorruptRecordException,
                 InvalidMessageError, InvalidTimestampError)  # fmt: skip
"""Publish errors that are the record's own: no other head would take it either, and its head is not at fault."""
PARTITION_ERRORS = (NotLeaderForPartitionError, LeaderNotAvailableError, NotEnoughReplicasError,
                    NotEnoughReplicasAfterAppendError, UnknownTopicOrPartitionError)  # fmt: skip
"""Retriable errors a live broker answers about one partition: still failing after the whole retry budget, they
are the head's partition's problem even when nothing else was sent in the batch (a broker that is down gives
connection errors and timeouts instead)."""
THROTTLE_REASON_B = THROTTLE_REASON.encode()
FALLBACK_ROUNDS = 2
"""How many times one batch moves jobs off failing heads (each round passes over every head failed so far)."""


_PROBE_MAX_S = 2.0
"""The longest wait for the broker's answer to the metadata request that tells a partition's fault from an outage."""


async def broker_answers(producer: AIOKafkaProducer, request_timeout_ms: int) -> bool:
    """Whether the cluster answers a metadata request now (within 2 s, or the request timeout if shorter)."""
    client: Any = producer.client
    try:
        await asyncio.wait_for(client.fetch_all_metadata(), min(_PROBE_MAX_S, request_timeout_ms / 1000))
    except Exception:
        return False
    return True


def breaker_config(policy: Policy, s: Settings) -> BreakerConfig | None:
    """The breaker settings in force: the policy's ``breaker`` section, else ``ROUTER_BREAKER_*``; None: off."""
    if policy.breaker is not None:
        return policy.breaker.config() if policy.breaker.enabled else None
    if not s.breaker_enabled:
        return None
    return BreakerConfig(window_ms=int(s.breaker_window_s * 1000), min_volume=s.breaker_min_volume,
                         error_threshold=s.breaker_error_threshold, cooldown_ms=int(s.breaker_cooldown_s * 1000),
                         half_open_probes=s.breaker_half_open_probes)  # fmt: skip


class FaultMetrics:
    """The contract's breaker and admission metrics, on the router's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.breaker_state = Gauge("circuit_breaker_state", "Circuit breaker of a head as this router sees it: "
                                   "0 closed, 1 half-open, 2 open.", ["head_id"], registry=registry)  # fmt: skip
        self.breaker_transitions = Counter(
            "circuit_breaker_transitions_total", "Breaker transitions this router applied (each transition is "
            "applied by one router: sum over routers).", ["head_id", "to"], registry=registry,
        )  # fmt: skip
        self.throttled = Counter("admission_throttled_total", "Jobs delayed for their admission token.",
                                 ["tenant", "model_type"], registry=registry)  # fmt: skip


def restore_waited(parts: Parts, retry_topics: frozenset[str]) -> None:
    """Records back from an admission wait: the attempt they had (intake counted the wait as one) and an
    idempotency key of their own per trip (the earlier trips are marked done)."""
    for tp, items in parts:
        if tp.topic not in retry_topics:
            continue
        for inc in items:
            if inc.job is None or not inc.headers:
                continue
            trips = throttle_trips(inc.headers)
            if trips:
                inc.attempt = max(1, inc.attempt - 1)
                inc.claim_key = throttle_claim_key(
                    inc.job.job_id, inc.attempt, trips, redrive_of(inc.headers)
                )


@dataclass(slots=True)
class _Needs:
    """The jobs of a batch an admission limit applies to, with the buckets each needs."""

    limits: dict[str, Limit] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    """Claim keys, in batch order."""
    buckets: list[list[str]] = field(default_factory=list)


Signature = tuple[tuple[str, Limit], ...]
"""The buckets a job's token was scheduled in, with their limits."""


def signature(wanted: list[str], limits: dict[str, Limit]) -> Signature:
    return tuple((k, limits[k]) for k in wanted)


RESERVED_MAX = 20_000
"""Admission verdicts kept for records not yet settled, and keys kept as spent: at least this many, and at least
two batches' worth (past it, the oldest go: such a record read again takes a second token, as every record did
before verdicts were kept)."""


class FaultGate:
    def __init__(self, settings: Settings, redis: Redis, keys: Keys, audit: AuditSink, registry: CollectorRegistry,
                 router_id: str, state: StateCache, memory: RouterMemory, retry_topics: frozenset[str],
                 cfg: PlanConfig, rng: random.Random) -> None:  # fmt: skip
        self.s = settings
        self.memory = memory
        self.redis = redis
        self.keys = keys
        self.audit = audit
        self.router_id = router_id
        self.state = state
        self.retry_topics = retry_topics
        self.cfg = cfg
        self.rng = rng
        self.metrics = FaultMetrics(registry)
        self.breakers = BreakerStore(redis, keys)
        self.buckets = Buckets(redis, keys)
        self.view: dict[str, Breaker] = {}
        """Every breaker this router knows not to be closed."""
        self.probes: dict[str, int] = {}
        """Half-open probes this router holds a lease on (head -> jobs it may still send)."""
        self.feed: Tally[str] = Tally()
        """Failures this router counted (publishes to a head that failed), added on the next read."""
        self.transitions = 0
        self._seen_refresh = -1
        self._last_read_ms = 0
        self._shown: set[str] = set()
        self.verdicts: dict[str, Admission] = {}
        """The batch's admission verdicts (claim key -> verdict), for the plan."""
        self.reserved: OrderedDict[str, tuple[Admission, Signature]] = OrderedDict()
        """Verdicts of records this router scheduled that no batch has settled yet (a hold cut their partition
        short, their publish stayed unsent, their batch was rewound), with the limits they were scheduled under:
        read again under the same limits, a record keeps its token instead of taking another. The newest
        :data:`RESERVED_MAX` (or two batches' worth) are kept."""
        self.spent: OrderedDict[str, None] = OrderedDict()
        """Records acknowledged in a batch whose partition was then rewound behind them (a publish before them
        stayed unsent, or the batch raised): the next read of each is a duplicate, and takes no token. Each is
        forgotten at that read. The newest :data:`RESERVED_MAX` (or two batches' worth)."""
        self.kept_max = max(RESERVED_MAX, 2 * settings.batch_max_records)

    def scripts(self) -> tuple[LoadedScript, ...]:
        """The scripts a batch's fault state runs (breaker reads and writes, admission)."""
        return (*self.breakers.scripts(), *self.buckets.scripts())

    # --- before the plan ----------------------------------------------------------------------------------

    def restore(self, parts: Parts) -> None:
        """Records back from an admission wait get their attempt and trip-keyed claims back. Before anything keys
        on the claims (a forged redrive is unkeyed after this, then admission keys on what is left)."""
        restore_waited(parts, self.retry_topics)

    def ride(self, parts: Parts, now: int, restored: bool = False) -> FaultRide:
        """Restore waited records (unless ``restored``) and work out what the batch needs from Redis: a breaker
        read (when due) and admission (when limits apply). The commands ride on the batch's claim round trip
        (``Marks.claim``); :meth:`FaultRide.apply` (or ``failed``) then sets the verdicts and the breaker view."""
        if not restored:
            restore_waited(parts, self.retry_topics)
        self.probes = {h: n for h, n in self.memory.probes.items() if n > 0}  # what the last plan left
        policy = self.state.policy
        cfg = breaker_config(policy, self.s)
        verdicts: dict[str, Admission] = {}
        needs = self._admission_needs(parts, policy, now, verdicts)
        read = cfg is not None and self._read_due(now, cfg)
        if not read and cfg is None and (self.view or self.probes):
            self.view, self.probes = {}, {}
        return FaultRide(self, read, needs, now, verdicts, cfg)

    async def before_plan(self, parts: Parts, now: int) -> dict[str, Admission]:
        """:meth:`ride` with a round trip of its own (for a caller with no claim round trip to share)."""
        r = self.ride(parts, now)
        if not r.active:
            r.done()
            return r.verdicts
        for last_try in (False, True):
            try:
                await r.ensure()
                async with self.redis.pipeline(transaction=False) as pipe:
                    r.queue(pipe)
                    r.received(await pipe.execute())
                await r.apply()
                break
            except NoScriptError:
                r.lost()
                if last_try:
                    r.failed(RedisError("scripts lost twice"))
            except (RedisError, OSError) as exc:
                r.failed(exc)
                break
        return r.verdicts

    def _read_due(self, now: int, cfg: BreakerConfig) -> bool:
        if self.feed or self.state.refreshes != self._seen_refresh:
            return True
        if now - self._last_read_ms >= self.s.breaker_poll_ms:
            return True
        return any(b.state is BreakerState.OPEN and now >= b.open_until_ms for b in self.view.values())

    def _admission_needs(
        self, parts: Parts, policy: Policy, now: int, verdicts: dict[str, Admission]
    ) -> _Needs:
        needs = _Needs()
        adm = policy.admission
        active = adm.active
        kept, spent = self.reserved, self.spent
        for _, items in parts:
            for inc in items:
                job = inc.job
                if job is None:
                    continue
                # A plain record (not marked: at most a content-type) holds no throttle header.
                if inc.marked and any(k in THROTTLE_HEADERS for k, _ in inc.headers):
                    reserved = admit_at(inc.headers)
                    if reserved is not None and inc.tp.topic in self.retry_topics:  # its token is reserved
                        verdicts[inc.claim_key] = Admission(reserved, throttle_trips(inc.headers))
                        continue
                if not active:
                    continue
                key = inc.claim_key
                if spent and key in spent:  # acknowledged before a rewind: a duplicate now, it goes nowhere
                    del spent[key]
                    continue
                wanted = []
                tl = adm.tenant_limit(job.tenant)
                if tl is not None and job.tenant:
                    k = tenant_key(job.tenant)
                    needs.limits[k] = tl
                    wanted.append(k)
                ml = adm.model_limit(job.model_type)
                if ml is not None:
                    k = model_key(job.model_type)
                    needs.limits[k] = ml
                    wanted.append(k)
                got = kept.get(key) if kept else None
                if got is not None:
                    # Read again before it was settled: its token is taken, unless the limits it was taken
                    # under changed (then it is scheduled anew, under the policy in force).
                    if got[1] == signature(wanted, needs.limits):
                        verdicts[key] = got[0]
                        continue
                    del kept[key]
                if wanted and key not in verdicts:
                    needs.keys.append(inc.claim_key)
                    needs.buckets.append(wanted)
                    verdicts[inc.claim_key] = Admission(now)
        return needs

    def reserve(self, key: str, verdict: Admission, sig: Signature) -> None:
        """A record's token was scheduled (under the limits ``sig``): keep its verdict until a batch settles the
        record."""
        kept = self.reserved
        kept[key] = (verdict, sig)
        if len(kept) > self.kept_max:
            kept.popitem(last=False)

    def settled(self, keys: Iterable[str]) -> None:
        """These records are settled (acknowledged, dead-lettered, duplicates): forget their tokens."""
        kept = self.reserved
        if kept:
            for key in keys:
                kept.pop(key, None)

    def spend(self, keys: Iterable[str]) -> None:
        """These records were acknowledged, and their partition rewound: read again, they take no token."""
        spent = self.spent
        for key in keys:
            spent[key] = None
        while len(spent) > self.kept_max:
            spent.popitem(last=False)

    async def _judge(self, read: dict[str, Breaker], cfg: BreakerConfig, now: int) -> None:
        """Evaluate what was read; write transitions and probe leases by compare-and-set; audit what won."""
        writes: list[Write] = []
        granted: dict[str, int] = {}
        for head_id, b in read.items():
            new, t = evaluate(b, cfg, now)
            if (
                new.state is BreakerState.HALF_OPEN
                and probes_left(new, cfg, now)
                and not self.probes.get(head_id)
            ):
                new, granted[head_id] = lease(new, cfg, now, cfg.half_open_probes)
            if new is not b:
                writes.append(Write(head_id, b, prune(new, cfg, now), t))
        view = {h: b for h, b in read.items() if b.state is not BreakerState.CLOSED}
        if writes:
            won = await self.breakers.write(writes, self.keys.events)
            records = []
            for w, ok in zip(writes, won, strict=True):
                if not ok:  # another router got there first: its state is read next time
                    self._seen_refresh = -1
                    continue
                if w.new.state is BreakerState.CLOSED:
                    view.pop(w.head_id, None)
                else:
                    view[w.head_id] = w.new
                if granted.get(w.head_id):
                    self.probes[w.head_id] = granted[w.head_id]
                t = w.transition
                if t is not None:
                    self.transitions += 1
                    self.metrics.breaker_transitions.labels(w.head_id, t.to_state.label).inc()
                    records.append({"ts": now, "event": t.event, "router_id": self.router_id, "head_id": w.head_id,
                                    "actor": self.router_id, "from": t.from_state.label, "to": t.to_state.label,
                                    "ok": t.ok, "err": t.err, "open_until": t.open_until_ms,
                                    "reason": f"{t.err} failures of {t.ok + t.err} outcomes"})  # fmt: skip
                    log.warning("circuit breaker of head %s: %s -> %s (%d failures of %d)", w.head_id,
                                t.from_state.label, t.to_state.label, t.err, t.ok + t.err)  # fmt: skip
            if records:
                await self.audit.emit_many(records)
        self.view = view

    def _apply_view(self, now: int) -> None:
        """The breaker view as the engine reads it: heads to pass over, and probes this router may send."""
        blocked: dict[str, str] = {}
        probes: dict[str, int] = {}
        for head_id, b in self.view.items():
            left = self.probes.get(head_id, 0)
            if b.state is BreakerState.HALF_OPEN and left > 0 and now < b.lease_until_ms:
                probes[head_id] = left
            else:
                blocked[head_id] = describe_breaker(b, now)
        self.probes = probes
        self.memory.set_breakers(blocked, dict(probes))
        gauge = self.metrics.breaker_state
        heads = self.state.index.heads
        for head_id in self._shown - set(self.view):
            if head_id in heads:
                gauge.labels(head_id).set(0)
            else:  # a gone head's breaker is forgotten: its series goes too
                gauge.remove(head_id)
                self._shown.discard(head_id)
        for head_id, b in self.view.items():
            gauge.labels(head_id).set(int(b.state))
        self._shown |= set(self.view)

    # --- publishing with fallback -----------------------------------------------------------------------

    async def publish(
        self, producer: AIOKafkaProducer, p: Plan, budget: RetryBudget, now: int
    ) -> PublishReport:
        """Publish the plan; move routed jobs off heads whose publish failed; count throttled jobs."""
        report = await publish(producer, p.sends(), budget)
        failed: set[str] = set()
        charged: set[tuple[int, str]] = set()
        for _ in range(FALLBACK_ROUNDS):
            bad = await self._blamed(producer, report)
            moved = self._move_failed(p, bad, failed, charged, now)
            if not moved:
                break
            again = await publish(producer, moved, budget)
            ids = {id(s) for s in moved}
            report.fatal = [s for s in report.fatal if id(s) not in ids] + again.fatal
            report.unsent = [s for s in report.unsent if id(s) not in ids] + again.unsent
            report.acked += again.acked
            report.tries += again.tries
        self._count_throttled(p, report)
        return report

    async def _blamed(self, producer: AIOKafkaProducer, report: PublishReport) -> set[int]:
        """The failed sends that are their head's partition's fault (ids): a fatal error that is not the record's
        own; an unsent one the broker answered about (:data:`PARTITION_ERRORS`); an unsent one that timed out, if
        the broker answers a metadata request right after (acks from before an outage prove nothing: a broker
        that went down mid-batch blames no head)."""
        bad = {id(s) for s in report.fatal}
        timed_out = []
        for s in report.unsent:
            if isinstance(s.error, PARTITION_ERRORS):
                bad.add(id(s))
            elif not isinstance(s.error, ProducerClosed):
                timed_out.append(s)
        if timed_out and report.acked and await broker_answers(producer, self.s.kafka_request_timeout_ms):
            bad |= {id(s) for s in timed_out}
        return bad

    def _move_failed(
        self, p: Plan, bad: set[int], failed: set[str], charged: set[tuple[int, str]], now: int
    ) -> list[Send]:
        if not bad:
            return []
        state = self.state
        moved: list[Send] = []
        failures: Tally[str] = Tally()
        for o in p.outcomes:
            if not isinstance(o, Routed) or o.send is None or id(o.send) not in bad:
                continue
            if isinstance(o.send.error, RECORD_ERRORS):
                continue
            head_id = o.head_id
            # Once per job and head: a job no head could take stays failed at the same head (a job moved is the
            # same send, failing next at another head, which is charged for it in turn).
            if (id(o.send), head_id) not in charged:
                charged.add((id(o.send), head_id))
                failures[head_id] += 1
            failed.add(head_id)
            why = f"publish to head {head_id} failed: {describe(o.send.error or Exception())}"
            if reroute(
                o, frozenset(failed), why, state.index, state.policy, self.memory, now, self.rng, self.cfg
            ):
                moved.append(o.send)
        self._feed_failures(failures)
        if moved:
            log.warning("%d jobs moved to other heads after their publishes failed (heads %s)", len(moved),
                        ", ".join(sorted(failed)))  # fmt: skip
        return moved

    def _feed_failures(self, failures: Tally[str]) -> None:
        """Count publishes that failed for good against their heads' breakers, each head at least the breaker's
        minimum volume: such a publish failed after the producer's whole retry budget (its request timeout, then
        ours), so the head's partition is unwritable, and every batch holding a job for it would wait that long
        again. A few jobs per batch, batches that far apart, never fill the window on their own. Nothing is
        counted while breakers are off (nothing would read the counts, and they would all land on the window in
        force when breakers are turned on)."""
        cfg = breaker_config(self.state.policy, self.s)
        if cfg is None:
            return
        for head_id, n in failures.items():
            self.feed[head_id] += max(n, cfg.min_volume)

    def _count_throttled(self, p: Plan, report: PublishReport) -> None:
        acked = {id(s) for s in report.acked}
        tally: Tally[tuple[str, str]] = Tally()
        for o in p.outcomes:
            if (isinstance(o, Retried) and o.send is not None and id(o.send) in acked and o.src.job is not None
                    and header(o.send.headers, H_THROTTLE_N) == b"1"
                    and header(o.send.headers, H_RETRY_REASON) == THROTTLE_REASON_B):  # fmt: skip
                tally[(o.src.job.tenant or "", o.src.job.model_type)] += 1
        for (tenant, model), n in tally.items():
            self.metrics.throttled.labels(tenant, model).inc(n)


@dataclass(slots=True)
class FaultRide:
    """The fault state's share of a batch's claim round trip: queued on its pipeline, applied from its replies."""

    gate: FaultGate
    read: bool
    """Breakers are read (and this router's counted failures added) in this round trip."""
    needs: _Needs
    now: int
    verdicts: dict[str, Admission]
    cfg: BreakerConfig | None
    _feed: dict[str, int] = field(default_factory=dict)
    _refresh: int = -1
    _at_read: int = -1
    _at_sched: int = -1
    _replies: list[Any] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.read or bool(self.needs.keys)

    async def ensure(self) -> None:
        """Load the scripts the ride queues (a round trip only the first time, or after :meth:`lost`)."""
        if self.read:
            await self.gate.breakers.ensure_scripts()
        if self.needs.keys:
            await self.gate.buckets.ensure_script()

    def lost(self) -> None:
        """Redis answered NOSCRIPT: load them again before the next try."""
        self.gate.breakers.scripts_lost()
        self.gate.buckets.script_lost()

    def queue(self, pipe: Any) -> None:
        g = self.gate
        if self.read:
            self._feed = dict(g.feed)
            self._refresh = g.state.refreshes
            g.breakers.queue_counts(pipe, {h: (0, n) for h, n in self._feed.items()}, self.now)
            self._at_read = len(pipe)
            g.breakers.queue_read(pipe, forget_gone=True)
        if self.needs.keys:
            self._at_sched = len(pipe)
            g.buckets.queue(pipe, self.needs.limits, self.needs.buckets, self.now)

    def received(self, replies: list[Any]) -> None:
        """The whole pipeline's replies (the ride's are where it queued them)."""
        self._replies = replies

    async def apply(self) -> None:
        """Verdicts from the replies, then the breakers' judgement (which writes any transition)."""
        g = self.gate
        res = self._replies
        if self.needs.keys:
            limits = self.needs.limits
            for key, wanted, t in zip(self.needs.keys, self.needs.buckets, res[self._at_sched], strict=True):
                self.verdicts[key] = verdict = Admission(int(t))
                g.reserve(key, verdict, signature(wanted, limits))
        if self.read:
            g.feed -= Tally(self._feed)
            g._seen_refresh = self._refresh
            g._last_read_ms = self.now
            assert self.cfg is not None
            await g._judge(BreakerStore.parse_read(res[self._at_read]), self.cfg, self.now)
        self.done()

    def failed(self, exc: BaseException) -> None:
        """Redis did not answer: every job admitted, the last breaker view kept."""
        log.warning("fault state not read (admitting every job, keeping the last breaker view): %s", exc)
        self.done()

    def done(self) -> None:
        self.gate._apply_view(self.now)
        self.gate.verdicts = self.verdicts
