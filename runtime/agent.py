"""Agents: user classes whose every tool call goes through the supervisor.

    class Summarizer(Agent):
        resources = {"num_cpus": 0.5}

        async def run(self, task):
            msgs = await self.call("chat.read", channel="general")
            return summarise(msgs)

An agent holds its own token and its own request key, never a root key or a tool
credential. It can narrow its token and hand the narrower one to another agent with
``delegate``; the supervisor binds it to the other agent, so the copy is useless to anyone
else. Everything the model proposes is just arguments to ``call``.
"""

from __future__ import annotations

import contextvars
import importlib
import json
from typing import Any, Awaitable, Callable, ClassVar, Iterable, Protocol

from pydantic import ValidationError

from .errors import DelegationDenied, WardenError
from .llm import (HANDLE_KEY, ChatModel, LoopResult, handles_in_text, is_handle, model_from_config, run_tool_loop,
                  with_handle_guide)
from .reader import ASK
from .protocol import check_reply, decode_reply, encode_batch, encode_call, encode_delegate
from .trusted.capability import CallBudget, Caveat, CostBudget, Expires, MaxDepth, Token, Tools
from .trusted.policy import ArgRule, FlowRule
from .policyfile import explain_error


async def outcome(call: Awaitable[Any], *, detail: bool = False) -> dict[str, Any]:
    """A call's outcome as data, for scripted agents and their tests: ``{"ok": True, "value": V}``, or
    ``{"ok": False, "code": CODE}`` when it raised a ``WardenError`` (``detail``: also its
    ``retry_after_s`` and the ``public`` text the agent is told). Any other exception propagates."""
    try:
        return {"ok": True, "value": await call}
    except WardenError as exc:
        out: dict[str, Any] = {"ok": False, "code": exc.code.value}
        if detail:
            out.update(retry_after_s=exc.retry_after_s, public=exc.public())
        return out


class SupervisorClient(Protocol):
    async def call(self, request: bytes) -> bytes: ...
    async def delegate(self, request: bytes) -> bytes: ...
    async def call_batch(self, request: bytes) -> bytes: ...


class Peer(Protocol):
    async def run_delegated(self, task: Any, token: bytes) -> Any: ...


_TOKEN: contextvars.ContextVar[bytes | None] = contextvars.ContextVar("warden_token", default=None)


