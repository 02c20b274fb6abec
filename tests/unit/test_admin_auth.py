"""Admin API tokens (pure): named tokens from settings, identification of a bearer header, the settings'
refusals; and the pure parts of the shared operator actions (policy validation naming the field, the audit
file read backwards)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from router_worker.admin import AdminAuth
from router_worker.audit_recent import AuditFilter, lines_backwards, recent_records
from router_worker.ops import ErrorKind, OpError, validate_policy
from router_worker.settings import SettingsError, load_settings

token_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Zs", "Zl", "Zp", "Cs")), min_size=1,
                     max_size=40)  # fmt: skip
named_tokens = st.dictionaries(st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True), token_text, min_size=1,
                               max_size=5).filter(lambda d: len(set(d.values())) == len(d))  # fmt: skip


@given(named_tokens, st.data())
def test_a_bearer_header_is_identified_by_its_token_name(tokens: dict[str, str], data: st.DataObject) -> None:
    auth = AdminAuth.of(tokens)
    name = data.draw(st.sampled_from(sorted(tokens)))
    assert auth.identify(f"Bearer {tokens[name]}") == name
    assert auth.identify(f"bearer   {tokens[name]}  ") == name, "scheme case and spaces do not matter"
    other = data.draw(token_text.filter(lambda t: t not in tokens.values()))
    assert auth.identify(f"Bearer {other}") is None
    assert auth.identify(tokens[name]) is None, "a token without the Bearer scheme"
    assert auth.identify(f"Basic {tokens[name]}") is None
    assert auth.identify(f"Bearer {tokens[name]}x") is None
    assert auth.identify(None) is None
    assert auth.identify("Bearer ") is None


def test_no_token_configured_identifies_nobody() -> None:
    auth = AdminAuth()
    assert not auth.enabled
    assert auth.identify("Bearer ") is None
    assert auth.identify("Bearer anything") is None


def test_tokens_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTER_ADMIN_TOKEN", "root-token")
    monkeypatch.setenv("ROUTER_ADMIN_TOKENS", "ops=ops-token, ci=ci-token")
    monkeypatch.setenv("ROUTER_ADMIN_READS_PUBLIC", "false")
    s = load_settings()
    assert "ops-token" not in repr(s), "tokens are secrets: never shown"
    auth = AdminAuth.from_settings(s)
    assert not auth.reads_public
    assert [auth.identify(f"Bearer {t}") for t in ("root-token", "ops-token", "ci-token")] == [
        "admin",
        "ops",
        "ci",
    ]
    monkeypatch.setenv("ROUTER_ADMIN_TOKENS", '{"ops": "ops-token"}')
    assert AdminAuth.from_settings(load_settings()).identify("Bearer ops-token") == "ops"
    monkeypatch.delenv("ROUTER_ADMIN_TOKENS")
    monkeypatch.setenv("ROUTER_ADMIN_TOKEN", "")
    assert not AdminAuth.from_settings(load_settings()).enabled, "an empty token is no token"


@pytest.mark.parametrize(
    ("tokens", "admin", "says"),
    [
        ("ops", None, "expected name=token"),
        ("ops=a,ops=b", None, "token name 'ops' given twice"),
        ("bad name=x", None, "a token name (8 characters, starting 'ba') is not 1-64"),
        ("ops=", None, "token 'ops' is empty"),
        ("admin=x", "y", "that name is ROUTER_ADMIN_TOKEN's"),
        ("ops=same,ci=same", None, "two admin tokens are equal"),
        ("ops=same", "same", "two admin tokens are equal"),
        ('{"ops": ', None, "not valid JSON"),
    ],
)
def test_bad_tokens_are_refused_at_start_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, tokens: str, admin: str | None, says: str
) -> None:
    monkeypatch.setenv("ROUTER_ADMIN_TOKENS", tokens)
    if admin is not None:
        monkeypatch.setenv("ROUTER_ADMIN_TOKEN", admin)
    with pytest.raises(SettingsError, match="ROUTER_") as exc:
        load_settings()
    assert says in str(exc.value)
    assert "same" not in str(exc.value).replace(says, ""), "no token value in the message"


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"default_strategy": "nope"}, "default_strategy"),
        ({"rules": [{"pattern": "a"}, {"pattern": "b", "goal": "fastest"}]}, "rules.1.goal"),
        ({"extra": 1}, "extra"),
        ({"max_load_threshold": True}, "max_load_threshold"),
        ({"hybrid_weights": {"load": "0.5"}}, "hybrid_weights.load"),
        ("text", "body"),
    ],
)
def test_policy_validation_names_the_first_bad_field(doc: object, field: str) -> None:
    with pytest.raises(OpError) as exc:
        validate_policy(doc)
    assert (exc.value.kind, exc.value.field) == (ErrorKind.INVALID, field)
    assert exc.value.message.startswith("invalid policy: ")


lines = st.lists(st.binary(min_size=0, max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=30)


@given(lines, st.integers(1, 64), st.booleans())
def test_lines_backwards_is_the_file_reversed_whatever_the_block(
    tmp_path_factory: pytest.TempPathFactory, content: list[bytes], block: int, final_newline: bool
) -> None:
    path = tmp_path_factory.mktemp("audit") / "a.log"
    path.write_bytes(b"\n".join(content) + (b"\n" if final_newline and content else b""))
    assert list(lines_backwards(path, block)) == [ln for ln in reversed(content) if ln]


def test_recent_records_newest_first_across_rotated_files(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"

    def write(path: Path, events: list[str]) -> None:
        recs = [orjson.dumps({"ts": i, "event": e, "router_id": "r", "actor": "ops" if i % 2 else "ci"})
                for i, e in enumerate(events)]  # fmt: skip
        path.write_bytes(b"\n".join([*recs, b"{torn"]) + b"\n")

    write(log.with_name("audit.log.2"), ["a0", "a1"])
    write(log.with_name("audit.log.1"), ["b0", "b1"])
    write(log, ["c0", "c1"])
    assert [r["event"] for r in recent_records(log, 2, 10)] == ["c1", "c0", "b1", "b0", "a1", "a0"]
    assert [r["event"] for r in recent_records(log, 1, 10)] == ["c1", "c0", "b1", "b0"], (
        "only the kept backups"
    )
    assert [r["event"] for r in recent_records(log, 2, 3)] == ["c1", "c0", "b1"]
    assert [r["event"] for r in recent_records(log, 2, 10, AuditFilter(actor="ops"))] == ["c1", "b1", "a1"]
    assert recent_records(tmp_path / "none.log", 2, 10) == []
    assert recent_records(log, 2, 0) == []
