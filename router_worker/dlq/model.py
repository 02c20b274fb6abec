"""Dead letters as plain data, and every decision about them that needs no I/O.

A record of the dead-letter topic becomes a :class:`DeadLetter` (:func:`parse_dead_letter`, total: any record
parses). Operators select with a :class:`Filter` (built from their words by :func:`parse_filter`, which refuses
typos with a clear message); :func:`summary` counts by reason; :func:`plan_item` decides what a redrive does
with one dead letter; :func:`redrive_record` builds what it sends; :func:`pace` spaces the sends.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from router_worker.pipeline.messages import (
    H_ATTEMPT,
    H_DLQ_ERROR,
    H_DLQ_HEADERS_DROPPED,
    H_DLQ_KEY_TRUNCATED,
    H_DLQ_REASON,
    H_DLQ_SHA256,
    H_DLQ_TRUNCATED,
    H_JOB_ID,
    H_ORIG_OFFSET,
    H_ORIG_PARTITION,
    H_ORIG_TOPIC,
    Headers,
    header,
)
from router_worker.pipeline.outcomes import H_REDRIVE, redrive_of
from schemas.envelope import DeadLetterReason, EnvelopeError, content_type_of, decode_raw

REASONS: tuple[str, ...] = tuple(r.value for r in DeadLetterReason)
NEVER_ROUTABLE = frozenset({DeadLetterReason.DECODE_ERROR.value, DeadLetterReason.SCHEMA_ERROR.value})
"""Reasons a record can never be routed for as it stands: redriven only with ``--force``."""
MAX_RATE = 10_000.0
"""Redrive sends per second at most: a redrive must never flood the routers."""
MIN_RATE = 1 / 60
"""Redrive sends per second at least (one a minute): a redrive holds the deployment's only redrive lock for as
long as it runs, so a typo (``0.0001/s``) must not hold it for days."""

_ROUTER_HEADER_PREFIXES = ("x-dlq-", "x-route-", "x-retry-", "x-original-")
_ROUTER_HEADERS = frozenset({"x-job-id", H_REDRIVE})


class UsageError(ValueError):
    """An operator's typo (unknown reason, bad duration, bad rate): one clear line, exit code 2."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of the dead-letter topic, with what its headers and value say."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    reason: str
    error: str
    job_id: str | None
    model: str | None
    orig_topic: str | None
    orig_partition: int | None
    orig_offset: int | None
    attempt: int | None
    truncated_from: int | None
    """``x-dlq-truncated``: the original value's size when the value here was cut."""
    sha256: str | None
    key_truncated: bool
    headers_dropped: bool
    redrive: str | None
    """The redrive this dead letter's job came from (its ``x-redrive``), if it was redriven before."""
    content_type: str
    key: bytes | None
    value: bytes | None
    headers: Headers = field(default_factory=list)

    @property
    def coord(self) -> str:
        """Where it lies in the dead-letter topic: what a redrive records it by."""
        return f"{self.topic}|{self.partition}|{self.offset}"

    @property
    def size(self) -> int:
        return len(self.value or b"")

    @property
    def squeezed(self) -> bool:
        """Something of the original (value, key or headers) was left out: the original must be fetched."""
        return self.truncated_from is not None or self.key_truncated or self.headers_dropped

    @property
    def origin(self) -> str:
        if self.orig_topic is None:
            return "?"
        return f"{self.orig_topic}[{self.orig_partition}]@{self.orig_offset}"

    def as_row(self) -> dict[str, Any]:
        """The listing's fields, JSON-ready (no value bytes)."""
        return {
            "time": iso(self.timestamp_ms), "ts": self.timestamp_ms, "reason": self.reason, "error": self.error,
            "job_id": self.job_id, "model": self.model, "original_topic": self.orig_topic,
            "original_partition": self.orig_partition, "original_offset": self.orig_offset,
            "attempt": self.attempt, "size": self.size, "truncated": self.truncated_from is not None,
            "original_size": self.truncated_from, "redrive": self.redrive,
            "dlq_partition": self.partition, "dlq_offset": self.offset,
        }  # fmt: skip


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", errors="replace")


