"""Bounded decoding of what crosses into the trusted core, and tool argument canonicalisation.

Invariants: nothing from an agent is unpickled or trusted for its shape. A request is
msgpack ``[body, mac]`` no larger than ``MAX_REQUEST_BYTES``, whose body is a map of
known fields with known types, nested no deeper than ``MAX_DEPTH``, with string keys only.
Tool arguments are checked against the tool's declared parameters (unknown or missing
names are refused, defaults are filled in, numbers take the declared type, paths, URLs and
hosts are canonicalised, array items and object fields are checked the same way), so that
the caveats are evaluated on exactly the values the tool will receive.

Names (agent, tool) are at most ``MAX_NAME_CHARS`` characters: the supervisor counts and audits
by name, so an invented name must cost no more than a real one.

Threats: oversized or deeply nested messages meant to exhaust the supervisor; type
confusion (``True`` for ``1``, a list for a string); a check on one spelling of a path and
use of another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any

import msgpack

from ..errors import ErrorCode, MalformedRequest
from .capability import canonical_path, check_arg, host_value, url_origin

MAX_REQUEST_BYTES = 1 << 20
MAX_DEPTH = 16
MAX_ITEMS = 10_000
REQUEST_VERSION = 1

_BODY_FIELDS: dict[str, tuple[type, ...]] = {
    "v": (int,), "op": (str,), "agent": (str,), "token": (bytes,), "tool": (str,),
    "args": (dict,), "nonce": (bytes,), "ts": (float, int), "to": (str,), "batch": (list,), "handles": (list,),
}
_REQUIRED = {"call": ("v", "op", "agent", "token", "tool", "args", "nonce", "ts"),
             "delegate": ("v", "op", "agent", "token", "to", "nonce", "ts"),
             "batch": ("v", "op", "agent", "token", "batch", "nonce", "ts")}
MAX_BATCH = 256
MAX_NAME_CHARS = 128


_unpack = partial(msgpack.unpackb, raw=False, strict_map_key=True, use_list=True, max_str_len=MAX_REQUEST_BYTES,
                  max_bin_len=MAX_REQUEST_BYTES, max_array_len=MAX_ITEMS, max_map_len=MAX_ITEMS, max_ext_len=0)


_SCALARS = frozenset({str, bytes, int, float, bool, type(None)})


def check_depth(value: Any, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise MalformedRequest(f"nested deeper than {MAX_DEPTH}")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise MalformedRequest("map keys must be strings")
            if depth >= MAX_DEPTH or type(v) not in _SCALARS:  # a scalar within the limit needs no visit
                check_depth(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            if depth >= MAX_DEPTH or type(v) not in _SCALARS:
                check_depth(v, depth + 1)
    elif not isinstance(value, (str, bytes, int, float, bool)) and value is not None:
        raise MalformedRequest(f"unsupported value type {type(value).__name__}")


def decode_signed(data: Any) -> tuple[bytes, bytes, dict[str, Any]]:
    """``(body_bytes, mac, body)`` of any ``[body, mac]`` message, bounded; the body's fields unchecked."""
    if not isinstance(data, (bytes, bytearray)):
        raise MalformedRequest(f"request is {type(data).__name__}, not bytes")
    if len(data) > MAX_REQUEST_BYTES:
        raise MalformedRequest(f"request is {len(data)} bytes > {MAX_REQUEST_BYTES}", code=ErrorCode.TOO_LARGE)
    try:
        outer = _unpack(bytes(data))
        body_bytes, mac = outer
        if not isinstance(body_bytes, bytes) or not isinstance(mac, bytes):
            raise ValueError("envelope is not [bytes, bytes]")
        body = _unpack(body_bytes)
    except MalformedRequest:
        raise
    except Exception as exc:
        raise MalformedRequest(f"request does not decode: {type(exc).__name__}: {exc}"[:300]) from None
    if not isinstance(body, dict):
        raise MalformedRequest("request body is not a map")
    return bytes(body_bytes), mac, body


def decode_envelope(data: Any) -> tuple[bytes, bytes, dict[str, Any]]:
    """``(body_bytes, mac, body)`` of a request, or MalformedRequest."""
    body_bytes, mac, body = decode_signed(data)
    if body.get("op") == "call" and tuple(body) == _CALL_FIELDS and tuple(map(type, body.values())) == _CALL_TYPES:
        check_depth(body["args"], 1)  # encode_call's own shape: each field once, of its type
    else:
        _check_fields(body)
        op = body["op"]
        if not body.keys() >= _REQUIRED_KEYS[op]:
            raise MalformedRequest(f"missing fields {[f for f in _REQUIRED[op] if f not in body]}")
    if body["v"] != REQUEST_VERSION:
        raise MalformedRequest(f"unsupported request version {body['v']}")
    if max(len(body["agent"]), len(body.get("tool", "")), len(body.get("to", ""))) > MAX_NAME_CHARS:
        raise MalformedRequest(f"an agent or tool name longer than {MAX_NAME_CHARS} characters")
    return body_bytes, mac, body


_REQUIRED_KEYS = {op: frozenset(fields) for op, fields in _REQUIRED.items()}
_CALL_FIELDS = _REQUIRED["call"]  # in the order encode_call writes them
_CALL_TYPES = (int, str, str, bytes, str, dict, bytes, float)


