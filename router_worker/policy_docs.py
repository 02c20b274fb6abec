"""The policy's fields as a reference, from its own JSON Schema: every field (nested ones as ``breaker.window_s``,
list items as ``rules[].pattern``, map values as ``admission.tenants{}.rate``), its type, default, bounds and
description. ``router-worker policy fields`` prints it, so the documentation can never drift from the code."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from router_worker.core.policy import Policy

_BOUNDS = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"),
           ("maxItems", "items <="), ("maxLength", "length <="), ("maxProperties", "entries <="))  # fmt: skip


@dataclass(frozen=True, slots=True)
class FieldDoc:
    path: str
    type: str
    default: str
    bounds: str
    description: str


def policy_fields() -> list[FieldDoc]:
    schema = Policy.model_json_schema()
    return list(_walk(schema, schema.get("$defs", {}), ""))


def _resolve(node: Mapping[str, Any], defs: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str):
        return dict(defs.get(ref.rsplit("/", 1)[-1], {})) | {k: v for k, v in node.items() if k != "$ref"}
    return node


def _options(node: Mapping[str, Any], defs: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The alternatives of a field (``anyOf``: a type or null), resolved; the node itself when it has none."""
    alts = node.get("anyOf") or node.get("oneOf")
    if not alts:
        return [_resolve(node, defs)]
    return [_resolve(a, defs) for a in alts if a.get("type") != "null"]


def _type_of(node: Mapping[str, Any], defs: Mapping[str, Any]) -> str:
    names = []
    for opt in _options(node, defs):
        if "enum" in opt:
            names.append(" | ".join(str(v) for v in opt["enum"]))
        elif "const" in opt:
            names.append(repr(opt["const"]))
        elif opt.get("type") == "array":
            names.append(f"list of {_type_of(opt.get('items', {}), defs)}")
        elif opt.get("type") == "object" and "properties" not in opt:
            names.append(f"map of {_type_of(opt.get('additionalProperties') or {}, defs)}")
        elif "properties" in opt:
            names.append(str(opt.get("title", "object")))
        else:
            names.append(str(opt.get("type", "any")))
    nullable = any(a.get("type") == "null" for a in node.get("anyOf", ()))
    return " or ".join(names) + (" (or null)" if nullable else "")


def _bounds(node: Mapping[str, Any], defs: Mapping[str, Any]) -> str:
    out = []
    for opt in [node, *_options(node, defs)]:
        out += [f"{sign} {opt[key]}" for key, sign in _BOUNDS if key in opt]
    return ", ".join(dict.fromkeys(out))


def _walk(node: Mapping[str, Any], defs: Mapping[str, Any], prefix: str) -> Iterator[FieldDoc]:
    for name, raw in (node.get("properties") or {}).items():
        path = f"{prefix}{name}"
        field = dict(raw)
        desc = str(field.get("description") or "")
        opts = _options(field, defs)
        if not desc:
            desc = next((str(o.get("description", "")) for o in opts if o.get("description")), "")
        default = repr(field["default"]) if "default" in field else ""
        yield FieldDoc(path, _type_of(field, defs), default, _bounds(field, defs), " ".join(desc.split()))
        for opt in opts:
            if "properties" in opt:
                yield from _walk(opt, defs, f"{path}.")
            elif opt.get("type") == "array" and "properties" in _resolve(opt.get("items", {}), defs):
                yield from _walk(_resolve(opt["items"], defs), defs, f"{path}[].")
            elif opt.get("type") == "object" and isinstance(opt.get("additionalProperties"), dict):
                value = _resolve(opt["additionalProperties"], defs)
                if "properties" in value:
                    yield from _walk(value, defs, f"{path}{{}}.")