def _int(raw: bytes | None) -> int | None:
    if raw is None or not raw.strip().isdigit() or len(raw) > 18:
        return None
    return int(raw)


def peek_envelope(value: bytes | None, content_type: str) -> dict[Any, Any] | None:
    """The value decoded as a map, whatever the schema says; None when it does not decode to one."""
    if value is None:
        return None
    try:
        obj = decode_raw(value, content_type)
    except EnvelopeError:
        return None
    return obj if isinstance(obj, dict) else None


def parse_dead_letter(topic: str, partition: int, offset: int, timestamp_ms: int, key: bytes | None,
                      value: bytes | None, headers: Sequence[tuple[str, bytes | None]] | None
                      ) -> DeadLetter:  # fmt: skip
    """A dead letter from a record's fields. Total: any record parses (missing headers read as unknown)."""
    hs: Headers = list(headers or ())
    ctype = content_type_of(hs)
    truncated = _int(header(hs, H_DLQ_TRUNCATED))
    env = peek_envelope(value, ctype) if truncated is None else None
    return DeadLetter(
        topic=topic, partition=partition, offset=offset, timestamp_ms=timestamp_ms,
        reason=_text(header(hs, H_DLQ_REASON)) or "unknown", error=_text(header(hs, H_DLQ_ERROR)) or "",
        job_id=_str_field(env, "job_id") if truncated is None else _text(header(hs, H_JOB_ID)),
        model=_str_field(env, "model_type"),
        orig_topic=_text(header(hs, H_ORIG_TOPIC)), orig_partition=_int(header(hs, H_ORIG_PARTITION)),
        orig_offset=_int(header(hs, H_ORIG_OFFSET)), attempt=_int(header(hs, H_ATTEMPT)),
        truncated_from=truncated, sha256=_text(header(hs, H_DLQ_SHA256)),
        key_truncated=header(hs, H_DLQ_KEY_TRUNCATED) is not None,
        headers_dropped=header(hs, H_DLQ_HEADERS_DROPPED) is not None,
        redrive=redrive_of(hs), content_type=ctype, key=key, value=value, headers=hs,
    )  # fmt: skip


def _str_field(env: Mapping[Any, Any] | None, name: str) -> str | None:
    v = env.get(name) if env is not None else None
    return v if isinstance(v, str) else None


@dataclass(frozen=True, slots=True)
class Original:
    """The original record of a squeezed dead letter, read back from its coordinates."""

    key: bytes | None
    value: bytes | None
    headers: Headers


def check_original(dl: DeadLetter, orig: Original) -> str | None:
    """Why ``orig`` is not the record ``dl`` was made from (None: it is). The hash and size say so when the
    value was cut; otherwise the value must be the dead letter's own, byte for byte."""
    value = orig.value or b""
    if dl.truncated_from is not None:
        if len(value) != dl.truncated_from:
            return f"it holds {len(value)} bytes, the dead letter says the original held {dl.truncated_from}"
        if dl.sha256 is None:
            return "the dead letter has no x-dlq-sha256 to check the original against"
        if hashlib.sha256(value).hexdigest() != dl.sha256:
            return "its sha256 differs from the dead letter's x-dlq-sha256"
        return None
    if value != (dl.value or b""):
        return "its value differs from the dead letter's"
    return None


def with_original(dl: DeadLetter, orig: Original) -> DeadLetter:
    """``dl`` with the job id and model read from its original (a cut value decodes to nothing)."""
    env = peek_envelope(orig.value, content_type_of(orig.headers))
    return replace(
        dl, job_id=_str_field(env, "job_id") or dl.job_id, model=_str_field(env, "model_type") or dl.model
    )


def clean_headers(headers: Iterable[tuple[str, bytes | None]]) -> Headers:
    """The producer's own headers (content-type, traceparent, ...): the router's are written afresh."""
    return [
        (k, v) for k, v in headers if k not in _ROUTER_HEADERS and not k.startswith(_ROUTER_HEADER_PREFIXES)
    ]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """What a redrive publishes to the request topic for one dead letter."""

    key: bytes | None
    value: bytes | None
    headers: Headers