class Agent:
    """Base class of user agents. Subclasses implement ``async def run(self, task)``."""

    resources: ClassVar[dict[str, Any]] = {}  # Ray reservation: num_cpus, memory, resources={...}

    name: str
    config: dict[str, Any]

    def _attach(self, *, name: str, token: bytes, request_key: bytes, supervisor: SupervisorClient,
                peers: dict[str, tuple[str, Peer]], tool_schemas: list[dict[str, Any]],
                config: dict[str, Any], clock: Callable[[], float]) -> None:
        """Called by the runtime before ``run``; user code never calls it."""
        self.name = name
        self.config = config
        self._root_token = token
        self._request_key = request_key
        self._supervisor = supervisor
        self._peers = peers  # agent name -> (class name, handle)
        self._tool_schemas = tool_schemas
        self._clock = clock

    async def run(self, task: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.run")

    @property
    def token(self) -> bytes:
        """The token in force: the root token, or the delegated one inside ``run_delegated``."""
        return _TOKEN.get() or self._root_token

    @property
    def tool_schemas(self) -> list[dict[str, Any]]:
        """OpenAI function schemas of the tools this agent's policy names."""
        return list(self._tool_schemas)

    async def call(self, tool: str, /, **args: Any) -> Any:
        """Ask the supervisor to run ``tool``. Raises the typed error on any refusal."""
        request = encode_call(agent=self.name, token=self.token, tool=tool, args=args,
                              request_key=self._request_key)
        return decode_reply(await self._supervisor.call(request))["value"]

    async def ask(self, handle: Any, question: str, schema: dict[str, Any] | str) -> Any:
        """Ask the job's quarantined reader one question about a handle's content (``reader.ask``;
        the policy must allow it). Returns the answer, validated by the supervisor against
        ``schema`` (a low-capacity JSON Schema, or the name of one in the policy's ``schemas:``):
        a plain value, labelled endorsed, that does not taint this agent's context. For free text
        (``{"type": "string"}``) the answer comes back as a new handle. An answer that does not
        validate raises ``ReaderInvalid`` (READER_INVALID)."""
        return await self.call(ASK, handle=handle, question=question, schema=schema)

    async def call_many(self, calls: Iterable[tuple[str, dict[str, Any]]]) -> list[Any]:
        """Several calls in one message. Each is checked, audited and settled on its own; the
        result list holds each value, or the typed error of that call (not raised)."""
        calls = list(calls)
        request = encode_batch(agent=self.name, token=self.token, calls=calls, request_key=self._request_key)
        replies = decode_reply(await self._supervisor.call_batch(request))["batch"]
        out: list[Any] = []
        for reply in replies:
            try:
                out.append(check_reply(reply)["value"])
            except WardenError as exc:
                out.append(exc)
        return out

    async def delegate(self, other: type["Agent"] | str, task: Any, *, tools: Iterable[str] | None = None,
                       max_calls: int | None = None, max_cost: float | None = None, ttl_s: float | None = None,
                       max_depth: int | None = None, args: dict[str, dict[str, Any]] | None = None,
                       flow: Iterable[dict[str, Any]] = (), handles: Iterable[Any] = (),
                       caveats: Iterable[Caveat] = ()) -> Any:
        """Run ``task`` on another agent with a token no wider than this one, narrowed further.

        ``args`` maps "tool.arg" to a check, e.g. ``{"chat.read.channel": {"one_of": ["general"]}}``;
        ``flow`` adds sink rules, each a policy-wide ``ifc`` rule, e.g. ``{"effects": ["write"],
        "args": "trusted"}`` (no untrusted argument to any write tool); ``handles`` (handles or
        their ids) may then be used by the delegate too.
        """
        target = self._resolve_peer(other)
        narrowing = narrowing_caveats(now=self._clock(), tools=tools, max_calls=max_calls, max_cost=max_cost,
                                      ttl_s=ttl_s, max_depth=max_depth, args=args, flow=flow, caveats=caveats)
        token = Token.decode(self.token).attenuate(*narrowing).encode()
        ids = [h["$handle"] if is_handle(h) else h for h in handles]
        request = encode_delegate(agent=self.name, token=token, to=target, request_key=self._request_key,
                                  handles=ids)
        delegated = decode_reply(await self._supervisor.delegate(request))["token"]
        return await self._peers[target][1].run_delegated(task, delegated)

    def _resolve_peer(self, other: type["Agent"] | str) -> str:
        if isinstance(other, str):
            if other in self._peers:
                return other
        else:
            names = [n for n, (cls, _) in self._peers.items() if cls == other.__name__]
            if len(names) == 1:
                return names[0]
        raise DelegationDenied(f"{self.name!r} has no delegation peer {getattr(other, '__name__', other)!r}; "
                               f"peers: {sorted(self._peers)}")

    async def run_delegated(self, task: Any, token: bytes) -> Any:
        """Run ``task`` with a token delegated by another agent (not this agent's own)."""
        reset = _TOKEN.set(token)
        try:
            return await self.run(task)
        finally:
            _TOKEN.reset(reset)


def narrowing_caveats(*, now: float, tools: Iterable[str] | None = None, max_calls: int | None = None,
                      max_cost: float | None = None, ttl_s: float | None = None, max_depth: int | None = None,
                      args: dict[str, dict[str, Any]] | None = None, flow: Iterable[dict[str, Any]] = (),
                      caveats: Iterable[Caveat] = ()) -> list[Caveat]:
    """The caveats ``Agent.delegate`` appends to a token before handing it on (each only narrows)."""
    narrowing: list[Caveat] = list(caveats)
    if tools is not None:
        narrowing.append(Tools(tuple(tools)))
    if max_calls is not None:
        narrowing.append(CallBudget(max_calls))
    if max_cost is not None:
        narrowing.append(CostBudget(max_cost))
    if ttl_s is not None:
        narrowing.append(Expires(now + ttl_s))
    if max_depth is not None:
        narrowing.append(MaxDepth(max_depth))
    for key, rule in (args or {}).items():  # "tool.arg": a policy argument rule ({max: 100}, {one_of: [...]})
        tool, _, arg = key.rpartition(".")
        if not tool or not isinstance(rule, dict):
            raise ValueError(f"delegation args: {key!r} must be 'tool.argument' mapped to an argument rule")
        try:
            narrowing += ArgRule.model_validate(rule).caveats(tool, arg)
        except ValidationError as exc:
            raise ValueError(f"delegation args {key!r}: " + "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'rule'}: {explain_error(ArgRule, e)}" for e in exc.errors())) from None
    for i, rule in enumerate(flow):  # a policy-wide ifc rule: {"effects": [...], "context"/"args"/"destination"}
        try:
            flows = FlowRule.model_validate(rule).caveats("*")
            if not flows:
                raise ValueError(f"delegation flow[{i}]: a rule needs context, args or destination above untrusted")
            narrowing += flows
        except ValidationError as exc:
            raise ValueError(f"delegation flow[{i}]: " + "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'rule'}: {explain_error(FlowRule, e)}" for e in exc.errors())) from None
    return narrowing


