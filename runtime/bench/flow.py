"""The ``authz`` suite's information-flow rows: what flow checks add to a decision, and what
labelling a result costs.

Decision (``Supervisor.authorize``, as in ``runtime.bench.authz``): one agent calls ``send(to,
body)`` with a cached token of 4 caveats (audience, expiry, tools, an argument rule) and a fresh
nonce per request.

* ``flow.off``: no sink rule on the token;
* ``flow.on``: plus the sink rules of ``ifc: {context: trusted, args: {to: trusted},
  destination: to}`` (three ``Flow`` caveats: the context, the ``to`` argument, the readers of the
  data against ``to``), every call passing them;
* ``flow.on.handle``: as ``flow.on``, with ``body`` a handle the agent holds (labelled trusted,
  readers ``*@corp.example``): the handle is looked up, substituted and its label joined, and the
  readers check has a reader set to match ``to`` against;
* ``flow.on.answers64``: as ``flow.on``, the run having been given 64 reader answers (IBANs,
  amounts; the most a run keeps), none of which the arguments carry: every call is matched
  against all of them.

``off`` and ``on`` runs alternate, and ``authorize.flow.added`` is, per pair of runs, the p50 of
``on`` minus the p50 of ``off`` (target: at most 5 us), so that a machine getting busier between
runs does not show up as a flow cost.

Result labelling: after a call the supervisor labels its result (the call's context joined with
the handles it held and with what each policy on the token's chain declares for the tool) and joins
that label into the context of the run and every run it was delegated from. Timed: exactly those
two steps (``Supervisor._result_label`` and ``Supervisor._taint``) on an allowed call, for a plain
declared label, and for a declaration with a trusted-items rule over a result of 20 messages. The
context is already at the result's level in the steady state (a context only goes down), so the
join changes nothing and writes nothing; the first taint of a run also writes a journal record.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from ..protocol import encode_call
from ..testing import MemoryAudit
from ..trusted.capability import Arg, Audience, Caveat, Expires, KeyRing, Tools
from ..trusted.flow import Answer, Answers, Label
from ..trusted.ledger import AgentQuota
from ..trusted.policy import FlowRule, OutputRule
from ..trusted.supervisor import AgentEntry, Supervisor
from ..trusted.wire import ParamSpec, ToolSpec
from .stats import Figure, percentile, summarise, timed_decisions, timed_runs

SUITE = "authz"
JOB = "bench-flow"
AGENT = "bench-agent"
TOOL = "send"
READ = "mail.read"
ADDED_TARGET_US = 5.0
SPECS = {TOOL: ToolSpec(TOOL, "write", {"to": ParamSpec("string"), "body": ParamSpec("string")}),
         READ: ToolSpec(READ, "read", {"folder": ParamSpec("string")})}
SINK = FlowRule(context="trusted", args={"to": "trusted"}, destination="to")
PLAIN_OUTPUT = OutputRule(integrity="untrusted", readers=["*@corp.example"])
ITEMS_OUTPUT = OutputRule(integrity="untrusted", readers=["*@corp.example"], trusted_items={
    "path": "messages", "when": {"sender": {"one_of": ["alice@corp.example", "bob@corp.example"]}}})
MESSAGES = {"messages": [{"sender": "alice@corp.example" if i % 2 else "bob@corp.example",
                          "subject": f"report {i}", "body": "numbers attached " * 8} for i in range(20)]}


class _NoDispatch:
    async def dispatch(self, tool: str, message: bytes, agent: str = "") -> bytes:
        raise AssertionError("the flow benchmark never dispatches")


class FlowBench:
    """A supervisor with one agent whose policy declares ``output`` for ``mail.read``, and requests
    for ``send`` under a token with or without the sink rules."""

    def __init__(self, output: OutputRule = PLAIN_OUTPUT) -> None:
        self.keyring = KeyRing.generate()
        self.request_key = os.urandom(32)
        self.supervisor = Supervisor(job_id=JOB, keyring=self.keyring, tools=dict(SPECS), audit=MemoryAudit(),
                                     dispatcher=_NoDispatch(), dispatch_key=os.urandom(32))
        self.supervisor.register_agent(AgentEntry(AGENT, self.request_key, outputs={READ: output.output()}),
                                       AgentQuota())
        self.now = time.time()
        self.calls = 0

    def token(self, flow: bool) -> bytes:
        caveats: list[Caveat] = [Audience(JOB), Expires(self.now + 3600.0), Tools((TOOL, READ)),
                                 Arg(TOOL, "to", "max_bytes", 256)]
        if flow:
            caveats += SINK.caveats(TOOL)
        token = self.keyring.mint(holder=AGENT, caveats=caveats).encode()
        self.keyring.verify(token)  # cached from here on, as an agent's token is after its first call
        return token

    def handle(self, token: bytes) -> dict[str, Any]:
        """A handle the agent holds in the run of ``token``, as it would pass it on (trusted content, readers
        *@corp.example)."""
        runs = set(self.keyring.verify(token).runs)
        h = self.supervisor.handles.issue(AGENT, runs, READ, "the quarterly figures " * 20,
                                          Label.parse({"integrity": "trusted", "readers": ["*@corp.example"]}),
                                          {"call_id": "c0", "tool": READ, "agent": AGENT}, (1 << 20, 1 << 30, 1e9))
        return {"$handle": h.id}

    def answers(self, token: bytes, count: int) -> None:
        """``count`` reader answers given to the run of ``token`` (endorsed): half IBANs, half amounts."""
        root = self.keyring.verify(token).runs[0]
        kept = self.supervisor.answers[root] = Answers()
        for i in range(count):
            kept.add(Answer(f"XX{i:02d} 4000 1234 {i:04d}" if i % 2 else 1000.0 + i, Label(1),
                            {"call_id": f"a{i}", "tool": "reader.ask", "agent": AGENT}))

    def requests(self, token: bytes, count: int, body: Any = "hello") -> list[bytes]:
        out = []
        for _ in range(count):
            self.calls += 1
            out.append(encode_call(agent=AGENT, token=token, tool=TOOL, request_key=self.request_key,
                                   args={"to": f"user{self.calls % 50}@corp.example", "body": body}))
        return out


def decision_figures(runs: int, n: int, warmup: int, no_gc: Any) -> list[Figure]:
    """``authorize.flow.off`` / ``.on`` / ``.on.handle`` / ``.on.answers64``, and ``authorize.flow.added``
    (on - off)."""
    bench = FlowBench()
    tokens = {"off": bench.token(False), "on": bench.token(True), "answers": bench.token(True)}
    handle = bench.handle(tokens["on"])
    bench.answers(tokens["answers"], 64)
    cases: dict[str, Callable[[int], list[bytes]]] = {
        "off": lambda k: bench.requests(tokens["off"], k),
        "on": lambda k: bench.requests(tokens["on"], k),
        "on.handle": lambda k: bench.requests(tokens["on"], k, body=handle),
        "on.answers64": lambda k: bench.requests(tokens["answers"], k)}
    for make in cases.values():
        timed_decisions(bench.supervisor, make(warmup))
    samples: dict[str, list[list[float]]] = {name: [] for name in cases}
    for _ in range(runs):  # alternate, so a change of machine load hits every case alike
        batches = {name: make(n) for name, make in cases.items()}
        with no_gc():
            for name, batch in batches.items():
                samples[name].append(timed_decisions(bench.supervisor, batch))
    figures = [summarise(SUITE, f"authorize.flow.{name}", "us", runs_, caveats=4 + (3 if name != "off" else 0),
                         token_cache="cached", flow_rules=0 if name == "off" else 3,
                         handle=name == "on.handle") for name, runs_ in samples.items()]
    added = [[percentile(sorted(on), 0.5) - percentile(sorted(off), 0.5)]  # each run's p50, as the figures take it
             for on, off in zip(samples["on"], samples["off"])]
    figures.append(summarise(SUITE, "authorize.flow.added", "us", added, target_max_p50=ADDED_TARGET_US,
                             what="per pair of runs: p50 with the sink rules minus p50 without"))
    return figures


def labelling_figures(runs: int, n: int, warmup: int, no_gc: Any) -> list[Figure]:
    """``label.result.declared`` and ``label.result.items20``: label one result, join it into the context."""
    figures = []
    for name, output, value in (("declared", PLAIN_OUTPUT, "one message " * 20), ("items20", ITEMS_OUTPUT, MESSAGES)):
        bench = FlowBench(output)
        sup = bench.supervisor
        ok = sup.authorize(encode_call(agent=AGENT, token=bench.token(False), tool=READ, args={"folder": "inbox"},
                                       request_key=bench.request_key))
        origin = {"call_id": ok.call_id, "tool": READ, "agent": AGENT}

        def once() -> None:
            label, _hide = sup._result_label(ok, value)
            sup._taint(ok.vt, label, origin)

        for _ in range(warmup):
            once()
        per_run = timed_runs(once, runs=runs, n=n, clock=time.perf_counter_ns, each_run=no_gc)
        sup.ledger.release(ok.reservation)
        figures.append(summarise(SUITE, f"label.result.{name}", "us", per_run,
                                 items=20 if name == "items20" else 0, item_rule=name == "items20"))
    return figures


NOTES = [
    "authorize.flow.*: Supervisor.authorize of 'send(to, body)' with a cached 4-caveat token; '.on' adds the three "
    "Flow caveats of ifc {context: trusted, args: {to: trusted}, destination: to}, every call passing them; "
    "'.on.handle' passes body as a handle (looked up, substituted, its label joined; the readers check then has a "
    "reader set). Runs of off, on and on.handle alternate.",
    "authorize.flow.added: per pair of runs, p50(on) - p50(off); target p50 <= 5 us.",
    "label.result.*: Supervisor._result_label + Supervisor._taint on an allowed call (label the result from the "
    "policy's output declaration, join it into the context of the run and its delegators); 'declared' is a plain "
    "label, 'items20' a trusted_items rule (one_of on 'sender') over 20 messages. Steady state: the context is "
    "already at the result's level, so nothing is journaled.",
]