def redrive_record(dl: DeadLetter, orig: Original | None, redrive_id: str) -> Outgoing:
    """The original bytes (from ``orig`` when the dead letter was squeezed), the producer's headers and
    ``x-redrive``. No ``x-route-attempt``: on the request topic the job starts again at attempt 1."""
    src = orig if orig is not None else Original(dl.key, dl.value, dl.headers)
    hs = clean_headers(src.headers)
    hs.append((H_REDRIVE, redrive_id.encode()))
    key = src.key if src.key is not None or src.value is not None else b""
    return Outgoing(key, src.value, hs)


# ---------------------------------------------------------------- filters

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)")
_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_MAX_DURATION_MS = 100 * 365 * 86_400_000
_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|m|min))?")


def parse_duration_ms(text: str) -> int:
    """``90s``, ``15m``, ``1h``, ``2d``, ``1h30m`` to milliseconds."""
    s = text.strip().lower()
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION.match(s, pos)
        if m is None:
            raise UsageError(
                f"bad duration {text!r}: use a number and a unit, e.g. 30m, 1h, 2d (units ms s m h d w)"
            )
        total += float(m[1]) * _UNIT_MS[m[2]]
        pos = m.end()
    if not s or total <= 0:
        raise UsageError(f"bad duration {text!r}: use a positive number and a unit, e.g. 30m, 1h, 2d")
    if total > _MAX_DURATION_MS:  # also infinity: a number of hundreds of digits
        raise UsageError(f"bad duration {text[:40]!r}: at most 100 years")
    return int(total)


def parse_rate(text: str) -> float:
    """``50/s``, ``50``, ``600/m`` to sends per second (:data:`MIN_RATE` to :data:`MAX_RATE`)."""
    m = _RATE.fullmatch(text.strip().lower())
    if m is None:
        raise UsageError(f"bad rate {text!r}: use N/s (e.g. 50/s) or N/m")
    rate = float(m[1]) / (60.0 if m[2] in ("m", "min") else 1.0)
    if not 0 < rate <= MAX_RATE:
        raise UsageError(f"bad rate {text!r}: it must be above 0 and at most {MAX_RATE:g}/s")
    if rate < MIN_RATE - 1e-12:
        raise UsageError(f"bad rate {text!r}: at least 1/m (a redrive holds the redrive lock while it runs)")
    return rate


def parse_reasons(words: Iterable[str]) -> frozenset[str]:
    out: set[str] = set()
    for w in words:
        for part in w.split(","):
            r = part.strip().lower()
            if not r:  # an unset shell variable, or a stray comma: never read as "every reason"
                raise UsageError(f"empty reason in {w!r}: one of {', '.join(REASONS)}")
            if r not in REASONS:
                raise UsageError(f"unknown reason {part.strip()!r}: one of {', '.join(REASONS)}")
            out.add(r)
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class Filter:
    """Which dead letters an operation takes. Empty fields select everything."""

    reasons: frozenset[str] = frozenset()
    model: str | None = None
    since_ms: int | None = None
    """Only dead letters written at or after this time (epoch ms)."""
    job_ids: frozenset[str] = frozenset()
    since_text: str | None = None
    """The operator's words for ``since_ms`` (for the audit record)."""

    def matches(self, dl: DeadLetter) -> bool:
        if self.reasons and dl.reason not in self.reasons:
            return False
        if self.since_ms is not None and dl.timestamp_ms < self.since_ms:
            return False
        if self.model is not None and dl.model != self.model:
            return False
        return not self.job_ids or dl.job_id in self.job_ids

    def matches_but_job(self, dl: DeadLetter) -> bool:
        """Whether it matches on what is known without the job (reason, time): for a dead letter whose cut
        value says nothing of its model or id until its original is read."""
        return replace(self, model=None, job_ids=frozenset()).matches(dl)

    @property
    def needs_job(self) -> bool:
        return self.model is not None or bool(self.job_ids)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.reasons:
            out["reason"] = sorted(self.reasons)
        if self.model is not None:
            out["model"] = self.model
        if self.since_ms is not None:
            out["since"] = self.since_text or iso(self.since_ms)
            out["since_ms"] = self.since_ms
        if self.job_ids:
            out["job_id"] = sorted(self.job_ids)
        return out


