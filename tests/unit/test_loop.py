"""The event loop a command runs on: asyncio's, or uvloop's where installed and asked for."""

from __future__ import annotations

import asyncio

import pytest

from router_worker import loop
from router_worker.settings import SettingsError, load_settings


async def _kind() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def test_asyncio_when_asked() -> None:
    assert loop.run(_kind(), "asyncio") == "asyncio"


def test_auto_takes_uvloop_when_installed() -> None:
    pytest.importorskip("uvloop", reason="uvloop is in the test extra; without it auto is asyncio")
    assert loop.run(_kind(), "auto") == "uvloop"
    assert loop.run(_kind(), "uvloop") == "uvloop"


def test_uvloop_asked_for_by_name_and_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed
    assert loop.loop_factory("auto") is None
    with pytest.raises(loop.LoopUnavailable, match="pip install"):
        loop.loop_factory("uvloop")


def test_a_typo_in_the_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTER_EVENT_LOOP", "uvlop")
    with pytest.raises(SettingsError, match="ROUTER_EVENT_LOOP"):
        load_settings()
