"""One redrive: select dead letters, decide each (:func:`model.plan_item`), then send at a bounded rate.

:func:`prepare` reads the dead-letter topic, the redrive marks and the routers' done marks, and fetches the
originals of squeezed dead letters (checked by size and SHA-256); it sends nothing, so ``--dry-run`` is just
``prepare``. :func:`execute` publishes the sendable ones to the request topic in small chunks paced to the rate,
marking each dead letter *being sent* before and *sent* after the acknowledgement, keeps its progress in Redis,
and writes one ``dlq_redrive`` audit record whatever the end (done, interrupted, failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from router_worker.audit import AuditSink
from router_worker.clock import now_ms
from router_worker.dlq.model import (
    DeadLetter,
    Filter,
    Item,
    Original,
    Outgoing,
    Verdict,
    attempt_keys,
    check_original,
    chunk_size,
    kin_of,
    new_redrive_id,
    pace,
    plan_item,
    redrive_record,
    sendable,
    sent_as,
    tally,
    under_current_marks,
    with_original,
    with_redrive_id,
)
from router_worker.dlq.reader import OriginalGone, Originals, read_dead_letters
from router_worker.dlq.state import RedriveState
from router_worker.metrics import Metrics
from router_worker.pipeline.kafka import make_producer
from router_worker.pipeline.publish import RetryBudget, Send, describe, publish
from router_worker.settings import Settings
from router_worker.state.keys import Keys
from router_worker.topics import Topics

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""Called with (sent so far, to send) after every acknowledged chunk."""


class RedriveBusy(RuntimeError):
    """Another redrive holds the deployment's lock."""


class LockLost(RuntimeError):
    """This redrive's lock lapsed or was taken by another: it stops rather than send beside that one."""


async def _keep_lock(state: RedriveState, redrive_id: str, lost: asyncio.Event) -> None:
    """Renew the lock a few times per lease for as long as the redrive runs (a slow rate or a slow broker
    must not let it lapse); set ``lost`` once it is not ours any more, or may have lapsed unrenewed."""
    lease = state.lease_s()
    last_ok = time.monotonic()
    while not lost.is_set():
        await asyncio.sleep(lease / 4)
        try:
            ok = await state.renew(redrive_id)
        except Exception as exc:  # Redis hiccup: try again, until the lease may have run out
            log.warning("redrive %s: could not renew its lock: %s", redrive_id, exc)
            ok = None
        if ok:
            last_ok = time.monotonic()
        elif ok is False or time.monotonic() - last_ok >= lease:
            lost.set()


def os_user() -> str:
    """The actor of a command-line redrive: the operating-system user."""
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (a bare container): the uid still says who
        return f"uid:{os.getuid()}"


@dataclass(slots=True)
class Prepared:
    redrive_id: str
    flt: Filter
    force: bool
    items: list[Item] = field(default_factory=list)
    outgoing: dict[str, Outgoing] = field(default_factory=dict)
    """coord -> what is sent, for every sendable item."""
    kin: list[DeadLetter] = field(default_factory=list)
    """Every dead letter of each job to send: their marks are read again at the send."""

    @property
    def to_send(self) -> list[Item]:
        return sendable(self.items)

    def counts(self) -> dict[str, int]:
        return tally(self.items)


@dataclass(slots=True)
class Result:
    redrive_id: str
    status: str  # done | interrupted | failed
    total: int
    sent: int = 0
    failed: list[tuple[Item, str]] = field(default_factory=list)
    error: str | None = None


