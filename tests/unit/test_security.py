"""Security settings (pure): secrets as SecretStr and from files, redaction, refused combinations, and the exact
options every Kafka and Redis client is built with."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from pydantic import SecretStr
from redis.exceptions import AuthenticationError, NoPermissionError
from redis.exceptions import ConnectionError as RedisConnectionError

from router_worker.pipeline import kafka
from router_worker.pipeline.kafka import KafkaSecurityError, kafka_options, kafka_ssl_context
from router_worker.runtime import describe_failure, redis_options
from router_worker.security import SECRET_FIELDS, redact_text, redact_url, reveal
from router_worker.settings import Settings, SettingsError, load_settings, settings_help
from tests.tls import Pki, make_pki

PLANT = "Pl4nted-S3cret"
BASE: dict[str, Any] = {"kafka_bootstrap_servers": "k1:9093,k2:9093", "redis_url": "redis://r:6379/0"}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("ROUTER_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# --- secrets --------------------------------------------------------------------------------------------


def test_every_secret_setting_is_a_secretstr() -> None:
    for name in SECRET_FIELDS:
        annotation = str(Settings.model_fields[name].annotation)
        assert "SecretStr" in annotation, f"{name} is {annotation}"


def test_repr_and_str_show_no_secret_nor_url_password() -> None:
    s = load_settings(**BASE | {"redis_url": f"redis://svc:{PLANT}1@r:6379/0"}, admin_token=f"{PLANT}2",
                      admin_tokens={"ops": f"{PLANT}3"}, kafka_security_protocol="SASL_PLAINTEXT",
                      kafka_sasl_mechanism="PLAIN", kafka_sasl_username="u",
                      kafka_sasl_password=f"{PLANT}4")  # fmt: skip
    for text in (repr(s), str(s), settings_help()):
        assert PLANT not in text
    assert "redis://svc:***@r:6379/0" in repr(s)
    assert s.kafka_sasl_password is not None
    assert s.kafka_sasl_password.get_secret_value() == f"{PLANT}4"


def test_secret_from_a_file_named_by_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("redis_password", "admin_token", "admin_tokens", "redis_url"):
        (tmp_path / name).write_text({"admin_tokens": f"ops={PLANT}t\n", "redis_url": "redis://u:f@r/0\n"}
                                     .get(name, f"{PLANT}-{name}\n"))  # fmt: skip
    monkeypatch.setenv("ROUTER_KAFKA_BOOTSTRAP_SERVERS", "k:9092")
    monkeypatch.setenv("ROUTER_REDIS_URL_FILE", str(tmp_path / "redis_url"))
    monkeypatch.setenv("ROUTER_ADMIN_TOKEN_FILE", str(tmp_path / "admin_token"))
    monkeypatch.setenv("ROUTER_ADMIN_TOKENS_FILE", str(tmp_path / "admin_tokens"))
    s = load_settings()
    assert s.redis_url == "redis://u:f@r/0"  # the trailing newline is not part of it
    assert s.admin_token == SecretStr(f"{PLANT}-admin_token")
    assert s.admin_tokens["ops"].get_secret_value() == f"{PLANT}t"
    # the password given twice (URL and setting) is refused
    monkeypatch.setenv("ROUTER_REDIS_PASSWORD_FILE", str(tmp_path / "redis_password"))
    with pytest.raises(SettingsError, match="password is given twice"):
        load_settings()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"ROUTER_ADMIN_TOKEN": "x", "ROUTER_ADMIN_TOKEN_FILE": "{d}/tok"},
            "ROUTER_ADMIN_TOKEN or ROUTER_ADMIN_TOKEN_FILE",
        ),
        ({"ROUTER_ADMIN_TOKEN_FILE": "{d}/missing"}, "ROUTER_ADMIN_TOKEN_FILE: can not read"),
        ({"ROUTER_ADMIN_TOKEN_FILE": "{d}/empty"}, "ROUTER_ADMIN_TOKEN_FILE: .* is empty"),
    ],
)
def test_bad_secret_files_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], message: str
) -> None:
    (tmp_path / "tok").write_text(PLANT)
    (tmp_path / "empty").write_text("\n")
    for k, v in env.items():
        monkeypatch.setenv(k, v.format(d=tmp_path))
    with pytest.raises(SettingsError, match=message) as info:
        load_settings()
    assert PLANT not in str(info.value)


def test_settings_file_may_name_secret_files(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "redis").write_text(f"{PLANT}\n")
    conf = tmp_path / "router.toml"
    conf.write_text('kafka_bootstrap_servers = "k:1"\nredis_url = "redis://r/0"\n'
                    'redis_password_file = "secrets/redis"\n')  # fmt: skip
    s = load_settings(conf)
    assert s.redis_password == SecretStr(PLANT)
    conf.write_text(
        'redis_url = "redis://r/0"\nredis_password = "a"\nredis_password_file = "secrets/redis"\n'
    )
    with pytest.raises(SettingsError, match="both redis_password and redis_password_file"):
        load_settings(conf)


def test_help_names_the_file_variants_and_shows_no_secret_default() -> None:
    text = settings_help()
    for name in SECRET_FIELDS:
        assert f"ROUTER_{name.upper()}_FILE" in text
        line = next(ln for ln in text.splitlines() if ln.startswith(f"ROUTER_{name.upper()}="))
        assert line.startswith(f"ROUTER_{name.upper()}= "), line  # no default shown


def test_reveal_gives_child_processes_the_secrets() -> None:
    dumped = {"a": SecretStr("x"), "b": {"n": SecretStr("y")}, "c": [SecretStr("z")], "d": 1}
    assert reveal(dumped) == {"a": "x", "b": {"n": "y"}, "c": ["z"], "d": 1}


# --- redaction ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:pw@host:6379/0", "redis://user:***@host:6379/0"),
        ("rediss://:pw@host/0", "rediss://:***@host/0"),
        ("redis://user@host/0", "redis://user@host/0"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://u:p#w@rd@host/0", "redis://u:***@host/0"),
        ("unix://u:pw@/run/redis.sock", "unix://u:***@/run/redis.sock"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@given(st.text(st.characters(blacklist_categories=("Z", "C")), min_size=1, max_size=40))
def test_no_password_survives_redaction(pw: str) -> None:
    shown = redact_text(f"connecting to redis://svc:{pw}@10.0.0.1:6379/0 failed")
    assume(pw not in "connecting to redis://svc:***@10.0.0.1:6379/0 failed")
    assert pw not in shown


def test_redact_text_removes_given_secrets() -> None:
    assert redact_text(f"token {PLANT} and {PLANT}x", [PLANT, "", f"{PLANT}x"]) == "token *** and ***"


# --- refused combinations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "ROUTER_KAFKA_SASL_MECHANISM"),
        (
            {"kafka_sasl_mechanism": "PLAIN", "kafka_sasl_username": "u", "kafka_sasl_password": "p"},
            "ROUTER_KAFKA_SECURITY_PROTOCOL=SASL_SSL",
        ),
        (
            {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "SCRAM-SHA-256"},
            "ROUTER_KAFKA_SASL_USERNAME and ROUTER_KAFKA_SASL_PASSWORD",
        ),
        ({"kafka_sasl_password": "p"}, "ROUTER_KAFKA_SASL_PASSWORD is set"),
        (
            {"kafka_ssl_cafile": "/etc/hostname"},
            "ROUTER_KAFKA_SSL_CAFILE needs ROUTER_KAFKA_SECURITY_PROTOCOL=SSL",
        ),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_keyfile": "/etc/hostname"},
            "ROUTER_KAFKA_SSL_KEYFILE needs ROUTER_KAFKA_SSL_CERTFILE",
        ),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "/no/such.pem"},
            "ROUTER_KAFKA_SSL_CAFILE: /no/such.pem is not a file",
        ),
        (
            {"kafka_security_protocol": "SSL", "kafka_bootstrap_servers": None},
            "needs ROUTER_KAFKA_BOOTSTRAP_SERVERS",
        ),
        ({"redis_url": "http://u:pw@r/0"}, r"ROUTER_REDIS_URL must start with .*http://u:\*\*\*@r/0"),
        ({"redis_url": "redis://u:pw@r/0", "redis_password": "x"}, "password is given twice"),
        ({"redis_url": "redis://u@r/0", "redis_username": "v"}, "user is given twice"),
        ({"redis_ssl_cafile": "/etc/hostname"}, "ROUTER_REDIS_SSL_CAFILE needs a rediss://"),
        ({"redis_url": "rediss://r/0", "redis_ssl_key_password": "x"}, "ROUTER_REDIS_SSL_KEY_PASSWORD needs"),
        ({"redis_url": None, "redis_password": "x"}, "ROUTER_REDIS_PASSWORD needs ROUTER_REDIS_URL"),
    ],
)
def test_bad_combinations_are_refused_naming_the_setting(values: dict[str, Any], named: str) -> None:
    with pytest.raises(SettingsError, match=named) as info:
        load_settings(**BASE | values)
    assert "pw" not in str(info.value).replace("password", "")


# --- Kafka client options -------------------------------------------------------------------------------


def test_kafka_options_plaintext_and_sasl_exactly() -> None:
    base = {
        "bootstrap_servers": "k1:9093,k2:9093",
        "client_id": "router-worker",
        "request_timeout_ms": 30_000,
    }
    assert kafka_options(load_settings(**BASE)) == base | {"security_protocol": "PLAINTEXT"}
    for mech in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        s = load_settings(**BASE, kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism=mech,
                          kafka_sasl_username="svc", kafka_sasl_password=PLANT)  # fmt: skip
        assert kafka_options(s) == base | {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": mech,
                                           "sasl_plain_username": "svc", "sasl_plain_password": PLANT}  # fmt: skip


def test_kafka_options_tls_with_client_certificate(pki: Pki) -> None:
    s = load_settings(**BASE, kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                      kafka_sasl_username="svc", kafka_sasl_password=PLANT, kafka_ssl_cafile=str(pki.ca),
                      kafka_ssl_certfile=str(pki.client_cert), kafka_ssl_keyfile=str(pki.client_key_encrypted),
                      kafka_ssl_key_password=pki.key_password)  # fmt: skip
    opts = kafka_options(s)
    ctx = opts.pop("ssl_context")
    assert opts == {"bootstrap_servers": "k1:9093,k2:9093", "client_id": "router-worker",
                    "request_timeout_ms": 30_000, "security_protocol": "SASL_SSL",
                    "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "svc",
                    "sasl_plain_password": PLANT}  # fmt: skip
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert [dict(x[0] for x in c["subject"])["commonName"] for c in ctx.get_ca_certs()] == ["ca"]
    no_host = load_settings(**BASE, kafka_security_protocol="SSL", kafka_ssl_check_hostname=False)
    assert not kafka_options(no_host)["ssl_context"].check_hostname


def test_a_wrong_key_password_is_one_clear_error(pki: Pki) -> None:
    s = load_settings(**BASE, kafka_security_protocol="SSL", kafka_ssl_certfile=str(pki.client_cert),
                      kafka_ssl_keyfile=str(pki.client_key_encrypted), kafka_ssl_key_password=PLANT)  # fmt: skip
    with pytest.raises(KafkaSecurityError, match=r"ROUTER_KAFKA_SSL_\*") as info:
        kafka_options(s)
    assert PLANT not in str(info.value)


def test_every_kafka_client_factory_gets_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []

    class Recorder:
        def __init__(self, *topics: str, **kwargs: Any) -> None:
            seen.append(kwargs)

    for name in ("AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient"):
        monkeypatch.setattr(kafka, name, Recorder)
    s = load_settings(**BASE, kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN",
                      kafka_sasl_username="svc", kafka_sasl_password=PLANT)  # fmt: skip
    kafka.make_producer(s)
    kafka.make_consumer(s, "t", group_id="g")
    kafka.make_admin(s)
    assert len(seen) == 3
    for kwargs in seen:
        assert {k: kwargs[k] for k in kafka_options(s)} == kafka_options(s)


async def test_the_client_certificate_is_presented_in_the_handshake(pki: Pki) -> None:
    """A TLS server that, like a broker with ssl.client.auth=required, takes only clients with a
    certificate from its CA: the context Kafka clients get passes, one without the certificate does not."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    peers: list[Any] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peercert"))
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    common = dict(BASE, kafka_security_protocol="SSL", kafka_ssl_cafile=str(pki.ca))
    try:
        with_cert = load_settings(**common, kafka_ssl_certfile=str(pki.client_cert),
                                  kafka_ssl_keyfile=str(pki.client_key_encrypted),
                                  kafka_ssl_key_password=pki.key_password)  # fmt: skip
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=kafka_ssl_context(with_cert))
        assert await asyncio.wait_for(reader.read(2), 10) == b"ok"
        writer.close()
        assert dict(x[0] for x in peers[0]["subject"])["commonName"] == "router-worker"
        without = load_settings(**common)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await _read_ok(port, kafka_ssl_context(without))
        wrong_ca = load_settings(**common | {"kafka_ssl_cafile": str(pki.other_ca)})
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection("127.0.0.1", port, ssl=kafka_ssl_context(wrong_ca))
    finally:
        server.close()
        await server.wait_closed()


