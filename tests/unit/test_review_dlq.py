"""Adversarial review of issue 11: the pure parts (operators' words, the redrive plan)."""

from __future__ import annotations

import pytest

from router_worker.dlq.model import (
    UsageError,
    Verdict,
    parse_dead_letter,
    parse_duration_ms,
    parse_rate,
    plan_item,
    sent_as,
)


@pytest.mark.parametrize("text", ["9" * 400 + "s", "9" * 30 + "w"])
def test_an_absurd_duration_is_a_usage_error_not_a_crash(text: str) -> None:
    """It was an OverflowError (a traceback from the CLI, a 500 from the admin API)."""
    with pytest.raises(UsageError, match="bad duration"):
        parse_duration_ms(text)


def _dl(offset: int, job: str, redrive: str | None = None):  # type: ignore[no-untyped-def]
    hs = [("content-type", b"application/json"), ("x-dlq-reason", b"unknown_model")]
    if redrive is not None:
        hs.append(("x-redrive", redrive.encode()))
    return parse_dead_letter(
        "dlq", 0, offset, 0, None, b'{"job_id": "%s", "model_type": "m"}' % job.encode(), hs
    )


def test_a_second_dead_letter_of_a_job_goes_under_the_id_its_first_went_under() -> None:
    a, b, c, d = _dl(0, "J"), _dl(1, "J"), _dl(2, "J", redrive="rd-x"), _dl(3, "K")
    siblings = sent_as([a, b, c, d], {a.coord: "s|rd-1"})
    assert siblings == {(None, "J"): "rd-1"}
    item = plan_item(b, None, [], "rd-2", False, siblings.get((b.redrive, "J")))
    assert (item.verdict, item.redrive_id) == (Verdict.RESEND, "rd-1")
    # A later generation (dead-lettered again after redrive rd-x) is a job of its own.
    assert siblings.get((c.redrive, "J")) is None
    assert plan_item(c, None, [], "rd-2", False).verdict is Verdict.SEND


@pytest.mark.parametrize("text", ["0.00001/s", "0.5/m", "0.001"])
def test_a_rate_that_would_hold_the_redrive_lock_for_days_is_refused(text: str) -> None:
    with pytest.raises(UsageError, match="at least 1/m"):
        parse_rate(text)
    assert parse_rate("1/m") == pytest.approx(1 / 60)