def _check_fields(body: dict[str, Any]) -> None:
    """The body checks in order (nesting, op, each field's name and type), raising at the first fault."""
    check_depth(body)
    op = body.get("op")
    if not isinstance(op, str) or op not in _REQUIRED:
        raise MalformedRequest(f"unknown op {op!r:.40}")
    for name, value in body.items():
        types = _BODY_FIELDS.get(name)
        if types is None:
            raise MalformedRequest(f"unknown field {name!r:.40}")
        if isinstance(value, bool) or not isinstance(value, types):
            raise MalformedRequest(f"field {name!r} has type {type(value).__name__}")


# ------------------------------------------------------------------- tool parameters

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list,), "object": (dict,), "any": (str, int, float, bool, list, dict, type(None)),
}
_PLAIN = {"string": str, "integer": int, "number": float, "boolean": bool}
# url: refuse ambiguous URLs before any caveat sees them (the URL itself is passed on as written)
_FORMATS = {"path": canonical_path, "url": lambda v: url_origin(v) and v, "host": host_value}


@dataclass(frozen=True)
class ParamSpec:
    type: str = "any"  # a JSON schema type name, or "any"
    required: bool = True
    default: Any = None  # None on an optional, non-nullable parameter: left out when the call omits it
    format: str | None = None  # "path", "url" or "host": canonicalised before evaluation
    nullable: bool = False  # None is accepted as well as ``type`` (an ``X | None`` parameter)
    enum: tuple[Any, ...] | None = None  # the canonical value must be one of these (compared as ``exact``)
    items: ParamSpec | None = None  # an array's items
    fields: dict[str, ParamSpec] | None = None  # an object's keys: exactly these, checked like arguments
    checks: tuple[tuple[str, Any], ...] = ()  # (kind, param) of ``check_arg``: bounds, of a string's length

    @cached_property
    def plain(self) -> tuple[type, Any] | None:
        """(type, format function or None) when a value of that type needs nothing else, as ``conform`` does it."""
        if self.items or self.fields is not None or self.checks or self.enum is not None:
            return None
        if self.format:
            return (str, _FORMATS[self.format]) if self.type == "string" else None
        return (_PLAIN[self.type], None) if self.type in _PLAIN else None


def conform(p: ParamSpec, value: Any, where: str) -> Any:
    """``value`` in its canonical form (the one the tool receives) if it fits ``p``; else MalformedRequest."""
    kind = type(value)
    if kind is int and p.type == "number":
        value = float(value)  # a number compares and reaches the tool as a float, 2200 as 2200.0
    elif kind is float and p.type == "integer" and value.is_integer() and abs(value) <= 2 ** 53:
        value = int(value)
    elif value is None and p.nullable:
        return None
    if (kind is bool and p.type in ("integer", "number")) or not isinstance(value, _JSON_TYPES.get(p.type, ())):
        raise MalformedRequest(f"argument {where!r} must be {p.type}, got {kind.__name__}")
    value = _FORMATS[p.format](value) if p.format else value
    if p.items is not None:
        value = [conform(p.items, v, f"{where}[{i}]") for i, v in enumerate(value)]
    value = conform_fields(p.fields, value, where + ".") if p.fields is not None else value
    measure = len(value) if kind is str else value  # a string's bounds are on its length in code points
    why = p.checks and any(check_arg(check, param, measure) for check, param in p.checks)
    if why or (p.enum is not None and check_arg("one_of", p.enum, value)):  # no value quoted: it may be a handle's
        raise MalformedRequest(f"argument {where!r}: the {kind.__name__}{' length' if kind is str else ''} is outside "
                               f"{dict(p.checks) if why else list(p.enum or ())!r:.200}")
    return value


def conform_fields(params: dict[str, ParamSpec], args: dict[str, Any], where: str = "") -> dict[str, Any]:
    if not args.keys() <= params.keys():
        raise MalformedRequest(f"unknown arguments {sorted(where + k for k in set(args) - set(params))}")
    out: dict[str, Any] = {}
    for name, p in params.items():
        if name in args:
            value, plain = args[name], p.plain
            if plain is not None and type(value) is plain[0]:
                out[name] = value if plain[1] is None else plain[1](value)
            else:
                out[name] = conform(p, value, where + name)
        elif p.required:
            raise MalformedRequest(f"missing argument {where + name!r}")
        elif p.default is not None or p.nullable:
            out[name] = p.default
    return out


@dataclass(frozen=True)
class ToolSpec:
    """What the trusted core knows about a tool: never its code, only its contract."""

    name: str
    effect: str
    params: dict[str, ParamSpec] = field(default_factory=dict)
    cost: float = 1.0
    description: str = ""
    sandboxed: bool = False  # runs code or touches the agent's workspace: needs a sandbox session
    output: Any = None  # the label ``@tool`` declares for its results (a policy's ``OutputRule`` fields)

    def canonical_args(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            return conform_fields(self.params, args)
        except MalformedRequest as exc:
            raise MalformedRequest(exc.reason, code=exc.code, tool=self.name) from None


def batch_items(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The ``(tool, args)`` items of a batch request; each is then checked like a single call."""
    items = body["batch"]
    if not 1 <= len(items) <= MAX_BATCH:
        raise MalformedRequest(f"a batch holds 1 to {MAX_BATCH} calls, not {len(items)}", code=ErrorCode.TOO_LARGE)
    out = []
    for i, item in enumerate(items):
        if (not isinstance(item, dict) or set(item) != {"tool", "args"} or not isinstance(item["tool"], str)
                or not isinstance(item["args"], dict) or len(item["tool"]) > MAX_NAME_CHARS):
            raise MalformedRequest(f"batch item {i} is not {{tool: str, args: map}}")
        out.append((item["tool"], item["args"]))
    return out
