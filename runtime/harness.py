"""Policy tests without Ray: the real supervisor in one process, and what it decided, with why.

    from runtime import PolicyHarness

    with PolicyHarness(tools=["agents.chat"], stubs={"chat.post": {"id": 1}}) as h:
        h.add_agent("policies/lead.yaml")
        d = h.call("lead", "chat.post", {"channel": "general", "text": "hi"})
        assert d.code == "POLICY_DENIED", d.reason

A ``PolicyHarness`` is a ``Supervisor`` with a fresh key ring, agents registered from their
policies by ``runtime.registry.register_agent`` (the job driver's own code), an audit log on a
real file (in a temporary directory unless ``audit_dir`` is given), and a real ``ToolWorker``
behind an in-process dispatcher. Every request is MAC'd with the agent's request key and goes
through the whole pipeline: decode, request MAC and nonce, token chain and holder, argument
canonicalisation, caveats, approval, quotas, the audit write, the MAC'd dispatch and the
outcome. Nothing is short-cut: a ``Decision`` is what a job would have decided.

The agent on the real path is told only the error code and the tool. The harness adds, for the
test, what the audit log holds: the reason, with values, and the records the call wrote.

Time is a ``FakeClock`` (``advance(seconds)``), so expiry and rate refills are tested without
waiting. A call that a policy parks for approval is answered by the harness: ``approve=True``
or ``False`` per call (default: not approved, so ``APPROVAL_DENIED``).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .agent import narrowing_caveats
from .errors import ConfigError, ErrorCode, WardenError
from .llm import model_from_config
from .protocol import REQUEST_VERSION, decode_reply, seal_request
from .reader import ASK, Reader, ask_tool
from .registry import Registration, check_policy_against_tools, register_agent
from .sandbox.worker import ToolWorker
from .testing import FakeClock, InProcessDispatcher
from .tool import Tool, load_tools
from .trusted.audit import AuditLog
from .trusted.capability import Caveat, KeyRing, Token
from .trusted.ledger import QuotaLedger
from .trusted.policy import Policy
from .policyfile import load_policy
from .trusted.supervisor import Supervisor

__all__ = ["Decision", "PolicyHarness"]

APPROVER = "policy-test"
# The records written while the current request is decided (a request runs in its own context).
_WRITTEN: contextvars.ContextVar[list[dict[str, Any]] | None] = contextvars.ContextVar("warden_harness_records",
                                                                                      default=None)
_APPROVE: contextvars.ContextVar[bool] = contextvars.ContextVar("warden_harness_approve", default=False)


@dataclass
class Decision:
    """What the supervisor decided about one call or delegation, and why.

    ``code`` is the denial's stable code (None when allowed); ``reason`` the full reason from the
    audit record (which rule, which values), never shown to the agent; ``error`` is exactly what
    the agent's ``call`` raised (code and tool only). For an allowed call, ``outcome`` is its
    outcome record and ``value`` the tool's result; for an allowed delegation, ``token`` is the
    token the delegate now holds."""

    agent: str
    tool: str  # the tool, or "delegate:NAME"
    allowed: bool
    code: str | None = None
    reason: str | None = None
    error: WardenError | None = None
    value: Any = None
    outcome: dict[str, Any] | None = None
    audit: dict[str, Any] | None = None  # the decision (or delegate) record
    records: list[dict[str, Any]] = field(default_factory=list)  # every record this request wrote
    token: bytes | None = field(default=None, repr=False)

    @property
    def result(self) -> str:
        """``"allow"`` or the denial code: what a case file's ``expect`` is compared with."""
        return "allow" if self.allowed else str(self.code)

    @property
    def outcome_code(self) -> str | None:
        """The failure code of an allowed call that did not succeed (TOOL_FAILED, SANDBOX_CPU, ...)."""
        return None if self.outcome is None or self.outcome.get("ok") else self.outcome.get("code")

    def __str__(self) -> str:
        if not self.allowed:
            return f"{self.agent} -> {self.tool}: {self.code} ({self.reason})"
        if self.outcome_code:
            return f"{self.agent} -> {self.tool}: allow; tool failed: {self.outcome_code} ({self.outcome['reason']})"
        return f"{self.agent} -> {self.tool}: allow"


