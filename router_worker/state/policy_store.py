"""The routing policy in Redis: validated on write, versioned, announced to every router on change."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import orjson
import yaml
from pydantic import ValidationError
from redis.asyncio import Redis

from router_worker.core.policy import DEFAULT_POLICY, Policy, parse_policy_text
from router_worker.settings import Settings
from router_worker.state.keys import Keys

HISTORY_LEN = 50


log = logging.getLogger(__name__)


class PolicyError(ValueError):
    """A policy document that was refused; the message names the bad field."""


class PolicyVersionConflict(PolicyError):
    """A write that expected another version than the one stored (someone changed the policy meanwhile)."""


def describe_errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '<policy>'}: {e['msg']}"
        for e in exc.errors(include_url=False)
    )


def parse_policy(data: Any) -> Policy:
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(f"invalid policy: {describe_errors(exc)}") from exc


def load_policy_file(path: str | Path) -> Policy:
    p = Path(path)
    text = p.read_text()
    try:
        data = parse_policy_text(text, p.suffix in (".yaml", ".yml"))  # bounded: size, no YAML aliases
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise PolicyError(
            f"{p}: not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'}: {exc}"
        ) from exc
    return parse_policy(data)


class PolicyStore:
    def __init__(self, redis: Redis, keys: Keys, default: Policy = DEFAULT_POLICY) -> None:
        self.redis = redis
        self.keys = keys
        self.default = default
        """The policy in force while none is stored (``ROUTER_DEFAULT_STRATEGY`` sets its strategy)."""

    @classmethod
    def for_settings(cls, redis: Redis, settings: Settings) -> PolicyStore:
        return cls(redis, Keys(settings.redis_prefix), Policy(default_strategy=settings.default_strategy))

    async def get(self) -> Policy:
        raw = await self.redis.get(self.keys.policy)
        if not raw:
            return self.default
        try:
            return Policy.model_validate(orjson.loads(raw))
        except (orjson.JSONDecodeError, ValidationError):
            # Written by hand past validation: keep routing on the defaults rather than stop.
            return self.default

    async def set(self, policy: Policy, expect_version: int | None = None, actor: str = "") -> Policy:
        """Store a new version (WATCH/MULTI compare-and-set, so concurrent writers never lose an update
        silently). ``expect_version`` refuses the write when the current version differs."""
        stored: Policy | None = None

        async def attempt(pipe: Any) -> None:
            nonlocal stored
            cur = await pipe.get(self.keys.policy)
            version = 0
            if cur:
                try:
                    version = int(orjson.loads(cur).get("version", 0))
                except (orjson.JSONDecodeError, AttributeError, ValueError):
                    version = 0
            if expect_version is not None and expect_version != version:
                raise PolicyVersionConflict(
                    f"policy changed meanwhile: expected version {expect_version}, found {version}"
                )
            stored = policy.model_copy(update={"version": version + 1})
            pipe.multi()
            pipe.set(self.keys.policy, orjson.dumps(stored.model_dump(mode="json")))
            if cur:
                pipe.lpush(self.keys.policy_history, cur)
                pipe.ltrim(self.keys.policy_history, 0, HISTORY_LEN - 1)

        await self.redis.transaction(attempt, self.keys.policy)
        assert stored is not None
        await self.redis.publish(
            self.keys.events,
            orjson.dumps({"event": "policy_changed", "version": stored.version, "actor": actor}),
        )
        return stored

    async def history(self, limit: int = 10) -> list[Policy]:
        raws = await self.redis.lrange(self.keys.policy_history, 0, limit - 1)
        out = []
        for r in raws:  # an entry stored by an older version, or by hand, is skipped (as get() tolerates one)
            try:
                out.append(Policy.model_validate(orjson.loads(r)))
            except ValueError as exc:
                log.warning("skipping a policy history entry that no longer validates: %s", str(exc)[:200])
        return out