def parse_filter(reasons: Iterable[str] = (), model: str | None = None, since: str | None = None,
                 job_ids: Iterable[str] = (), *, now_ms: int) -> Filter:  # fmt: skip
    """A filter from an operator's words; :class:`UsageError` for a typo."""
    since_ms = None if since is None else now_ms - parse_duration_ms(since)
    if model is not None and not model.strip():
        raise UsageError("--model must not be empty")
    ids = list(job_ids)
    if any(not j.strip() for j in ids):  # an unset shell variable would otherwise select every dead letter
        raise UsageError("--job-id must not be empty")
    return Filter(parse_reasons(reasons), model, since_ms, frozenset(ids), since)


def summary(dls: Iterable[DeadLetter]) -> dict[str, int]:
    """Dead letters per reason, most first."""
    return dict(Counter(dl.reason for dl in dls).most_common())


# ---------------------------------------------------------------- the redrive plan


class Verdict(StrEnum):
    SEND = "send"
    RESEND = "resend"
    """Marked as being sent by an earlier, interrupted redrive: sent again under that redrive's id, so a
    router that already has it takes it for a duplicate."""
    DONE = "already_redriven"
    DELIVERED = "reached_a_head"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Item:
    dl: DeadLetter
    verdict: Verdict
    why: str = ""
    redrive_id: str | None = None
    """The id it is (or was) sent under."""


def sent_state(raw: str | None) -> tuple[str, str] | None:
    """A dead letter's redrive mark: ``("p"|"s", redrive_id)`` (being sent, sent), or None."""
    if raw is None or len(raw) < 3 or raw[1] != "|" or raw[0] not in "ps":
        return None
    return raw[0], raw[2:]


def attempt_keys(dl: DeadLetter, max_attempts: int) -> list[str]:
    """The router's idempotency keys of the dead-lettered job's attempts from the one that was dead-lettered on
    (see ``outcomes.claim_key_of``), in its generation (the plain one or the redrive it came from). The attempts
    before it reached heads and failed there (that is why a job runs out of attempts): a job "reached a head"
    only if an attempt from its dead letter's on was routed."""
    if dl.job_id is None:
        return []
    first = dl.attempt or 1
    last = max(first, max_attempts)
    if dl.redrive is not None:
        return [f"jr|{dl.redrive}|{a}|{dl.job_id}" for a in range(first, last + 1)]
    return [f"j|{a}|{dl.job_id}" for a in range(first, last + 1)]


def sent_as(dls: Iterable[DeadLetter], marks: Mapping[str, str | None]) -> dict[tuple[str | None, str], str]:
    """(generation, job id) -> the redrive id a dead letter of that job was sent (or is being sent) under. The
    same job can have two dead letters of one generation (a router killed between a dead letter's ack and its
    marks writes it again): the second must go under the first one's id, or the router takes it for new."""
    out: dict[tuple[str | None, str], str] = {}
    for dl in dls:
        state = sent_state(marks.get(dl.coord))
        if state is not None and dl.job_id is not None:
            out.setdefault((dl.redrive, dl.job_id), state[1])
    return out


def kin_of(dls: Iterable[DeadLetter], items: Iterable[Item]) -> list[DeadLetter]:
    """Every dead letter of each job (and generation) ``items`` send: the marks a redrive reads again before it
    sends (see :func:`under_current_marks`)."""
    wanted = {(i.dl.redrive, i.dl.job_id) for i in items if i.dl.job_id is not None}
    return [dl for dl in dls if dl.job_id is not None and (dl.redrive, dl.job_id) in wanted]


