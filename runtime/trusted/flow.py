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
from dataclasses import dataclass, field
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
SCHEMAS = (f"a reader schema is {{type: boolean}}; {{enum: [...]}} (1..{MAX_CHOICES} numbers or strings of <= "
           f"{MAX_CHARS} characters); {{type: integer|number, minimum, maximum}} (finite); {{type: string, format: "
           f"date}}; {{type: string, pattern (RE2), maxLength <= {MAX_CHARS}}}; {{type: array, items: one of these, "
           f"maxItems <= {MAX_ITEMS}}}; or free text, answered with a handle: {{type: string, maxLength <= "
           f"{MAX_FREE}}}")
_SEP, _NUM, _DATE = re.compile(r"[\W_]+"), re.compile(r"-?\d[\d,]*(?:\.\d+)?"), re.compile(r"\d{4}-\d{2}-\d{2}")


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


def violations(flows: list[Flow], args: dict[str, Any], ctx: Label, held: dict[str, Label]) -> list[Any]:
    """The ``flows`` (those that apply) broken: (rule, argument, label); an argument is ``ctx`` joined with ``held``."""
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
        lab = every if f.arg == "*" else ctx.join(held[f.arg]) if f.arg in held else ctx
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


def is_ref(v: Any) -> bool:
    return type(v) is dict and "$handle" in v and v.keys() <= HANDLE_KEYS


def substitute(args: dict[str, Any], resolve: Callable[[Any], Handle]) -> tuple[dict[str, Any], dict[str, Label],
                                                                                   list[tuple[str, Handle]]]:
    """Handles at the top level of ``args`` or as items of a list argument replaced by their content:
    (arguments, each argument's handles joined, (argument, handle) for each reference)."""
    out, held, used = args, {}, []
    for name, v in args.items():  # most arguments are scalars: one type check each
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
        raise ValueError(f"not a reader schema: {str(s)[:120]}; {SCHEMAS}")
    return shape == "free"


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
    """The answers the chains of one root run were given, indexed by their words and numbers."""

    kept: list[Answer] = field(default_factory=list)
    words: list[tuple[str, Answer]] = field(default_factory=list)  # its strings, case-folded, letters and digits
    numbers: dict[float, list[Answer]] = field(default_factory=dict)

    def add(self, a: Answer) -> None:
        self.kept.append(a)
        for v in a.value if isinstance(a.value, list) else [a.value]:
            if type(v) is str and (w := _SEP.sub("", v.casefold())):
                self.words.append((w, a))
            elif _number(v):
                self.numbers.setdefault(v, []).append(a)

    def carried(self, value: Any) -> list[Answer]:
        """Those an argument carries. A number: one equal to it, in a string too ("1,240.50"). A string: its
        letters and digits, case-folded, within a string's or number's (all of them, if 1 or 2). A boolean: never."""
        leaves = [x for x in _leaves(value) if type(x) in (str, int, float)]
        words = {_SEP.sub("", str(x).casefold()) for x in leaves}
        text = "\0".join(words)  # one search per answer word; no word holds the separator
        numbers = {float(d.replace(",", "")) for x in leaves if type(x) is str for d in _NUM.findall(x)} | {
            x for x in leaves if type(x) is not str}
        found = [a for w, a in self.words if (w in text if len(w) > 2 else w in words)]
        found += [a for n in numbers & self.numbers.keys() for a in self.numbers[n]]
        return list(dict.fromkeys(found))


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
