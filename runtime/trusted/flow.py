"""Information flow: labels on what reaches an agent, sink rules on what leaves it, handles.

A label is an integrity (trusted > endorsed > untrusted) and reader sets, each of which must admit
a destination (none: public); a join takes the lower integrity and the sets of both. Labels come
only from declarations (policy, job file, ``@tool``; none: untrusted), never from a tool or its
output. Each agent run (a token's holder caveats: ``runs``) has a context label, the join of all it
was handed, which only goes down. An argument carries the context joined with its handles (hidden
results kept here); the token's ``Flow`` caveats say what may reach each sink.

Threat: data an attacker controls (a web page, an e-mail) that steers a call the capability
allows: the destination of a payment or a message, or private data sent to a public sink.
"""

from __future__ import annotations

import itertools
import re
import secrets
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterator

import msgpack

from ..errors import ErrorCode, FlowDenied, PolicyDenied
from .capability import Flow, check_arg, url_origin

LEVELS = {"untrusted": 0, "endorsed": 1, "trusted": 2}
_PRINCIPAL = re.compile(r"[A-Za-z0-9._+:\[\]-]{1,254}(?:@[A-Za-z0-9.-]{1,254})?")  # a host, an address: one name
HANDLE_KEYS = frozenset({"$handle", "label", "bytes", "tool"})


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
