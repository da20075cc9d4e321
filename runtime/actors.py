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
import os
import warnings
from pathlib import Path
from typing import Any, Awaitable

import msgpack
import ray

from .agent import load_agent_class
from .control import LocalOperator, PeersBehind, merge_stats
from .errors import ErrorCode, InternalError, SupervisorUnavailable, ToolFailed
from .observe import stats_of, status_of
from .trusted.audit import AuditLog
from .trusted.capability import KeyRing
from .protocol import first_holder
from .reader import ASK, Reader, dispatched_tool
from .trusted.ledger import AgentQuota
from .trusted.state import StateJournal
from .trusted.supervisor import AgentEntry, Supervisor, shard_of
from .trusted.wire import ToolSpec
from .sandbox.pool import SandboxPool
from .sandbox.restart import DispatchJournal, reclaim_workspaces, workspace_root
from .sandbox.worker import ToolWorker
from .mcpjob import Connections, worker_tools
from .tool import load_tools


def _was_restarted() -> bool:
    """Whether Ray restarted this actor. Ray's ``was_current_actor_reconstructed`` reads Ray's own
    deprecated ``actor_id`` and prints a RayDeprecationWarning in every actor; that one is hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "This API is deprecated", DeprecationWarning, r"ray\.runtime_context")
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


def place(agents: list[str], workers: int) -> dict[str, int]:
    """Each agent, in order, on the tool worker with the fewest agents so far (ties: the lowest
    index): n agents spread evenly over the workers, whatever their names."""
    home: dict[str, int] = {}
    for agent in agents:
        home[agent] = _least_loaded(home, range(workers))
    return home


def _least_loaded(home: dict[str, int], live: Any) -> int:
    load = {i: 0 for i in live}
    for i in home.values():
        if i in load:
            load[i] += 1
    return min(load, key=lambda i: (load[i], i))


PROBE_TIMEOUT_S = 60.0  # how long later calls wait for a failed tool worker to answer again


class _Pool:
    """Actors that Ray restarts on a crash (``max_restarts``), and the state of each as the calls found
    it: live, suspect (a call failed: the next calls wait for one probe) or dead for good. A call is
    sent once and never again: a call in flight when its actor died ends WORKER_UNAVAILABLE (the
    actor may have acted). Subclasses say which actor serves a call (``_pick``)."""

    what = "tool worker"

    def __init__(self, actors: list[Any]) -> None:
        self._workers = list(actors)
        self._dead: set[int] = set()
        self._suspect: dict[int, asyncio.Future[None] | None] = {}  # failed a call: probe before the next
        self._methods: dict[tuple[int, str], Any] = {}

    def _live(self) -> list[int]:
        live = [k for k in range(len(self._workers)) if k not in self._dead]
        if not live:
            raise ToolFailed(f"every {self.what} of the job is dead (out of restarts)",
                             code=ErrorCode.WORKER_UNAVAILABLE)
        return live

    def _pick(self, key: str) -> int:
        raise NotImplementedError

    async def _send(self, key: str, method: str, payload: Any) -> Any:
        i = self._pick(key)
        if i in self._suspect:
            await self._healthy(i)
            i = self._pick(key)
        return await self._send_to(i, method, payload)

    async def _send_to(self, i: int, method: str, payload: Any) -> Any:
        bound = self._methods.get((i, method))
        if bound is None:  # Ray binds a new method object on every attribute access
            bound = self._methods[(i, method)] = getattr(self._workers[i], method)
        try:
            return await bound.remote(payload)
        except ray.exceptions.ActorDiedError:
            self._dead.add(i)  # for good; this call is not resent (it may have run)
            raise
        except ray.exceptions.RayActorError:
            self._suspect.setdefault(i, None)  # restarting, or dead and not yet noticed by Ray
            raise

    async def _healthy(self, i: int) -> None:
        """After actor ``i`` failed a call, the next calls wait for one shared probe to answer.

        Until Ray notices a death, a call sent to the dead process fails like the one in flight
        did, and must not be resent (it may have run); a probe runs nothing, so it is the one
        thing safe to repeat. It ends when the restarted process answers, or the actor is dead
        for good (its calls then go elsewhere)."""
        probe = self._suspect.get(i)
        if probe is None:
            probe = self._suspect[i] = asyncio.ensure_future(self._probe(i))
        try:
            await asyncio.shield(probe)
        finally:
            if probe.done() and self._suspect.get(i) is probe:
                del self._suspect[i]

    async def _probe(self, i: int) -> None:
        delay_s, give_up = 0.02, asyncio.get_running_loop().time() + PROBE_TIMEOUT_S
        while True:
            try:
                await asyncio.wait_for(awaited(self._workers[i].counters.remote()), PROBE_TIMEOUT_S)
                return
            except ray.exceptions.ActorDiedError:
                self._dead.add(i)
                return
            except (ray.exceptions.RayActorError, asyncio.TimeoutError):
                if asyncio.get_running_loop().time() > give_up:
                    return  # the next call then reports the actor's state itself
                # Ray gives no event for "restarted"; each probe is one cheap call, backing off.
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 1.0)


class _Placed(_Pool):
    """Dispatcher over tool-worker actors, and the reader pool (``_Readers``) for ``reader.ask``. Each
    agent has a home worker (``place``, the same in every shard), so its sandbox session and workspace
    live in one place. A worker that crashes is restarted by Ray: calls sent meanwhile wait for it
    (within the call's deadline) and run on the new process. A worker out of restarts is dead: its
    agents move, one call later, to the live worker with the fewest agents."""

    def __init__(self, workers: list[Any], home: dict[str, int] | None = None, readers: list[Any] = ()) -> None:
        if not workers:
            raise ValueError("a job needs at least one tool worker")
        super().__init__(workers)
        self._home = {a: i for a, i in (home or {}).items() if 0 <= i < len(self._workers)}
        self._readers = _Readers(list(readers)) if readers else None

    def _pick(self, agent: str) -> int:
        i = self._home.get(agent)
        if i is None or i in self._dead:
            i = self._home[agent] = _least_loaded(self._home, self._live())
        return i

    async def dispatch(self, tool: str, message: bytes, agent: str = "") -> bytes:
        if tool == ASK:
            return await self._reader(message)
        return await self._send(agent, "execute", message)

    async def _reader(self, message: bytes) -> bytes:
        if self._readers is None:  # the job offers no reader.ask then: the supervisor should never get here
            return _worker_error("the job has no reader pool (no reader: section)")
        return await self._readers.ask(message)

    async def dispatch_batch(self, messages: list[bytes], agent: str = "") -> list[bytes]:
        """The batch's calls on the agent's worker, in one hop; its ``reader.ask`` calls on the reader pool."""
        asks = {i for i, m in enumerate(messages) if dispatched_tool(m) == ASK}
        if not asks:
            return await self._send(agent, "execute_batch", messages)
        rest = [m for i, m in enumerate(messages) if i not in asks]
        order = sorted(asks)
        answers = asyncio.gather(*[self._reader(messages[i]) for i in order], return_exceptions=True)
        others = self._send(agent, "execute_batch", rest) if rest else asyncio.sleep(0, [])
        got, done = await asyncio.gather(answers, others)  # the workers' hop failing fails the batch, as before
        out, done_iter = {i: _reply_of(a) for i, a in zip(order, got)}, iter(done)
        return [out[i] if i in out else next(done_iter) for i in range(len(messages))]


def _worker_error(reason: str) -> bytes:
    return msgpack.packb({"ok": False, "error": {"code": ErrorCode.WORKER_UNAVAILABLE.value, "reason": reason}},
                         use_bin_type=True)


def _reply_of(answer: Any) -> bytes:
    """A reader's reply in a batch; its failure as the reply a single call's failure would settle to."""
    if isinstance(answer, BaseException):
        return _worker_error(f"reader stopped before answering: {type(answer).__name__}")
    return answer


class _Readers(_Pool):
    """The job's reader actors (``ReaderActor``). Each question goes to the live reader with the fewest
    questions in flight from this shard (ties: the next in turn). A reader that failed a call, or
    that the supervisor stopped waiting for, is probed in the background; until it answers, the
    others take the questions (if there are none, they wait for the probe)."""

    what = "reader"

    def __init__(self, readers: list[Any]) -> None:
        super().__init__(readers)
        self._in_flight = [0] * len(readers)
        self._turn = 0

    def _pick(self, _key: str = "") -> int:
        live = self._live()
        for k in [k for k, probe in self._suspect.items() if probe is None]:  # probed in the background: back soon
            probe = self._suspect[k] = asyncio.ensure_future(self._probe(k))
            probe.add_done_callback(lambda done, k=k: self._suspect.get(k) is done and self._suspect.pop(k))
        ready = [k for k in live if k not in self._suspect] or live
        n = len(self._workers)
        self._turn += 1
        return min(ready, key=lambda k: (self._in_flight[k], (k - self._turn) % n))

    async def ask(self, message: bytes) -> bytes:
        i = self._pick()
        self._in_flight[i] += 1
        try:
            if i in self._suspect:
                await self._healthy(i)
            return await self._send_to(i, "execute", message)
        except asyncio.CancelledError:  # the supervisor gave up waiting (a hung reader?): probe it before the next
            self._suspect.setdefault(i, None)
            raise
        finally:
            self._in_flight[i] -= 1


PEER_TIMEOUT_S = 30.0
TEARDOWN_TIMEOUT_S = 60.0
SETTLE_MARGIN_S = 5.0  # beyond the call timeout, for a call's last records once its dispatch ended


async def awaited(ref: Any) -> Any:
    """A Ray object ref as a coroutine (for ``ensure_future`` and ``wait_for``)."""
    return await ref


def verified(path: str | os.PathLike[str]) -> dict[str, Any]:
    """An audit log's verification, as the job's result reports it."""
    from . import auditlog

    report = auditlog.verify(path)
    return {"ok": report.ok, "path": str(path), "records": report.records, "problem": report.problem}


def unsettled_calls(path: str) -> dict[str, str]:
    """The allowed calls an audit log has no outcome for (call id -> agent): what a restarted
    shard must still close on record (the process may have died between its journal and its log)."""
    from .auditlog import read_records

    open_calls: dict[str, str] = {}
    for rec in read_records(path):
        if rec.get("kind") == "decision" and rec.get("decision") == "allow":
            open_calls[rec["call_id"]] = rec["agent"]
        elif rec.get("kind") == "outcome":
            open_calls.pop(rec.get("call_id"), None)
    return open_calls


def within(ref: Any, timeout_s: float = PEER_TIMEOUT_S) -> Awaitable[Any]:
    """A Ray call awaited for at most ``timeout_s`` (then ``asyncio.TimeoutError``)."""
    return asyncio.wait_for(awaited(ref), timeout_s)


class Shard:
    """One supervisor shard, in plain Python (``SupervisorActor`` is its Ray face). With
    ``shard=(i, n)``, n > 1, it decides the calls made under tokens whose root agent hashes to i,
    and carries quarantines and operator changes to its peers before it answers. A restarted
    instance (Ray ``max_restarts``) replays its state journal and, in a sharded job, refuses
    calls until the host has reconnected it to its peers; reconnecting pulls every peer's state
    and pushes its own. Restarted where its journal is not (another node), it has lost its
    state: it refuses every call for the rest of the job and says so."""

    def __init__(self, *, job_id: str, keys: dict[str, Any], dispatch_key: bytes, tools: list[ToolSpec],
                 audit_path: str, workers: list[Any], agents: list[tuple[AgentEntry, AgentQuota]],
                 placement: dict[str, int] | None = None,
                 call_timeout_s: float, credentials: dict[str, dict[str, dict[str, str]]],
                 audit_options: dict[str, Any] | None = None, shard: tuple[int, int] = (0, 1),
                 state_path: str | None = None, peer_key: bytes | None = None, host_secret: bytes = b"",
                 reconstructed: bool = False, readers: list[Any] = ()) -> None:
        from .metrics import PrometheusObserver

        self.host_secret = host_secret
        audit_options = audit_options or {}
        self.audit = AuditLog(audit_path, **audit_options)
        journal = StateJournal(state_path, fsync=audit_options.get("fsync") == "always") if state_path else None
        self.restarted = journal is not None and journal.size > 0
        # Ray restarted this actor, but its journal is empty: it came back on another node.
        self.state_lost = reconstructed and journal is not None and not self.restarted
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.observer = PrometheusObserver(job_id, agents=[e.name for e, _ in agents], tools=[t.name for t in tools])
        self._server: Any = None
        self._outbox: list[bytes] = []  # changes for the peers, sent before the current request is answered
        self._behind: set[int] = set()  # peers (by position) that missed a change: retried with a full sync
        self._flushing = asyncio.Lock()  # one flush at a time: when a caller's flush returns, its messages are out
        self._retrying: asyncio.Task[None] | None = None
        self._in_flight = 0  # agent requests being handled: closing waits for them (their outcome records)
        self._idle = asyncio.Event()
        self._idle.set()
        self.sup = Supervisor(job_id=job_id, keyring=KeyRing.from_secret_dict(keys),
                              tools={t.name: t for t in tools}, audit=self.audit,
                              dispatcher=_Placed(workers, placement, readers), dispatch_key=dispatch_key,
                              call_timeout_s=call_timeout_s, credentials=credentials,
                              observer=self.observer, on_event=self._event, shard=shard, journal=journal,
                              peer_key=peer_key)
        for entry, quota in agents:
            self.sup.register_agent(entry, quota)
        if self.state_lost:
            self.audit.record("shard_state_lost", shard=shard[0],
                              reason="restarted on a node without its state journal; refusing every call")
        elif self.restarted:
            self.sup.restore(unsettled_calls(audit_path))
            for agent in sorted(self.sup.quarantined):  # the host may never have seen the first event
                self.events.put_nowait({"event": "quarantine", "agent": agent, "shard": shard[0],
                                        "reason": "quarantined (restored after a restart)"})
        else:
            self.audit.record("job_start", job=job_id, agents=[e.name for e, _ in agents],
                              tools=sorted(t.name for t in tools), shard=shard[0], shards=shard[1])
        self.peers: list[Any] | None = [] if shard[1] == 1 and not self.state_lost else None  # None: not ready

    def _event(self, event: dict[str, Any]) -> None:
        self.events.put_nowait(event)
        if event.get("event") == "quarantine" and self.sup.shards > 1:
            self._outbox.append(self.sup.peer_message("quarantine", agent=event["agent"], reason=event["reason"],
                                                      by="anomaly"))

    # ------------------------------------------------------------------ changes for the peers
    async def flush(self) -> list[str]:
        """Carry this shard's pending changes to every peer; returns what failed. A peer that fails is
        retried in the background with a full (idempotent) sync until it takes one."""
        if not self._outbox:
            return []
        async with self._flushing:
            if not self.peers or not self._outbox:
                return []  # not connected yet: kept, sent when it is
            messages, self._outbox = self._outbox, []
            sends = [(k, m) for m in messages for k in range(len(self.peers))]
            failed = await self._send(sends)
        return failed

    async def _send(self, sends: list[tuple[int, bytes]]) -> list[str]:
        assert self.peers is not None
        results = await asyncio.gather(*[within(self.peers[k].apply_peer.remote(m)) for k, m in sends],
                                       return_exceptions=True)
        failed = {k: f"{type(r).__name__}: {r}"[:200] for (k, _), r in zip(sends, results)
                  if isinstance(r, BaseException)}
        if failed:
            self._behind |= set(failed)
            self.audit.record("peer_unreachable", shard=self.sup.shard, failures=sorted(failed.values()))
            if self._retrying is None or self._retrying.done():
                self._retrying = asyncio.ensure_future(self._catch_up())
        return sorted(failed.values())

    async def _catch_up(self) -> None:
        """Send a full sync to every peer that missed a change, with backoff, until each took one."""
        delay = 0.5
        while self._behind and self.peers:
            await asyncio.sleep(delay)  # a peer that is down: nothing to await but time
            behind, self._behind = sorted(self._behind), set()
            message = self.sup.sync_message()
            results = await asyncio.gather(*[within(self.peers[k].apply_peer.remote(message)) for k in behind],
                                           return_exceptions=True)
            self._behind |= {k for k, r in zip(behind, results) if isinstance(r, BaseException)}
            delay = min(delay * 2, 30.0)

    # ------------------------------------------------------------------ calls
    async def handle(self, op: str, request: bytes) -> bytes:
        """One agent request (op: call, delegate or call_batch); always an encoded reply."""
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._handle(op, request)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _handle(self, op: str, request: bytes) -> bytes:
        try:
            if self.peers is None:
                why = ("this shard restarted where its state is not; it refuses every call" if self.state_lost
                       else "this shard restarted and is not yet reconnected to its peers")
                reply = self.sup.refuse(SupervisorUnavailable(why), request)
            else:
                reply = await getattr(self.sup, op)(request)
        except Exception as exc:  # the supervisor never raises by design; if it does, still deny
            reply = self.sup.refuse(InternalError(f"{type(exc).__name__}: {exc}"[:300]), request)
        await self.flush()
        return reply

    # ------------------------------------------------------------------ shards
    async def connect(self, peers: list[Any]) -> dict[str, bool]:
        """The other shards' handles, at start and again after a restart; a restarted shard first
        pulls every peer's state and pushes its own (full, idempotent syncs), then takes calls."""
        if self.state_lost:
            return {"restarted": True, "state_lost": True}
        if self.restarted and peers:
            syncs = await asyncio.gather(*[within(p.sync_message.remote(self.host_secret)) for p in peers])
            for message in syncs:
                self.sup.apply_peer(message)
            own = self.sup.sync_message()
            await asyncio.gather(*[within(p.apply_peer.remote(own)) for p in peers])
        self.peers, self._behind = list(peers), set()
        await self.flush()
        return {"restarted": self.restarted, "state_lost": False}

    def status(self) -> dict[str, Any]:
        """The shard's status, with where it runs (process and Ray node), for operators and tests."""
        import os

        return {**status_of(self.sup), "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "restarted": self.restarted, "state_lost": self.state_lost}

    async def serve(self, host: str, port: int, operator_token: str) -> str:
        """Start /metrics and the authenticated /control API; returns the base URL."""
        from .control import control_routes
        from .metrics import MetricsServer

        if self._server is not None:
            await self._server.stop()
        self._server = MetricsServer(self.observer)
        self._server.add_routes(control_routes(ShardOperator(self), operator_token))
        bound_host, bound_port = await self._server.start(host, port)
        return f"http://{bound_host}:{bound_port}"

    async def settle(self) -> None:
        """Let the calls still in flight finish on record (an agent that died, or timed out, may
        have left some): parked ones are denied now, dispatched ones end within the call timeout."""
        for agent in sorted(self.sup.agents):
            self.sup.approvals.deny_agent(agent, approver="(job end)", reason="the job ended before a decision")
        try:
            await asyncio.wait_for(self._idle.wait(), self.sup.call_timeout_s + SETTLE_MARGIN_S)
        except asyncio.TimeoutError:  # a bug, not a slow tool: dispatches are bounded by the call timeout
            self.audit.record("calls_unsettled", shard=self.sup.shard, count=self._in_flight)

    async def close(self, status: str) -> dict[str, Any]:
        """Write the last record, close the log and verify it here, on the node that holds it."""
        if self._retrying is not None:
            self._retrying.cancel()
        await self.settle()
        seq = self.audit.record("job_end", job=self.sup.job_id, status=status,
                                quarantined=sorted(self.sup.quarantined), shard=self.sup.shard)
        self.audit.close()
        if self.sup.journal is not None:
            self.sup.journal.close()
        if self._server is not None:
            await self._server.stop()
        return {"seq": seq, **verified(self.audit.path)}


@ray.remote
class SupervisorActor:
    """The Ray face of a ``Shard``. Ray lets whoever holds a handle call every method of an actor
    class, underscored or not, and agents hold their shards' handles (to send calls). So this
    class has exactly the methods below (a test checks the list): the agents' three, the MAC'd
    ``apply_peer``, and the rest, which take a host secret only the driver and the shards have.
    Everything runs on the actor's one event loop: the supervisor's state (parked calls, event
    queue) is not thread-safe, so peer traffic gets no concurrency group of its own."""

    def __init__(self, **kw: Any) -> None:
        host_secret = kw.get("host_secret", b"")
        if not isinstance(host_secret, bytes) or len(host_secret) < 16:
            raise ValueError("a supervisor shard needs a host secret of at least 16 bytes")
        self.shard = Shard(reconstructed=_was_restarted(), **kw)

    async def call(self, request: bytes) -> bytes:
        return await self.shard.handle("call", request)

    async def delegate(self, request: bytes) -> bytes:
        return await self.shard.handle("delegate", request)

    async def call_batch(self, request: bytes) -> bytes:
        return await self.shard.handle("call_batch", request)

    def apply_peer(self, message: bytes) -> Any:
        return self.shard.sup.apply_peer(message)

    def sync_message(self, secret: bytes) -> bytes:
        _guard(self.shard, secret)
        return self.shard.sup.sync_message()

    async def connect(self, secret: bytes, peers: list[Any]) -> dict[str, bool]:
        _guard(self.shard, secret)
        return await self.shard.connect(peers)

    def status(self, secret: bytes) -> dict[str, Any]:
        _guard(self.shard, secret)
        return self.shard.status()

    def approvals(self, secret: bytes) -> list[dict[str, Any]]:
        _guard(self.shard, secret)
        return self.shard.sup.approvals.list()

    def stats(self, secret: bytes) -> list[dict[str, Any]]:
        _guard(self.shard, secret)
        return stats_of(self.shard.sup)

    def metrics_text(self, secret: bytes) -> bytes:
        _guard(self.shard, secret)
        return self.shard.observer.render()

    async def serve(self, secret: bytes, host: str, port: int, operator_token: str) -> str:
        _guard(self.shard, secret)
        return await self.shard.serve(host, port, operator_token)

    async def next_event(self, secret: bytes) -> dict[str, Any]:
        """The next event for the job's host (e.g. a quarantine: stop that agent's actor)."""
        _guard(self.shard, secret)
        return await self.shard.events.get()

    async def close(self, secret: bytes, status: str) -> dict[str, Any]:
        _guard(self.shard, secret)
        return await self.shard.close(status)


SUPERVISOR_METHODS = frozenset({"call", "delegate", "call_batch", "apply_peer", "sync_message", "connect", "status",
                                "approvals", "stats", "metrics_text", "serve", "next_event", "close"})


def _guard(shard: Shard, secret: Any) -> None:
    if not (isinstance(secret, bytes) and hmac.compare_digest(secret, shard.host_secret)):
        raise PermissionError("this supervisor method is for the job's driver and its shards only")


class ShardOperator(LocalOperator):
    """The operator API of one shard: changes are made here and carried to every peer before the
    request is answered; status and approvals cover every shard."""

    def __init__(self, shard: Shard) -> None:
        super().__init__(shard.sup)
        self._shard = shard

    @property
    def _peers(self) -> list[Any]:
        return self._shard.peers or []

    async def _ask(self, method: str) -> tuple[list[Any], list[str]]:
        """Every reachable peer's answer, and what went wrong with the others."""
        secret = self._shard.host_secret
        answers = await asyncio.gather(*[within(getattr(p, method).remote(secret)) for p in self._peers],
                                       return_exceptions=True)
        return ([a for a in answers if not isinstance(a, BaseException)],
                [f"{type(a).__name__}: {a}"[:200] for a in answers if isinstance(a, BaseException)])

    async def _everywhere(self, op: str, **args: Any) -> None:
        if self.sup.shards == 1:
            return
        self._shard._outbox.append(self.sup.peer_message(op, **args))
        if self._shard.peers is None:
            raise PeersBehind("made on this shard, which is not reconnected to its peers yet; they get it "
                              "when it is")
        failed = await self._shard.flush()
        if failed:
            raise PeersBehind(f"made here, but {len(failed)} peer shard(s) did not take it yet (they are sent "
                              f"a full sync until they do): {failed[0]}")

    async def status(self) -> dict[str, Any]:
        others, unreachable = await self._ask("status")
        shards = [self._shard.status()] + others
        where = sorted(({k: st[k] for k in ("shard", "pid", "node_id", "restarted")} for st in shards),
                       key=lambda w: w["shard"])
        return {"job": self.sup.job_id, "agents": sorted(self.sup.agents), "shards": where,
                "unreachable_shards": unreachable,
                "keys": self.sup.keyring.kids, "current_key": self.sup.keyring.current_kid,
                "quarantined": sorted({a for st in shards for a in st["quarantined"]}),
                "revoked_agents": sorted({a for st in shards for a in st["revoked_agents"]}),
                "approvals_pending": [p for st in shards for p in st["approvals_pending"]],
                "stats": merge_stats([st["stats"] for st in shards]),
                "contexts": [c for st in shards for c in st.get("contexts", [])]}  # each run lives on one shard

    async def approvals(self) -> list[dict[str, Any]]:
        others, _ = await self._ask("approvals")  # calls parked on an unreachable shard died with it
        return self.sup.approvals.list() + [a for lst in others for a in lst]

    async def decide(self, approval_id: str, **kw: Any) -> dict[str, Any]:
        try:
            return self.sup.decide_approval(approval_id, **kw)
        except KeyError:
            if not self._peers:
                raise
        silent = []
        for peer in self._peers:  # signed: an agent holding a shard handle cannot answer for a human
            try:
                return await within(peer.apply_peer.remote(self.sup.peer_message("decide", id=approval_id, **kw)))
            except Exception as exc:  # Ray re-raises the peer's KeyError as an instance of it
                if not isinstance(exc, KeyError) and not isinstance(getattr(exc, "cause", None), KeyError):
                    silent.append(f"{type(exc).__name__}: {exc}"[:200])
        if silent:
            raise PeersBehind(f"approval {approval_id} is not parked on any shard that answered; "
                              f"{len(silent)} did not answer: {silent[0]}")
        raise KeyError(approval_id)


@ray.remote
class ToolWorkerActor:
    """A tool worker. The job restarts it on a crash (``workers.max_restarts``) with its calls
    never retried by Ray; the new process removes its predecessor's workspaces, starts with no
    sandbox session, and refuses every dispatch its predecessor accepted (``sandbox.restart``:
    both are noted in ``run_dir``)."""

    def __init__(self, *, dispatch_key: bytes, tool_modules: list[str], job_id: str,
                 tool_config: dict[str, Any], index: int = 0, call_timeout_s: float = 120.0,
                 mcp: list[dict[str, Any]] | None = None) -> None:
        run_dir = Path(tool_config["run_dir"]) if tool_config.get("run_dir") else None
        note = run_dir / f"worker-{index}.workspaces" if run_dir else None
        restarted = _was_restarted()
        self._reclaimed = reclaim_workspaces(note) if restarted and note else []
        self._journal = DispatchJournal(run_dir / f"worker-{index}.dispatches" if run_dir else None,
                                        restarted=restarted, call_timeout_s=call_timeout_s)
        root = workspace_root(note)
        self._mcp = Connections(root)  # shared MCP servers' workspaces live beside the agents'
        tools = {**load_tools(tool_modules), **worker_tools(mcp or [], self._mcp)}  # the servers listed at job start
        self._worker = ToolWorker(dispatch_key=dispatch_key, tools=tools, job=job_id,
                                  tool_config=tool_config, sandboxes=SandboxPool(root), journal=self._journal)
        self._restarted = restarted

    async def execute(self, message: bytes) -> bytes:
        return await self._worker.execute(message)

    async def execute_batch(self, messages: list[bytes]) -> list[bytes]:
        return await self._worker.execute_batch(messages)

    def counters(self) -> dict[str, int]:
        return {"executed": self._worker.executed, "refused": self._worker.refused}

    def threads(self) -> dict[str, Any]:
        """Tool threads: live, idle, queued, and stuck in calls past their deadline (in all and per agent)."""
        return self._worker.threads()
    def status(self) -> dict[str, Any]:
        """Where it runs and whether it is a restarted process, for operators and tests."""
        return {"pid": os.getpid(), "restarted": self._restarted, "record_lost": self._journal.lost,
                "reclaimed_workspaces": len(self._reclaimed)}

    def artifacts(self, proof: bytes, paths: list[str], max_bytes: int, max_files: int) -> dict[str, Any]:
        """The job's artifacts from every workspace of this process (the driver's proof required)."""
        return self._worker.artifacts(proof, paths, max_bytes=max_bytes, max_files=max_files)

    def shutdown(self) -> None:
        self._mcp.close()  # first: a server runs in an agent's session, which the pool closes
        self._worker.close()
        self._journal.close()


@ray.remote
class ReaderActor:
    """A quarantined reader (``runtime.reader.Reader``): answers ``reader.ask`` dispatches the supervisor
    MAC'd, with the job's reader model. It gets the dispatch key (to check MACs, as a tool worker
    does) and its model configuration, nothing else: no token, no request key, no tool, no handle
    but the content one dispatch carries. Restarted by Ray on a crash (``reader.max_restarts``); the
    new process refuses every dispatch its predecessor accepted."""

    def __init__(self, *, dispatch_key: bytes, job_id: str, model: dict[str, Any], system: str = "",
                 index: int = 0, run_dir: str | None = None, call_timeout_s: float = 120.0) -> None:
        from .llm import model_from_config

        self._restarted = _was_restarted()
        path = Path(run_dir) / f"reader-{index}.dispatches" if run_dir else None
        self._journal = DispatchJournal(path, restarted=self._restarted, call_timeout_s=call_timeout_s)
        self._reader = Reader(dispatch_key=dispatch_key, job=job_id, model=model_from_config(model), system=system,
                              journal=self._journal)

    async def execute(self, message: bytes) -> bytes:
        return await self._reader.execute(message)

    def counters(self) -> dict[str, int]:
        return self._reader.counters()

    def status(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "restarted": self._restarted, "record_lost": self._journal.lost,
                **self._reader.counters()}


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
