"""The JSON Schema subset Warden enforces: a tool's ``inputSchema`` turned into the supervisor's ``ParamSpec``s.

A tool declared from a JSON Schema (``runtime.tool_from_schema``) gets the same checks as a
``@tool`` function: the supervisor canonicalises and type-checks every argument, array items,
enums and nested objects included, before any caveat sees it. What a schema may say is
explicit, and anything outside it is a ``SchemaError`` at declaration, never a check that is
silently skipped:

- enforced: ``type`` (one type, or one type and ``"null"``), ``enum``, ``const``,
  ``properties`` / ``required`` (an object takes exactly its declared properties:
  ``additionalProperties`` may only be absent or ``false``; an object without ``properties``
  takes any keys, except at the top, where it means a tool without arguments), ``items`` (one schema), ``default`` (checked at declaration), ``minimum`` /
  ``maximum``, integer ``exclusiveMinimum`` / ``exclusiveMaximum``, ``minLength`` /
  ``maxLength``, ``anyOf`` / ``oneOf`` of one schema and ``{"type": "null"}`` (an optional
  value, as pydantic writes it), ``$ref`` to ``#/$defs/...`` or ``#/definitions/...``
  (not recursive); ``format`` ``uri`` / ``url`` (an http(s) URL, refused if ambiguous, as
  ``URL``), ``hostname`` (canonicalised as ``HOST``);
- annotations, passed to the model and not enforced: ``title``, ``description``,
  ``examples``, ``$schema``, ``$id``, ``$comment``, ``deprecated``, ``readOnly``,
  ``writeOnly``, and any other ``format`` (``email``, ``date-time``, ...), as JSON Schema
  itself treats ``format`` by default;
- refused at declaration: everything else; a caller may name some validation keywords in
  ``unenforced`` (``UNENFORCEABLE``: ``pattern``, ``minItems``, ...) to pass them to the model
  knowingly unchecked, and the rest (``pattern``, ``allOf``, other ``anyOf`` /
  ``oneOf``, ``not``, ``if``, ``minItems``, ``uniqueItems``, ``multipleOf``,
  ``patternProperties``, ``additionalProperties: true`` beside ``properties``, remote
  ``$ref``, ...).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Iterable, NamedTuple

from .errors import WardenError
from .trusted.wire import MAX_DEPTH, ParamSpec, conform

_TYPES = ("string", "integer", "number", "boolean", "array", "object")
_ANNOTATIONS = {"title", "description", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
                "writeOnly", "format", "default", "$defs", "definitions"}
_ENFORCED = {"type", "enum", "const", "properties", "required", "additionalProperties", "items", "minimum",
             "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "anyOf", "oneOf", "$ref"}
_FORMATS = {"uri": "url", "url": "url", "hostname": "host"}


class SchemaError(ValueError):
    """A JSON Schema that uses something Warden does not enforce, or is malformed."""


# Validation keywords a caller may knowingly leave to the tool (``unenforced=``): none changes a value's shape.
UNENFORCEABLE = frozenset({"pattern", "minItems", "maxItems", "uniqueItems", "multipleOf", "minProperties",
                           "maxProperties"})


class _Context(NamedTuple):
    defs: dict[str, Any]
    unenforced: frozenset[str]


def params_from_schema(schema: Any, unenforced: Iterable[str] = ()) -> dict[str, ParamSpec]:
    """The parameters of a tool whose arguments ``schema`` (an object schema) describes.

    ``unenforced`` names keywords of ``UNENFORCEABLE`` that the caller accepts are passed to the
    model but not checked by Warden; any other keyword outside the subset is still an error.
    """
    if not isinstance(schema, dict):
        raise SchemaError("a tool's schema must be a JSON object")
    unenforced = frozenset(unenforced)
    if not unenforced <= UNENFORCEABLE:
        raise SchemaError(f"unenforced may name only {sorted(UNENFORCEABLE)}, not {sorted(unenforced - UNENFORCEABLE)}")
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    spec = _spec(schema, _Context(defs, unenforced), "", 0)
    if spec.type != "object" or spec.nullable:
        raise SchemaError("a tool's schema must be {\"type\": \"object\", \"properties\": {...}}")
    return dict(spec.fields or {})


def _spec(schema: Any, ctx: _Context, where: str, depth: int, required: bool = True) -> ParamSpec:
    at = where or "the schema"
    if depth > MAX_DEPTH:
        raise SchemaError(f"{at}: nested deeper than {MAX_DEPTH} (or a recursive $ref)")
    if schema is True or schema == {}:
        return ParamSpec("any", required)
    if not isinstance(schema, dict):
        raise SchemaError(f"{at}: a schema must be a JSON object, not {schema!r:.60}")
    schema, or_null = _optional(schema, at)
    unknown = set(schema) - _ANNOTATIONS - _ENFORCED - ctx.unenforced
    if unknown:
        raise SchemaError(f"{at}: {sorted(unknown)} not supported (Warden would not enforce it)")
    if "$ref" in schema:
        spec = _spec(_resolve(schema, ctx.defs, at), ctx, where, depth + 1)
    else:
        kind, nullable = _type(schema, at)
        fmt = _FORMATS.get(schema.get("format")) if kind == "string" else None
        items = _spec(schema["items"], ctx, f"{where}[]", depth + 1) if "items" in schema else None
        if items is not None and kind != "array":
            raise SchemaError(f"{at}: 'items' on a {kind}")
        spec = ParamSpec(kind, required, None, fmt, nullable, None, items, _fields(schema, ctx, where, depth, kind),
                         _checks(schema, kind, at))
        spec = _with_enum(spec, schema, at)
    spec = replace(spec, required=required, nullable=spec.nullable or or_null)
    if "default" in schema:
        spec = replace(spec, default=_checked(spec, schema["default"], f"{at}: default"))
    return spec


def _resolve(schema: dict[str, Any], defs: dict[str, Any], at: str) -> Any:
    ref = schema["$ref"]
    prefix = next((p for p in ("#/$defs/", "#/definitions/") if isinstance(ref, str) and ref.startswith(p)), None)
    if prefix is None or ref[len(prefix):] not in defs:
        raise SchemaError(f"{at}: $ref {ref!r:.80} is not a local #/$defs/NAME of this schema")
    if set(schema) & _ENFORCED - {"$ref"}:
        raise SchemaError(f"{at}: keywords beside $ref are not supported")
    return defs[ref[len(prefix):]]


def _optional(schema: dict[str, Any], at: str) -> tuple[dict[str, Any], bool]:
    """``anyOf``/``oneOf`` of one schema and ``{"type": "null"}``: that schema, nullable (pydantic's Optional)."""
    key = next((k for k in ("anyOf", "oneOf") if k in schema), None)
    if key is None:
        return schema, False
    options = schema[key]
    rest = [o for o in options if o != {"type": "null"}] if isinstance(options, list) else []
    if len(rest) != 1 or len(options) != 2 or not isinstance(rest[0], dict) or set(schema) & _ENFORCED - {key}:
        raise SchemaError(f"{at}: {key} is supported only as [SCHEMA, {{\"type\": \"null\"}}]")
    merged = {**rest[0], **{k: v for k, v in schema.items() if k != key}}
    if "anyOf" in merged or "oneOf" in merged:
        raise SchemaError(f"{at}: nested anyOf / oneOf is not supported")
    return merged, True


def _type(schema: dict[str, Any], at: str) -> tuple[str, bool]:
    kind = schema.get("type")
    if kind is None:  # inferred where the keywords say it; otherwise any JSON value
        return ("object" if "properties" in schema else "array" if "items" in schema else "any"), False
    kinds = [kind] if isinstance(kind, str) else kind
    if not isinstance(kinds, list) or not kinds:
        raise SchemaError(f"{at}: type must be a name or a list of names")
    rest = [k for k in kinds if k != "null"]
    if len(rest) != 1 or rest[0] not in _TYPES or len(kinds) > 2:
        raise SchemaError(f"{at}: type {kind!r} not supported (one of {list(_TYPES)}, optionally with \"null\")")
    return rest[0], len(kinds) == 2


def _fields(schema: dict[str, Any], ctx: _Context, where: str, depth: int,
            kind: str) -> dict[str, ParamSpec] | None:
    extra = schema.get("additionalProperties")  # None: not given
    props, required = schema.get("properties"), schema.get("required", [])
    if props is None and "required" not in schema and extra in (None, True, {}):
        return None  # not an object, or an object of any keys
    if kind != "object":
        raise SchemaError(f"{where or 'the schema'}: properties / required / additionalProperties on a {kind}")
    if extra not in (None, False):
        raise SchemaError(f"{where or 'the schema'}: additionalProperties other than false is not supported "
                          "(undeclared keys are refused)")
    props = {} if props is None else props
    if (not isinstance(props, dict) or not isinstance(required, list)
            or not all(isinstance(r, str) and r in props for r in required)):
        raise SchemaError(f"{where or 'the schema'}: required names a property that is not declared")
    prefix = f"{where}." if where else ""
    return {name: _spec(sub, ctx, prefix + name, depth + 1, name in required) for name, sub in props.items()}


def _checks(schema: dict[str, Any], kind: str, at: str) -> tuple[tuple[str, Any], ...]:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if not all(b is None or _number(b) for b in (lo, hi)):
        raise SchemaError(f"{at}: minimum / maximum must be numbers")
    for key, step in (("exclusiveMinimum", 1), ("exclusiveMaximum", -1)):
        bound = schema.get(key)
        if bound is None:
            continue
        if kind != "integer" or not _number(bound):
            raise SchemaError(f"{at}: {key} is supported on integers only")
        edge = math.floor(bound) + 1 if step == 1 else math.ceil(bound) - 1
        lo, hi = (edge if lo is None else max(lo, edge), hi) if step == 1 else (lo, edge if hi is None else min(hi, edge))
    checks: list[tuple[str, Any]] = []
    if lo is not None or hi is not None:
        if kind not in ("integer", "number"):
            raise SchemaError(f"{at}: minimum / maximum need a numeric type")
        checks.append(("range", (lo, hi)))
    short, long = schema.get("minLength", 0), schema.get("maxLength")
    if "minLength" in schema or long is not None:
        if kind != "string" or not all(type(n) is int and n >= 0 for n in (short, long or 0)):
            raise SchemaError(f"{at}: minLength / maxLength need a string type and non-negative integers")
        checks.append(("range", (short, long)))  # on a string: its length in code points
    return tuple(checks)


def _with_enum(spec: ParamSpec, schema: dict[str, Any], at: str) -> ParamSpec:
    if "const" in schema and "enum" in schema:
        raise SchemaError(f"{at}: both enum and const")
    values = [schema["const"]] if "const" in schema else schema.get("enum")
    if values is None:
        return spec
    if not isinstance(values, list) or not values:
        raise SchemaError(f"{at}: enum must be a non-empty list")
    enum = tuple(_checked(spec, v, f"{at}: enum value") for v in values)
    return replace(spec, enum=enum, nullable=None in enum)  # conform lets None pass before the enum check


def _checked(spec: ParamSpec, value: Any, at: str) -> Any:
    """``value`` in its canonical form under ``spec``, as the supervisor would make it."""
    try:
        return conform(spec, value, "value")
    except WardenError as exc:
        raise SchemaError(f"{at} {value!r:.60} does not fit: {exc.reason}") from None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
