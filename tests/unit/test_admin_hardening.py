"""Small hardening found in review: a token read from a secret file keeps working with its trailing newline."""

from __future__ import annotations

import pytest

from router_worker.admin import AdminAuth
from router_worker.settings import load_settings


def test_a_token_with_a_trailing_newline_still_identifies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "ROUTER_ADMIN_TOKEN", "root-token\n"
    )  # as `$(cat secret-file)` or a mounted file gives it
    auth = AdminAuth.from_settings(load_settings())
    assert auth.identify("Bearer root-token") == "admin"
