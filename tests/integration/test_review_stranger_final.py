"""A stranger's review: operator typos and nonsense values (settings and the ``bench`` verbs), edge records from a
non-Python producer (librdkafka), and process signals on a router whose only head is saturated. Real broker and
Redis throughout; xfail(strict) marks a behaviour that is wrong today."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest
from aiokafka import TopicPartition
from confluent_kafka import KafkaError, Message, Producer
from redis.asyncio import Redis

from router_worker.settings import Settings, SettingsError, load_settings
from router_worker.topics import Topics
from tests.helpers import Served, cli_env, make_router, make_worker, read_topic, running, wait_until
from tests.procs import JobStream, Ledger, Procs, Report, time_limit, wait_committed

pytestmark = pytest.mark.integration

CONTRACT_REASONS = {
    "decode_error",
    "schema_error",
    "too_large",
    "expired",
    "unknown_model",
    "no_capacity",
    "max_attempts",
    "publish_error",
}


# --- helpers ----------------------------------------------------------------------------------------------------


def _cli(
    args: list[str], env: dict[str, str], timeout_s: float, cwd: Path | None = None
) -> tuple[int | None, str]:
    """Run ``router-worker ARGS`` in its own process group; (exit status or None when it ran past
    ``timeout_s`` and was killed, stdout + stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "router_worker.cli", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)  # let it stop its children (they also die with it)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        return None, out


