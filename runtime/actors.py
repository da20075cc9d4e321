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
import hmac
import secrets
import zlib
from typing import Any

import msgpack
import ray

from .agent import load_agent_class
from .control import LocalOperator, PeersBehind, merge_stats
from .errors import InternalError, SupervisorUnavailable
from .trusted.audit import AuditLog
from .trusted.capability import KeyRing, first_holder
from .trusted.ledger import AgentQuota
from .trusted.state import StateJournal
from .trusted.supervisor import AgentEntry, Supervisor, shard_of
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


PEER_TIMEOUT_S = 30.0


async def _await(ref: Any) -> Any:
    return await ref


@ray.remote
class SupervisorActor:
    """One supervisor shard. With ``shard=(i, n)``, n > 1, it decides the calls of the agents
    whose root tokens hash to i, and carries quarantines and operator changes to its peers
    before it answers. Created with ``max_restarts``: a restarted instance replays its state
    journal and, in a sharded job, refuses calls until the host has reconnected it to its peers
    (which also brings it every change it missed, and them every change it had not sent).

    Agents hold this actor's handle (to call it), and Ray lets any handle holder call any
    method: every method but ``call``/``delegate``/``call_batch`` and the MAC'd ``apply_peer``
    takes ``host_secret``, which only the driver and the shards have."""

    def __init__(self, *, job_id: str, keys: dict[str, Any], dispatch_key: bytes, tools: list[ToolSpec],
                 audit_path: str, workers: list[Any], agents: list[tuple[AgentEntry, AgentQuota]],
                 call_timeout_s: float, credentials: dict[str, dict[str, str]],
                 audit_options: dict[str, Any] | None = None, shard: tuple[int, int] = (0, 1),
                 state_path: str | None = None, peer_key: bytes | None = None, host_secret: bytes = b"") -> None:
        from .metrics import PrometheusObserver

        if len(host_secret) < 16:
            raise ValueError("a supervisor shard needs a host secret of at least 16 bytes")
        self._host_secret = host_secret

        audit_options = audit_options or {}
        self._audit = AuditLog(audit_path, **audit_options)
        journal = StateJournal(state_path, fsync=audit_options.get("fsync") == "always") if state_path else None
        self.restarted = journal is not None and journal.size > 0
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._observer = PrometheusObserver(job_id, agents=[e.name for e, _ in agents], tools=[t.name for t in tools])
        self._server: Any = None
        self._outbox: list[bytes] = []  # changes for the peers, sent before the current request is answered
        self._behind: set[int] = set()  # peers (by position) that missed a change: sent a full sync first
        self._flushing = asyncio.Lock()  # one flush at a time: when a caller's flush returns, its messages are out
        self._sup = Supervisor(job_id=job_id, keyring=KeyRing.from_secret_dict(keys),
                               tools={t.name: t for t in tools}, audit=self._audit,
                               dispatcher=_ByAgent(workers), dispatch_key=dispatch_key,
                               call_timeout_s=call_timeout_s, credentials=credentials,
                               observer=self._observer, on_event=self._event, shard=shard, journal=journal,
                               peer_key=peer_key)
        for entry, quota in agents:
            self._sup.register_agent(entry, quota)
        if self.restarted:
            self._sup.restore()
            for agent in sorted(self._sup.quarantined):  # the host may never have seen the first event
                self._events.put_nowait({"event": "quarantine", "agent": agent, "shard": shard[0],
                                         "reason": "quarantined (restored after a restart)"})
        else:
            self._audit.record("job_start", job=job_id, agents=[e.name for e, _ in agents],
                               tools=sorted(t.name for t in tools), shard=shard[0], shards=shard[1])
        self._peers: list[Any] | None = [] if shard[1] == 1 else None  # None: not connected (yet)

    def _guard(self, secret: bytes) -> None:
        if not (isinstance(secret, bytes) and hmac.compare_digest(secret, self._host_secret)):
            raise PermissionError("this supervisor method is for the job's driver and its shards only")

    def _event(self, event: dict[str, Any]) -> None:
        self._events.put_nowait(event)
        if event.get("event") == "quarantine" and self._sup.shards > 1:
            self._outbox.append(self._sup.peer_message("quarantine", agent=event["agent"], reason=event["reason"],
                                                       by="anomaly"))

    async def _flush(self) -> list[str]:
        """Carry pending changes to every peer. A peer that cannot take one is sent a full sync
        (idempotent) before anything else from now on, until it takes it. Returns the failures."""
        async with self._flushing:
            return await self._flush_now()

    async def _flush_now(self) -> list[str]:
        if not self._peers or not (self._outbox or self._behind):
            return []
        messages, self._outbox = self._outbox, []
        sends = [(k, self._sup.sync_message()) for k in sorted(self._behind)]
        sends += [(k, m) for m in messages for k in range(len(self._peers)) if k not in self._behind]
        results = await asyncio.gather(*[asyncio.wait_for(_await(self._peers[k].apply_peer.remote(m)), PEER_TIMEOUT_S)
                                         for k, m in sends], return_exceptions=True)
        failed = {k: f"{type(r).__name__}: {r}"[:200] for (k, _), r in zip(sends, results)
                  if isinstance(r, BaseException)}
        self._behind = set(failed)
        if failed:
            self._audit.record("peer_unreachable", shard=self._sup.shard, failures=sorted(failed.values()))
        return sorted(failed.values())

    def _ready(self, request: bytes) -> bytes | None:
        if self._peers is None:
            return self._sup.refuse(SupervisorUnavailable("this shard restarted and is not yet reconnected to "
                                                          "its peers"), request)
        return None

    async def _handle(self, entry: Any, request: bytes) -> bytes:
        try:
            reply = self._ready(request) or await entry(request)
        except Exception as exc:  # the supervisor never raises by design; if it does, still deny
            reply = self._sup.refuse(InternalError(f"{type(exc).__name__}: {exc}"[:300]), request)
        await self._flush()
        return reply

    async def call(self, request: bytes) -> bytes:
        return await self._handle(self._sup.call, request)

    async def delegate(self, request: bytes) -> bytes:
        return await self._handle(self._sup.delegate, request)

    async def call_batch(self, request: bytes) -> bytes:
        return await self._handle(self._sup.call_batch, request)

    # ------------------------------------------------------------------ shards
    async def connect(self, secret: bytes, peers: list[Any]) -> bool:
        """The other shards' handles, at start and again after a restart. A restarted shard first
        takes from every peer what it missed and gives them what it had not sent (both are full,
        idempotent syncs); only then does it take calls. Returns whether it is a restarted one."""
        self._guard(secret)
        if self.restarted and peers:
            syncs = await asyncio.gather(*[asyncio.wait_for(_await(p.sync_message.remote(secret)), PEER_TIMEOUT_S)
                                           for p in peers])
            for message in syncs:
                self._sup.apply_peer(message)
            own = self._sup.sync_message()
            await asyncio.gather(*[asyncio.wait_for(_await(p.apply_peer.remote(own)), PEER_TIMEOUT_S)
                                   for p in peers])
        self._peers = list(peers)
        await self._flush()
        return self.restarted

    def sync_message(self, secret: bytes) -> bytes:
        self._guard(secret)
        return self._sup.sync_message()

    def apply_peer(self, message: bytes) -> Any:
        return self._sup.apply_peer(message)

    def approvals(self, secret: bytes) -> list[dict[str, Any]]:
        self._guard(secret)
        return self._sup.approvals.list()

    # ------------------------------------------------------------------ operating
    def stats(self, secret: bytes) -> list[dict[str, Any]]:
        self._guard(secret)
        return self._sup.stats()

    def status(self, secret: bytes) -> dict[str, Any]:
        """The shard's status, with where it runs (process and Ray node), for operators and tests."""
        import os

        self._guard(secret)
        return {**self._sup.status(), "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "restarted": self.restarted}

    def metrics_text(self, secret: bytes) -> bytes:
        self._guard(secret)
        return self._observer.render()

    async def serve(self, secret: bytes, host: str, port: int, operator_token: str) -> str:
        """Start /metrics and the authenticated /control API; returns the base URL."""
        from .control import control_routes
        from .metrics import MetricsServer

        self._guard(secret)
        if self._server is not None:
            await self._server.stop()
        self._server = MetricsServer(self._observer)
        self._server.add_routes(control_routes(ShardOperator(self), operator_token))
        bound_host, bound_port = await self._server.start(host, port)
        return f"http://{bound_host}:{bound_port}"

    async def next_event(self, secret: bytes) -> dict[str, Any]:
        """The next event for the job's host (e.g. a quarantine: stop that agent's actor)."""
        self._guard(secret)
        return await self._events.get()

    async def close(self, secret: bytes, status: str) -> dict[str, Any]:
        """Write the last record, close the log and verify it here, on the node that holds it."""
        from .trusted import audit as audit_mod

        self._guard(secret)
        seq = self._audit.record("job_end", job=self._sup.job_id, status=status,
                                 quarantined=sorted(self._sup.quarantined), shard=self._sup.shard)
        self._audit.close()
        if self._sup.journal is not None:
            self._sup.journal.close()
        if self._server is not None:
            await self._server.stop()
        report = audit_mod.verify(self._audit.path)
        return {"seq": seq, "path": self._audit.path, "ok": report.ok, "records": report.records,
                "problem": report.problem}


class ShardOperator(LocalOperator):
    """The operator API of one shard: changes are made here and carried to every peer before the
    request is answered; status and approvals cover every shard."""

    def __init__(self, actor: Any) -> None:
        super().__init__(actor._sup)
        self._actor = actor

    @property
    def _peers(self) -> list[Any]:
        return self._actor._peers or []

    async def _ask(self, method: str) -> tuple[list[Any], list[str]]:
        """Every reachable peer's answer, and what went wrong with the others."""
        secret = self._actor._host_secret
        answers = await asyncio.gather(*[asyncio.wait_for(_await(getattr(p, method).remote(secret)), PEER_TIMEOUT_S)
                                         for p in self._peers], return_exceptions=True)
        return ([a for a in answers if not isinstance(a, BaseException)],
                [f"{type(a).__name__}: {a}"[:200] for a in answers if isinstance(a, BaseException)])

    async def _everywhere(self, op: str, **args: Any) -> None:
        if self.sup.shards > 1:
            if self._actor._peers is None:
                raise PeersBehind("this shard restarted and is not reconnected yet; the change is made here "
                                  "and reaches the others when it is")
            self._actor._outbox.append(self.sup.peer_message(op, **args))
            failed = await self._actor._flush()
            if failed:
                raise PeersBehind(f"made here, but {len(failed)} peer shard(s) did not take it yet (they get it "
                                  f"with the next change or when they reconnect): {failed[0]}")

    async def status(self) -> dict[str, Any]:
        others, unreachable = await self._ask("status")
        shards = [self._actor.status(self._actor._host_secret)] + others
        where = sorted(({k: st[k] for k in ("shard", "pid", "node_id", "restarted")} for st in shards),
                       key=lambda w: w["shard"])
        return {"job": self.sup.job_id, "agents": sorted(self.sup.agents), "shards": where,
                "unreachable_shards": unreachable,
                "keys": self.sup.keyring.kids, "current_key": self.sup.keyring.current_kid,
                "quarantined": sorted({a for st in shards for a in st["quarantined"]}),
                "revoked_agents": sorted({a for st in shards for a in st["revoked_agents"]}),
                "approvals_pending": [p for st in shards for p in st["approvals_pending"]],
                "stats": merge_stats([st["stats"] for st in shards])}

    async def approvals(self) -> list[dict[str, Any]]:
        others, _ = await self._ask("approvals")  # calls parked on an unreachable shard died with it
        return self.sup.approvals.list() + [a for lst in others for a in lst]

    async def decide(self, approval_id: str, **kw: Any) -> dict[str, Any]:
        try:
            return self.sup.decide_approval(approval_id, **kw)
        except KeyError:
            if not self._peers:
                raise
        for peer in self._peers:  # signed: an agent holding a shard handle cannot answer for a human
            try:
                return await asyncio.wait_for(
                    _await(peer.apply_peer.remote(self.sup.peer_message("decide", id=approval_id, **kw))),
                    PEER_TIMEOUT_S)
            except Exception as exc:  # Ray re-raises the peer's KeyError as an instance of it
                if not isinstance(exc, KeyError) and not isinstance(getattr(exc, "cause", None), KeyError):
                    raise
        raise KeyError(approval_id)

    async def revoke_agent(self, agent: str, by: str) -> None:
        self.sup.revoke_agent(agent, by=by)
        await self._everywhere("revoke_agent", agent=agent, by=by)

    async def revoke_token(self, token_id: bytes, by: str) -> None:
        self.sup.revoke_token(token_id, by=by)
        await self._everywhere("revoke_token", token_id=token_id, by=by)

    async def rotate_key(self, by: str) -> str:
        kid, key = secrets.token_hex(4), secrets.token_bytes(32)
        epoch = self.sup.add_key(kid, key, by=by)
        await self._everywhere("add_key", kid=kid, key=key, epoch=epoch, by=by)
        return kid

    async def retire_key(self, kid: str, by: str) -> None:
        self.sup.retire_key(kid, by=by)
        await self._everywhere("retire_key", kid=kid, by=by)


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
    """The agent's side of the supervisor: each request goes to the shard of its token's root
    agent (the shard checks it: routing is not trusted). A shard that dies before answering is
    reported as SUPERVISOR_UNAVAILABLE; the call is never resent."""

    def __init__(self, handles: list[Any]) -> None:
        self._hs = list(handles)
        self._route: dict[bytes, Any] = {}

    def _shard(self, request: bytes) -> Any:
        if len(self._hs) == 1:
            return self._hs[0]
        try:
            token = msgpack.unpackb(msgpack.unpackb(request, raw=False)[0], raw=False)["token"]
            handle = self._route.get(token)
            if handle is None:
                handle = self._hs[shard_of(first_holder(token), len(self._hs))]
                if len(self._route) > 1024:
                    self._route.clear()
                self._route[token] = handle
            return handle
        except Exception:
            return self._hs[0]  # a malformed request: let a shard refuse it, on record

    async def _send(self, method: str, request: bytes) -> bytes:
        try:
            return await getattr(self._shard(request), method).remote(request)
        except ray.exceptions.RayActorError as exc:
            err = SupervisorUnavailable(f"supervisor shard stopped before answering: {type(exc).__name__}")
            return msgpack.packb({"ok": False, "error": err.to_wire()}, use_bin_type=True)

    async def call(self, request: bytes) -> bytes:
        return await self._send("call", request)

    async def delegate(self, request: bytes) -> bytes:
        return await self._send("delegate", request)

    async def call_batch(self, request: bytes) -> bytes:
        return await self._send("call_batch", request)


class _PeerClient:
    def __init__(self, handle: Any) -> None:
        self._h = handle

    async def run_delegated(self, task: Any, token: bytes) -> Any:
        return await self._h.run_delegated.remote(task, token)


@ray.remote
class AgentActor:
    def __init__(self, *, cls_path: str, name: str, token: bytes, request_key: bytes, supervisors: list[Any],
                 tool_schemas: list[dict[str, Any]], config: dict[str, Any]) -> None:
        import time

        self._agent = load_agent_class(cls_path)()
        self._attach = dict(name=name, token=token, request_key=request_key,
                            supervisor=_SupervisorClient(supervisors), tool_schemas=tool_schemas,
                            config=config, clock=time.time)
        self._agent._attach(peers={}, **self._attach)

    def connect(self, peers: dict[str, tuple[str, Any]]) -> None:
        self._agent._attach(peers={n: (c, _PeerClient(h)) for n, (c, h) in peers.items()}, **self._attach)

    async def run(self, task: Any) -> Any:
        return await self._agent.run(task)

    async def run_delegated(self, task: Any, token: bytes) -> Any:
        return await self._agent.run_delegated(task, token)
