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
vs ``/data``) and hosts (``good.com@evil.com``) in arguments.
"""

from __future__ import annotations

import hashlib
import hmac
import posixpath
import re
import secrets
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Union
from urllib.parse import urlsplit

import msgpack

try:  # the regex parser moved in 3.11; both expose the same parse tree
    from re import _constants as _sre_constants, _parser as _sre_parser  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre_constants  # type: ignore[no-redef]
    import sre_parse as _sre_parser  # type: ignore[no-redef]

from ..errors import ErrorCode, PolicyDenied, TokenRejected

VERSION = 1
MAX_TOKEN_BYTES = 16 * 1024
MAX_CAVEATS = 64
EFFECTS = ("read", "write", "delete", "execute")
_SHA = hashlib.sha256


def _mac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, _SHA).digest()


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# --------------------------------------------------------------------------- arguments


def canonical_path(value: Any) -> str:
    """Absolute, lexically normalised POSIX path; anything else is refused."""
    if not isinstance(value, str) or not value or "\x00" in value or len(value) > 4096:
        raise PolicyDenied(f"not a usable path: {value!r:.80}")
    if not value.startswith("/"):
        raise PolicyDenied(f"path must be absolute: {value!r:.80}")
    # normpath keeps a leading '//' (POSIX allows it to mean something else): fold it.
    return posixpath.normpath("/" + value.lstrip("/"))


def path_is_under(path: str, root: str) -> bool:
    root = canonical_path(root)
    path = canonical_path(path)
    return root == "/" or path == root or path.startswith(root + "/")


_HOST = re.compile(r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
                   r"|[0-9a-f:.]+")  # DNS labels, or an IPv4/IPv6 literal (brackets already stripped)
_URL_BAD = re.compile(r"[\x00-\x20\x7f-\U0010ffff\\]")


def url_host(value: Any) -> str:
    """The lower-case host of an http(s) URL; refuses anything ambiguous."""
    if not isinstance(value, str) or len(value) > 4096 or _URL_BAD.search(value):
        raise PolicyDenied(f"not a usable URL: {value!r:.80}")
    try:
        parts = urlsplit(value)  # raises ValueError on e.g. a malformed '[...]' host
    except ValueError as exc:
        raise PolicyDenied(f"malformed URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise PolicyDenied(f"URL scheme {parts.scheme!r} not allowed")
    try:
        host = (parts.hostname or "").rstrip(".")
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise PolicyDenied(f"malformed URL authority: {exc}") from None
    if not host or not _HOST.fullmatch(host):
        raise PolicyDenied(f"URL host {host!r:.80} is not a plain DNS name or IP address")
    return host


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    for pattern in allowed:
        pattern = pattern.lower().rstrip(".")
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
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


@lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern[str]:
    """Compile a constraint pattern, refusing the shapes that backtrack catastrophically.

    Any holder can append a regex caveat offline, so a pattern is attacker-chosen input to
    the supervisor: a quantified group that itself contains a quantifier (``(a+)+``) is
    refused, as are patterns over 512 characters.
    """
    if len(pattern) > 512:
        raise ValueError("regex longer than 512 characters")
    compiled = re.compile(pattern)
    if _nested_repeat(_sre_parser.parse(pattern), inside=False):
        raise ValueError(f"regex {pattern!r} nests quantifiers (catastrophic backtracking)")
    return compiled


_REPEATS = tuple(getattr(_sre_constants, n) for n in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
                 if hasattr(_sre_constants, n))


def _nested_repeat(items: Any, inside: bool) -> bool:
    for op, av in items:
        if op in _REPEATS:
            low, high, sub = av
            repeats = high is _sre_constants.MAXREPEAT or high > 1
            if repeats and inside:
                return True
            if _nested_repeat(sub, inside or repeats):
                return True
        elif op is _sre_constants.SUBPATTERN:
            if _nested_repeat(av[-1], inside):
                return True
        elif op is _sre_constants.BRANCH:
            if any(_nested_repeat(branch, inside) for branch in av[1]):
                return True
        elif op in (_sre_constants.ASSERT, _sre_constants.ASSERT_NOT):
            if _nested_repeat(av[1], inside):
                return True
    return False


def _same(a: Any, b: Any) -> bool:
    """Equality that does not let True stand for 1 or 1.0 for 1, also inside lists and maps."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


ARG_CHECKS = ("exact", "one_of", "range", "regex", "path_under", "url_host", "max_bytes")