async def prepare(settings: Settings, redis: Redis, flt: Filter, *, force: bool = False,
                  redrive_id: str | None = None) -> Prepared:  # fmt: skip
    """Every matching dead letter with its verdict, and the record each sendable one becomes."""
    rid = redrive_id or new_redrive_id(now_ms(), os.urandom(3))
    state = RedriveState(redis, Keys(settings.redis_prefix))
    every = await read_dead_letters(settings, Topics.from_settings(settings).dlq)
    marks = dict(zip((dl.coord for dl in every), await state.marks([dl.coord for dl in every]), strict=True))
    siblings = sent_as(every, marks)  # of every dead letter: a sibling may lie outside the filter
    dls = [dl for dl in every if flt.matches_but_job(dl)]
    out = Prepared(rid, flt, force)
    chosen: list[tuple[DeadLetter, Original | None]] = []
    async with Originals(settings) as originals:
        for dl in dls:
            orig: Original | None = None
            mark = marks[dl.coord]
            if dl.squeezed and not (mark or "").startswith("s|"):
                try:
                    orig = await _original(originals, dl)
                except OriginalGone as exc:
                    if not flt.needs_job:  # it matches whatever its job: say why it can not go
                        out.items.append(Item(dl, Verdict.REFUSED, str(exc)))
                    continue
                dl = with_original(dl, orig)
            if flt.matches(dl):
                chosen.append((dl, orig))
    per_dl = [attempt_keys(dl, settings.max_attempts) for dl, _ in chosen]
    done = await state.done_marks([k for keys in per_dl for k in keys], settings.dedupe_ttl_s * 1000)
    at = 0
    for (dl, orig), keys in zip(chosen, per_dl, strict=True):
        sibling = siblings.get((dl.redrive, dl.job_id)) if dl.job_id is not None else None
        item = plan_item(dl, marks[dl.coord], done[at : at + len(keys)], rid, force, sibling)
        at += len(keys)
        out.items.append(item)
        if item.verdict in (Verdict.SEND, Verdict.RESEND):
            assert item.redrive_id is not None
            out.outgoing[dl.coord] = redrive_record(dl, orig, item.redrive_id)
    out.kin = kin_of(every, out.to_send)
    return out


async def _original(originals: Originals, dl: DeadLetter) -> Original:
    if dl.orig_topic is None or dl.orig_partition is None or dl.orig_offset is None:
        raise OriginalGone("the dead letter was cut and names no original (x-original-* headers missing)")
    orig = await originals.fetch(dl.orig_topic, dl.orig_partition, dl.orig_offset)
    problem = check_original(dl, orig)
    if problem is not None:
        raise OriginalGone(f"the record at {dl.origin} is not the original: {problem}")
    return orig


async def lock(settings: Settings, redis: Redis, redrive_id: str) -> None:
    """Take the deployment's redrive lock for ``redrive_id``; :class:`RedriveBusy` when another holds it."""
    holder = await RedriveState(redis, Keys(settings.redis_prefix)).lock(redrive_id)
    if holder is not None:
        raise RedriveBusy(f"redrive {holder} is running; wait for it to end (or for its lock to lapse)")