async def _read_ok(port: int, ctx: ssl.SSLContext) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:  # TLS 1.3: a server's refusal of the client arrives at the first read
        if await asyncio.wait_for(reader.read(2), 10) != b"ok":
            raise ConnectionError("closed by the server")
    finally:
        writer.close()


# --- Redis client options and failures ------------------------------------------------------------------


def test_redis_options_exactly(pki: Pki) -> None:
    assert redis_options(load_settings(**BASE)) == {}
    s = load_settings(**BASE, redis_username="svc", redis_password=PLANT)
    assert redis_options(s) == {"username": "svc", "password": PLANT}
    tls = load_settings(**BASE | {"redis_url": "rediss://r:6380/0"}, redis_ssl_cafile=str(pki.ca),
                        redis_ssl_certfile=str(pki.client_cert), redis_ssl_keyfile=str(pki.client_key_encrypted),
                        redis_ssl_key_password=pki.key_password, redis_ssl_check_hostname=False)  # fmt: skip
    assert redis_options(tls) == {"ssl_cert_reqs": "required", "ssl_check_hostname": False,
                                  "ssl_ca_certs": str(pki.ca), "ssl_certfile": str(pki.client_cert),
                                  "ssl_keyfile": str(pki.client_key_encrypted),
                                  "ssl_password": pki.key_password}  # fmt: skip


def test_failures_are_described_in_one_line_without_secrets() -> None:
    s = load_settings(**BASE | {"redis_url": f"redis://svc:{PLANT}@r:6379/0"})
    login = describe_failure(AuthenticationError("invalid username-password pair or user is disabled."), s)
    assert login is not None
    assert "refused the login" in login
    assert "ROUTER_REDIS_PASSWORD" in login
    perm = describe_failure(NoPermissionError("this user has no permissions to run the 'xadd' command"), s)
    assert perm is not None
    assert "ACL" in perm
    down = describe_failure(RedisConnectionError(f"Error 111 connecting to redis://svc:{PLANT}@r:6379"), s)
    assert down is not None
    assert "could not be reached" in down
    from aiokafka.errors import KafkaConnectionError

    k = describe_failure(KafkaConnectionError("Unable to bootstrap from [('k1', 9093)]"), s)
    assert k is not None
    assert "ROUTER_KAFKA_SECURITY_PROTOCOL" in k
    for text in (login, perm, down, k):
        assert PLANT not in text
        assert "\n" not in text
    assert describe_failure(ValueError("x"), s) is None