def check_arg(kind: str, param: Any, value: Any) -> str | None:
    """None if ``value`` satisfies the check, else the reason it does not."""
    if kind == "exact":
        return None if _same(value, param) else f"{value!r:.80} != {param!r:.80}"
    if kind == "one_of":
        return None if any(_same(value, p) for p in param) else f"{value!r:.80} not in {param!r:.200}"
    if kind == "range":
        lo, hi = param
        if not _is_number(value) or value != value:  # NaN compares false with every bound
            return f"{value!r:.80} is not a number"
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return f"{value!r} outside [{lo}, {hi}]"
        return None
    if kind == "regex":
        if not isinstance(value, str) or len(value) > 65536:
            return "not a string of at most 64 KiB"
        return None if _regex(param).fullmatch(value) else f"{value!r:.80} does not match {param!r}"
    if kind == "path_under":
        return None if path_is_under(value, param) else f"{canonical_path(value)!r} not under {param!r}"
    if kind == "url_host":
        host = url_host(value)
        return None if host_allowed(host, param) else f"host {host!r} not in {list(param)!r}"
    if kind == "max_bytes":
        n = value_bytes(value)
        return None if n <= param else f"{n} bytes > max {param}"
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


Caveat = Union[Tools, Effects, Arg, Expires, NotBefore, CallBudget, CostBudget, MaxDepth, Audience, Holder]


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
    raise TypeError(f"not a caveat: {c!r}")


def decode_caveat(blob: bytes) -> Caveat:
    """Strict parse of one caveat; anything unexpected raises ValueError (deny)."""
    v = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    if not isinstance(v, list) or not v or not isinstance(v[0], str):
        raise ValueError("caveat is not [type, ...]")
    kind, args = v[0], v[1:]
    if kind == "tools" and len(args) == 1:
        return Tools(_str_tuple(args[0], "tools"))
    if kind == "effects" and len(args) == 1:
        effects = _str_tuple(args[0], "effects")
        if not set(effects) <= set(EFFECTS):
            raise ValueError(f"unknown effect in {effects}")
        return Effects(effects)
    if kind == "arg" and len(args) == 4:
        tool, arg, check, param = args
        if not (isinstance(tool, str) and isinstance(arg, str) and check in ARG_CHECKS):
            raise ValueError("malformed arg caveat")
        return Arg(tool, arg, check, _checked_param(check, param))
    if kind in ("exp", "nbf", "cost") and len(args) == 1 and _is_number(args[0]):
        return {"exp": Expires, "nbf": NotBefore, "cost": CostBudget}[kind](float(args[0]))
    if kind in ("calls", "depth") and len(args) == 1 and type(args[0]) is int and args[0] >= 0:
        return CallBudget(args[0]) if kind == "calls" else MaxDepth(args[0])
    if kind == "aud" and len(args) == 1 and isinstance(args[0], str):
        return Audience(args[0])
    if kind == "holder" and len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], bytes):
        return Holder(args[0], args[1])
    raise ValueError(f"unknown or malformed caveat type {kind!r}")


def _checked_param(check: str, param: Any) -> Any:
    if check in ("one_of", "url_host"):
        if not isinstance(param, list):
            raise ValueError(f"{check} needs a list")
        return tuple(param)
    if check == "range":
        ok = isinstance(param, list) and len(param) == 2
        if not ok or not all(p is None or _is_number(p) for p in param):
            raise ValueError("range needs [min|null, max|null]")
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
            tag = _mac(tag, blob)
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


@dataclass(frozen=True, slots=True)
class CallContext:
    """What a caveat is evaluated against: the canonicalised call."""

    agent: str
    tool: str
    effect: str
    args: dict[str, Any]
    now: float
    job: str


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

    @property
    def token_id(self) -> bytes:
        return self.token.token_id

    def chain_ids(self) -> tuple[bytes, ...]:
        """Everything that can be revoked to kill this token: its id and every tag on its chain."""
        return (self.token.token_id, *self.tags)

    def check_time(self, now: float) -> None:
        for c in self.caveats:
            if isinstance(c, Expires) and now > c.at:
                raise TokenRejected(f"expired at {c.at:.3f}, now {now:.3f}", code=ErrorCode.TOKEN_EXPIRED)
            if isinstance(c, NotBefore) and now < c.at:
                raise TokenRejected(f"not before {c.at:.3f}, now {now:.3f}", code=ErrorCode.TOKEN_NOT_YET_VALID)

    def evaluate(self, ctx: CallContext) -> None:
        """Raise unless every caveat holds for this call. Budgets are the quota ledger's job."""
        if ctx.agent != self.holder:
            raise TokenRejected(f"holder is {self.holder!r}, presented by {ctx.agent!r}",
                                code=ErrorCode.WRONG_HOLDER, tool=ctx.tool)
        self.check_time(ctx.now)
        for c in self.caveats:
            if isinstance(c, Tools):
                if ctx.tool not in c.names:
                    raise PolicyDenied(f"tool {ctx.tool!r} not in {list(c.names)}", tool=ctx.tool)
            elif isinstance(c, Effects):
                if ctx.effect not in c.effects:
                    raise PolicyDenied(f"effect {ctx.effect!r} not in {list(c.effects)}", tool=ctx.tool)
            elif isinstance(c, Arg):
                if c.tool != ctx.tool and c.tool != "*":
                    continue
                if c.arg not in ctx.args:
                    if c.tool == "*":
                        continue
                    raise PolicyDenied(f"argument {c.arg!r} required by a {c.check} constraint", tool=ctx.tool)
                try:
                    why = check_arg(c.check, c.param, ctx.args[c.arg])
                except PolicyDenied as exc:
                    why = exc.reason
                if why is not None:
                    raise PolicyDenied(f"argument {c.arg!r}: {why}", tool=ctx.tool)
            elif isinstance(c, Audience):
                if ctx.job != c.job:
                    raise TokenRejected(f"audience {c.job!r}, job is {ctx.job!r}",
                                        code=ErrorCode.WRONG_AUDIENCE, tool=ctx.tool)
            # Expires/NotBefore: check_time; budgets: quota ledger; Holder/MaxDepth: verify.