async def execute(settings: Settings, redis: Redis, prepared: Prepared, *, rate: float, actor: str, source: str,
                  audit: AuditSink, metrics: Metrics | None = None, on_progress: Progress | None = None,
                  locked: bool = False) -> Result:  # fmt: skip
    """Send what ``prepared`` says at ``rate`` per second; record progress; audit once at the end.

    Takes the redrive lock unless ``locked`` (see :func:`lock`): raises :class:`RedriveBusy` (nothing sent)
    while another redrive runs. Dead letters another redrive sent since ``prepared`` was made are left out.
    Cancelling it (Ctrl-C, a stopped server) ends it as ``interrupted``; the next redrive of the same filter
    picks up where it stopped."""
    rid = prepared.redrive_id
    state = RedriveState(redis, Keys(settings.redis_prefix))
    if not locked:
        await lock(settings, redis, rid)
    try:  # what other redrives did since the plan was made, now that none can run beside this one
        coords = list(
            dict.fromkeys([*(it.dl.coord for it in prepared.to_send), *(dl.coord for dl in prepared.kin)])
        )
        now_marks = dict(zip(coords, await state.marks(coords), strict=True))
    except BaseException:
        await state.unlock(rid)
        raise
    items = under_current_marks(prepared.to_send, now_marks, prepared.kin)
    outgoing = {
        it.dl.coord: with_redrive_id(prepared.outgoing[it.dl.coord], it.redrive_id or rid) for it in items
    }
    res = Result(rid, "failed", len(items))
    started = now_ms()
    base: dict[str, Any] = {"id": rid, "actor": actor, "source": source, "filter": prepared.flt.describe(),
                            "force": prepared.force, "rate": rate, "total": len(items), "sent": 0, "failed": 0,
                            "skipped": {k: v for k, v in prepared.counts().items() if k not in ("send", "resend")},
                            "status": "running", "started_ms": started, "updated_ms": started}  # fmt: skip
    producer = make_producer(settings)
    topic = Topics.from_settings(settings).requests
    budget = RetryBudget(settings.publish_retry_attempts, settings.publish_retry_max_s)
    lost = asyncio.Event()
    keeper = asyncio.create_task(_keep_lock(state, rid, lost))
    try:
        await state.save(rid, base, new=True)
        await producer.start()
        t0 = time.monotonic()
        step = chunk_size(rate)
        for i in range(0, len(items), step):
            chunk = items[i : i + step]
            with contextlib.suppress(TimeoutError):  # wakes early when the lock is lost
                await asyncio.wait_for(lost.wait(), pace(i, rate, t0, time.monotonic()))
            if lost.is_set():
                raise LockLost(f"lost the redrive lock (now held by {await state.holder() or 'nobody'}); "
                               "stopped so as not to send beside another redrive")  # fmt: skip
            await state.mark("p", [(it.dl.coord, it.redrive_id or rid) for it in chunk])
            sends = {id(s): (it, s) for it in chunk
                     for s in [_send(topic, outgoing[it.dl.coord])]}  # fmt: skip
            report = await publish(producer, [s for _, s in sends.values()], budget)
            acked = [sends[id(s)][0] for s in report.acked]
            if acked:
                await state.mark("s", [(it.dl.coord, it.redrive_id or rid) for it in acked])
            res.sent += len(acked)
            if metrics is not None:
                for it in acked:
                    metrics.dead_letters_redriven.labels(it.dl.reason).inc()
            for s in report.fatal:
                res.failed.append((sends[id(s)][0], describe(s.error or Exception())))
            await state.save(rid, {"sent": res.sent, "failed": len(res.failed), "updated_ms": now_ms()})
            if not await state.renew(rid):
                lost.set()
            if on_progress is not None:
                on_progress(res.sent, res.total)
            if report.unsent:
                raise RuntimeError(f"the broker did not take {len(report.unsent)} records: "
                                   f"{describe(report.unsent[0].error or Exception())}")  # fmt: skip
        res.status = "done"
    except asyncio.CancelledError:
        res.status = "interrupted"
        raise
    except Exception as exc:
        res.error = describe(exc)
        log.error("redrive %s failed after %d of %d: %s", rid, res.sent, res.total, res.error)
    finally:
        keeper.cancel()
        await asyncio.shield(_finish(state, producer, audit, prepared, res, base, source))
    return res


def _send(topic: str, out: Outgoing) -> Send:
    return Send(topic, out.value, out.key, None, list(out.headers))


async def _finish(state: RedriveState, producer: Any, audit: AuditSink, prepared: Prepared, res: Result,
                  base: dict[str, Any], source: str) -> None:  # fmt: skip
    try:
        await producer.stop()
    finally:
        try:
            await state.save(res.redrive_id, {"status": res.status, "sent": res.sent, "failed": len(res.failed),
                                              "error": res.error, "updated_ms": now_ms(),
                                              "finished_ms": now_ms()})  # fmt: skip
        finally:
            await state.unlock(res.redrive_id)
            await audit.emit("dlq_redrive", source, actor=base["actor"], redrive_id=res.redrive_id,
                             filter=base["filter"], count=res.sent, total=res.total, status=res.status,
                             failed=len(res.failed), skipped=base["skipped"], force=prepared.force,
                             rate=base["rate"], error=res.error)  # fmt: skip
