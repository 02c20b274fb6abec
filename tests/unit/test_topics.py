from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from router_worker.settings import load_settings
from router_worker.topics import MAX_TOPIC_LEN, Topics, escape_model_id, unescape_model_id

LEGAL = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def test_documented_examples() -> None:
    t = Topics.from_settings(load_settings(topic_prefix="acme."))
    assert t.model("llama-3.3-70b") == "acme.model.llama-3.3-70b"
    assert t.model("meta-llama/Llama-3.3-70B") == "acme.model.meta-llama_2fLlama-3.3-70B"
    assert t.model("a_b") == "acme.model.a_5fb"
    assert t.requests == "acme.router.requests"
    assert t.retry(2) == "acme.router.retry.2"


@given(st.text(min_size=1, max_size=60))
def test_escape_is_legal_and_reversible(model_id: str) -> None:
    esc = escape_model_id(model_id)
    assert set(esc) <= LEGAL
    assert unescape_model_id(esc) == model_id


@given(st.text(min_size=1, max_size=30), st.text(min_size=1, max_size=30))
def test_distinct_ids_never_share_a_topic(a: str, b: str) -> None:
    if a != b:
        assert escape_model_id(a) != escape_model_id(b)


def test_long_ids_are_shortened_with_a_digest() -> None:
    t = Topics.from_settings(load_settings())
    a, b = t.model("x" * 300), t.model("x" * 299 + "y")
    assert len(a) <= MAX_TOPIC_LEN
    assert len(b) <= MAX_TOPIC_LEN
    assert a != b
    assert set(a) <= LEGAL
