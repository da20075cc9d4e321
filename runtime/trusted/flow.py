"""Information flow: labels on what reaches an agent, sink rules on what leaves it, handles.

A label is an integrity (trusted > endorsed > untrusted) and reader sets, each of which must admit
a destination (none: public); a join takes the lower integrity and the sets of both. Labels come
only from declarations (policy, job file, ``@tool``; none: untrusted), never from a tool or its
output. Each agent run (a token's holder caveats: ``runs``) has a context label, the join of all it
was handed, which only goes down. An argument carries the context joined with its handles (hidden
results kept here); the token's ``Flow`` caveats say what may reach each sink.

A reader (``ASK``) answers a question about a handle's content; the answer must fit a schema of
low capacity (a boolean, a choice, a bounded number, a date, a short pattern) and is then
``endorsed``, with the content's readers. It reaches the agent, whose context keeps its integrity;
an argument that carries the answer (``carries``) carries its label. A free-text answer is a handle.

Threat: data an attacker controls (a web page, an e-mail) that steers a call the capability
allows: the destination of a payment or a message, or private data sent to a public sink.
"""

from __future__ import annotations

import datetime
import itertools
import math
import re
import secrets
import unicodedata
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any, Callable, Iterator

import msgpack

from ..errors import ErrorCode, FlowDenied, PolicyDenied
from .capability import Flow, _regex, _regex_reason, check_arg, url_origin

LEVELS = {"untrusted": 0, "endorsed": 1, "trusted": 2}
_PRINCIPAL = re.compile(r"[A-Za-z0-9._+:\[\]-]{1,254}(?:@[A-Za-z0-9.-]{1,254})?")  # a host, an address: one name
HANDLE_KEYS = frozenset({"$handle", "label", "bytes", "tool"})
ASK = "reader.ask"  # the reader: a model that sees one handle's content and a question, nothing else
MAX_CHOICES, MAX_CHARS, MAX_ITEMS, MAX_FREE = 64, 64, 16, 1 << 16  # what a low-capacity answer may be
_SHAPES = {"boolean": {"type"}, "enum": {"type", "enum"}, "integer": {"type", "minimum", "maximum"},
           "number": {"type", "minimum", "maximum"}, "date": {"type", "format"}, "free": {"type", "maxLength"},
           "pattern": {"type", "pattern", "maxLength"}, "array": {"type", "items", "maxItems", "minItems"}}
SCHEMAS = "boolean, enum, bounded number, date, pattern with maxLength, an array of these, or free text"
_NUM, _DATE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?"), re.compile(r"\d{4}-\d{2}-\d{2}")
_FILLERS = frozenset("\u115f\u1160\u3164\uffa0")  # letters that show as nothing
GRAM, MAX_SCAN = 8, 1 << 13  # an answer's runs matched; characters of a call matched at most


@dataclass(frozen=True)
class Label:
    integrity: int = 2
    readers: frozenset[frozenset[str]] = frozenset()  # every set must admit a destination; none: public

    def join(self, other: "Label") -> "Label":
        if other.integrity >= self.integrity and other.readers <= self.readers:
            return self
        return Label(min(self.integrity, other.integrity), self.readers | other.readers)

    def admits(self, dest: str) -> bool:
        return all(any(p == dest or p[:1] == "*" and dest.endswith(p[1:]) for p in s) for s in self.readers)

    @lru_cache(maxsize=4096)  # labels are few and immutable; shared: never change what it returns
    def public(self) -> dict[str, Any]:
        return {"integrity": ("untrusted", "endorsed", "trusted")[self.integrity],
                "readers": sorted(sorted(s) for s in self.readers) if self.readers else "public"}

    @staticmethod
    def parse(d: Any) -> "Label":  # a public() form, or a policy's: readers a list of names
        sets = () if d["readers"] == "public" else [d["readers"]] if isinstance(d["readers"][0], str) else d["readers"]
        return Label(LEVELS[d["integrity"]], frozenset(frozenset(s) for s in sets))


TOP = Label()  # the task an operator gave: trusted, public


@dataclass(frozen=True)
class Output:
    """A result's label: ``label``, or trusted if all items of the list at ``items`` ('': the result) meet ``when``."""

    label: Label = Label(0)
    hide: bool = False
    carries_inputs: bool = True  # the result carries the labels of the handles passed in (false: a receipt)
    items: str | None = None
    when: tuple[tuple[str, str, Any], ...] = ()  # (field, check kind, param), as Arg caveats

    def label_of(self, value: Any) -> Label:
        found = value.get(self.items) if self.items and isinstance(value, dict) else value
        try:  # a field missing, outside a check, or that no check can judge keeps the declared label
            trusted = self.items is not None and isinstance(found, list) and all(isinstance(i, dict) and all(
                f in i and check_arg(k, p, i[f]) is None for f, k, p in self.when) for i in found)
        except PolicyDenied:
            trusted = False
        return Label(2, self.label.readers) if trusted else self.label


