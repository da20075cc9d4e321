"""Fakes for the seams, shipped with the library so unit tests need no Ray.

``FakeClock`` (time you move by hand), ``MemoryAudit`` (an audit sink in a list, which can
be told to fail), ``InProcessDispatcher`` (a dispatcher that calls a ``ToolWorker``
directly), ``InProcessSupervisorClient`` (what an agent talks to in tests) and
``ScriptedResolver`` (a DNS that answers from a script: the rebinding attacker for
``http.fetch``). Tests of the audit log itself use real files, not these.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..errors import AuditUnavailable
from ..llm import ScriptedModel
from ..reader import ASK, dispatched_tool
from ..sandbox.worker import ToolWorker


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class MemoryAudit:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.fail = False

    def record(self, kind: str, **fields: Any) -> int:
        if self.fail:
            raise AuditUnavailable("audit sink is down (test)")
        self.records.append({"seq": len(self.records), "kind": kind, **fields})
        return len(self.records) - 1

    def of(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == kind and all(r.get(k) == v for k, v in match.items())]


class InProcessDispatcher:
    """A worker (and a ``runtime.reader.Reader`` for ``reader.ask``, if given) in this process."""

    def __init__(self, worker: ToolWorker, reader: Any = None) -> None:
        self.worker = worker
        self.reader = reader
        self.messages: list[bytes] = []

    async def dispatch(self, tool: str, message: bytes, agent: str = "") -> bytes:
        self.messages.append(message)
        if self.reader is not None and tool == ASK:
            return await self.reader.execute(message)
        return await self.worker.execute(message)

    async def dispatch_batch(self, messages: list[bytes], agent: str = "") -> list[bytes]:
        if self.reader is None or all(dispatched_tool(m) != ASK for m in messages):
            self.messages.extend(messages)
            return await self.worker.execute_batch(messages)
        return list(await asyncio.gather(*[self.dispatch(dispatched_tool(m) or "", m, agent) for m in messages]))


class InProcessSupervisorClient:
    def __init__(self, supervisor: Any) -> None:
        self.supervisor = supervisor

    async def call(self, request: bytes) -> bytes:
        return await self.supervisor.call(request)

    async def delegate(self, request: bytes) -> bytes:
        return await self.supervisor.delegate(request)

    async def call_batch(self, request: bytes) -> bytes:
        return await self.supervisor.call_batch(request)


class ScriptedResolver:
    """Answers each lookup of a name with the next answer of its script (the last one repeats),
    like a DNS server whose records change between two queries; ``lookups`` records each query."""

    def __init__(self, script: dict[str, list[list[str]]]) -> None:
        self.script = {name: list(answers) for name, answers in script.items()}
        self.lookups: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append((host, port))
        answers = self.script.get(host)
        if not answers:
            raise OSError(f"no such name: {host}")
        return answers.pop(0) if len(answers) > 1 else answers[0]


__all__ = ["FakeClock", "MemoryAudit", "InProcessDispatcher", "InProcessSupervisorClient", "ScriptedModel",
           "ScriptedResolver"]
