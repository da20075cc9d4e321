"""Tool worker: executes dispatched calls, and only dispatched calls.

Invariant: a message is executed only if it carries a valid supervisor MAC, has not been
seen before, and its deadline has not passed. So an agent (or any other Ray process) that
calls a worker directly, replays a dispatch, or edits one is refused with
DISPATCH_REFUSED, and nothing runs.

Invariant: every call is answered by its deadline. A call's time is bounded by the
dispatch's ``deadline`` and, for a sandboxed tool, by the policy's ``wall_s`` (plus
``SANDBOX_GRACE_S`` for starting the sandbox); blocking tool functions run on the worker's
own ``ToolThreads``, so a call that never returns is answered with a typed error in time,
its thread is written off and counted (``threads()``), and other agents' calls keep running.

Tools run in this process; model-written code never does: sandboxed tools hand it to the
agent's sandbox session (``SandboxPool``).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import inspect
import time
import traceback
from hashlib import sha256
from typing import Any, Callable

import msgpack

from ..errors import DispatchRefused, ErrorCode, SandboxKilled, SandboxUnavailable, ToolFailed, WardenError
from .artifacts import collect
from .base import Limits
from .context import ToolContext
from .pool import SandboxPool
from .threads import Overdue, ToolThreads
from .restart import DispatchJournal

MAX_DISPATCH_BYTES = 2 << 20
MAX_RESULT_BYTES = 8 << 20
SANDBOX_GRACE_S = 10.0  # beyond wall_s, for starting a sandbox and killing one that overran
REPLY_MARGIN_S = 1.0  # answer this much before the deadline (at most a tenth of the time), so the reply arrives in time


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def artifacts_proof(dispatch_key: bytes, job: str) -> bytes:
    """What the driver shows a worker to collect a job's artifacts (derived from the dispatch key)."""
    return hmac.new(dispatch_key, b"artifacts:" + job.encode(), sha256).digest()


def _error(code: ErrorCode, reason: str) -> bytes:
    return _pack({"ok": False, "error": {"code": code.value, "reason": reason}})


class DispatchGate:
    """The check every dispatch passes before anything runs (tool workers and readers alike): the
    supervisor's MAC, this job, the deadline, and a call id never seen before (``journal``: the ids
    a restarted process's predecessor accepted are refused too). ``open`` returns the decoded body
    or raises DispatchRefused."""

    def __init__(self, dispatch_key: bytes, job: str, *, clock: Callable[[], float] = time.time,
                 journal: DispatchJournal | None = None) -> None:
        self._key = dispatch_key
        self._job = job
        self._clock = clock
        self.journal = journal  # accepted ids on disk: a restarted worker refuses them too
        self.seen: dict[str, float] = {}  # call_id -> deadline
        self._next_prune = 0.0

    def open(self, message: Any) -> dict[str, Any]:
        try:
            if not isinstance(message, (bytes, bytearray)) or len(message) > MAX_DISPATCH_BYTES:
                raise ValueError("not bytes or too large")
            body_bytes, mac = msgpack.unpackb(bytes(message), raw=False)
            if not isinstance(body_bytes, bytes) or not isinstance(mac, bytes):
                raise ValueError("envelope is not [bytes, bytes]")
        except Exception as exc:
            raise DispatchRefused(f"undecodable dispatch: {type(exc).__name__}") from None
        good = hmac.new(self._key, body_bytes, sha256).digest()
        if not hmac.compare_digest(good, mac):
            raise DispatchRefused("dispatch MAC does not verify: not sent by the supervisor")
        try:
            body = msgpack.unpackb(body_bytes, raw=False)
            call_id, deadline = str(body["call_id"]), float(body["deadline"])
            if not isinstance(body["tool"], str) or not isinstance(body["args"], dict):
                raise TypeError("tool/args of the wrong type")
            str(body["agent"])
        except Exception as exc:
            raise DispatchRefused(f"signed dispatch lacks or mistypes a field: {type(exc).__name__}: {exc}") from None
        now = self._clock()
        if body.get("job") != self._job:
            raise DispatchRefused(f"dispatch for job {body.get('job')!r}, worker serves {self._job!r}")
        if now > deadline:
            raise DispatchRefused("dispatch past its deadline")
        if call_id in self.seen:
            raise DispatchRefused(f"dispatch {call_id} replayed")
        if now >= self._next_prune:  # expired ids can no longer be replayed (their deadline passed)
            self.seen = {c: d for c, d in self.seen.items() if d >= now}
            self._next_prune = now + 10.0
        if self.journal is not None:
            self.journal.admit(call_id, deadline)
        self.seen[call_id] = deadline
        return body