def under_current_marks(items: Iterable[Item], marks: Mapping[str, str | None],
                        kin: Iterable[DeadLetter]) -> list[Item]:  # fmt: skip
    """What is still to send of a plan, judged again by the redrive marks read once the lock is held: another
    redrive may have sent (``s``) or begun sending (``p``, interrupted) a dead letter, or one of the same job,
    since the plan was made. Such an item goes under that redrive's id, so that a router which has the copy
    already takes it for a duplicate; a sent one does not go."""
    taken = sent_as(kin, marks)
    out: list[Item] = []
    for it in items:
        state = sent_state(marks.get(it.dl.coord))
        if state is not None and state[0] == "s":
            continue
        now_id = state[1] if state is not None else None
        if now_id is None and it.dl.job_id is not None:
            now_id = taken.get((it.dl.redrive, it.dl.job_id))
        if now_id is None or now_id == it.redrive_id:
            out.append(it)
        else:
            out.append(
                replace(it, verdict=Verdict.RESEND, why=f"resumed from redrive {now_id}", redrive_id=now_id)
            )
    return out


def with_redrive_id(out: Outgoing, redrive_id: str) -> Outgoing:
    """The same record under ``redrive_id`` (itself when it is under that id already)."""
    if redrive_of(out.headers) == redrive_id:
        return out
    hs = [(k, v) for k, v in out.headers if k != H_REDRIVE]
    hs.append((H_REDRIVE, redrive_id.encode()))
    return Outgoing(out.key, out.value, hs)


def plan_item(dl: DeadLetter, mark: str | None, attempt_marks: Sequence[str | None], redrive_id: str,
              force: bool, sibling: str | None = None) -> Item:  # fmt: skip
    """What a redrive does with one matching dead letter, given its redrive mark, the router's done marks
    of its attempts, and the id another dead letter of the same job and generation went out under
    (``sibling``, see :func:`sent_as`)."""
    state = sent_state(mark)
    if state is not None and state[0] == "s":
        return Item(dl, Verdict.DONE, f"sent by redrive {state[1]}", state[1])
    if dl.reason in NEVER_ROUTABLE and not force:
        return Item(
            dl, Verdict.REFUSED, f"{dl.reason} can never be routed as it is (pass --force to send it anyway)"
        )
    for m in attempt_marks:
        if m is not None and m.startswith("d|routed|"):
            return Item(dl, Verdict.DELIVERED, f"reached head {m.removeprefix('d|routed|')}")
    if state is not None:  # "p": an interrupted redrive may have sent it: the same id makes it a duplicate
        return Item(dl, Verdict.RESEND, f"resumed from redrive {state[1]}", state[1])
    if sibling is not None:  # the router drops it if that copy arrived
        return Item(
            dl, Verdict.RESEND, f"another dead letter of this job went out under redrive {sibling}", sibling
        )
    return Item(dl, Verdict.SEND, "", redrive_id)


def sendable(items: Iterable[Item]) -> list[Item]:
    return [i for i in items if i.verdict in (Verdict.SEND, Verdict.RESEND)]


def tally(items: Iterable[Item]) -> dict[str, int]:
    return dict(Counter(i.verdict.value for i in items))


def pace(sent: int, rate: float, started_s: float, now_s: float) -> float:
    """Seconds to wait before the next send so that ``sent`` sends since ``started_s`` stay within ``rate``."""
    return max(0.0, started_s + sent / rate - now_s)


def chunk_size(rate: float) -> int:
    """Sends per round trip: about a tenth of a second's worth, 1 to 100."""
    return max(1, min(100, int(rate / 10)))


def new_redrive_id(now_ms: int, entropy: bytes) -> str:
    """``rd-<utc time>-<6 hex>``: unique per run, and a valid ``x-redrive`` (``outcomes.REDRIVE_ID``)."""
    stamp = datetime.fromtimestamp(now_ms / 1000, UTC).strftime("%Y%m%dT%H%M%S")
    return f"rd-{stamp}-{entropy.hex()[:6]}"


def show_value(value: Any) -> Any:
    """A decoded envelope made JSON-ready: bytes as text when they are UTF-8, else base64."""
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(raw).decode()}
    if isinstance(value, dict):
        return {str(k): show_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [show_value(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


def show_headers(headers: Iterable[tuple[str, bytes | None]]) -> list[list[str | None]]:
    return [[k, None if v is None else v.decode("utf-8", errors="backslashreplace")] for k, v in headers]