def load_agent_class(path: str) -> type[Agent]:
    """``"package.module:Name"`` -> the Agent subclass it names. TypeError / ImportError otherwise."""
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise TypeError(f"expected 'module:Name', got {path!r}")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Agent)):
        raise TypeError(f"{path} is not a subclass of runtime.Agent")
    return obj


class ToolCallingAgent(Agent):
    """The generic LLM agent: the model proposes tool calls, the supervisor decides.

    Configured from the job file: ``config: {model: {...}, system: "...", max_turns: 8,
    show_results: false, handle_guide: true}`` (``show_results`` adds each tool result, abridged,
    to the agent's result). Handles the supervisor returns reach the model as JSON it can copy;
    ``handle_guide`` (default true) appends ``runtime.llm.HANDLE_GUIDE`` to ``system``: what a
    handle is, how to pass one on as an argument, and that ``handle.reveal`` taints the context.
    The model's arguments, handles included, go to the supervisor as the model wrote them.
    """

    def build_model(self) -> ChatModel:
        """The model this agent follows; override to build one in code."""
        return model_from_config(self.config["model"])

    def system_prompt(self) -> str | None:
        """The job's ``system``, with the handle guide appended unless ``handle_guide: false``."""
        system = self.config.get("system")
        return with_handle_guide(system) if self.config.get("handle_guide", True) else system

    async def run(self, task: Any) -> dict[str, Any]:
        model = self.build_model()

        async def call_tool(name: str, args: dict[str, Any]) -> Any:
            return await self.call(name, **args)

        text = task if isinstance(task, str) else json.dumps(task, default=str, ensure_ascii=False)  # handles: JSON
        result: LoopResult = await run_tool_loop(
            model, task=text, tools=self.tool_schemas, call_tool=call_tool,
            system=self.system_prompt(), max_turns=int(self.config.get("max_turns", 8)))
        tool_messages = [m for m in result.messages if m.get("role") == "tool"]  # one per call, in order
        calls = []
        for c, m in zip(result.calls, tool_messages):
            entry: dict[str, Any] = {"tool": c.name, "ok": c.ok, "code": c.error_code}
            if c.ok and (handles := handles_in_text(m.get("content", ""))):
                entry["handles"] = [h[HANDLE_KEY] for h in handles]  # what the call returned instead of content
            calls.append(entry)
        out = {"answer": result.answer, "turns": result.turns, "stopped": result.stopped, "calls": calls}
        if self.config.get("show_results"):  # what each call returned, as the model saw it (abridged)
            out["results"] = [m.get("content", "")[:600] for m in tool_messages]
        return out
