"""Capability tokens: macaroon-style, HMAC-chained, msgpack-encoded.

Wire form (msgpack array)::

    [version, key_id, token_id, [caveat_bytes, ...], tag]
    tag_0 = HMAC(root_key[key_id], msgpack([version, key_id, token_id]))
    tag_i = HMAC(tag_{i-1}, caveat_bytes_i)

Invariants kept here:

* Attenuation only narrows. Every caveat is an independent predicate that must hold; no
  caveat can widen another, and an unknown caveat type makes the token invalid (deny).
  Anyone holding a token can append caveats offline (``Token.attenuate``); nobody can
  remove one, because the tag chain would no longer verify.
* Only ``KeyRing.verify`` turns bytes into a ``VerifiedToken``. Everything that decides
  a call takes a ``VerifiedToken``; an unchecked ``Token`` cannot be evaluated.
* Holder binding. A ``Holder`` caveat names the agent allowed to present the token and is
  sealed with a second key that only the key ring holds, over the previous tag: a holder
  caveat can be neither forged, edited, nor moved onto another token. The last holder
  caveat names the current holder; each one after the first is one delegation step.

Threats: a model (or anything that read a prompt or a log) copying, editing, truncating,
re-targeting or forging a token; prefix tricks on paths (``/data/../etc``, ``/database``
vs ``/data``) and hosts (``good.com@evil.com``) in arguments; a pattern or value chosen
to make a check slow (regexes run on RE2, linear in the input, with bounded sizes).
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import posixpath
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import accumulate
from typing import Any, Iterable, NamedTuple, Union
from urllib.parse import urlsplit

import msgpack
import re2

from ..errors import ErrorCode, PolicyDenied, TokenRejected

VERSION = 1
MAX_TOKEN_BYTES = 16 * 1024
MAX_CAVEATS = 64
EFFECTS = ("read", "write", "delete", "execute")


def hmac_sha256_py(key: bytes, msg: bytes) -> bytes:
    """HMAC-SHA256, in one call of OpenSSL's (``hmac.new`` wraps it in Python)."""
    return hmac.digest(key, msg, "sha256")


def hmac_chain_py(tag: bytes, blobs: tuple[bytes, ...]) -> list[bytes]:
    """The tag after each blob of a chain that starts at ``tag``: ``tag_i = HMAC(tag_{i-1}, blob_i)``."""
    return list(accumulate(blobs, hmac_sha256_py, initial=tag))[1:]


try:  # the same two in C (native/hmac.c, built with the package), a few times faster; the two above are the reference
    from .._hmac import hmac_chain, hmac_sha256
except ImportError:  # not built: no compiler or OpenSSL headers where the package was installed
    hmac_sha256, hmac_chain = hmac_sha256_py, hmac_chain_py


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# --------------------------------------------------------------------------- arguments


def canonical_path(value: Any) -> str:
    """Absolute, lexically normalised POSIX path; anything else is refused."""
    if not isinstance(value, str) or not value or "\x00" in value or len(value) > 4096:
        raise PolicyDenied(f"not a usable path: {value!r:.80}")
    return _normalised_path(value)


@lru_cache(maxsize=1024)  # paths repeat
def _normalised_path(value: str) -> str:
    if not value.startswith("/"):
        raise PolicyDenied(f"path must be absolute: {value!r:.80}")
    # normpath keeps a leading '//' (POSIX allows it to mean something else): fold it.
    return posixpath.normpath("/" + value.lstrip("/"))


def path_is_under(path: str, root: str) -> bool:
    root = canonical_path(root)
    path = canonical_path(path)
    return root == "/" or path == root or path.startswith(root + "/")