@dataclass
class Run:
    agent: str
    depth: int
    label: Label = TOP
    origin: dict[str, Any] | None = None  # the result that first lowered it


def rule_name(f: Flow) -> str:
    where = f.tool + (f"[{','.join(f.effects)}]" if f.effects else "")
    if f.need == "readers":
        return f"{where}: readers must admit argument {f.arg!r}" if f.arg else f"{where}: data must be public"
    return f"{where}: {({'': 'context', '*': 'every argument'}).get(f.arg, f'argument {f.arg!r}')} must be {f.need}"


def destination(value: Any) -> str:
    """The one name an argument sends to (a URL's host), or '': not a string, or not one name ("a@x.com,b@y.com")."""
    try:
        name = url_origin(value)[1] if "://" in value else value
    except (PolicyDenied, TypeError):
        return ""
    return name if isinstance(name, str) and _PRINCIPAL.fullmatch(name) else ""


def violations(flows: list[Flow], args: dict[str, Any], ctx: Label, held: dict[str, Label],
               answered: Label = TOP) -> list[Any]:
    """The ``flows`` (those that apply) broken: (rule, argument, label); an argument is ``ctx`` joined with ``held``,
    the call's context ``ctx`` joined with the reader's answers it carries (``answered``): the agent saw them."""
    out = []
    for f in flows:
        every = ctx
        for h in held.values():
            every = every.join(h)
        if f.need == "readers":  # a destination, or each of a list; none (or not strings): a violation
            dests = args.get(f.arg) if f.arg else []
            dests = dests if isinstance(dests, list) else [dests]
            if every.readers and not (dests and all(every.admits(destination(d)) for d in dests)):
                out.append((f, "(data)", every))  # all the call carries, the rule names the destination
            continue
        lab = every if f.arg == "*" else ctx.join(held[f.arg]) if f.arg in held else ctx.join(answered) if not f.arg \
            else ctx
        if lab.integrity < LEVELS[f.need]:
            out.append((f, f.arg or "(context)", lab))
    return out


@dataclass
class Handle:
    id: str
    owner: str  # the agent it was issued to; counts against its limits
    runs: set[bytes]  # may present it: the run it was issued in, its delegators, runs it was passed to
    value: Any
    label: Label
    origin: dict[str, Any]
    nbytes: int
    expires: float
    tool: str = ""


@dataclass
class Handles:
    """Hidden results by id, in memory only: ids name the shard's epoch, so one from before a restart says so."""

    clock: Callable[[], float]
    epoch: str = field(default_factory=lambda: secrets.token_hex(2))
    by_id: dict[str, Handle] = field(default_factory=dict)
    issued: Iterator[int] = field(default_factory=itertools.count)  # in every id: no two alike

    def usage(self, agent: str) -> tuple[int, int]:
        mine = [h for h in self.by_id.values() if h.owner == agent]
        return len(mine), sum(h.nbytes for h in mine)

    def issue(self, agent: str, runs: set[bytes], tool: str, value: Any, label: Label, origin: dict[str, Any],
              limits: tuple[int, int, float]) -> Handle:
        (max_count, max_bytes, ttl_s), now = limits, self.clock()
        for hid in [h.id for h in self.by_id.values() if h.expires < now]:
            del self.by_id[hid]
        nbytes = len(msgpack.packb(value, use_bin_type=True))
        count, used = self.usage(agent)
        if count >= max_count or used + nbytes > max_bytes:
            raise FlowDenied(f"{agent!r} holds {count} handles of {used} bytes; limits {max_count} and {max_bytes}"
                             f" bytes (this result: {nbytes})", code=ErrorCode.HANDLE_LIMIT, tool=tool)
        h = Handle(f"h_{self.epoch}{secrets.token_hex(4)}{next(self.issued):x}", agent, runs, value, label, origin,
                   nbytes, now + ttl_s, tool)
        self.by_id[h.id] = h
        return h

    def get(self, agent: str, run: bytes, ref: Any, tool: str) -> Handle:
        hid = ref.get("$handle") if isinstance(ref, dict) else ref
        h = self.by_id.get(hid) if isinstance(hid, str) else None
        if h is None or h.expires < self.clock():
            lost = isinstance(hid, str) and hid[:2] == "h_" and len(hid) > 14 and hid[2:6] != self.epoch
            raise FlowDenied(f"handle {hid!r:.40} " + ("was issued before this supervisor shard restarted: handles "
                             "do not survive a restart" if lost else "is unknown or expired"),
                             code=ErrorCode.HANDLE_UNKNOWN, tool=tool)
        if run not in h.runs:
            raise FlowDenied(f"handle {h.id} of {h.owner!r} was not issued or passed to this run of {agent!r}",
                             code=ErrorCode.HANDLE_DENIED, tool=tool)
        return h