class _TeeAudit:
    """The audit sink: every record goes to the real log file first, then to the harness."""

    def __init__(self, log: AuditLog, seen: Callable[[dict[str, Any]], None]) -> None:
        self.log, self._seen = log, seen

    def record(self, kind: str, **fields: Any) -> int:
        seq = self.log.record(kind, **fields)
        self._seen({"seq": seq, "kind": kind, **fields})
        return seq


def _stub_tool(real: Tool, stub: Any) -> Tool:
    """``real``'s contract with ``stub`` as its body: a callable gets the checked arguments (and
    ``ctx`` if it asks for it), anything else is returned as the value. No sandbox is started."""
    if callable(stub):
        try:
            wants_ctx = "ctx" in inspect.signature(stub).parameters
        except (TypeError, ValueError):  # a builtin without a signature: it gets the arguments only
            wants_ctx = False
        fn = stub
    else:
        wants_ctx, fn = False, (lambda **_args: stub)
    return Tool(fn, replace(real.spec, sandboxed=False), real.schema, wants_ctx)


class PolicyHarness:
    """The supervisor, its audit log and a tool worker in this process, for policy tests.

    ``tools``: ``Tool`` objects or module names whose ``@tool`` functions exist. ``stubs``:
    tool name -> a callable or a value that replaces the tool's body (its contract stays, so
    arguments are checked as in a job). ``run_tools=False`` stubs every other tool with
    ``None``: no tool code runs. ``tool_config`` becomes ``ctx.config`` (``run_dir`` defaults to
    the harness's directory). ``sandboxes`` is a ``SandboxPool`` for sandboxed tools that are not
    stubbed (without one they end in ``SANDBOX_UNAVAILABLE``, after an allow). ``reader``: a job file's
    ``reader:`` section (``{"model": {...}, "system"?, "cost"?}``): ``reader.ask`` is offered and
    answered by a ``runtime.reader.Reader`` with that model, through the MAC'd dispatch."""

    def __init__(self, tools: Iterable[Tool | str] | Mapping[str, Tool] = (), *,
                 stubs: Mapping[str, Any] | None = None, run_tools: bool = True, job_id: str = "policy-test",
                 audit_dir: str | os.PathLike[str] | None = None, tool_config: dict[str, Any] | None = None,
                 clock: FakeClock | None = None, sandboxes: Any = None, call_timeout_s: float = 30.0,
                 reader: dict[str, Any] | None = None) -> None:
        self.tools = _tools(tools)
        if reader is not None:  # as a job's reader: section: reader.ask, answered by a reader in this process
            if ASK in self.tools:
                raise ConfigError(f"tool {ASK!r} is given, and reader= offers it too", code=ErrorCode.JOB_INVALID)
            self.tools[ASK] = ask_tool(float(reader.get("cost", 1.0)))
        unknown = sorted(set(stubs or {}) - set(self.tools))
        if unknown:
            raise ConfigError(f"stubs for tools that are not given: {unknown}", code=ErrorCode.JOB_INVALID)
        self.job_id = job_id
        self.clock = clock or FakeClock(time.time())
        self._own_dir = audit_dir is None
        self.dir = Path(tempfile.mkdtemp(prefix="warden-policy-test-") if audit_dir is None else audit_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.audit_path = self.dir / "audit.log"
        self.records: list[dict[str, Any]] = []  # as the supervisor wrote them (the file redacts secret fields)
        self._log = AuditLog(self.audit_path)
        self._loop = asyncio.new_event_loop()
        self.agents: dict[str, Registration] = {}
        self.policies: dict[str, Policy] = {}
        dispatch_key = secrets.token_bytes(32)
        self.reader = None if reader is None else Reader(
            dispatch_key=dispatch_key, job=job_id, model=model_from_config(reader["model"]),
            system=str(reader.get("system", "")), clock=self.clock)
        self.worker = ToolWorker(dispatch_key=dispatch_key, tools=self._worker_tools(stubs or {}, run_tools),
                                 job=job_id, tool_config={"run_dir": str(self.dir), **(tool_config or {})},
                                 clock=self.clock, sandboxes=sandboxes)
        self.supervisor = Supervisor(job_id=job_id, keyring=KeyRing.generate(),
                                     tools={n: t.spec for n, t in self.tools.items()},
                                     audit=_TeeAudit(self._log, self._seen),
                                     dispatcher=InProcessDispatcher(self.worker, self.reader),
                                     dispatch_key=dispatch_key, clock=self.clock, ledger=QuotaLedger(clock=self.clock),
                                     call_timeout_s=call_timeout_s)

    def _worker_tools(self, stubs: Mapping[str, Any], run_tools: bool) -> dict[str, Tool]:
        out = {}
        for name, t in self.tools.items():
            if name in stubs:
                out[name] = _stub_tool(t, stubs[name])
            else:
                out[name] = t if run_tools else _stub_tool(t, None)
        return out

    # ------------------------------------------------------------------ agents
    def add_agent(self, policy: Policy | str | os.PathLike[str] | dict[str, Any], *, name: str | None = None) -> str:
        """Register an agent from its policy (a ``Policy``, a file, YAML text or a dict), exactly as a
        job does. Raises ConfigError if the policy names a tool the harness lacks, or another effect."""
        policy = policy if isinstance(policy, Policy) else load_policy(policy)
        name = name or policy.agent
        if name in self.agents:
            raise ConfigError(f"agent {name!r} is registered already", code=ErrorCode.JOB_INVALID)
        check_policy_against_tools(name, policy, self.tools, offered_by="the harness")  # as a job start does
        reg = register_agent(self.supervisor.keyring, policy, job_id=self.job_id, now=self.clock(), name=name,
                             tools=self.tools)
        self.supervisor.register_agent(reg.entry, reg.quota)
        self.agents[name], self.policies[name] = reg, policy
        return name

    def token(self, agent: str) -> bytes:
        """The agent's root token."""
        return self._agent(agent).token

    def advance(self, seconds: float) -> None:
        """Move the harness's clock (token expiry, rate-bucket refill, approval time)."""
        self.clock.advance(seconds)

    # ------------------------------------------------------------------ requests
    def call(self, agent: str, tool: str, args: Mapping[str, Any] | None = None, *, token: bytes | None = None,
             approve: bool | None = None) -> Decision:
        """``agent`` calls ``tool`` with ``args`` (with its root token, or ``token``, e.g. a delegated one)."""
        return self._run(self.acall(agent, tool, args, token=token, approve=approve))

    async def acall(self, agent: str, tool: str, args: Mapping[str, Any] | None = None, *,
                    token: bytes | None = None, approve: bool | None = None) -> Decision:
        body = {"op": "call", "tool": tool, "args": dict(args or {})}
        return await self._send(agent, tool, self.supervisor.call, self._request(agent, body, token), bool(approve))

    def delegate(self, agent: str, to: str, *, token: bytes | None = None, tools: Iterable[str] | None = None,
                 max_calls: int | None = None, max_cost: float | None = None, ttl_s: float | None = None,
                 max_depth: int | None = None, args: dict[str, dict[str, Any]] | None = None,
                 flow: Iterable[dict[str, Any]] = (), handles: Iterable[Any] = (),
                 caveats: Iterable[Caveat] = ()) -> Decision:
        """``agent`` narrows its token (as ``Agent.delegate`` does) and asks the supervisor to bind it
        to ``to``, passing on ``handles``. Allowed: ``Decision.token`` is the delegate's token, for
        ``call(to, ..., token=)``."""
        narrowing = narrowing_caveats(now=self.clock(), tools=tools, max_calls=max_calls, max_cost=max_cost,
                                      ttl_s=ttl_s, max_depth=max_depth, args=args, flow=flow, caveats=caveats)
        narrowed = Token.decode(token or self.token(agent)).attenuate(*narrowing).encode()
        ids = [h["$handle"] if isinstance(h, dict) else h for h in handles]
        request = self._request(agent, {"op": "delegate", "to": to, **({"handles": ids} if ids else {})}, narrowed)
        return self._run(self._send(agent, f"delegate:{to}", self.supervisor.delegate, request))

    async def _send(self, agent: str, tool: str, entry: Callable[[bytes], Any], request: bytes,
                    approve: bool = False) -> Decision:
        """One request; the records it wrote are told apart from those of concurrent requests by
        the context they were written in (each request runs in its own), and so is its approval."""
        mine: list[dict[str, Any]] = []
        reset = _WRITTEN.set(mine), _APPROVE.set(approve)
        try:
            raw = await entry(request)
        finally:
            _WRITTEN.reset(reset[0])
            _APPROVE.reset(reset[1])
        return self._decision(agent, tool, raw, mine)

    def _request(self, agent: str, body: dict[str, Any], token: bytes | None) -> bytes:
        """The real wire format, MAC'd with the agent's own key; timestamped by the harness's clock."""
        reg = self._agent(agent)
        return seal_request({"v": REQUEST_VERSION, "agent": agent, "token": token or reg.token, **body,
                             "nonce": os.urandom(16), "ts": self.clock()}, reg.request_key)

    def _decision(self, agent: str, tool: str, raw: bytes, records: list[dict[str, Any]]) -> Decision:
        kinds = ("decision", "delegate")
        decided = next((r for r in reversed(records) if r["kind"] in kinds), None)
        outcome = next((r for r in reversed(records) if r["kind"] == "outcome"), None)
        d = Decision(agent, tool, allowed=decided is not None and decided.get("decision", "allow") == "allow",
                     audit=decided, outcome=outcome, records=records)
        try:
            reply = decode_reply(raw)
            d.value, d.token = reply.get("value"), reply.get("token")
        except WardenError as exc:
            d.error = exc
            if not d.allowed:
                d.code = exc.code.value
                d.reason = (decided or {}).get("reason") or "no decision record (see records)"
        return d

    def _agent(self, agent: str) -> Registration:
        try:
            return self.agents[agent]
        except KeyError:
            raise ConfigError(f"no agent {agent!r} in the harness; add_agent() it first "
                              f"(agents: {sorted(self.agents)})", code=ErrorCode.JOB_INVALID) from None

    def _seen(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        mine = _WRITTEN.get()
        if mine is not None:
            mine.append(record)
        if record["kind"] == "approval_requested":  # the human of a job, answering at once
            asyncio.get_running_loop().call_soon(self._answer, record["approval_id"], _APPROVE.get())

    def _answer(self, approval_id: str, approve: bool) -> None:
        why = "approved by the test" if approve else "the test did not approve this call (approve=True does)"
        self.supervisor.decide_approval(approval_id, approve=approve, approver=APPROVER, reason=why)

    def _run(self, coro: Any) -> Any:
        if self._loop.is_closed():
            raise RuntimeError("the harness is closed")
        return self._loop.run_until_complete(coro)

    def restart(self, journal: Any) -> int:
        """A supervisor restart, as a job's shard after a crash: a new ``Supervisor`` over the same keys,
        tools, log, worker and clock, with this ``StateJournal``, the agents registered again and the
        journal replayed. Returns ``Supervisor.restore``'s count of calls closed as in flight."""
        old = self.supervisor
        self.supervisor = Supervisor(job_id=old.job_id, keyring=old.keyring, tools=old.tools, audit=old.audit,
                                     dispatcher=old.dispatcher, dispatch_key=old._dispatch_key, clock=old.clock,
                                     ledger=QuotaLedger(clock=self.clock), call_timeout_s=old.call_timeout_s,
                                     journal=journal)
        for reg in self.agents.values():
            self.supervisor.register_agent(reg.entry, reg.quota)
        return self.supervisor.restore()

    # ------------------------------------------------------------------ the log
    def verify(self) -> Any:
        """The audit log's chain check (``runtime.auditlog.verify``), as ``warden audit verify`` does it."""
        from .auditlog import verify

        return verify(self.audit_path)

    def close(self) -> None:
        """Stop the worker, close the log; remove the temporary directory if the harness made it."""
        if self._loop.is_closed():
            return
        self.worker.close()
        self._log.close()
        self._loop.close()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "PolicyHarness":
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()


def _tools(tools: Iterable[Tool | str] | Mapping[str, Tool]) -> dict[str, Tool]:
    if isinstance(tools, Mapping):
        return dict(tools)
    out: dict[str, Tool] = {}
    for t in tools:
        try:
            found = load_tools([t]) if isinstance(t, str) else {t.name: t}
        except Exception as exc:  # a module that does not import, or defines a tool twice
            raise ConfigError(f"cannot load tools from {t!r}: {type(exc).__name__}: {exc}",
                              code=ErrorCode.JOB_INVALID) from None
        for name, tool_obj in found.items():
            if out.get(name, tool_obj) is not tool_obj:
                raise ConfigError(f"tool {name!r} given twice", code=ErrorCode.JOB_INVALID)
            out[name] = tool_obj
    return out
