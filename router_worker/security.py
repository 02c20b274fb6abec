"""Secrets in settings: read from files (``ROUTER_<NAME>_FILE``), never shown.

Pure helpers, plus the one file read a mounted secret needs. A password or token reaches the process through
the environment or a file, never a command line (where ``ps`` and shell history would keep it), and it leaves
only towards the server it is for: every URL that may carry credentials is redacted before it is shown.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr

ENV_PREFIX = "ROUTER_"
FILE_SUFFIX = "_FILE"

SECRET_FIELDS: tuple[str, ...] = (
    "admin_token",
    "admin_tokens",
    "kafka_sasl_password",
    "kafka_ssl_key_password",
    "redis_password",
    "redis_ssl_key_password",
)
"""Settings that hold a secret (SecretStr): readable from ``ROUTER_<NAME>_FILE``, never printed."""

FILE_READABLE: tuple[str, ...] = (*SECRET_FIELDS, "redis_url")
"""Settings that may come from a file: the secrets, and the Redis URL (it may carry a password)."""

REDACTED = "***"
MAX_SECRET_FILE_BYTES = 64 * 1024
"""A secret file larger than this is refused (a token list of named tokens fits many times over)."""

# scheme://user:password@host — the password part, whatever scheme (redis, rediss, kafka, http, ...).
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)(?P<pw>\S+)(?P<at>@)")
# ...?password=secret&ssl_password=secret: redis-py takes a URL's query parameters as client options, a login too.
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&;](?:ssl_)?password=)(?P<pw>[^&;#\s]*)", re.IGNORECASE)


class SecretFileError(ValueError):
    """A ``*_FILE`` setting that can not be used; the message names the variable, never the content."""


def redact_url(url: str) -> str:
    """``redis://user:secret@host:6379/0`` -> ``redis://user:***@host:6379/0``; a URL without a password as it
    is. Also a URL too odd to parse loses whatever sits between ``://`` and ``@``."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return redact_text(url)
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        return redact_text(urlunsplit(parts._replace(netloc=f"{user}:{REDACTED}@{host}")))
    except ValueError:
        return redact_text(re.sub(r"://[^@/\s]*@", f"://{REDACTED}@", url))


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every URL's password and every given secret replaced by ``***``."""
    out = _URL_PASSWORD.sub(lambda m: f"{m['head']}{REDACTED}{m['at']}", text)
    out = _QUERY_PASSWORD.sub(lambda m: f"{m['head']}{REDACTED}", out)
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        out = out.replace(secret, REDACTED)
    return out


def file_variable(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}{FILE_SUFFIX}"


def read_secret_file(path: str | Path, variable: str) -> str:
    """A secret file's content without its trailing newline; SecretFileError naming ``variable`` otherwise."""
    p = Path(path)
    try:
        # O_NONBLOCK: a FIFO with no writer would block the open; only a regular file is read, and at most
        # MAX_SECRET_FILE_BYTES of it (ROUTER_X_FILE=/dev/zero read for ever, into all of memory).
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                kind = "a directory" if p.is_dir() else "not a regular file"
                raise SecretFileError(f"{variable}: can not read {p}: {kind}")
            raw = f.read(MAX_SECRET_FILE_BYTES + 1)
        text = raw.decode("utf-8")
    except OSError as exc:
        raise SecretFileError(f"{variable}: can not read {p}: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise SecretFileError(f"{variable}: {p} is not UTF-8 text") from None
    if len(raw) > MAX_SECRET_FILE_BYTES:
        raise SecretFileError(
            f"{variable}: {p} is larger than {MAX_SECRET_FILE_BYTES:,} bytes (no secret is)"
        )
    value = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
    if not value:
        raise SecretFileError(f"{variable}: {p} is empty")
    return value


def secrets_from_env(env: Mapping[str, str]) -> dict[str, str]:
    """The values of ``ROUTER_<NAME>_FILE`` variables, by field name. Refuses a secret given twice
    (``ROUTER_X`` and ``ROUTER_X_FILE``): which one wins would be a guess."""
    upper = {k.upper(): v for k, v in env.items()}
    out: dict[str, str] = {}
    for field in FILE_READABLE:
        variable = file_variable(field)
        path = upper.get(variable)
        if not path:
            continue
        if upper.get(f"{ENV_PREFIX}{field.upper()}"):
            raise SecretFileError(f"set {ENV_PREFIX}{field.upper()} or {variable}, not both")
        out[field] = read_secret_file(path, variable)
    return out


def secrets_from_config(values: dict[str, object], base: Path) -> dict[str, object]:
    """A settings file's ``<name>_file`` keys replaced by the files' contents (paths relative to ``base``,
    the settings file's folder)."""
    out = dict(values)
    for field in FILE_READABLE:
        key = f"{field}_file"
        if key not in out:
            continue
        path = out.pop(key)
        if field in out:
            raise SecretFileError(f"the settings file sets both {field} and {key}")
        if not isinstance(path, str) or not path:
            raise SecretFileError(f"the settings file's {key} must be a file path")
        out[field] = read_secret_file(base / path, key)
    return out


def reveal(value: Any) -> Any:
    """``value`` with every SecretStr replaced by its secret, in lists and mappings too: for the environment
    of a child process of this deployment (an environment, not a command line, and never printed)."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: reveal(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [reveal(v) for v in value]
    return value
