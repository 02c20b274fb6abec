"""Who is calling the admin API: bearer tokens, each with a name that becomes the audit record's actor.

Pure: the tokens come from settings (``ROUTER_ADMIN_TOKEN``, named ``admin``, and ``ROUTER_ADMIN_TOKENS``).
A presented token is hashed and compared with every configured token's hash in constant time, all of them
every time, so neither timing nor an early exit tells which token came close.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from router_worker.settings import Settings

ADMIN_TOKEN_NAME = "admin"
HOW_TO_SET = "set ROUTER_ADMIN_TOKEN=<token> or ROUTER_ADMIN_TOKENS=<name>=<token>,<name>=<token>"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True, slots=True)
class AdminAuth:
    tokens: tuple[tuple[str, bytes], ...] = ()
    """(name, SHA-256 of the token)."""
    reads_public: bool = True

    @classmethod
    def of(cls, named: dict[str, str], reads_public: bool = True) -> AdminAuth:
        return cls(tuple((name, _digest(tok)) for name, tok in sorted(named.items())), reads_public)

    @classmethod
    def from_settings(cls, s: Settings) -> AdminAuth:
        named = {name: tok.get_secret_value() for name, tok in s.admin_tokens.items()}
        if s.admin_token is not None:
            named[ADMIN_TOKEN_NAME] = s.admin_token.get_secret_value().strip()  # a secret file's newline
        return cls.of(named, s.admin_reads_public)

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    def identify(self, authorization: str | None) -> str | None:
        """The name of the token in an ``Authorization: Bearer <token>`` header, or None."""
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return None
        digest = _digest(given.strip())
        found: str | None = None
        for name, expected in self.tokens:
            match = hmac.compare_digest(digest, expected)
            found = name if match else found
        return found