def _offline_env(**extra: str) -> dict[str, str]:
    """An environment whose Kafka and Redis answer nothing: a command that gets past its settings fails on them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_") and k != "COLUMNS"}
    env.update(
        ROUTER_KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1", ROUTER_REDIS_URL="redis://127.0.0.1:1", COLUMNS="200"
    )
    env.update(extra)
    return env


def _refused(rc: int | None, out: str) -> None:
    assert rc is not None, f"still running after its time limit (not refused):\n{out[-1500:]}"
    assert "Traceback" not in out, f"a traceback instead of one clear line (exit {rc}):\n{out[-2500:]}"
    assert rc == 2, f"exit {rc}, not 2:\n{out[-1500:]}"
    assert "error:" in out, out[-1500:]


# --- 1. settings ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"ROUTER_KAFKA_FETCH_MAX_BYTES": "1000"}, "ROUTER_KAFKA_FETCH_MAX_BYTES"),
        ({"ROUTER_KAFKA_FETCH_MAX_BYTES": "50MiB"}, "ROUTER_KAFKA_FETCH_MAX_BYTES"),
        ({"ROUTER_KAFKA_FETCH_MAX_BYTES": "1000000000"}, "ROUTER_KAFKA_FETCH_MAX_BYTES"),
        ({"ROUTER_BACKPRESSURE_MAX_MS": "0"}, "ROUTER_BACKPRESSURE_MAX_MS"),
        ({"ROUTER_BACKPRESSURE_MAX_MS": "-5"}, "ROUTER_BACKPRESSURE_MAX_MS"),
        ({"ROUTER_HEAP_TRIM_S": "nan"}, "ROUTER_HEAP_TRIM_S"),
        ({"ROUTER_HEAP_TRIM_S": "inf"}, "ROUTER_HEAP_TRIM_S"),
        ({"ROUTER_HEAP_TRIM_S": "30s"}, "ROUTER_HEAP_TRIM_S"),
        ({"ROUTER_EVENT_LOOP": "UVLOOP"}, "ROUTER_EVENT_LOOP"),
        ({"ROUTER_EVENT_LOOP": ""}, "ROUTER_EVENT_LOOP"),
        ({"ROUTER_REDIS_TIMEOUT_S": "nan"}, "ROUTER_REDIS_TIMEOUT_S"),
        ({"ROUTER_AUDIT_SAMPLE": "nan"}, "ROUTER_AUDIT_SAMPLE"),
    ],
)
def test_the_newest_settings_with_nonsense_values_are_refused_at_start_naming_the_variable(
    env: dict[str, str], variable: str
) -> None:
    """Refuted: each is refused before any connection (Kafka and Redis here answer nothing), exit 2, one error
    naming the variable, no traceback (nan and inf included, which slip past many range checks)."""
    t0 = time.monotonic()
    rc, out = _cli(["run"], _offline_env(**env), timeout_s=30)
    _refused(rc, out)
    assert variable in out, out
    assert "could not be reached" not in out, f"got past its settings to a connection: {out}"
    assert time.monotonic() - t0 < 20


@pytest.mark.parametrize(
    ("args", "env", "shown"),
    [
        (["run", "--config", "conf/[prod]/router.toml"], {}, "conf/[prod]/router.toml"),
        (["run"], {"ROUTER_DEFAULT_STRATEGY": "[/]"}, "'[/]'"),
    ],
)
def test_a_settings_error_shows_the_operators_text_verbatim(
    args: list[str], env: dict[str, str], shown: str, tmp_path: Path
) -> None:
    rc, out = _cli(args, _offline_env(**env), timeout_s=30, cwd=tmp_path)
    _refused(rc, out)
    assert shown in out, f"the error does not show {shown!r} as given: {out!r}"


def test_a_settings_error_is_one_line_in_a_service_log() -> None:
    env = _offline_env(ROUTER_KAFKA_FETCH_MAX_BYTES="1000")
    env.pop("COLUMNS")
    rc, out = _cli(["run"], env, timeout_s=30)
    _refused(rc, out)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, f"the error takes {len(lines)} lines: {lines}"


@pytest.mark.parametrize(
    ("over", "variable"),
    [({"heap_trim_s": 0.5}, "ROUTER_HEAP_TRIM_S"), ({"retry_backoff_ms": []}, "ROUTER_RETRY_BACKOFF_MS")],
)
def test_a_cross_field_settings_error_names_the_variable(over: dict[str, Any], variable: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(**over)
    assert variable in str(info.value), str(info.value)
    assert "<settings>" not in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("over", "variable"),
    [
        ({"dlq_topic": "router dlq*"}, "ROUTER_DLQ_TOPIC"),
        ({"requests_topic": ""}, "ROUTER_REQUESTS_TOPIC"),
        ({"topic_prefix": "team/a."}, "ROUTER_TOPIC_PREFIX"),
        ({"topic_prefix": "x" * 245}, "ROUTER_TOPIC_PREFIX"),
        ({"retry_topic_prefix": "retry#"}, "ROUTER_RETRY_TOPIC_PREFIX"),
        ({"group_id": ""}, "ROUTER_GROUP_ID"),
    ],
)
def test_illegal_topic_names_and_an_empty_group_id_are_refused(over: dict[str, Any], variable: str) -> None:
    """Against the embedded broker such a router even runs (Tansu created a topic named ``""``); against
    Apache Kafka its first topic creation or join fails mid-start, far from the typo."""
    with pytest.raises(SettingsError) as info:
        load_settings(kafka_bootstrap_servers="127.0.0.1:1", redis_url="redis://127.0.0.1:1", **over)
    assert variable in str(info.value), str(info.value)


# --- 1b. the bench verbs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--heads", "abc"],
        ["--iterations", "0"],
        ["--heads", "0", "--iterations", "50"],
        ["--strategy", "bogus", "--heads", "10", "--iterations", "50"],
    ],
)
def test_bench_decisions_refuses_nonsense_values(args: list[str]) -> None:
    rc, out = _cli(["bench", "decisions", *args], _offline_env(), timeout_s=30)
    _refused(rc, out)


@pytest.mark.parametrize("bad", ["plot", "payload", "rate"])
def test_bench_e2e_refuses_nonsense_at_once(bad: str, settings: Settings, tmp_path: Path) -> None:
    small = [
        "--jobs",
        "50",
        "--latency-jobs",
        "20",
        "--routers",
        "1",
        "--heads",
        "2",
        "--models",
        "1",
        "--regions",
        "1",
        "--no-baseline",
    ]
    extra = {
        "plot": ["--plot", str(tmp_path / "no" / "such" / "dir" / "p.png"), "--rate", "100"],
        "payload": ["--payload-bytes", "-1", "--rate", "100"],
        "rate": ["--rate", "nan"],
    }[bad]
    env = cli_env(settings, ROUTER_KAFKA_FETCH_MAX_WAIT_MS="5")
    t0 = time.monotonic()
    rc, out = _cli(["bench", "e2e", *small, *extra], env, timeout_s=12)
    _refused(rc, out)
    assert time.monotonic() - t0 < 12
    assert "draining" not in out, f"it began measuring before refusing: {out[-800:]}"


def test_bench_soak_refuses_a_nan_fault_interval(settings: Settings) -> None:
    rc, out = _cli(
        ["bench", "soak", "--fault-every", "nan", "--minutes", "0.2"], cli_env(settings), timeout_s=10
    )
    _refused(rc, out)


@pytest.mark.parametrize(
    "args",
    [
        ["e2e", "--jobs", "0"],
        ["e2e", "--routers", "1,x"],
        ["e2e", "--regions", "99"],
        ["e2e", "--strategy", "nope"],
        ["e2e", "--rate", "-1"],
        ["e2e", "--no-baseline", "--pipes", "2"],
        ["soak", "--minutes", "0"],
        ["soak", "--minutes", "inf"],
        ["soak", "--rate", "nan"],
        ["soak", "--fault-every", "1"],
        ["nonsense"],
    ],
)
def test_bench_refuses_other_nonsense_quickly(args: list[str]) -> None:
    """Refuted: these are refused before anything starts (no broker is reachable here), exit 2, one line."""
    rc, out = _cli(["bench", *args], _offline_env(), timeout_s=30)
    _refused(rc, out)
    assert "could not be reached" not in out, out


# --- 2. edge records from librdkafka ------------------------------------------------------------------------------

ODD_MODEL = "meta-llama/Llama 3.3 70B é"
MP, JS = b"application/msgpack", b"application/json"


def _job(job_id: str, model: str = "m", **extra: Any) -> dict[str, Any]:
    return {"job_id": job_id, "model_type": model, "payload": {"x": job_id}} | extra


EDGE: list[tuple[str, bytes | None, bytes | None, list[tuple[Any, bytes | None]], str | None]] = [
    # (label, value, key, headers, job id that must reach a head; None: must be dead-lettered)
    ("empty value", b"", b"k1", [], None),
    ("empty JSON value", b"", b"k2", [("content-type", JS)], None),
    ("JSON with a BOM", b"\xef\xbb\xbf" + orjson.dumps(_job("bom")), None, [("content-type", JS)], None),
    ("msgpack string", msgpack.packb("just a string"), None, [], None),
    ("msgpack nil", msgpack.packb(None), None, [], None),
    ("msgpack int", msgpack.packb(42), None, [], None),
    ("empty model", msgpack.packb(_job("empty-model", "")), None, [], None),
    ("deadline NaN", msgpack.packb(_job("dl-nan", deadline_ms=math.nan)), None, [], None),
    ("deadline inf", msgpack.packb(_job("dl-inf", deadline_ms=math.inf)), None, [], None),
    ("deadline negative", msgpack.packb(_job("dl-neg", deadline_ms=-1)), None, [], None),
    ("deadline true", msgpack.packb(_job("dl-true", deadline_ms=True)), None, [], None),
    ("deadline past", msgpack.packb(_job("dl-past", deadline_ms=1_000)), None, [], None),
    ("deadline far future", msgpack.packb(_job("dl-far", deadline_ms=2**64 - 1)), None, [], "dl-far"),
    (
        "deadline far future JSON",
        orjson.dumps(_job("dl-far-js", deadline_ms=2**63 - 1)),
        None,
        [("content-type", JS)],
        "dl-far-js",
    ),
    (
        "two content-types, first wins",
        orjson.dumps(_job("two-ct")),
        None,
        [("content-type", JS), ("content-type", MP)],
        "two-ct",
    ),
    (
        "non-UTF-8 header values",
        msgpack.packb(_job("bin-headers")),
        None,
        [
            ("traceparent", b"\xff\xfe\x00"),
            ("x-job-id", b"\xff"),
            ("x-route-attempt", b"\xd9\xa3"),
            ("x-note", b"\x80" * 50),
        ],
        "bin-headers",
    ),
    ("non-UTF-8 header key", msgpack.packb(_job("bin-key")), None, [(b"\xff\xfe-key", b"v")], "bin-key"),
    ("binary key", msgpack.packb(_job("bin-rec-key")), b"\x00\xff\xfe", [], "bin-rec-key"),
    ("empty key", msgpack.packb(_job("empty-key")), b"", [], "empty-key"),
    (
        "priority extremes",
        msgpack.packb(_job("prio-max", priority=2**63 - 1, estimated_tokens=2**64 - 1)),
        None,
        [],
        "prio-max",
    ),
    ("priority min", msgpack.packb(_job("prio-min", priority=-(2**63))), None, [], "prio-min"),
    ("non-ASCII job id", msgpack.packb(_job("é" * 128)), None, [], "é" * 128),
    (
        "metadata nan and inf",
        msgpack.packb(
            _job("meta-nan", strategy="adaptive", metadata={"batch_size": math.inf, "min_context": math.nan})
        ),
        None,
        [],
        "meta-nan",
    ),
    (
        "model with illegal topic characters",
        msgpack.packb(_job("odd-model", ODD_MODEL)),
        None,
        [],
        "odd-model",
    ),
    ("unknown model with illegal characters", msgpack.packb(_job("no-head", "bad*model#/x")), None, [], None),
]


def _produce(
    bootstrap: str, topic: str, recs: list[tuple[bytes | None, bytes | None, list[Any]]]
) -> list[int]:
    """Produce with librdkafka to partition 0, in order; the offsets."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "broker.address.family": "v4",
            "linger.ms": 5,
            "acks": "all",
            "enable.idempotence": False,
            "max.in.flight": 1,
        }
    )
    offsets: list[int] = [-1] * len(recs)
    errors: list[str] = []

    def cb(i: int) -> Any:
        def done(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                errors.append(str(err))
            else:
                offsets[i] = msg.offset() or 0

        return done

    for i, (value, key, headers) in enumerate(recs):
        producer.produce(topic, value=value, key=key, headers=headers, partition=0, on_delivery=cb(i))
        producer.poll(0)
    assert producer.flush(30) == 0
    assert not errors, errors
    return offsets


@time_limit(60)
async def test_edge_records_from_librdkafka_each_end_routed_or_dead_lettered_once(
    settings: Settings, redis: Redis
) -> None:
    """Refuted: every edge record is routed (to the right head) or dead-lettered with a contract reason and its
    original offset, once; the router never fails a batch, and the partition is committed past all of them."""
    topics = Topics.from_settings(settings)
    served = Served()
    router = make_router(settings, redis)
    heads = [make_worker(settings, redis, served, "m"), make_worker(settings, redis, served, ODD_MODEL)]
    recs = [(v, k, h) for _, v, k, h, _ in EDGE] + [(msgpack.packb(_job("after")), None, [])]
    async with running(*heads, router):
        assert settings.kafka_bootstrap_servers
        offsets = await asyncio.to_thread(_produce, settings.kafka_bootstrap_servers, topics.requests, recs)
        want_routed = {jid for *_, jid in EDGE if jid} | {"after"}
        want_dead = sum(1 for *_, jid in EDGE if jid is None)
        await wait_until(lambda: want_routed <= set(served.job_ids()), timeout=30)
        dead = await read_topic(settings, topics.dlq, expect=want_dead, timeout=20)
        tp = TopicPartition(topics.requests, 0)
        committed = await wait_committed(settings, {tp: offsets[-1] + 1}, timeout=15)
        stats = router.stats
    assert stats.batch_errors == 0, stats
    got = Counter(served.job_ids())
    assert all(got[j] == 1 for j in want_routed), {j: got[j] for j in want_routed if got[j] != 1}
    by_offset: dict[int, list[str]] = {}
    for d in dead:
        hdr = dict(d.headers)
        assert hdr.get("x-original-topic") == topics.requests.encode(), hdr
        by_offset.setdefault(int(hdr["x-original-offset"] or b"-1"), []).append(
            (hdr.get("x-dlq-reason") or b"").decode()
        )
    for (label, *_, jid), off in zip(EDGE, offsets, strict=False):
        if jid is None:
            reasons = by_offset.get(off, [])
            assert len(reasons) == 1, f"{label} (offset {off}): {reasons}"
            assert reasons[0] in CONTRACT_REASONS, f"{label} (offset {off}): {reasons}"
        else:
            assert off not in by_offset, f"{label} was routed and dead-lettered: {by_offset[off]}"
    odd = [r for r in served.rows if r[0] == "odd-model"]
    assert odd
    assert odd[0][2] == ODD_MODEL
    assert committed[tp] == offsets[-1] + 1, committed


# --- 3. signals on a router while its head is saturated ------------------------------------------------------------


def _explained(ledger: Ledger, rep: Report) -> dict[str, list[Any]]:
    """Duplicates the contract does not admit: deliveries of one job with different x-route-attempt."""
    return {
        j: [d.get("attempt") for d in ledger.deliveries[j]]
        for j in rep.more
        if len({d.get("attempt") for d in ledger.deliveries[j]}) != 1
    }


@time_limit(75)
async def test_a_router_paused_past_its_session_timeout_behind_a_saturated_head_loses_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    """Refuted: two routers, one slow head (capacity 2, 40 ms: the partitions are held behind it); one router is
    stopped (SIGSTOP) for longer than its session timeout mid-backlog, then continued. Every job arrives; any
    duplicate carries one attempt (the contract's paused-router case); both routers live on."""
    jobs = 300
    async with Procs(settings, tmp_path) as procs:
        r1, r2 = await procs.start_routers(2)
        head = await procs.start_head("m", capacity=2, service_ms=40.0, jitter_ms=1.0)
        async with (
            Ledger(settings) as ledger,
            JobStream(settings, "m", jobs, rate=0, prefix="stop") as stream,
        ):
            await stream.wait(30)
            assert await ledger.wait_for(lambda: ledger.delivered(stream.ids) >= 20, 20)
            r1.pause()
            await asyncio.sleep(settings.kafka_session_timeout_ms / 1000 + 3)
            r1.resume()
            done = await ledger.wait_for(lambda: ledger.delivered(stream.ids) == jobs, 35)
            await ledger.settle(quiet_s=2.0)
            rep = ledger.report(stream.ids)
            print(f"\n[sigstop] {rep.summary()}")
            procs.assert_alive(r1, r2, head)
    assert done, rep.summary()
    assert rep.lost == 0, rep.summary()
    assert not rep.dead_by_reason, rep.summary()
    assert not _explained(ledger, rep), f"duplicates with different attempts: {_explained(ledger, rep)}"


@time_limit(75)
async def test_the_only_router_killed_behind_a_saturated_head_and_restarted_loses_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    """Refuted: one router, one slow head; kill -9 mid-backlog (partitions paused, batches in flight), then a new
    router. Every job arrives; duplicates only with one attempt (the contract's killed-router case)."""
    jobs = 200
    async with Procs(settings, tmp_path) as procs:
        (r1,) = await procs.start_routers(1)
        head = await procs.start_head("m", capacity=2, service_ms=25.0, jitter_ms=1.0)
        async with (
            Ledger(settings) as ledger,
            JobStream(settings, "m", jobs, rate=0, prefix="kill") as stream,
        ):
            await stream.wait(30)
            assert await ledger.wait_for(lambda: ledger.delivered(stream.ids) >= 30, 20)
            r1.kill9()
            assert await r1.wait_exit(10) == -9
            (r2,) = await procs.start_routers(1)
            done = await ledger.wait_for(lambda: ledger.delivered(stream.ids) == jobs, 40)
            await ledger.settle(quiet_s=1.0)
            rep = ledger.report(stream.ids)
            print(f"\n[kill9] {rep.summary()}")
            procs.assert_alive(r2, head)
    assert done, rep.summary()
    assert rep.lost == 0, rep.summary()
    assert not rep.dead_by_reason, rep.summary()
    assert not _explained(ledger, rep), f"duplicates with different attempts: {_explained(ledger, rep)}"