_CONTAINERS = frozenset({dict, list})


def is_ref(v: Any) -> bool:
    return type(v) is dict and "$handle" in v and v.keys() <= HANDLE_KEYS


def substitute(args: dict[str, Any], resolve: Callable[[Any], Handle]) -> tuple[dict[str, Any], dict[str, Label],
                                                                                   list[tuple[str, Handle]]]:
    """Handles at the top level of ``args`` or as items of a list argument replaced by their content:
    (arguments, each argument's handles joined, (argument, handle) for each reference)."""
    out, held, used = args, {}, []
    if not _CONTAINERS.intersection(map(type, args.values())):  # most calls: no map or list, so no handle
        return out, held, used
    for name, v in args.items():
        if type(v) not in (dict, list) or not (items := [v] if is_ref(v) else v if any(map(is_ref, v)) else []):
            continue
        hs, out = [resolve(i) if is_ref(i) else None for i in items], dict(out)
        for h in filter(None, hs):
            held[name] = held.get(name, h.label).join(h.label)
            used.append((name, h))
        values = [h.value if h else i for h, i in zip(hs, items)]
        out[name] = values[0] if items is not v else values
    return out, held, used



def _number(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _size(v: Any, low: int, high: int) -> bool:
    return type(v) is int and low <= v <= high


def _shape(s: Any) -> str:
    t = s.get("type") if isinstance(s, dict) else None
    if isinstance(s, dict) and "enum" in s:
        return "enum"
    return ("date" if "format" in s else "pattern" if "pattern" in s else "free") if t == "string" else str(t)


def answer_kind(s: Any, item: bool = False) -> bool:
    """Is schema ``s`` free text (True) or of low capacity (False)? ValueError if it is neither."""
    shape = _shape(s)
    match shape if shape in _SHAPES and not set(s) - _SHAPES[shape] else None:
        case "boolean":
            ok = True
        case "enum":
            ok = isinstance(s["enum"], list) and 0 < len(s["enum"]) <= MAX_CHOICES and all(
                _number(v) or isinstance(v, str) and len(v) <= MAX_CHARS for v in s["enum"])
        case "integer" | "number":
            ok = _number(s.get("minimum")) and _number(s.get("maximum")) and s["minimum"] <= s["maximum"]
        case "date":
            ok = s["format"] == "date"
        case "pattern":
            ok = _size(s.get("maxLength"), 1, MAX_CHARS) and _regex(s["pattern"]) is not None  # RE2: linear
        case "free":
            ok = not item and _size(s.get("maxLength", MAX_FREE), 1, MAX_FREE)
        case "array":
            ok = not item and _size(s.get("maxItems"), 1, MAX_ITEMS) and _size(s.get("minItems", 0), 0, s[
                "maxItems"]) and answer_kind(s.get("items"), True) is False
        case _:
            ok = False
    if not ok:
        raise ValueError(f"not a reader schema: {str(s)[:120]} (a schema is a {SCHEMAS}: see reader.ask)")
    return shape == "free"


def worded(s: dict[str, Any]) -> bool:
    """Can an answer of schema ``s`` spell words (a short instruction): a pattern, or an array of them?"""
    return _shape(s) == "pattern" or _shape(s) == "array" and _shape(s["items"]) == "pattern"


def check_answer(s: dict[str, Any], v: Any) -> Any:
    """``v`` if schema ``s`` (which ``answer_kind`` passed) admits it, an integral float as an int; else ValueError."""
    match _shape(s):
        case "enum":
            ok = any(v == e and type(v) is not bool and _number(v) == _number(e) for e in s["enum"])
        case "boolean":
            ok = type(v) is bool
        case "integer" | "number" as t:
            v = int(v) if t == "integer" and type(v) is float and v.is_integer() else v
            ok = _number(v) and (t == "number" or type(v) is int) and s["minimum"] <= v <= s["maximum"]
        case "array":
            ok = isinstance(v, list) and s.get("minItems", 0) <= len(v) <= s["maxItems"]
            v = [check_answer(s["items"], i) for i in v] if ok else v
        case "date":
            ok = isinstance(v, str) and bool(_DATE.fullmatch(v)) and _is_date(v)
        case "pattern":
            ok = isinstance(v, str) and len(v) <= s["maxLength"] and _regex_reason(s["pattern"], v) is None
        case _:
            ok = isinstance(v, str) and len(v) <= s.get("maxLength", MAX_FREE)
    if not ok:
        raise ValueError(f"the answer {str(v)[:200]!r} does not fit the schema {str(s)[:200]}")
    return v


def _is_date(v: str) -> bool:
    try:
        return bool(datetime.date.fromisoformat(v))
    except ValueError:
        return False


@dataclass(frozen=True, eq=False)
class Answer:
    """A reader's answer given to a run: an argument that carries its value carries its label."""

    value: Any
    label: Label
    origin: dict[str, Any]


@dataclass
class Answers:
    """The answers the chains of one root run were given, indexed by runs of ``GRAM`` letters and digits
    (an argument sharing one carries the answer, however it was cut, spaced or cased), shorter strings
    whole, and numbers by value. A call's arguments past ``MAX_SCAN`` characters carry every answer."""

    kept: list[Answer] = field(default_factory=list)
    grams: dict[str, list[Answer]] = field(default_factory=dict)
    short: dict[str, list[Answer]] = field(default_factory=dict)  # strings shorter than GRAM
    numbers: dict[Decimal, list[Answer]] = field(default_factory=dict)

    def add(self, a: Answer) -> None:
        self.kept.append(a)
        items = a.value if isinstance(a.value, list) else [a.value]
        texts = [v for v in items if type(v) is str] + ["".join(v for v in items if type(v) is str)]  # pieces joined
        for v in items:
            if _number(v):
                self.numbers.setdefault(Decimal(repr(v)), []).append(a)
                texts += [str(v) if type(v) is int else f"{v:f}".rstrip("0").rstrip(".")] if abs(v) >= 1e7 else []
        for w in filter(None, map(_norm, texts)):
            for g in {w[i:i + GRAM] for i in range(len(w) - GRAM + 1)} if len(w) >= GRAM else ():
                self.grams.setdefault(g, []).append(a)
            if len(w) < GRAM:
                self.short.setdefault(w, []).append(a)

    def carried(self, value: Any, budget: list[int]) -> list[Answer]:
        """Those an argument carries: a number equal to one (in a string too: "1,240.50", "1e+21"); a run
        of GRAM of its letters or digits; a shorter answer within a word (all of it, if 1 or 2 long).
        ``budget``: characters left to scan in this call; past it, every answer. Booleans: never."""
        leaves, size = [], 0
        for x in _leaves(value):
            if type(x) in (str, int, float):
                size += len(x) if type(x) is str else 24
                if size > budget[0]:
                    return list(self.kept)
                leaves.append(x)
        budget[0] -= size
        words = {_norm(str(x)) for x in leaves}
        text = "\0".join(words)  # no word holds the separator
        found = [a for w in words for i in range(len(w) - GRAM + 1) for a in self.grams.get(w[i:i + GRAM], ())]
        found += [a for w, kept in self.short.items() if (w in text if len(w) > 2 else w in words) for a in kept]
        numbers = {_decimal(d) for x in leaves if type(x) is str for d in _NUM.findall(x)} | {
            _decimal(repr(x)) for x in leaves if type(x) is not str}
        found += [a for n in numbers - {None} if n in self.numbers for a in self.numbers[n]]
        return list(dict.fromkeys(found))


def _norm(s: str) -> str:
    """Letters and digits, case-folded, in compatibility form (fullwidth, ligatures) without accents or fillers."""
    return "".join(c for c in unicodedata.normalize("NFKD", s.casefold()) if c.isalnum() and c not in _FILLERS)


def _decimal(d: str) -> Decimal | None:
    try:
        n = Decimal(d.replace(",", ""))
    except InvalidOperation:
        return None
    return n if n.is_finite() else None


def _leaves(v: Any) -> Iterator[Any]:
    if isinstance(v, dict):
        for k, x in v.items():
            yield k
            yield from _leaves(x)
    elif isinstance(v, list):
        for x in v:
            yield from _leaves(x)
    else:
        yield v