class KeyRing:
    """Holds the root keys (by key id) and the holder-seal key. Lives only in the TCB."""

    def __init__(self, root_keys: dict[str, bytes], current_kid: str, holder_key: bytes,
                 *, cache_size: int = 4096) -> None:
        if current_kid not in root_keys:
            raise ValueError(f"current key id {current_kid!r} not in the key ring")
        self._root = dict(root_keys)
        self.current_kid = current_kid
        self._holder_key = holder_key
        self._cache: dict[bytes, VerifiedToken] = {}
        self._cache_size = cache_size

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

    def retire(self, kid: str) -> None:
        if kid == self.current_kid:
            raise ValueError("cannot retire the current key")
        self._root.pop(kid, None)
        self._cache.clear()

    def _seal(self, prev_tag: bytes, agent: str) -> bytes:
        return _mac(self._holder_key, b"warden-holder\x00" + prev_tag + agent.encode())

    def mint(self, *, holder: str, caveats: Iterable[Caveat] = ()) -> Token:
        """A root token for ``holder`` with ``caveats``."""
        kid, token_id = self.current_kid, secrets.token_bytes(16)
        tag = _mac(self._root[kid], _pack([VERSION, kid, token_id]))
        token = Token(kid, token_id, (), tag)
        return self.bind(token, holder).attenuate(*caveats)

    def bind(self, token: Token, agent: str) -> Token:
        """Append a sealed holder caveat: the token now belongs to ``agent``."""
        blob = encode_caveat(Holder(agent, self._seal(token.tag, agent)))
        return Token(token.kid, token.token_id, token.caveats + (blob,), _mac(token.tag, blob), token.version)

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
        tag = _mac(key, _pack([tok.version, tok.kid, tok.token_id]))
        caveats: list[Caveat] = []
        tags: list[bytes] = []
        holder, depth, max_depth = None, -1, None
        budgets: list[tuple[bytes, str, float]] = []
        for blob in tok.caveats:
            try:
                c = decode_caveat(blob)
            except Exception as exc:
                raise TokenRejected(f"caveat {len(caveats)}: {exc}") from None
            if isinstance(c, Holder):
                if not hmac.compare_digest(c.seal, self._seal(tag, c.agent)):
                    raise TokenRejected(f"holder caveat {len(caveats)} has a bad seal", code=ErrorCode.WRONG_HOLDER)
                holder, depth = c.agent, depth + 1
            elif isinstance(c, MaxDepth):
                limit = max(depth, 0) + c.depth
                max_depth = limit if max_depth is None else min(max_depth, limit)
            tag = _mac(tag, blob)
            caveats.append(c)
            tags.append(tag)
            if isinstance(c, (CallBudget, CostBudget)):
                kind = "calls" if isinstance(c, CallBudget) else "cost"
                budgets.append((tag, kind, float(c.calls if kind == "calls" else c.cost)))
        if not hmac.compare_digest(tag, tok.tag):
            raise TokenRejected("tag chain does not verify (tampered or forged)")
        if holder is None:
            raise TokenRejected("token names no holder")
        if max_depth is not None and depth > max_depth:
            raise TokenRejected(f"delegation depth {depth} > max {max_depth}", code=ErrorCode.DEPTH_EXCEEDED)
        vt = VerifiedToken(tok, tuple(caveats), tuple(tags), holder, depth, max_depth, tuple(budgets))
        if len(self._cache) >= self._cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[raw] = vt
        return vt
