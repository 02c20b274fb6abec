"""Topic names, and the collision-free mapping of model ids onto legal Kafka topic names.

The rule: characters ``[A-Za-z0-9.-]`` stand as they are; every other character, ``_`` included, becomes
``_`` followed by the two lower-case hex digits of each of its UTF-8 bytes. Because ``_`` only ever starts
an escape, the mapping is injective and reversible: ``meta-llama/Llama-3.3-70B`` becomes
``meta-llama_2fLlama-3.3-70B``. A name that would exceed Kafka's 249 characters keeps its first part and
ends in ``_zz`` plus 32 hex digits of its SHA-256; ``_zz`` is never an escape, so a shortened name can not
equal an unshortened one.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

from router_worker.settings import Settings

_KEEP = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-")
MAX_TOPIC_LEN = 249


@functools.lru_cache(maxsize=4096)  # once per routed job: a deployment has few model ids
def escape_model_id(model_id: str) -> str:
    """Map a model id to the legal topic-name fragment (see module docstring)."""
    out: list[str] = []
    for ch in model_id:
        if ch in _KEEP:
            out.append(ch)
        else:
            out.extend(f"_{b:02x}" for b in ch.encode())
    return "".join(out)


def unescape_model_id(fragment: str) -> str:
    """Invert :func:`escape_model_id`."""
    raw = bytearray()
    i = 0
    while i < len(fragment):
        if fragment[i] == "_":
            raw.append(int(fragment[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(fragment[i].encode())
            i += 1
    return raw.decode()


def _shorten(name: str) -> str:
    # A long name keeps a readable head and a digest of the whole; "_zz" is never a valid escape, so a
    # shortened name can not equal any name produced without shortening.
    digest = hashlib.sha256(name.encode()).hexdigest()[:32]
    return name[: MAX_TOPIC_LEN - 35] + "_zz" + digest


_NAMES_KEPT = 4096


@dataclass(frozen=True, slots=True)
class Topics:
    """Every topic name of one deployment, prefix applied."""

    prefix: str
    requests: str
    dlq: str
    results: str
    model_prefix: str
    retry_prefix: str

    @classmethod
    def from_settings(cls, s: Settings) -> Topics:
        p = s.topic_prefix
        return cls(
            prefix=p,
            requests=p + s.requests_topic,
            dlq=p + s.dlq_topic,
            results=p + s.results_topic,
            model_prefix=p + s.model_topic_prefix,
            retry_prefix=p + s.retry_topic_prefix,
        )

    _names: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)
    """Model topic names already worked out: the router asks for one per routed job."""

    def model(self, model_id: str) -> str:
        names = self._names
        name = names.get(model_id)
        if name is None:
            if len(names) >= _NAMES_KEPT:  # model ids come from heads and jobs: bounded, but never trusted
                names.clear()
            name = self.model_prefix + escape_model_id(model_id)
            name = names[model_id] = name if len(name) <= MAX_TOPIC_LEN else _shorten(name)
        return name

    def retry(self, tier: int) -> str:
        return f"{self.retry_prefix}{tier}"