class ToolWorker:
    def __init__(self, *, dispatch_key: bytes, tools: dict[str, Any], job: str,
                 tool_config: dict[str, Any] | None = None, clock: Callable[[], float] = time.time,
                 sandboxes: SandboxPool | None = None, threads: ToolThreads | None = None,
                 journal: DispatchJournal | None = None) -> None:
        self._key = dispatch_key
        self._tools = tools
        self._job = job
        self._config = tool_config or {}
        self._clock = clock
        self._sandboxes = sandboxes
        self._threads = threads or ToolThreads()
        self._gate = DispatchGate(dispatch_key, job, clock=clock, journal=journal)
        self.refused = 0
        self.executed = 0

    def open(self, message: Any) -> dict[str, Any]:
        """Check the supervisor's MAC, freshness and uniqueness; the decoded dispatch or refuse."""
        return self._gate.open(message)

    async def execute(self, message: Any) -> bytes:
        try:
            body = self.open(message)
        except WardenError as exc:
            self.refused += 1
            return _error(exc.code, exc.reason)
        tool = self._tools.get(body["tool"])
        if tool is None:
            return _error(ErrorCode.TOOL_FAILED, f"worker has no tool {body['tool']!r}")
        self.executed += 1
        try:
            value = await self._run(tool, body)
            out = _pack({"ok": True, "value": value, "cost": None})
        except WardenError as exc:
            return _error(exc.code, exc.reason)
        except Exception as exc:  # the tool's own failure, reported as data
            tb = traceback.extract_tb(exc.__traceback__)[-1:]
            where = f" at {tb[0].name}:{tb[0].lineno}" if tb else ""
            return _error(ErrorCode.TOOL_FAILED, f"{type(exc).__name__}: {exc}{where}"[:2000])
        if len(out) > MAX_RESULT_BYTES:
            return _error(ErrorCode.TOOL_FAILED, f"result is {len(out)} bytes > {MAX_RESULT_BYTES}")
        return out

    async def execute_batch(self, messages: Any) -> list[bytes]:
        """Several dispatches in one hop; each is checked (MAC, freshness, replay) on its own."""
        if not isinstance(messages, list) or len(messages) > 256:
            self.refused += 1
            return [_error(ErrorCode.DISPATCH_REFUSED, "a batch is a list of at most 256 dispatches")]
        return list(await asyncio.gather(*[self.execute(m) for m in messages]))

    async def _run(self, tool: Any, body: dict[str, Any]) -> Any:
        """``tool`` is a ``runtime.tool.Tool`` (duck-typed: this side does not import the trusted side)."""
        kwargs, agent, handle = dict(body["args"]), body["agent"], None
        limits = self._limits(tool, body)
        left_s = body["deadline"] - self._clock()
        limit_s = left_s - min(REPLY_MARGIN_S, left_s / 10)
        by_wall = limits is not None and limits.wall_s + SANDBOX_GRACE_S < limit_s
        if by_wall:
            limit_s = limits.wall_s + SANDBOX_GRACE_S
        loop = asyncio.get_running_loop()
        ends_at = loop.time() + limit_s
        try:
            if limits is not None:
                pool, backend = self._sandboxes, str(body["sandbox"]["backend"])
                handle = await self._threads.run(lambda: pool.handle(agent, backend, limits),
                                                 owner=agent, timeout_s=ends_at - loop.time())
            if tool.wants_ctx:
                creds = body.get("credentials") if isinstance(body.get("credentials"), dict) else {}
                kwargs["ctx"] = ToolContext(agent, body["call_id"], self._job, self._config, handle, creds)
            if not inspect.iscoroutinefunction(tool.fn):
                return await self._threads.run(functools.partial(tool.fn, **kwargs), owner=agent,
                                               timeout_s=ends_at - loop.time())
            try:
                return await asyncio.wait_for(tool.fn(**kwargs), ends_at - loop.time())
            except asyncio.TimeoutError:
                raise Overdue(started=True) from None
        except Overdue as late:
            raise self._overdue(body["tool"], late, limit_s, by_wall) from None

    def _limits(self, tool: Any, body: dict[str, Any]) -> Limits | None:
        """A sandboxed tool's limits; backend and limits come from the signed dispatch, i.e. the agent's policy."""
        if not tool.spec.sandboxed:
            return None
        settings = body.get("sandbox")
        if not isinstance(settings, dict) or self._sandboxes is None:
            raise SandboxUnavailable("sandboxed tool dispatched without sandbox settings, or worker has no "
                                     "sandbox pool", code=ErrorCode.SANDBOX_UNAVAILABLE)
        return Limits.from_dict(settings.get("limits"))

    def _overdue(self, tool: str, late: Overdue, limit_s: float, by_wall: bool) -> WardenError:
        if not late.started:
            return ToolFailed(f"no free tool thread within {limit_s:.1f}s ({self._threads.counts()['stuck']} "
                              "stuck in this worker)", code=ErrorCode.WORKER_UNAVAILABLE, tool=tool)
        what = f"wall limit {limit_s - SANDBOX_GRACE_S:g}s (+{SANDBOX_GRACE_S:g}s grace)" if by_wall \
            else f"dispatch deadline ({limit_s:.1f}s)"
        reason = (f"{tool} still running at its {what}: answered now; a blocked thread is written off "
                  f"({self._threads.counts()['stuck']} stuck in this worker)")
        if by_wall:
            return SandboxKilled(reason, code=ErrorCode.SANDBOX_TIMEOUT, tool=tool)
        return ToolFailed(reason, code=ErrorCode.WORKER_UNAVAILABLE, tool=tool)

    def artifacts(self, proof: bytes, paths: list[str], *, max_bytes: int, max_files: int) -> dict[str, Any]:
        """Every agent's ``paths`` (``sandbox.artifacts.collect``), for the job's driver only: ``proof``
        is ``artifacts_proof(dispatch key, job)``, which no agent holds (workspaces are private)."""
        if not isinstance(proof, bytes) or not hmac.compare_digest(proof, artifacts_proof(self._key, self._job)):
            self.refused += 1
            raise DispatchRefused("artifacts asked for without the driver's proof")
        if self._sandboxes is None:
            return {}
        return {agent: collect(ws, list(paths), max_bytes=max_bytes, max_files=max_files)
                for agent, ws in self._sandboxes.workspaces().items()}

    def threads(self) -> dict[str, Any]:
        """The worker's tool threads: live, idle, queued, stuck (in all and per agent), written off."""
        return self._threads.counts()

    def close(self) -> None:
        """End every agent's sandbox session and remove its workspace, and let the tool threads go."""
        self._threads.close()
        if self._sandboxes is not None:
            self._sandboxes.close()