_HOST = re.compile(r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")  # labels
_NUMBER = re.compile(r"[0-9]+|0x[0-9a-f]*")  # a last label that makes a resolver read IPv4 ('127.1'): must be one
DEFAULT_PORTS = {"http": 80, "https": 443}
_URL_BAD = re.compile(r"[\x00-\x20\x7f-\U0010ffff\\]")
# The common shape, read without urlsplit: http(s)://, a lower-case host of name characters only (no userinfo,
# port or brackets), then nothing or one of '/?#' and a rest _URL_BAD accepts: the host urlsplit would find.
# Each run is matched as (?=(X))\N, which cannot backtrack into X: a long hostile URL costs one pass.
_PLAIN_URL = re.compile(r"(https?)://(?=([a-z0-9_.-]+))\2(?:[/?#](?=([^\x00-\x20\x7f-\U0010ffff\\]*))\3)?")


def url_origin(value: Any) -> tuple[str, str, int]:
    """(scheme, canonical host, port) of an http(s) URL, the port defaulted by scheme; refuses anything ambiguous."""
    if not isinstance(value, str) or len(value) > 4096:
        raise PolicyDenied(f"not a usable URL: {value!r:.80}")
    plain = _PLAIN_URL.fullmatch(value)
    if plain is not None:
        scheme, host, port = plain.group(1), plain.group(2), None
    elif _URL_BAD.search(value):
        raise PolicyDenied(f"not a usable URL: {value!r:.80}")
    else:
        try:  # ValueError on e.g. a malformed '[...]' host, and from .port on a malformed port
            parts = urlsplit(value)
            scheme, host, port = parts.scheme, parts.hostname or "", parts.port
        except ValueError as exc:
            raise PolicyDenied(f"malformed URL: {exc}") from None
        if scheme not in DEFAULT_PORTS:
            raise PolicyDenied(f"URL scheme {scheme!r} not allowed")
    return scheme, canonical_host(host), DEFAULT_PORTS[scheme] if port is None else port


@lru_cache(maxsize=1024)  # an IP address costs microseconds to parse; hosts repeat
def canonical_host(host: str) -> str:
    """A DNS name of non-empty labels (one trailing dot dropped) or an IP address as ipaddress writes it."""
    host = host[:-1] if host.endswith(".") else host
    if _HOST.fullmatch(host) and not _NUMBER.fullmatch(host.rpartition(".")[2]):
        return host
    try:  # ipaddress accepts 'fe80::1%eth0', but a scope names an interface, not a host: refused
        return str(ipaddress.ip_address(host if "%" not in host else ""))
    except ValueError:
        raise PolicyDenied(f"URL host {host!r:.80} is not a plain DNS name or IP address") from None


def host_value(value: Any) -> str:
    """A bare host ('www.example.com': no scheme, port or path), lower-cased and then as ``canonical_host``."""
    if not isinstance(value, str) or not value.isascii() or len(value) > 255:
        raise PolicyDenied(f"not a usable host: {value!r:.80}")
    return canonical_host(value.lower())


# A url_host entry: 'host' or '*.name' (any scheme and port), or 'http(s)://host-or-*.name[:port]' (port: default)
_ORIGIN = re.compile(r"(https?)://(\*\.)?(\[[0-9a-f.]*:[0-9a-f:.]*\]|[^:/\[\]]*)(?::([0-9]{1,5}))?/?")


@lru_cache(maxsize=1024)
def host_pattern(pattern: str) -> tuple[str | None, bool, str, int | None]:
    """(scheme or None, wildcard?, canonical host, port or None) of a url_host entry; ValueError if malformed."""
    m = _ORIGIN.fullmatch(pattern.lower())
    if "://" in pattern and not m:
        raise ValueError(f"url_host entry {pattern!r:.80} is not host, *.name or http(s)://host[:port]")
    scheme, wild, host = (m[1], bool(m[2]), m[3].strip("[]")) if m else (None, pattern[:2] == "*.", pattern.lower())
    try:
        host = canonical_host(host[2:] if wild and not m else host)
    except PolicyDenied as exc:
        raise ValueError(f"url_host entry {pattern!r:.80}: {exc.reason}") from None
    port = (int(m[4]) if m[4] else DEFAULT_PORTS[scheme]) if m else None
    if (wild and (":" in host or _NUMBER.fullmatch(host.rpartition(".")[2]))) or (port or 0) > 65535:
        raise ValueError(f"url_host entry {pattern!r:.80}: a wildcard over an IP address, or a port > 65535")
    return scheme, wild, host, port


def url_allowed(origin: tuple[str, str, int], allowed: Iterable[str]) -> bool:
    """Whether an entry of ``allowed`` matches ``url_origin``'s answer; '*.name' matches names below 'name'."""
    scheme, host, port = origin
    for p_scheme, wild, p_host, p_port in map(host_pattern, allowed):
        if p_scheme in (None, scheme) and p_port in (None, port) and (
                host.endswith("." + p_host) and ".." not in "." + host if wild else host == p_host):
            return True
    return False


def value_bytes(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    return len(_pack(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


MAX_REGEX_CHARS = 512
MAX_REGEX_PROGRAM = 1000  # RE2 instructions: a check costs at most (program size x input bytes) steps
MAX_REGEX_INPUT_BYTES = 64 * 1024
MAX_REGEX_WORK = 4 << 20  # program size x input bytes of one check: linear is not free either
MAX_REGEX_CAVEATS = 8  # per token: any holder may append regex caveats, and each costs a pass
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.dot_nl = True  # '.' matches a newline too: a newline is no way out of a pattern
_RE2_OPTIONS.never_capture = True
_RE2_OPTIONS.log_errors = False
_RE2_OPTIONS.max_mem = 1 << 20  # per compiled pattern; past it RE2 falls back to its (still linear) NFA


@lru_cache(maxsize=256)
def _regex(pattern: str) -> Any:
    """Compile a constraint pattern with RE2, which matches in time linear in the input.

    Any holder can append a regex caveat offline, so a pattern is attacker-chosen input to the
    supervisor: its length and compiled size are bounded. ValueError if it is refused.
    """
    if not isinstance(pattern, str) or len(pattern) > MAX_REGEX_CHARS:
        raise ValueError(f"a regex is a string of at most {MAX_REGEX_CHARS} characters")
    try:
        compiled = re2.compile(pattern.encode("utf-8"), _RE2_OPTIONS)
    except Exception as exc:  # re2.error (its message in bytes), or a pattern with lone surrogates
        why = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        raise ValueError(f"regex {pattern!r:.80} is not valid RE2 syntax: {why}") from None
    if compiled.programsize > MAX_REGEX_PROGRAM:
        raise ValueError(f"regex {pattern!r:.80} compiles to {compiled.programsize} RE2 instructions "
                         f"> {MAX_REGEX_PROGRAM}")
    return compiled


def _regex_reason(pattern: str, value: Any) -> str | None:
    """None if ``value`` is a string the pattern matches in full; PolicyDenied if it cannot be judged."""
    data = value.encode("utf-8") if isinstance(value, str) else None  # lone surrogates: ValueError
    if data is None or len(data) > MAX_REGEX_INPUT_BYTES:
        raise PolicyDenied(f"not a string of at most {MAX_REGEX_INPUT_BYTES} UTF-8 bytes: {value!r:.80}")
    compiled = _regex(pattern)
    if compiled.programsize * len(data) > MAX_REGEX_WORK:
        raise PolicyDenied(f"regex work {compiled.programsize} x {len(data)} bytes > {MAX_REGEX_WORK}")
    return None if compiled.fullmatch(data) else f"{value!r:.80} does not match {pattern!r}"


def _same(a: Any, b: Any) -> bool:
    """Equality that does not let True stand for 1, also inside lists and maps; numbers by value (2 == 2.0)."""
    if type(a) is not type(b):
        return _is_number(a) and _is_number(b) and a == b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


ARG_CHECKS = ("exact", "one_of", "range", "regex", "path_under", "url_host", "max_bytes", "each", "items")


def check_arg(kind: str, param: Any, value: Any) -> str | None:
    """None if ``value`` satisfies the check, else the reason it does not.

    A value the check cannot judge (NaN or a non-number for a range, a non-string for a regex,
    path or URL, a path not in canonical form, a type none of the ``exact``/``one_of`` values
    has) raises instead: a denial for a caveat, a match for an approval rule."""
    if kind in ("exact", "one_of"):
        options = (param,) if kind == "exact" else param
        if type(value) is str and value in options:  # a string equals only a string: a match, as below
            return None
        if not any(type(value) is type(p) or _is_number(value) and _is_number(p) for p in options):  # no judgement
            raise PolicyDenied(f"{type(value).__name__} {value!r:.80} is not comparable with {param!r:.200}")
        return None if any(_same(value, p) for p in options) else f"{value!r:.80} is not {param!r:.200}"
    if kind == "range":
        lo, hi = param
        if not _is_number(value) or value != value:  # NaN compares false with every bound
            raise PolicyDenied(f"{value!r:.80} is not a number")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return f"{value!r} outside [{lo}, {hi}]"
        return None
    if kind == "regex":
        return _regex_reason(param, value)
    if kind == "path_under":
        if canonical_path(value) != value:  # the tool would get another spelling than the one checked
            raise PolicyDenied(f"path {value!r:.80} is not in canonical form (a parameter without PATH?)")
        return None if path_is_under(value, param) else f"{value!r} not under {param!r}"
    if kind == "url_host":  # a URL, or a host in the form a HOST parameter holds it (no entry with a scheme matches)
        bare = isinstance(value, str) and "://" not in value and host_value(value) == value
        scheme, host, port = origin = (None, value, None) if bare else url_origin(value)
        return None if url_allowed(origin, param) else f"host {host!r} ({scheme}, port {port}) not in {list(param)!r}"
    if kind == "max_bytes":
        n = value_bytes(value)
        return None if n <= param else f"{n} bytes > max {param}"
    if kind in ("each", "items") and not isinstance(value, (list, tuple)):
        raise PolicyDenied(f"{value!r:.80} is not a list")
    if kind == "each":  # [inner check, its param]: every item must pass it
        return next((f"item {i}: {why}" for i, v in enumerate(value) if (why := check_arg(*param, v))), None)
    if kind == "items":
        return check_arg("range", param, len(value)) and f"{len(value)} items outside [{param[0]}, {param[1]}]"
    return f"unknown check {kind!r}"


# ----------------------------------------------------------------------------- caveats


@dataclass(frozen=True, slots=True)
class Tools:
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Effects:
    effects: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Arg:
    """Constraint on one argument. ``tool='*'`` applies to every tool that has the argument."""

    tool: str
    arg: str
    check: str
    param: Any


@dataclass(frozen=True, slots=True)
class Expires:
    at: float


@dataclass(frozen=True, slots=True)
class NotBefore:
    at: float


@dataclass(frozen=True, slots=True)
class CallBudget:
    calls: int


@dataclass(frozen=True, slots=True)
class CostBudget:
    cost: float


@dataclass(frozen=True, slots=True)
class MaxDepth:
    """At most ``depth`` further delegations after the point where this caveat stands."""

    depth: int


@dataclass(frozen=True, slots=True)
class Audience:
    job: str


@dataclass(frozen=True, slots=True)
class Holder:
    agent: str
    seal: bytes = b""


@dataclass(frozen=True, slots=True)
class Flow:
    """A sink rule on ``tool`` ('*': any) with an effect in ``effects`` (none: any): ``need`` is an integrity for the
    context (``arg`` ''), one argument or all ('*'), or 'readers' of all the data for argument ``arg`` ('': anyone)."""

    tool: str
    effects: tuple[str, ...]
    arg: str
    need: str
    mode: str = "deny"


Caveat = Union[Tools, Effects, Arg, Expires, NotBefore, CallBudget, CostBudget, MaxDepth, Audience, Holder, Flow]


def _str_tuple(v: Any, what: str) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"{what} must be a list of strings")
    return tuple(v)


def encode_caveat(c: Caveat) -> bytes:
    if isinstance(c, Tools):
        return _pack(["tools", list(c.names)])
    if isinstance(c, Effects):
        return _pack(["effects", list(c.effects)])
    if isinstance(c, Arg):
        param = list(c.param) if isinstance(c.param, tuple) else c.param
        return _pack(["arg", c.tool, c.arg, c.check, param])
    if isinstance(c, Expires):
        return _pack(["exp", float(c.at)])
    if isinstance(c, NotBefore):
        return _pack(["nbf", float(c.at)])
    if isinstance(c, CallBudget):
        return _pack(["calls", int(c.calls)])
    if isinstance(c, CostBudget):
        return _pack(["cost", float(c.cost)])
    if isinstance(c, MaxDepth):
        return _pack(["depth", int(c.depth)])
    if isinstance(c, Audience):
        return _pack(["aud", c.job])
    if isinstance(c, Holder):
        return _pack(["holder", c.agent, c.seal])
    if isinstance(c, Flow):
        return _pack(["flow", c.tool, list(c.effects), c.arg, c.need, c.mode])
    raise TypeError(f"not a caveat: {c!r}")


def decode_caveat(blob: bytes) -> Caveat:
    """Strict parse of one caveat; anything unexpected raises ValueError (deny)."""
    v = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    if not isinstance(v, list) or not v or not isinstance(v[0], str):
        raise ValueError("caveat is not [type, ...]")
    kind, args = v[0], v[1:]
    parse = _CAVEAT_PARSERS.get(kind)
    c = parse(args) if parse is not None else None
    if c is None:
        raise ValueError(f"unknown or malformed caveat type {kind!r}")
    return c


def _parse_effects(args: list[Any]) -> Effects | None:
    if len(args) != 1:
        return None
    effects = _str_tuple(args[0], "effects")
    if not set(effects) <= set(EFFECTS):
        raise ValueError(f"unknown effect in {effects}")
    return Effects(effects)


def _parse_arg(args: list[Any]) -> Arg | None:
    if len(args) != 4:
        return None
    tool, arg, check, param = args
    if not (isinstance(tool, str) and isinstance(arg, str) and check in ARG_CHECKS):
        raise ValueError("malformed arg caveat")
    return Arg(tool, arg, check, _checked_param(check, param))


def _parse_flow(args: list[Any]) -> Flow | None:
    if len(args) != 5 or not all(isinstance(a, str) for a in (args[0], *args[2:])):
        return None
    if args[3] not in ("trusted", "endorsed", "readers") or args[4] not in ("deny", "approve"):
        raise ValueError("malformed flow caveat")
    return Flow(args[0], _parse_effects([args[1]]).effects, *args[2:])  # type: ignore[union-attr]


# Each parser gets the caveat's fields after its type name, and returns the caveat, None when
# the fields do not fit the type ("unknown or malformed"), or raises ValueError saying why.
_CAVEAT_PARSERS: dict[str, Any] = {
    "tools": lambda a: Tools(_str_tuple(a[0], "tools")) if len(a) == 1 else None,
    "effects": _parse_effects,
    "arg": _parse_arg,
    "exp": lambda a: Expires(float(a[0])) if len(a) == 1 and _finite(a[0]) else None,
    "nbf": lambda a: NotBefore(float(a[0])) if len(a) == 1 and _finite(a[0]) else None,
    "cost": lambda a: CostBudget(float(a[0])) if len(a) == 1 and _finite(a[0]) and a[0] >= 0 else None,
    "calls": lambda a: CallBudget(a[0]) if len(a) == 1 and type(a[0]) is int and a[0] >= 0 else None,
    "depth": lambda a: MaxDepth(a[0]) if len(a) == 1 and type(a[0]) is int and a[0] >= 0 else None,
    "aud": lambda a: Audience(a[0]) if len(a) == 1 and isinstance(a[0], str) else None,
    "holder": lambda a: Holder(a[0], a[1]) if len(a) == 2 and isinstance(a[0], str) and isinstance(a[1], bytes)
    else None,
    "flow": _parse_flow,
}


def _checked_param(check: str, param: Any) -> Any:
    if check == "each":  # one level: an 'each' inside 'each' is refused like any malformed caveat
        if not (isinstance(param, list) and len(param) == 2 and param[0] in ARG_CHECKS[:-2]):
            raise ValueError("each needs [check, param], the check not each/items")
        return param[0], _checked_param(*param)
    if check in ("one_of", "url_host"):
        if not isinstance(param, list):
            raise ValueError(f"{check} needs a list")
        if check == "url_host" and not all(isinstance(p, str) and host_pattern(p) for p in param):
            raise ValueError("url_host needs a list of strings")
        return tuple(param)
    if check in ("range", "items"):  # items: bounds on the number of items
        ok = isinstance(param, list) and len(param) == 2
        if not ok or not all(p is None or (_is_number(p) and p == p) for p in param):  # a NaN bound holds for all
            raise ValueError(f"{check} needs [min|null, max|null], numbers and not NaN")
        return tuple(param)
    if check in ("regex", "path_under") and not isinstance(param, str):
        raise ValueError(f"{check} needs a string")
    if check == "regex":
        _regex(param)
    if check == "max_bytes" and not (type(param) is int and param >= 0):
        raise ValueError("max_bytes needs a non-negative integer")
    return param


# ------------------------------------------------------------------------------ tokens


@dataclass(frozen=True, slots=True)
class Token:
    """An unverified token: can be encoded, decoded and attenuated, never evaluated."""

    kid: str
    token_id: bytes
    caveats: tuple[bytes, ...]
    tag: bytes
    version: int = VERSION

    def attenuate(self, *caveats: Caveat) -> "Token":
        """A new token with extra caveats appended. Offline; cannot widen."""
        tag, blobs = self.tag, list(self.caveats)
        for c in caveats:
            if isinstance(c, Holder):
                raise TypeError("holder caveats are added by the supervisor (delegate), not by attenuation")
            blob = encode_caveat(c)
            tag = hmac_sha256(tag, blob)
            blobs.append(blob)
        return Token(self.kid, self.token_id, tuple(blobs), tag, self.version)

    def encode(self) -> bytes:
        return _pack([self.version, self.kid, self.token_id, list(self.caveats), self.tag])

    @staticmethod
    def decode(data: Any) -> "Token":
        if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_TOKEN_BYTES:
            raise TokenRejected("token is not bytes or is larger than 16 KiB")
        try:
            v = msgpack.unpackb(bytes(data), raw=False)
            version, kid, token_id, caveats, tag = v
        except Exception as exc:  # any decode failure is a bad token, never a crash
            raise TokenRejected(f"token does not decode: {type(exc).__name__}") from None
        if version != VERSION:
            raise TokenRejected(f"unsupported token version {version!r}")
        if not (isinstance(kid, str) and isinstance(token_id, bytes) and isinstance(tag, bytes)):
            raise TokenRejected("token header has wrong types")
        if not isinstance(caveats, list) or len(caveats) > MAX_CAVEATS:
            raise TokenRejected("token caveat list malformed or too long")
        if not all(isinstance(c, bytes) for c in caveats):
            raise TokenRejected("token caveats must be bytes")
        return Token(kid, token_id, tuple(caveats), tag, version)


class EvaluationPlan(NamedTuple):
    """A chain's caveats folded into one lookup per kind of check, built when the chain is verified.

    Expiry and not-before become the tightest bound, tool and effect allow-lists their
    intersection, audiences a set, and argument constraints are grouped by tool, so a call
    costs one check per constraint on its own tool. ``check`` passes exactly when every caveat
    holds (the unit tests hold it to a caveat-by-caveat walk). Attenuation only ever adds to a
    plan (``extended``).
    """

    not_before: float = -math.inf
    not_after: float = math.inf
    tools: frozenset[str] | None = None  # None: no Tools caveat on the chain
    effects: frozenset[str] | None = None
    audiences: frozenset[str] = frozenset()
    arg_caveats: tuple[Arg, ...] = ()  # every Arg caveat, in chain order
    args_by_tool: dict[str, tuple[Arg, ...]] | None = None  # a tool's own constraints and the '*' ones
    any_tool_args: tuple[Arg, ...] = ()  # the '*' constraints alone: for tools with none of their own
    flows: tuple[Flow, ...] = ()  # sink rules, judged by the supervisor with the call's labels

    def extended(self, caveats: Iterable[Caveat]) -> "EvaluationPlan":
        """The plan of this chain with ``caveats`` appended."""
        not_before, not_after = self.not_before, self.not_after
        tools, effects, audiences = self.tools, self.effects, self.audiences
        new_args: list[Arg] = []
        new_flows: list[Flow] = []
        for c in caveats:
            kind = type(c)  # exact: an object of any other type (a subclass too) is refused, never skipped
            if kind is Arg:
                new_args.append(c)
            elif kind is Expires:
                if c.at < not_after:
                    not_after = c.at
            elif kind is NotBefore:
                if c.at > not_before:
                    not_before = c.at
            elif kind is Tools:
                tools = frozenset(c.names) if tools is None else tools.intersection(c.names)
            elif kind is Effects:
                effects = frozenset(c.effects) if effects is None else effects.intersection(c.effects)
            elif kind is Audience:
                audiences = audiences.union((c.job,))
            elif kind is Flow:
                new_flows.append(c)
            elif kind not in _CHECKED_ELSEWHERE:
                raise TypeError(f"not a caveat: {c!r:.80}")
        flows = self.flows + tuple(new_flows) if new_flows else self.flows
        if not new_args:
            return EvaluationPlan(not_before, not_after, tools, effects, audiences, self.arg_caveats,
                                  self.args_by_tool, self.any_tool_args, flows)
        arg_caveats = self.arg_caveats + tuple(new_args)
        any_tool = tuple(c for c in arg_caveats if c.tool == "*")
        by_tool: dict[str, tuple[Arg, ...]] = {}
        for c in arg_caveats:
            if c.tool != "*":
                by_tool[c.tool] = by_tool.get(c.tool, any_tool) + (c,)
        return EvaluationPlan(not_before, not_after, tools, effects, audiences, arg_caveats, by_tool, any_tool, flows)

    def check(self, tool: str, effect: str, args: dict[str, Any], job: str) -> None:
        """Raise the typed error of a caveat that does not hold (time and holder are checked before)."""
        if self.audiences and (len(self.audiences) != 1 or job not in self.audiences):
            raise TokenRejected(f"audience {sorted(self.audiences)}, job is {job!r}",
                                code=ErrorCode.WRONG_AUDIENCE, tool=tool)
        if self.tools is not None and tool not in self.tools:
            raise PolicyDenied(f"tool {tool!r} not in {sorted(self.tools)}", tool=tool)
        if self.effects is not None and effect not in self.effects:
            raise PolicyDenied(f"effect {effect!r} not in {sorted(self.effects)}", tool=tool)
        by_tool = self.args_by_tool
        for c in by_tool.get(tool, self.any_tool_args) if by_tool else self.any_tool_args:
            if c.arg not in args:
                if c.tool == "*":
                    continue
                raise PolicyDenied(f"argument {c.arg!r} required by a {c.check} constraint", tool=tool)
            try:
                why = check_arg(c.check, c.param, args[c.arg])
            except Exception as exc:  # a value the check cannot judge is denied
                why = getattr(exc, "reason", None) or f"cannot be checked ({type(exc).__name__})"
            if why is not None:
                raise PolicyDenied(f"argument {c.arg!r}: {why}", tool=tool)


_CHECKED_ELSEWHERE = (Holder, MaxDepth, CallBudget, CostBudget)  # by KeyRing.verify and the quota ledger
_EMPTY_PLAN = EvaluationPlan()


@dataclass(frozen=True)
class VerifiedToken:
    """A token whose chain and holder seals checked out. Only ``KeyRing.verify`` makes one."""

    token: Token
    caveats: tuple[Caveat, ...]
    tags: tuple[bytes, ...]  # tags[i] is the tag after caveat i
    holder: str
    depth: int
    max_depth: int | None  # absolute, or None when unbounded
    budgets: tuple[tuple[bytes, str, float], ...] = field(default=())  # (ledger key, kind, limit)
    plan: EvaluationPlan = field(default=_EMPTY_PLAN, repr=False, compare=False)
    _chain_ids: tuple[bytes, ...] = field(default=(), init=False, repr=False, compare=False)
    # The tag at each holder caveat: one id per agent run on the chain (the root agent's first,
    # this holder's last). Local attenuation adds no holder, so it cannot start a fresh run.
    runs: tuple[bytes, ...] = field(default=(), init=False, repr=False, compare=False)
    holders: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)  # the agent of each run

    def __post_init__(self) -> None:
        if self.plan is _EMPTY_PLAN and self.caveats:
            object.__setattr__(self, "plan", _EMPTY_PLAN.extended(self.caveats))
        object.__setattr__(self, "_chain_ids", (self.token.token_id, *self.tags))
        object.__setattr__(self, "runs", tuple(t for c, t in zip(self.caveats, self.tags) if isinstance(c, Holder)))
        object.__setattr__(self, "holders", tuple(c.agent for c in self.caveats if isinstance(c, Holder)))

    @property
    def token_id(self) -> bytes:
        return self.token.token_id

    @property
    def root_holder(self) -> str:
        """The agent the root token was minted for: the owner of every budget on the chain."""
        return self.holders[0]

    def chain_ids(self) -> tuple[bytes, ...]:
        """Everything that can be revoked to kill this token: its id and every tag on its chain."""
        return self._chain_ids

    def check_time(self, now: float) -> None:
        if not now <= self.plan.not_after:  # written so that a NaN clock reads as expired
            raise TokenRejected(f"expired at {self.plan.not_after:.3f}, now {now:.3f}", code=ErrorCode.TOKEN_EXPIRED)
        if now < self.plan.not_before:
            raise TokenRejected(f"not before {self.plan.not_before:.3f}, now {now:.3f}",
                                code=ErrorCode.TOKEN_NOT_YET_VALID)

    def evaluate_call(self, agent: str, tool: str, effect: str, args: dict[str, Any], now: float,
                      job: str) -> None:
        """Raise unless every caveat holds for this (canonicalised) call. Budgets are the quota ledger's job."""
        if agent != self.holder:
            raise TokenRejected(f"holder is {self.holder!r}, presented by {agent!r}",
                                code=ErrorCode.WRONG_HOLDER, tool=tool)
        self.check_time(now)
        self.plan.check(tool, effect, args, job)


class KeyRing:
    """Holds the root keys (by key id) and the holder-seal key. Lives only in the TCB.

    Two caches keep verification cheap, neither of which can make a chain verify that would
    not: verified tokens by their exact bytes, and, per (key id, token id), the last few
    verified tokens, so that a token extending one of them (an attenuated or delegated token)
    has only its new caveats checked, starting from the verified tag they extend. Both hold
    only tokens whose every tag and seal was checked, and both are cleared when a key is retired.
    A third keeps the caveats of verified chains decoded, by their bytes (what a caveat means is
    its bytes alone): a new token's tags and seals are all checked, its familiar caveats not re-parsed.
    """

    PREFIXES_PER_TOKEN_ID = 8
    DECODED_CAVEATS, DECODED_CAVEAT_BYTES = 1024, 1024  # caveats of verified chains kept decoded, by their bytes

    def __init__(self, root_keys: dict[str, bytes], current_kid: str, holder_key: bytes,
                 *, cache_size: int = 4096) -> None:
        if current_kid not in root_keys or not (isinstance(holder_key, bytes) and len(holder_key) >= 32):
            raise ValueError("the current key id must be in the ring, and the holder key at least 32 bytes")
        if type(cache_size) is not int or cache_size < 0:
            raise ValueError("cache_size is a count of tokens, 0 for none")
        self._root: dict[str, bytes] = {}
        for kid, key in root_keys.items():
            self.add_key(kid, key, current=False)
        self.current_kid = current_kid
        self._holder_key = holder_key
        self._cache: OrderedDict[bytes, VerifiedToken] = OrderedDict()
        self._prefixes: OrderedDict[tuple[str, bytes], list[VerifiedToken]] = OrderedDict()
        self._decoded: dict[bytes, Caveat] = {}  # a caveat's meaning is its bytes alone: decoded once
        self._cache_size = cache_size
        # The prefix index holds at most cache_size tokens too, in families of a few.
        self._family_size = max(1, min(self.PREFIXES_PER_TOKEN_ID, cache_size))
        self._families = max(1, cache_size // self._family_size)

    @classmethod
    def generate(cls) -> "KeyRing":
        kid = secrets.token_hex(4)
        return cls({kid: secrets.token_bytes(32)}, kid, secrets.token_bytes(32))

    def to_secret_dict(self) -> dict[str, Any]:
        """Key material for handing to another trusted process (the supervisor actor)."""
        return {"root": dict(self._root), "kid": self.current_kid, "holder": self._holder_key}

    @classmethod
    def from_secret_dict(cls, d: dict[str, Any]) -> "KeyRing":
        return cls(d["root"], d["kid"], d["holder"])

    def rotate(self) -> str:
        """Add a new current key; tokens under old keys still verify until the key is retired."""
        kid = secrets.token_hex(4)
        self._root[kid] = secrets.token_bytes(32)
        self.current_kid = kid
        return kid

    def add_key(self, kid: str, key: bytes, *, current: bool = True) -> None:
        """Install a key made elsewhere (rotation on a peer supervisor), by default as the current one."""
        if not (isinstance(kid, str) and kid and isinstance(key, bytes) and len(key) >= 32):
            raise ValueError("a key id and a key of at least 32 bytes")
        if self._root.get(kid, key) != key:
            raise ValueError(f"key id {kid!r} already names another key")
        self._root[kid] = key
        if current:
            self.current_kid = kid

    @property
    def kids(self) -> list[str]:
        return sorted(self._root)

    def retire(self, kid: str) -> None:
        if kid == self.current_kid:
            raise ValueError("cannot retire the current key")
        self._root.pop(kid, None)
        self._cache.clear()
        self._prefixes.clear()

    def _seal(self, prev_tag: bytes, agent: str) -> bytes:
        return hmac_sha256(self._holder_key, b"warden-holder\x00" + prev_tag + agent.encode())

    @staticmethod
    def _first_tag(key: bytes, version: int, kid: str, token_id: bytes) -> bytes:
        return hmac_sha256(key, _pack([version, kid, token_id]))

    def mint(self, *, holder: str, caveats: Iterable[Caveat] = ()) -> Token:
        """A root token for ``holder`` with ``caveats``."""
        kid, token_id = self.current_kid, secrets.token_bytes(16)
        token = Token(kid, token_id, (), self._first_tag(self._root[kid], VERSION, kid, token_id))
        return self.bind(token, holder).attenuate(*caveats)

    def bind(self, token: Token, agent: str) -> Token:
        """Append a sealed holder caveat: the token now belongs to ``agent``."""
        blob = encode_caveat(Holder(agent, self._seal(token.tag, agent)))
        return Token(token.kid, token.token_id, token.caveats + (blob,), hmac_sha256(token.tag, blob), token.version)

    def verify(self, token: Token | bytes) -> VerifiedToken:
        """Check the tag chain, every holder seal and the delegation depth. Raises TokenRejected."""
        if isinstance(token, Token):
            token = token.encode()
        if not isinstance(token, (bytes, bytearray)):
            raise TokenRejected(f"token is {type(token).__name__}, not bytes")
        raw = bytes(token)
        cached = self._cache.get(raw)
        if cached is not None:
            return cached
        tok = Token.decode(raw)
        key = self._root.get(tok.kid)
        if key is None:
            raise TokenRejected(f"unknown key id {tok.kid!r}")
        vt = self._verify_chain(tok, key, self._verified_prefix(tok))
        self._remember(raw, vt)
        return vt

    def _verify_chain(self, tok: Token, key: bytes, prefix: VerifiedToken | None) -> VerifiedToken:
        """Verify ``tok``'s chain, from its header or from ``prefix``, a verified token its caveats extend."""
        if prefix is None:
            tag = self._first_tag(key, tok.version, tok.kid, tok.token_id)
            caveats: list[Caveat] = []
            tags: list[bytes] = []
            holder, depth, max_depth = None, -1, None
            budgets: list[tuple[bytes, str, float]] = []
            plan = _EMPTY_PLAN
        else:
            tag = prefix.tags[-1]
            caveats, tags = list(prefix.caveats), list(prefix.tags)
            holder, depth, max_depth = prefix.holder, prefix.depth, prefix.max_depth
            budgets = list(prefix.budgets)
            plan = prefix.plan
        start, decoded, fresh = len(caveats), self._decoded, []
        blobs = tok.caveats[start:]
        for blob, next_tag in zip(blobs, hmac_chain(tag, blobs)):  # the chain is judged at its end, seals on the way
            c = decoded.get(blob)
            if c is None:
                try:
                    c = decode_caveat(blob)
                except Exception as exc:
                    raise TokenRejected(f"caveat {len(caveats)}: {exc}") from None
                if type(c) is not Holder and len(blob) <= self.DECODED_CAVEAT_BYTES:  # a seal is one token's
                    fresh.append((blob, c))
            kind = type(c)  # exactly one of the caveat classes: decode_caveat makes no other
            if kind is Holder:
                if not hmac.compare_digest(c.seal, self._seal(tag, c.agent)):
                    raise TokenRejected(f"holder caveat {len(caveats)} has a bad seal", code=ErrorCode.WRONG_HOLDER)
                holder, depth = c.agent, depth + 1
            elif kind is MaxDepth:
                limit = max(depth, 0) + c.depth
                max_depth = limit if max_depth is None else min(max_depth, limit)
            elif kind is CallBudget:
                budgets.append((next_tag, "calls", float(c.calls)))
            elif kind is CostBudget:
                budgets.append((next_tag, "cost", float(c.cost)))
            tag = next_tag
            caveats.append(c)
            tags.append(tag)
        if not hmac.compare_digest(tag, tok.tag):
            raise TokenRejected("tag chain does not verify (tampered or forged)")
        if holder is None:
            raise TokenRejected("token names no holder")
        plan = plan.extended(caveats[start:])
        if sum(c.check == "regex" or c.check == "each" and c.param[0] == "regex"
               for c in plan.arg_caveats) > MAX_REGEX_CAVEATS:
            raise TokenRejected(f"more than {MAX_REGEX_CAVEATS} regex caveats")
        if max_depth is not None and depth > max_depth:
            raise TokenRejected(f"delegation depth {depth} > max {max_depth}", code=ErrorCode.DEPTH_EXCEEDED)
        if fresh:  # only now: the chain verified
            if len(decoded) + len(fresh) > self.DECODED_CAVEATS:
                decoded.clear()
            decoded.update(fresh)
        return VerifiedToken(tok, tuple(caveats), tuple(tags), holder, depth, max_depth, tuple(budgets), plan)

    def _verified_prefix(self, tok: Token) -> VerifiedToken | None:
        """The longest remembered verified token whose caveats ``tok``'s begin with, if any.

        Same key id, token id and caveat bytes mean the same tags up to there: what was
        verified for that token holds for this one's prefix, and only the rest is checked.
        """
        family = self._prefixes.get((tok.kid, tok.token_id))
        if not family:
            return None
        blobs, best = tok.caveats, None
        for vt in family:
            k = len(vt.caveats)
            if k > len(blobs) or (best is not None and k <= len(best.caveats)):
                continue
            # Siblings share all but their last caveats: compare the last one first.
            if blobs[k - 1] == vt.token.caveats[-1] and blobs[:k] == vt.token.caveats:
                best = vt
        if best is not None and best is not family[-1]:
            family.remove(best)  # most recently extended last: a parent outlives its many children
            family.append(best)
        return best

    def _remember(self, raw: bytes, vt: VerifiedToken) -> None:
        if self._cache_size == 0:
            return
        if len(self._cache) >= self._cache_size:
            self._cache.popitem(last=False)
        self._cache[raw] = vt
        key = (vt.token.kid, vt.token.token_id)
        family = self._prefixes.get(key)
        if family is None:
            if len(self._prefixes) >= self._families:
                self._prefixes.popitem(last=False)
            family = self._prefixes[key] = []
        else:
            self._prefixes.move_to_end(key)
        family.append(vt)
        if len(family) > self._family_size:
            del family[0]
