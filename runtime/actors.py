"""The one module that turns Warden's plain classes into Ray actors.

``SupervisorActor`` wraps ``trusted.Supervisor``, ``ToolWorkerActor`` wraps
``sandbox.ToolWorker``, ``AgentActor`` hosts a user ``Agent``. Only bytes built by
``runtime.protocol`` travel between them on the call path; keys are handed out here at
creation time by the (trusted) driver, and each actor gets only its own.

Ray is not a security boundary: any process in the cluster can call any actor whose handle
it can obtain. That is why workers check a supervisor MAC on every dispatch, why agents
prove possession with their own request key, and why actors are not given guessable names.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

import ray

from .agent import load_agent_class
from .trusted.audit import AuditLog
from .trusted.capability import KeyRing
from .trusted.ledger import AgentQuota
from .trusted.supervisor import AgentEntry, Supervisor
from .trusted.wire import ToolSpec
from .sandbox.pool import SandboxPool
from .sandbox.worker import ToolWorker
from .tool import load_tools


class _ByAgent:
    """Dispatcher over tool-worker actors: an agent's calls always go to the same worker, so its
    sandbox session stays warm and its workspace lives in one place."""

    def __init__(self, workers: list[Any]) -> None:
        if not workers:
            raise ValueError("a job needs at least one tool worker")
        self._workers = list(workers)

    def _worker(self, agent: str) -> Any:
        return self._workers[zlib.crc32(agent.encode()) % len(self._workers)]

    async def dispatch(self, tool: str, message: bytes, agent: str = "") -> bytes:
        return await self._worker(agent).execute.remote(message)

    async def dispatch_batch(self, messages: list[bytes], agent: str = "") -> list[bytes]:
        return await self._worker(agent).execute_batch.remote(messages)


@ray.remote
class SupervisorActor:
    def __init__(self, *, job_id: str, keys: dict[str, Any], dispatch_key: bytes, tools: list[ToolSpec],
                 audit_path: str, workers: list[Any], agents: list[tuple[AgentEntry, AgentQuota]],
                 call_timeout_s: float, credentials: dict[str, dict[str, str]],
                 audit_options: dict[str, Any] | None = None) -> None:
        from .metrics import PrometheusObserver

        self._audit = AuditLog(audit_path, **(audit_options or {}))
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._observer = PrometheusObserver(job_id, agents=[e.name for e, _ in agents], tools=[t.name for t in tools])
        self._server: Any = None
        self._sup = Supervisor(job_id=job_id, keyring=KeyRing.from_secret_dict(keys),
                               tools={t.name: t for t in tools}, audit=self._audit,
                               dispatcher=_ByAgent(workers), dispatch_key=dispatch_key,
                               call_timeout_s=call_timeout_s, credentials=credentials,
                               observer=self._observer, on_event=self._events.put_nowait)
        for entry, quota in agents:
            self._sup.register_agent(entry, quota)
        self._audit.record("job_start", job=job_id, agents=[e.name for e, _ in agents],
                           tools=sorted(t.name for t in tools))

    async def call(self, request: bytes) -> bytes:
        return await self._sup.call(request)

    async def delegate(self, request: bytes) -> bytes:
        return await self._sup.delegate(request)

    async def call_batch(self, request: bytes) -> bytes:
        return await self._sup.call_batch(request)

    def stats(self) -> list[dict[str, Any]]:
        return self._sup.stats()

    def status(self) -> dict[str, Any]:
        return self._sup.status()

    def metrics_text(self) -> bytes:
        return self._observer.render()

    async def serve(self, host: str, port: int, operator_token: str) -> str:
        """Start /metrics and the authenticated /control API; returns the base URL."""
        from .control import control_routes
        from .metrics import MetricsServer

        self._server = MetricsServer(self._observer)
        self._server.add_routes(control_routes(self._sup, operator_token))
        bound_host, bound_port = await self._server.start(host, port)
        return f"http://{bound_host}:{bound_port}"

    async def next_event(self) -> dict[str, Any]:
        """The next event for the job's host (e.g. a quarantine: stop that agent's actor)."""
        return await self._events.get()

    async def close(self, status: str) -> int:
        seq = self._audit.record("job_end", job=self._sup.job_id, status=status,
                                 quarantined=sorted(self._sup.quarantined))
        self._audit.close()
        if self._server is not None:
            await self._server.stop()
        return seq


@ray.remote
class ToolWorkerActor:
    def __init__(self, *, dispatch_key: bytes, tool_modules: list[str], job_id: str,
                 tool_config: dict[str, Any]) -> None:
        pool = SandboxPool()
        self._worker = ToolWorker(dispatch_key=dispatch_key, tools=load_tools(tool_modules), job=job_id,
                                  tool_config=tool_config, sandboxes=pool)

    async def execute(self, message: bytes) -> bytes:
        return await self._worker.execute(message)

    async def execute_batch(self, messages: list[bytes]) -> list[bytes]:
        return await self._worker.execute_batch(messages)

    def counters(self) -> dict[str, int]:
        return {"executed": self._worker.executed, "refused": self._worker.refused}

    def shutdown(self) -> None:
        self._worker.close()


class _SupervisorClient:
    def __init__(self, handle: Any) -> None:
        self._h = handle

    async def call(self, request: bytes) -> bytes:
        return await self._h.call.remote(request)

    async def delegate(self, request: bytes) -> bytes:
        return await self._h.delegate.remote(request)

    async def call_batch(self, request: bytes) -> bytes:
        return await self._h.call_batch.remote(request)


class _PeerClient:
    def __init__(self, handle: Any) -> None:
        self._h = handle

    async def run_delegated(self, task: Any, token: bytes) -> Any:
        return await self._h.run_delegated.remote(task, token)


@ray.remote
class AgentActor:
    def __init__(self, *, cls_path: str, name: str, token: bytes, request_key: bytes, supervisor: Any,
                 tool_schemas: list[dict[str, Any]], config: dict[str, Any]) -> None:
        import time

        self._agent = load_agent_class(cls_path)()
        self._attach = dict(name=name, token=token, request_key=request_key,
                            supervisor=_SupervisorClient(supervisor), tool_schemas=tool_schemas,
                            config=config, clock=time.time)
        self._agent._attach(peers={}, **self._attach)

    def connect(self, peers: dict[str, tuple[str, Any]]) -> None:
        self._agent._attach(peers={n: (c, _PeerClient(h)) for n, (c, h) in peers.items()}, **self._attach)

    async def run(self, task: Any) -> Any:
        return await self._agent.run(task)

    async def run_delegated(self, task: Any, token: bytes) -> Any:
        return await self._agent.run_delegated(task, token)
