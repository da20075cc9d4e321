"""The supervisor: the only path from an agent to a tool.

A call goes through a short pipeline, each stage able only to deny::

    decode -> authenticate (request MAC, nonce) -> verify token (chain, seals, revocation)
      -> [per item of a batch: revocation again] -> canonicalise arguments -> evaluate caveats
      -> reserve quota -> [park for human approval] -> audit (write-ahead)
      -> [batch: revocation again] -> dispatch (supervisor-MAC'd) -> settle
      -> audit outcome (withheld if the agent was revoked meanwhile)

Invariants: every exception on the way to ``dispatch`` becomes a denial with a typed error
and an audit record; nothing is dispatched without a decision record on disk (audit down
means deny), nor recorded before its nonce and reservation are in the state journal (one
write); a dispatch carries the supervisor's MAC, which workers check. The agent is
answered with the error code and tool only; the reason, with values, goes to the audit log.
A call parks for approval holding its reservation, at most ``max_parked`` per agent. Counts use
names the supervisor vouches for: a request whose MAC does not verify is ``UNAUTHENTICATED``, a
tool nobody registered ``OTHER_TOOL``; invented names cost no memory, move nobody's figures.

Alongside, the supervisor produces the signals an operator needs (``Observer``), counts
violations per agent (``AnomalyDetector``) and quarantines an agent whose policy asks for
it: every token it holds or was minted is revoked and an event asks the host to stop it.

This module is plain Python: ``runtime.actors`` wraps it in a Ray actor and supplies a
``Dispatcher`` that talks to tool-worker actors.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any, Awaitable, Callable, Protocol

import msgpack

from ..errors import (ApprovalDenied, AuditUnavailable, DelegationDenied, ErrorCode, FlowDenied, InternalError,
                      MalformedRequest, QuotaExceeded, TokenRejected, ToolFailed, UnknownTool, WardenError)
from ..anomaly import AnomalyConfig, AnomalyDetector
from .approvals import ApprovalRule, Approvals
from .audit import AuditSink
from .capability import Caveat, Effects, Holder, KeyRing, Tools, VerifiedToken, hmac_sha256, url_origin
from .flow import (ASK, MAX_SCAN, TOP, Answer, Answers, Handle, Handles, Label, Output, Run, answer_kind,
                   check_answer, rule_name, substitute, violations, worded)
from .ledger import AgentQuota, NonceWindow, QuotaLedger, Reservation, RevocationList
from ..observe import NullObserver, Observer
from .state import StateJournal
from .wire import ToolSpec, batch_items, decode_envelope, decode_signed

log = logging.getLogger(__name__)
DEFAULT_BACKEND = "gvisor"
UNAUTHENTICATED, OTHER_TOOL = "(unauthenticated)", "(other)"  # the count series of names not vouched for
# The codes a tool worker may put on a failed result; anything else becomes TOOL_FAILED.
WORKER_CODES = frozenset(c.value for c in (
    ErrorCode.TOOL_FAILED, ErrorCode.WORKER_UNAVAILABLE, ErrorCode.DISPATCH_REFUSED, ErrorCode.SANDBOX_TIMEOUT,
    ErrorCode.SANDBOX_CPU, ErrorCode.SANDBOX_MEMORY, ErrorCode.SANDBOX_PIDS, ErrorCode.SANDBOX_OUTPUT,
    ErrorCode.SANDBOX_UNAVAILABLE, ErrorCode.EGRESS_REFUSED))


class Dispatcher(Protocol):
    async def dispatch(self, tool: str, message: bytes, agent: str = "") -> bytes: ...


async def _within(aw: Awaitable[Any], timeout_s: float) -> Any:
    """``aw`` for at most ``timeout_s`` (then TimeoutError) in this task (``wait_for`` < 3.12: a task per call)."""
    if not hasattr(asyncio, "timeout"):  # Python 3.10
        return await asyncio.wait_for(aw, timeout_s)
    async with asyncio.timeout(timeout_s):
        return await aw


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def sign_dispatch(key: bytes, body: dict[str, Any]) -> bytes:
    body_bytes = _pack(body)
    return _pack([body_bytes, hmac.new(key, body_bytes, sha256).digest()])


def holder_id(agent: str) -> bytes:
    """Revoking this id revokes every token ``agent`` ever held and all derived from them (cascade)."""
    return b"holder\x00" + agent.encode()


def shard_of(agent: str, shards: int) -> int:
    """The shard that owns ``agent``'s tokens: a stable hash, the same in every process."""
    return int.from_bytes(sha256(agent.encode()).digest()[:8], "big") % shards


MAX_RUNS = 1 << 12  # contexts kept per root agent's chains; a delegation past it is refused
MAX_ANSWERS = 64  # reader answers remembered per run; past it an answer lowers the context instead
UNDECLARED = Output()  # a tool whose results no declaration labels: untrusted (fail closed), public
PEER_OPS = frozenset({"revoke_agent", "revoke_token", "quarantine", "add_key", "retire_key", "sync", "decide"})


@dataclass(frozen=True)
class AgentEntry:
    name: str
    request_key: bytes
    can_delegate_to: frozenset[str] = frozenset()
    delegate_caveats: tuple[Caveat, ...] = ()  # appended to any token delegated to this agent
    sandbox: dict[str, dict[str, Any]] = field(default_factory=dict)  # tool or "*" -> {backend, limits}
    approvals: dict[str, ApprovalRule] = field(default_factory=dict)  # tool -> when a human must approve
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    root_token_id: bytes | None = None  # for reference: a quarantine revokes every token the agent held
    max_parked: int = 8  # calls parked for approval at once; one more is APPROVAL_QUEUE_FULL
    outputs: dict[str, Output] = field(default_factory=dict)  # tool -> the label of its results (none: untrusted)
    handle_limits: tuple[int, int, float] = (256, 16 << 20, 3600.0)  # count, bytes, lifetime of its handles
    schemas: dict[str, Any] = field(default_factory=dict)  # name -> a reader schema its policy gives


@dataclass
class _Allowed:
    call_id: str
    agent: str
    tool: str
    args: dict[str, Any]
    vt: VerifiedToken
    reservation: Reservation
    dispatched_at: float | None = None
    held: dict[str, Label] = field(default_factory=dict)  # argument -> the labels of the handles it holds
    flow: dict[str, Any] | None = None  # what the flow check saw, for the record (None: no rule, no handle)


class Supervisor:
    def __init__(self, *, job_id: str, keyring: KeyRing, tools: dict[str, ToolSpec], audit: AuditSink,
                 dispatcher: Dispatcher, dispatch_key: bytes, clock: Callable[[], float] = time.time,
                 ledger: QuotaLedger | None = None, nonces: NonceWindow | None = None,
                 revocations: RevocationList | None = None, call_timeout_s: float = 120.0,
                 credentials: dict[str, dict[str, dict[str, str]]] | None = None, observer: Observer | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None, shard: tuple[int, int] = (0, 1),
                 journal: StateJournal | None = None, peer_key: bytes | None = None) -> None:
        self.shard, self.shards = shard
        if not 0 <= self.shard < self.shards:
            raise ValueError(f"shard {shard} out of range")
        self.job_id, self.keyring, self.tools, self.audit, self.clock = job_id, keyring, dict(tools), audit, clock
        self.dispatcher, self._dispatch_key, self.call_timeout_s = dispatcher, dispatch_key, call_timeout_s
        self.journal, self._peer_key, self._on_event = journal, peer_key, on_event or (lambda _e: None)
        self.ledger, self.nonces = ledger or QuotaLedger(), nonces or NonceWindow(clock=clock)
        self.revocations, self.approvals = revocations or RevocationList(), Approvals(clock)
        self.anomaly, self.observer = AnomalyDetector(), observer or NullObserver()
        self._credentials = dict(credentials or {})  # tool -> header -> {value, origin}: only to that tool
        self.agents: dict[str, AgentEntry] = {}
        self.counts: Counter[tuple[str, str, str]] = Counter()  # (agent, tool, decision or code)
        self.quarantined: set[str] = set()
        self._open: dict[str, Reservation] = {}  # call id -> reservation, while the call is in flight
        self._call_ids: list[str] = []  # random call ids, drawn ahead
        self.runs, self._chains = dict[bytes, Run](), Counter[str]()  # run -> context; root -> runs its chains made
        self.handles = Handles(clock)  # hidden results; not journaled (lost on a restart, and said so)
        self.answers: dict[bytes, Answers] = {}  # root run -> the reader answers its chains got (journaled)
        self.key_epoch = 0  # rotations so far: the current key is the one of the highest (epoch, kid)
        self.retired: set[str] = set()  # key ids retired; never shrinks, a retired key never returns
        if hasattr(audit, "redact"):  # credentials never reach the log, whatever record they turn up in
            audit.redact(c["value"] if isinstance(c, dict) else c  # {value, origin} where bound to an origin
                         for creds in self._credentials.values() for c in creds.values())

    # ------------------------------------------------------------------ set-up
    def register_agent(self, entry: AgentEntry, quota: AgentQuota) -> None:
        self.agents[entry.name] = entry
        self.ledger.configure(entry.name, quota)
        self.anomaly.configure(entry.name, entry.anomaly)

    # ------------------------------------------------------------------ operator actions
    def revoke_agent(self, agent: str, *, by: str = "operator", cascade: bool = False) -> None:
        """Kill switch: every token the agent holds is refused from now on, parked calls included.
        ``cascade``: so is every token derived from one it held, delegated onwards, whoever holds it."""
        if cascade:  # first: it covers every token the agent holds too, should the next frame be lost
            self.revocations.revoke(holder_id(agent))
            self._journal("v", holder_id(agent))
        self.revocations.revoke_agent(agent)
        self._journal("va", agent)
        self.audit.record("revoke", agent=agent, by=by, cascade=cascade)
        self.approvals.deny_agent(agent, approver=by, reason="agent revoked")

    def revoke_token(self, token_id_or_tag: bytes, *, by: str = "operator") -> None:
        self.revocations.revoke(token_id_or_tag)
        self._journal("v", bytes(token_id_or_tag))
        self.audit.record("revoke", token_id=token_id_or_tag.hex(), by=by)

    def quarantine(self, agent: str, *, reason: str, origin: int | None = None) -> None:
        """Revoke everything the agent holds or was minted (descendants included), ask the host to stop it.

        ``origin`` is the shard that decided it, when that is another one: this shard applies it
        and does not announce it again."""
        if agent in self.quarantined:
            return
        # Every change in memory first, then the announcement; the records last (they may fail,
        # and the quarantine must hold regardless). One "q" frame restores all of it on a restart.
        self._quarantine_state(agent)
        by = "quarantine" if origin is None else f"quarantine on shard {origin}"
        self.approvals.deny_agent(agent, approver=by, reason="agent quarantined")
        self.observer.quarantine(agent)
        if origin is None:
            self._on_event({"event": "quarantine", "agent": agent, "reason": reason, "shard": self.shard})
        self._journal("q", agent)
        self.audit.record("revoke", agent=agent, by=by)
        self.audit.record("quarantine", agent=agent, reason=reason, violations=self.anomaly.violations(agent),
                          origin=self.shard if origin is None else origin)

    def _quarantine_state(self, agent: str) -> None:
        """What a quarantine changes, live and on replay: the agent revoked, with every token derived
        from one it held (its root token's delegations, and what it was delegated and passed on)."""
        self.quarantined.add(agent)
        self.revocations.revoke(holder_id(agent))
        self.revocations.revoke_agent(agent)

    def add_key(self, kid: str, key: bytes, *, epoch: int | None = None, by: str = "operator") -> int:
        """Key rotation: ``kid`` joins the ring, and becomes the current key unless a later rotation
        (higher epoch) is already in force; tokens under older keys still verify. Returns the epoch."""
        epoch = self.key_epoch + 1 if epoch is None else int(epoch)
        if kid in self.retired:
            raise ValueError(f"key {kid!r} was retired; a retired key never returns")
        current = (epoch, kid) > (self.key_epoch, self.keyring.current_kid)
        self._add_key(kid, key, epoch, current)
        self._journal("k", kid, key, epoch, current)
        self.audit.record("key_added", kid=kid, epoch=epoch, current=current, by=by)
        return epoch

    def _add_key(self, kid: str, key: bytes, epoch: int, current: bool) -> None:
        self.keyring.add_key(kid, key, current=current)
        if current:
            self.key_epoch = epoch

    def retire_key(self, kid: str, *, by: str = "operator") -> None:
        """Every token under ``kid`` is refused from now on. ValueError for the current key."""
        if kid == self.keyring.current_kid:
            raise ValueError("cannot retire the current key; rotate first")
        self.retired.add(kid)
        self.keyring.retire(kid)
        self._journal("kr", kid)
        self.audit.record("key_retired", kid=kid, by=by)

    # ------------------------------------------------------------------ shards
    def peer_message(self, op: str, **args: Any) -> bytes:
        """A control change for the other shards, MAC'd with the key only shards hold."""
        if self._peer_key is None:
            raise InternalError("no peer key: this supervisor is not part of a sharded job")
        return sign_dispatch(self._peer_key, {"op": op, "args": args, "job": self.job_id, "from": self.shard,
                                              "nonce": secrets.token_bytes(16), "ts": self.clock()})

    def apply_peer(self, message: Any) -> Any:
        """Apply a change another shard made (revocation, quarantine, key). Raises on anything forged."""
        body_bytes, mac, body = decode_signed(message)
        if self._peer_key is None or not hmac.compare_digest(hmac_sha256(self._peer_key, body_bytes), mac):
            raise TokenRejected("peer message MAC does not verify", code=ErrorCode.BAD_REQUEST_MAC)
        if body.get("job") != self.job_id or body.get("op") not in PEER_OPS:
            raise MalformedRequest(f"peer message for job {body.get('job')!r:.80} op {body.get('op')!r:.40}")
        self.nonces.check("(peer)", body["nonce"], float(body["ts"]))
        self._journal("n", "(peer)", body["nonce"], float(body["ts"]) + self.nonces.window_s)
        op, args, origin = body["op"], body["args"], int(body["from"])
        by = f"{args.get('by', 'operator')} via shard {origin}"
        if op == "revoke_agent":
            self.revoke_agent(args["agent"], by=by, cascade=bool(args.get("cascade")))
        elif op == "revoke_token":
            self.revoke_token(bytes(args["token_id"]), by=by)
        elif op == "quarantine":
            self.quarantine(args["agent"], reason=args["reason"], origin=origin)
        elif op == "add_key":
            self.add_key(args["kid"], bytes(args["key"]), epoch=int(args["epoch"]), by=by)
        elif op == "retire_key":
            self.retire_key(args["kid"], by=by)
        elif op == "decide":  # a human's answer that reached another shard first; KeyError if not parked here
            return self.decide_approval(args["id"], approve=bool(args["approve"]), approver=args["approver"],
                                        reason=args["reason"])
        else:
            self._merge(args, origin, by)
        return None

    def sync_message(self) -> bytes:
        """Every revocation, quarantine and key of this shard, for a peer that restarted and may
        have missed a change while it was down."""
        rev, keys = self.revocations.snapshot(), self.keyring.to_secret_dict()
        return self.peer_message("sync", ids=rev["ids"], agents=rev["agents"], quarantined=sorted(self.quarantined),
                                 keys=keys["root"], kid=keys["kid"], epoch=self.key_epoch,
                                 retired=sorted(self.retired), by="sync")

    def _merge(self, peer: dict[str, Any], origin: int, by: str) -> None:
        """Adopt what a peer revoked, quarantined, added or retired that this shard has not."""
        have = self.revocations.snapshot()
        for token_id in {bytes(t) for t in peer["ids"]} - set(have["ids"]):
            self.revoke_token(token_id, by=by)
        for agent in set(peer["agents"]) - set(have["agents"]):
            self.revoke_agent(agent, by=by)
        for agent in set(peer["quarantined"]) - self.quarantined:
            self.quarantine(agent, reason="quarantined on another shard", origin=origin)
        # Keys only move forward: a key either shard retired stays retired, and the current key is
        # the one of the later rotation, so a stale or lagging peer cannot roll anything back.
        retired = set(self.retired) | set(peer["retired"])
        keys = {k: bytes(v) for k, v in peer["keys"].items() if k not in retired}
        for kid in sorted(set(keys) - set(self.keyring.kids)):
            if kid != peer["kid"]:
                self.add_key(kid, keys[kid], epoch=0, by=by)
        if peer["kid"] in keys and (int(peer["epoch"]), peer["kid"]) > (self.key_epoch, self.keyring.current_kid):
            self.add_key(peer["kid"], keys[peer["kid"]], epoch=int(peer["epoch"]), by=by)
        for kid in sorted(set(peer["retired"]) - self.retired):
            if kid in self.keyring.kids:
                self.retire_key(kid, by=by)
            else:
                self.retired.add(kid)
                self._journal("kr", kid)

    def _journal(self, *frame: Any, defer: bool = False) -> None:
        """Record a state change, after it is made in memory (a compaction then snapshots it too).
        A journal that cannot be written is like an audit log that cannot: the caller denies.
        ``defer`` (a nonce): written with the reservation, or by ``_deny`` (no frame), before any answer."""
        if self.journal is not None:
            try:
                self.journal.append(*frame, defer=defer)
                if self.journal.size > self.journal.compact_bytes:
                    self.journal.compact(self._snapshot())
            except OSError as exc:
                raise AuditUnavailable(f"state journal {self.journal.path}: {exc}") from exc

    def _snapshot(self) -> list[Any]:
        keys = self.keyring.to_secret_dict()
        return ["snap", self.ledger.snapshot(), self.nonces.snapshot(), self.revocations.snapshot(),
                {cid: [r.agent, [list(c) for c in r.charges], r.projected_cost, list(r.cost_keys)]
                 for cid, r in self._open.items()},
                sorted(self.quarantined), keys["root"], keys["kid"], self.key_epoch, sorted(self.retired),
                {rid: [r.agent, r.depth, r.label.public(), r.origin] for rid, r in self.runs.items()},
                {rid: [[a.value, a.label.public(), a.origin] for a in kept.kept] for rid, kept in self.answers.items()}]

    def restore(self, unsettled: dict[str, str] | None = None) -> int:
        """Resume from the journal after a restart: the state as it was, and every call that was in
        flight closed with SUPERVISOR_UNAVAILABLE (charged: it may have run). Returns that count.
        ``unsettled``: the allowed calls the audit log has no outcome for (call id -> agent), read
        from it by the caller. Journal and log are two files: a call open in the journal but not
        allowed on record never reached a worker (refunded); one settled without its outcome gets it."""
        if self.journal is None:
            return 0
        frames = 0
        for frame in self.journal.replay():
            frames += 1
            self._replay(frame)
        if frames == 0:
            return 0
        self.ledger.drain_buckets()
        inflight = dict(self._open)
        self.audit.record("shard_restart", shard=self.shard, journal_frames=frames, inflight=len(inflight),
                          quarantined=sorted(self.quarantined), revoked_agents=self.revocations.snapshot()["agents"])
        for call_id, res in inflight.items():
            self._close(call_id, res, None, refund=unsettled is not None and call_id not in unsettled)
        if unsettled is None:  # the log not read: take every open call as allowed on record
            unsettled = {c: r.agent for c, r in inflight.items()}
        for call_id, agent in unsettled.items():
            self.audit.record("outcome", call_id=call_id, agent=agent, ok=False,
                              code=ErrorCode.SUPERVISOR_UNAVAILABLE.value,
                              reason="the supervisor shard restarted while the call was in flight; it may have run")
        return len(inflight)

    def _replay(self, frame: list[Any]) -> None:
        op, args = frame[0], frame[1:]
        if op == "n":
            self.nonces.remember(*args)
        elif op == "r":
            call_id, agent, charges, projected, cost_keys = args
            self._open[call_id] = self.ledger.recharge(agent, charges, projected, cost_keys)
        elif op in ("s", "x"):
            res = self._open.pop(args[0], None)
            if res is not None:
                self.ledger.settle(res, args[1]) if op == "s" else self.ledger.release(res)
        elif op == "v":
            self.revocations.revoke(bytes(args[0]))
        elif op == "va":
            self.revocations.revoke_agent(args[0])
        elif op == "q":
            self._quarantine_state(args[0])
        elif op == "k":
            kid, key, epoch, current = args
            self._add_key(kid, bytes(key), int(epoch), bool(current))
        elif op == "kr":
            self.retired.add(args[0])
            if args[0] in self.keyring.kids and args[0] != self.keyring.current_kid:
                self.keyring.retire(args[0])
        elif op == "c":
            self.runs[bytes(args[0])] = Run(args[1], args[2], Label.parse(args[3]), args[4])
        elif op == "a":
            self.answers.setdefault(bytes(args[0]), Answers()).add(Answer(args[1], Label.parse(args[2]), args[3]))
        elif op == "snap":
            ledger, nonces, revocations, open_calls, quarantined, root, kid, epoch, retired, runs, answers = args
            self.ledger.restore(ledger)  # its totals include the open calls' charges
            self.nonces.restore(nonces)
            self.revocations.restore(revocations)
            self._open = {cid: self.ledger.recharge(a, ch, p, ck, charged=True)
                          for cid, (a, ch, p, ck) in open_calls.items()}
            self.quarantined = set(quarantined)
            for k, key in root.items():
                if k not in self.keyring.kids:
                    self.keyring.add_key(k, bytes(key), current=False)
            self.keyring.current_kid, self.key_epoch, self.retired = kid, int(epoch), set(retired)
            for k in set(self.keyring.kids) - set(root):
                self.keyring.retire(k)
            self.runs = {bytes(rid): Run(a, d, Label.parse(lab), o) for rid, (a, d, lab, o) in runs.items()}
            self.answers = {}
            for rid, kept in answers.items():
                for v, lab, o in kept:
                    self.answers.setdefault(bytes(rid), Answers()).add(Answer(v, Label.parse(lab), o))
        else:
            raise ValueError(f"unknown journal frame {op!r}")

    def _close(self, call_id: str, res: Reservation, cost: float | None, *, refund: bool = False) -> None:
        """End a reservation: settle it (the call ran, or may have) or refund it (it never ran)."""
        self._open.pop(call_id, None)
        if refund:
            self.ledger.release(res)
        else:
            self.ledger.settle(res, cost)
        try:
            self._journal("x" if refund else "s", call_id, cost)
        except AuditUnavailable as exc:
            # Safe to go on: after a restart this call reads as in flight, so it stays charged; and
            # the next request's nonce cannot be journaled either, so it is denied.
            log.error("call %s closed but not journaled: %s", call_id, exc)

    def decide_approval(self, approval_id: str, *, approve: bool, approver: str, reason: str = "") -> dict[str, Any]:
        """A human's answer to one parked call. KeyError if unknown or already decided."""
        return self.approvals.resolve(approval_id, approve=approve, approver=approver, reason=reason).public()

    def _flag(self, agent: str, tool: str, flags: list[str]) -> None:
        if reason := self.anomaly.report(agent, tool, flags, self.audit, self.observer):
            self.quarantine(agent, reason=reason)

    # ------------------------------------------------------------------ stages
    def _authenticate(self, data: Any, op: str) -> tuple[dict[str, Any], AgentEntry, VerifiedToken]:
        body_bytes, mac, body = decode_envelope(data)
        tool = body.get("tool")
        if body["op"] != op:
            raise MalformedRequest(f"a {body['op']!r} request sent to the {op!r} entry point", tool=tool)
        entry = self.agents.get(body["agent"])
        if entry is None:
            raise TokenRejected(f"unknown agent {body['agent']!r:.60}", code=ErrorCode.BAD_REQUEST_MAC, tool=tool)
        good = hmac_sha256(entry.request_key, body_bytes)
        if not hmac.compare_digest(good, mac):
            raise TokenRejected(f"request MAC does not match agent {entry.name!r}",
                                code=ErrorCode.BAD_REQUEST_MAC, tool=tool)
        self.nonces.check(entry.name, body["nonce"], float(body["ts"]), tool)
        if self.journal is not None:
            self._journal("n", entry.name, body["nonce"], float(body["ts"]) + self.nonces.window_s, defer=True)
        try:
            vt = self.keyring.verify(body["token"])
        except TokenRejected as exc:
            exc.tool = tool
            raise
        self._check_revoked(vt, tool)
        if vt.holder != entry.name:
            raise TokenRejected(f"token holder is {vt.holder!r}, request from {entry.name!r}",
                                code=ErrorCode.WRONG_HOLDER, tool=tool)
        if self.shards > 1 and shard_of(vt.root_holder, self.shards) != self.shard:
            # Budgets of a chain live on the shard of its root agent only: deciding here would
            # let a delegate spend them once per shard.
            raise TokenRejected(f"token of {vt.root_holder!r} belongs to shard "
                                f"{shard_of(vt.root_holder, self.shards)}, not {self.shard}",
                                code=ErrorCode.WRONG_SHARD, tool=tool)
        return body, entry, vt

    def _check_revoked(self, vt: VerifiedToken, tool: str) -> None:
        """Not revoked by an id on its chain, its holder, nor an agent that held it (read only if any id is)."""
        ids = (*vt.chain_ids(), *map(holder_id, vt.holders)) if self.revocations.any_ids else ()
        self.revocations.check(ids, vt.holder, tool)

    def _still_valid(self, vt: VerifiedToken, tool: str) -> None:
        """For a call that waited (parked, in flight): still not revoked, its key still in the ring."""
        self._check_revoked(vt, tool)
        if vt.token.kid not in self.keyring.kids:
            raise TokenRejected(f"key {vt.token.kid!r} retired", code=ErrorCode.TOKEN_REVOKED, tool=tool)

    def _evaluate(self, tool: str, args: Any, entry: AgentEntry, vt: VerifiedToken) -> tuple[Any, ...]:
        """Canonical arguments (handles replaced) that every caveat and deny flow rule allow; cost, handles, record."""
        spec = self.tools.get(tool)
        if spec is None:
            raise UnknownTool(f"no tool named {tool!r:.80}", tool=tool[:80])
        raw = args  # as the agent wrote it
        args, held, used = substitute(args, lambda ref: self.handles.get(entry.name, vt.runs[-1], ref, tool))
        if used and (n := sum(h.nbytes for _, h in used)) > (cap := entry.handle_limits[1]):  # named 1000 times
            raise FlowDenied(f"handles make {n} bytes > {cap}", code=ErrorCode.HANDLE_LIMIT, tool=tool)
        if tool == ASK and {a for a, _ in used} != {"handle"}:  # the reader sees one handle's content, no other
            raise MalformedRequest("reader.ask: `handle` must be a handle, and no other argument may hold one",
                                   tool=tool)
        args = spec.canonical_args(args)  # its errors name types, never values: they reach the agent
        answered = TOP  # the reader's answers the call carries: the root run keeps every one its chains got
        if answers := self.answers.get(vt.runs[0]):
            budget = [MAX_SCAN]  # characters matched in this call; past them, an argument carries every answer
            for name in sorted(raw.keys() & args.keys()):  # what the agent wrote (not handles' content) that holds one
                for a in answers.carried(raw[name], budget):
                    held[name], answered = held.get(name, a.label).join(a.label), answered.join(a.label)
                    used.append((name, a))
        vt.evaluate_call(entry.name, tool, spec.effect, args, self.clock(), self.job_id)
        if tool == ASK:  # a schema of low capacity (or free text: its answer a handle); by name: the policy's
            try:
                if isinstance(named := args.get("schema"), str) and named not in entry.schemas:
                    raise ValueError(f"no schema named {named!r:.40} in the policy of {entry.name!r}")
                if isinstance(named, str) and any(self.agents[a].schemas.get(named, entry.schemas[named]) !=
                                                  entry.schemas[named] for a in vt.holders if a in self.agents):
                    raise ValueError(f"schema {named!r:.40} means different things to the agents of this chain")
                args = {**args, "schema": entry.schemas.get(named) if isinstance(named, str) else named}
                answer_kind(args["schema"])
            except ValueError as exc:
                raise MalformedRequest(f"reader.ask: {exc}", tool=tool) from None
        rules = [f for f in vt.plan.flows if f.tool in ("*", tool) and (not f.effects or spec.effect in f.effects)]
        if not rules and not used:
            return args, spec.cost, held, None
        run = self._run(vt)  # a broken rule's origin: a handle that lowered the label, else what tainted the run
        broken = [(f.mode, {"rule": rule_name(f), "arg": arg, "label": lab.public(), "origin": next(
            (h.origin for a, h in sorted(used, key=lambda u: u[0] != arg)  # the argument's own handles first
             if lab.join(h.label) is lab and run.label.join(h.label) is not run.label), run.origin)})
            for f, arg, lab in violations(rules, args, run.label, held, answered)]
        v = next((v for mode, v in broken if mode == "deny"), None)
        self.observer.flow(entry.name, tool, "deny" if v else "approve" if broken else "allow")
        if v:
            raise FlowDenied(f"{v['rule']}: {v['arg']} is {v['label']['integrity']}, readers {v['label']['readers']}, "
                             f"from {v['origin'] or 'the task'}", flow=v, tool=tool)
        hs = [h for _, h in used if isinstance(h, Handle)]
        return args, spec.cost, held, {"checked": [rule_name(f) for f in rules], "handles": [h.id for h in hs],
                                       "bytes": sum(h.nbytes for h in hs), "violations": [v for _, v in broken],
                                       **({"sources": [h.origin for h in hs]} if tool == ASK else {})}

    def _run(self, vt: VerifiedToken, i: int = -1) -> Run:
        """Run ``vt.runs[i]``: a root run starts as its task (trusted); a delegated one unknown here, untrusted."""
        if (run := self.runs.get(vt.runs[i])) is None:
            depth = i % len(vt.runs)
            run = self.runs[vt.runs[i]] = Run(vt.holders[i], depth, TOP) if depth == 0 else Run(
                vt.holders[i], depth, Label(0), {"why": "a delegated run this shard has no state for"})
        return run

    def _taint(self, vt: VerifiedToken, label: Label, origin: dict[str, Any]) -> None:
        """Join ``label`` into the run's context and its delegators' (journaled before the agent sees it)."""
        for i, rid in enumerate(vt.runs):
            run = self._run(vt, i)
            if (j := run.label.join(label)) is not run.label:  # the origin: what first lowered the integrity
                run.label, run.origin = j, origin if j.integrity < run.label.integrity else run.origin or origin
                self._journal("c", rid, run.agent, run.depth, run.label.public(), run.origin)
                self.observer.context(run.agent, run.label.integrity)

    def _result_label(self, ok: _Allowed, value: Any) -> tuple[Label, bool]:
        """A result's label (context, each declaration on the chain, handles passed in unless a receipt); hidden?"""
        label, hide, carries = self._run(ok.vt).label, False, False
        for agent in set(ok.vt.holders):
            out = self.agents[agent].outputs.get(ok.tool, UNDECLARED) if agent in self.agents else UNDECLARED
            label, hide, carries = label.join(out.label_of(value)), hide or out.hide, carries or out.carries_inputs
        for h in ok.held.values() if carries else ():
            label = label.join(h)
        return label, hide

    def _answer(self, ok: _Allowed, value: Any, origin: dict[str, Any]) -> tuple[Label, bool, Any]:
        """A reader's answer checked against its schema (READER_INVALID), labelled: (label, free text?, answer).
        Endorsed at best, with the content's readers; the run keeps it (journaled), its context only the readers."""
        schema, source, ctx = ok.args["schema"], ok.held["handle"], self._run(ok.vt).label
        try:
            free, value = answer_kind(schema), check_answer(schema, value)
        except ValueError as exc:
            self.observer.answer(ok.agent, "invalid")
            raise FlowDenied(str(exc), code=ErrorCode.READER_INVALID, tool=ASK) from None
        for arg, lab in ok.held.items():  # what the question carries (an earlier answer) too
            ctx = ctx if arg == "handle" else ctx.join(lab)
        # A pattern the agent wrote itself can spell words: its answer is untrusted, as if read (the policy's vouched).
        words = worded(schema) and schema not in self.agents[ok.agent].schemas.values()
        self.observer.answer(ok.agent, "free" if free else "untrusted" if words else "endorsed")
        label = Label(min(source.integrity if free or words else max(source.integrity, 1), ctx.integrity),
                      source.readers | ctx.readers)
        if not free:  # kept by the chain's root run: a delegator may be handed it back, or pass it on
            kept, root = self.answers.setdefault(ok.vt.runs[0], Answers()), ok.vt.runs[0]
            if len(kept.kept) >= MAX_ANSWERS:
                words = True
            else:
                kept.add(Answer(value, label, origin))
                self._journal("a", root, value, label.public(), origin)
            self._taint(ok.vt, label if words else Label(2, label.readers), origin)
        return label, free, value

    def _reserve(self, agent: str, tool: str, vt: VerifiedToken, args: dict[str, Any], cost: float,
                 held: dict[str, Label] | None = None, flow: dict[str, Any] | None = None) -> _Allowed:
        reservation = self.ledger.reserve(agent, vt.budgets, cost, tool)
        call_id = self._call_ids.pop() if self._call_ids else self._more_call_ids()
        if self.journal is not None:
            self._open[call_id] = reservation
            try:
                self._journal("r", call_id, agent, [list(x) for x in reservation.charges],
                              reservation.projected_cost, list(reservation.cost_keys))
            except Exception:
                self._open.pop(call_id, None)
                self.ledger.release(reservation)
                raise
        for key, kind, limit in vt.budgets:
            self.observer.budget(agent, kind, self.ledger.used(key), limit)
        return _Allowed(call_id, agent, tool, args, vt, reservation, None, held or {}, flow)

    def _more_call_ids(self) -> str:
        """A fresh random call id (64 bits), drawn from the OS 256 at a time: one system call, not one per call."""
        pool = secrets.token_hex(8 * 256)
        self._call_ids = [pool[i:i + 16] for i in range(16, len(pool), 16)]
        return pool[:16]

    def authorize(self, data: Any) -> _Allowed:
        """The in-process decision (no approval step). Raises a WardenError to deny."""
        body, entry, vt = self._authenticate(data, "call")
        return self._reserve(entry.name, body["tool"], vt, *self._evaluate(body["tool"], body["args"], entry, vt))

    async def _approval(self, c: _Allowed) -> None:
        """Park the reserved call until a human decides; raise ApprovalDenied unless approved in time."""
        rule, limit = self.agents[c.agent].approvals.get(c.tool), self.agents[c.agent].max_parked
        flow = c.flow and c.flow["violations"] or None  # flow rules broken whose mode is approve
        if not flow and (rule is None or not rule.matches(c.args)):
            return
        rule = rule or ApprovalRule(c.tool)
        if (parked := sum(p["agent"] == c.agent for p in self.approvals.list())) >= limit:
            raise QuotaExceeded(f"parked={parked}, limit={limit}", tool=c.tool, code=ErrorCode.APPROVAL_QUEUE_FULL)
        pending = self.approvals.park(c.agent, c.tool, c.args, rule.timeout_s, flow)
        try:
            self.audit.record("approval_requested", approval_id=pending.id, call_id=c.call_id, agent=c.agent,
                              tool=c.tool, args=c.args, timeout_s=rule.timeout_s, **({"flow": flow} if flow else {}))
            self.observer.approvals_pending(len(self.approvals))
            approved, approver, reason = await asyncio.wait_for(asyncio.shield(pending.future), rule.timeout_s)
        except asyncio.TimeoutError:
            approved, approver, reason = False, "(nobody)", f"no decision within {rule.timeout_s:g}s"
        finally:
            self.approvals.done(pending)
            self.observer.approvals_pending(len(self.approvals))
        self.audit.record("approval", approval_id=pending.id, agent=c.agent, tool=c.tool,
                          decision="approve" if approved else "deny", approver=approver, reason=reason)
        if not approved:
            code = ErrorCode.APPROVAL_TIMEOUT if approver == "(nobody)" else ErrorCode.APPROVAL_DENIED
            raise ApprovalDenied(f"approval {pending.id} denied by {approver}: {reason}", code=code, tool=c.tool)
        # Time passed while parked: the token may have been revoked, its key retired, or expired.
        self._still_valid(c.vt, c.tool)
        c.vt.check_time(self.clock())

    def _deny(self, exc: Exception, data: Any, *, authenticated: str | None = None,
              started: float | None = None, tool: str | None = None, context: Run | None = None) -> bytes:
        """Record a denial and encode it for the agent. A bug (not a WardenError) still denies.

        Only a denial of an *authenticated* agent counts as its violation: anyone can send a
        request in another agent's name, and must not be able to get it quarantined that way."""
        if not isinstance(exc, WardenError):
            exc = InternalError(f"{type(exc).__name__}: {exc}"[:500])
        agent, who = None, UNAUTHENTICATED  # counted under an agent only if its MAC vouches for it (no replay)
        try:
            body_bytes, mac, body = decode_envelope(data)
            agent, tool, entry = body.get("agent"), tool or body.get("tool"), self.agents.get(body.get("agent"))
            if entry and exc.code is not ErrorCode.REPLAY and hmac.compare_digest(
                    hmac_sha256(entry.request_key, body_bytes), mac):
                who = entry.name
        except WardenError:
            pass  # an undecodable request: the record's code says so
        tool = tool or exc.tool
        known = tool is None or tool in self.tools or tool.startswith("delegate:") and tool[9:] in self.agents
        label = str(tool) if known else OTHER_TOOL
        self.counts[(who, label, exc.code.value)] += 1
        elapsed = time.perf_counter() - started if started is not None else 0.0
        self.observer.decision(who, label, "deny", exc.code.value, elapsed)
        try:
            self._journal()  # the request's nonce, held back until now: on disk before the denial
            self.audit.record("decision", decision="deny", agent=agent, tool=tool, code=exc.code.value,
                              reason=exc.reason, authenticated=who != UNAUTHENTICATED, context=context and
                              context.label.public(), **({"flow": exc.flow} if getattr(exc, "flow", None) else {}))
            if authenticated is not None:
                self._flag(authenticated, label, self.anomaly.denial(authenticated, exc.code.value, self.clock()))
        except AuditUnavailable as audit_exc:
            audit_exc.tool = exc.tool
            return _pack({"ok": False, "error": audit_exc.to_wire()})
        return _pack({"ok": False, "error": exc.to_wire()})

    refuse = _deny  # a request denied for a reason outside the pipeline (the shard is not ready), on record

    # ------------------------------------------------------------------ entry points
    async def call(self, data: Any) -> bytes:
        """Handle one encoded tool call; always returns an encoded result, never raises."""
        started = time.perf_counter()
        try:
            body, entry, vt = self._authenticate(data, "call")
        except Exception as exc:
            return self._deny(exc, data, started=started)
        ok = await self._decide(body["tool"], body["args"], entry, vt, data, started)
        if isinstance(ok, bytes):
            return ok
        return _pack(await self._settle(ok, await self._run_one(ok)))

    async def call_batch(self, data: Any) -> bytes:
        """Several calls under one MAC: each is decided, audited and settled on its own; the
        allowed ones travel to the worker together. Replies come back in order."""
        started = time.perf_counter()
        try:
            body, entry, vt = self._authenticate(data, "batch")
            items = batch_items(body)
        except Exception as exc:
            return self._deny(exc, data, started=started)
        decided = [await self._decide(tool, args, entry, vt, data, started) for tool, args in items]
        outcomes, spent = dict[str, Any](), 0  # spent: bytes of handle content the items substitute, as for one call
        for d in decided:  # revoked, quarantined or expired (a later item parked) since its decision: not sent
            if isinstance(d, _Allowed):
                try:
                    self._still_valid(d.vt, d.tool)
                    d.vt.check_time(self.clock())
                    if (spent := spent + (d.flow or {}).get("bytes", 0)) > entry.handle_limits[1]:
                        raise FlowDenied(f"batch handles: {spent} bytes", code=ErrorCode.HANDLE_LIMIT, tool=d.tool)
                except (TokenRejected, FlowDenied) as exc:
                    outcomes[d.call_id] = exc
        allowed = [d for d in decided if isinstance(d, _Allowed) and d.call_id not in outcomes]
        asks = [ok for ok in allowed if ok.tool == ASK]  # a reader answers in its own time, never holding up a hop
        allowed = [ok for ok in allowed if ok.tool != ASK]

        async def hop() -> None:
            messages = [self._message(ok) for ok in allowed]
            dispatch_batch = getattr(self.dispatcher, "dispatch_batch", None)
            try:
                if dispatch_batch is not None:
                    sent = time.perf_counter()
                    for ok in allowed:
                        ok.dispatched_at = sent
                    raws = await _within(dispatch_batch(messages, entry.name), self.call_timeout_s)
                else:
                    raws = await asyncio.gather(*[self._run_one(ok, m) for ok, m in zip(allowed, messages)])
                outcomes.update(zip((ok.call_id for ok in allowed), raws))
            except Exception as exc:  # the whole hop failed: every allowed call reports it
                outcomes.update({ok.call_id: exc for ok in allowed})
        answers = await asyncio.gather(*([hop()] if allowed else []), *[self._run_one(ok) for ok in asks])
        outcomes.update(zip((ok.call_id for ok in asks), answers[1 if allowed else 0:]))
        replies = []
        for d in decided:
            if isinstance(d, bytes):
                replies.append(msgpack.unpackb(d, raw=False))
            else:
                replies.append(await self._settle(d, outcomes[d.call_id]))
        return _pack({"ok": True, "batch": replies})

    async def _decide(self, tool: str, args: Any, entry: AgentEntry, vt: VerifiedToken, data: Any,
                      started: float) -> "_Allowed | bytes":
        """Stages 3-6 for one authenticated call: an allowed call on record, or an encoded denial."""
        ok, label = None, tool if tool in self.tools else OTHER_TOOL  # one count series for invented names
        try:
            self._flag(entry.name, label, self.anomaly.call(entry.name, label, self.clock()))
            self._check_revoked(vt, tool)  # again for each item: an earlier one may have got the agent quarantined
            self.ledger.check_rate(entry.name, tool)  # before any caveat work: regex checks cost time
            ok = self._reserve(entry.name, tool, vt, *self._evaluate(tool, args, entry, vt))
            if ok.tool in entry.approvals or ok.flow and ok.flow["violations"]:
                await self._approval(ok)
                started = time.perf_counter()  # authorization time excludes the human's
        except Exception as exc:
            if ok is not None:  # denied while parked: it never ran
                self._close(ok.call_id, ok.reservation, None, refund=True)
            return self._deny(exc, data, authenticated=entry.name, started=started, tool=tool, context=self._run(vt))
        authz_s = time.perf_counter() - started
        self.observer.decision(ok.agent, ok.tool, "allow", None, authz_s)
        try:
            self.audit.record("decision", decision="allow", call_id=ok.call_id, agent=ok.agent, tool=ok.tool,
                              args=ok.args, token_id=ok.vt.token_id.hex(), depth=ok.vt.depth,
                              authz_us=round(authz_s * 1e6, 1), context=self._run(vt).label.public(),
                              sandbox=self.sandbox_for(ok.agent, ok.tool)["backend"]
                              if self.tools[ok.tool].sandboxed else None, **({"flow": ok.flow} if ok.flow else {}))
        except AuditUnavailable as exc:
            self._close(ok.call_id, ok.reservation, None, refund=True)
            exc.tool = ok.tool
            self.counts[(ok.agent, ok.tool, exc.code.value)] += 1
            return _pack({"ok": False, "error": exc.to_wire()})
        self.counts[(ok.agent, ok.tool, "allow")] += 1
        return ok

    def sandbox_for(self, agent: str, tool: str) -> dict[str, Any]:
        """The backend and limits the agent's policy sets for this tool (fail-safe default: gVisor)."""
        entry = self.agents[agent].sandbox
        return entry.get(tool) or entry.get("*") or {"backend": DEFAULT_BACKEND, "limits": {}}

    def _message(self, ok: _Allowed) -> bytes:
        body: dict[str, Any] = {"call_id": ok.call_id, "job": self.job_id, "agent": ok.agent, "tool": ok.tool,
                                "args": ok.args, "deadline": self.clock() + self.call_timeout_s}
        if self.tools[ok.tool].sandboxed:
            body["sandbox"] = self.sandbox_for(ok.agent, ok.tool)
        if ok.tool in self._credentials:  # only those bound to the origin of every URL the call names
            urls = {url_origin(v) for n, v in ok.args.items() if v and self.tools[ok.tool].params[n].format == "url"}
            body["credentials"] = {h: c for h, c in self._credentials[ok.tool].items()
                                   if all(url_origin(c["origin"]) == o for o in urls)}
        return sign_dispatch(self._dispatch_key, body)

    async def _run_one(self, ok: _Allowed, message: bytes | None = None) -> Any:
        """The worker's raw reply, or the exception the dispatch ended with."""
        ok.dispatched_at = time.perf_counter()
        try:
            return await _within(self.dispatcher.dispatch(ok.tool, message or self._message(ok), ok.agent),
                                 self.call_timeout_s)
        except Exception as exc:
            return exc

    async def _settle(self, ok: _Allowed, raw: Any) -> dict[str, Any]:
        """Turn the worker's reply into the agent's, settle the quota, record the outcome."""
        cost, origin = None, {"call_id": ok.call_id, "tool": ok.tool, "agent": ok.agent}  # of what it labels
        try:
            if ok.tool == ASK and ok.dispatched_at is not None:  # whatever comes back says something of the content
                self._taint(ok.vt, Label(2, ok.held["handle"].readers), origin)
            if isinstance(raw, asyncio.TimeoutError):
                raise ToolFailed(f"no result within {self.call_timeout_s}s", tool=ok.tool,
                                 code=ErrorCode.WORKER_UNAVAILABLE)
            if isinstance(raw, BaseException):
                raise raw
            result = msgpack.unpackb(raw, raw=False)
            if not isinstance(result, dict) or not isinstance(result.get("ok"), bool):
                raise ToolFailed("worker returned a malformed result", tool=ok.tool)
            cost = result.get("cost")
            if not result["ok"]:
                err = result.get("error") or {}
                # The worker is on the untrusted side: it may only report failure codes, never
                # make its outcome read as a decision of the trusted core.
                code = err.get("code") if err.get("code") in WORKER_CODES else ErrorCode.TOOL_FAILED.value
                raise ToolFailed(str(err.get("reason", "tool failed"))[:2000], tool=ok.tool, code=ErrorCode(code))
            # Revoked (or its key retired) while the call was in flight: the result is withheld.
            self._still_valid(ok.vt, ok.tool)
            value = result.get("value")
            label, hide, value = self._answer(ok, value, origin) if ok.tool == ASK else (
                *self._result_label(ok, value), value)
            outcome: dict[str, Any] = {"ok": True, "label": label.public(), **({"answer": value} if ok.tool == ASK
                                                                                 and not hide else {})}
            if hide:
                h = self.handles.issue(ok.agent, set(ok.vt.runs), ok.tool, value, label, origin,  # its delegators' too:
                                       self.agents[ok.agent].handle_limits)  # a helper may hand back what it hid
                value = {"$handle": h.id, "label": outcome["label"], "bytes": h.nbytes, "tool": ok.tool}
                outcome["handle"] = h.id
                self.observer.handles(ok.agent, *self.handles.usage(ok.agent))
            elif ok.tool != ASK:  # an answer lowered what it must in _answer
                self._taint(ok.vt, label, origin)
            reply: dict[str, Any] = {"ok": True, "value": value, "call_id": ok.call_id}
        except WardenError as exc:
            reply, outcome = self._failure(exc)
            if "detail" in reply["error"]:  # the tool's own words: never from a hidden result, else they taint
                label, hide = self._result_label(ok, None)
                try:  # and never if handles went in: its words may quote their content
                    hide or ok.held or self._taint(ok.vt, label, origin)
                except AuditUnavailable:
                    hide = True
                if hide or ok.held:
                    del reply["error"]["detail"]
        except Exception as exc:  # worker died, result undecodable, ...
            reply, outcome = self._failure(ToolFailed(f"{type(exc).__name__}: {exc}"[:500], tool=ok.tool,
                                                      code=ErrorCode.WORKER_UNAVAILABLE))
        finally:  # a call never dispatched (revoked first) is refunded
            self._close(ok.call_id, ok.reservation, cost if isinstance(cost, (int, float)) else None,
                        refund=ok.dispatched_at is None)
        elapsed = time.perf_counter() - (ok.dispatched_at or time.perf_counter())
        try:
            self.audit.record("outcome", call_id=ok.call_id, agent=ok.agent, tool=ok.tool,
                              dispatched=ok.dispatched_at is not None, dispatch_ms=round(elapsed * 1e3, 3),
                              cost=cost, context=self._run(ok.vt).label.public(), **outcome)
        except AuditUnavailable as exc:
            # The call ran but its outcome is not on record: do not hand back an unrecorded result.
            exc.tool = ok.tool
            return {"ok": False, "error": exc.to_wire(), "call_id": ok.call_id}
        self.observer.outcome(ok.agent, ok.tool, outcome["ok"], outcome.get("code"), elapsed)
        if not outcome["ok"]:
            self.counts[(ok.agent, ok.tool, outcome["code"])] += 1
        return reply

    @staticmethod
    def _failure(exc: WardenError) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"ok": False, "error": exc.to_wire()}, {"ok": False, "code": exc.code.value, "reason": exc.reason}

    async def delegate(self, data: Any) -> bytes:
        """Re-bind a (possibly attenuated) token of the caller to another agent (see ``_granted``)."""
        entry = target = None
        try:
            body, entry, vt = self._authenticate(data, "delegate")
            vt.check_time(self.clock())
            target = body["to"]
            if target not in entry.can_delegate_to or target not in self.agents:
                raise DelegationDenied(f"{entry.name!r} may not delegate to {target!r:.60}; "
                                       f"allowed: {sorted(entry.can_delegate_to)}")
            narrowed = vt.token.attenuate(*self.agents[target].delegate_caveats)
            child = self.keyring.verify(self.keyring.bind(narrowed, target))
            granted = self._granted(vt, child, target)
            self.ledger.check_rate(entry.name, f"delegate:{target}")  # each delegation is a run to keep
            handles = [self.handles.get(entry.name, vt.runs[-1], h, f"delegate:{target}")
                       for h in body.get("handles", ())]
            if child.runs[-1] not in self.runs and self._chains[vt.holders[0]] >= MAX_RUNS:
                raise DelegationDenied(f"{MAX_RUNS} runs of {vt.holders[0]!r}'s delegations, the most kept")
            self._chains[vt.holders[0]] += child.runs[-1] not in self.runs  # one agent cannot use up the shard's
            # The delegate starts where its delegator is (it gets the task from it), never reset.
            run, parent = self.runs.setdefault(child.runs[-1], Run(target, child.depth)), self._run(vt)
            run.label, run.origin = run.label.join(parent.label), run.origin or parent.origin
            self._journal("c", child.runs[-1], run.agent, run.depth, run.label.public(), run.origin)
            self.audit.record("delegate", agent=entry.name, to=target, tool=f"delegate:{target}", tools=granted,
                              token_id=vt.token_id.hex(), depth=child.depth, context=run.label.public(),
                              handles=[h.id for h in handles], tag_fp=sha256(child.tags[-1]).hexdigest()[:16])
            for h in handles:  # to that run only, once on record
                h.runs.add(child.runs[-1])
            self.counts[(entry.name, f"delegate:{target}", "allow")] += 1
            self.observer.decision(entry.name, f"delegate:{target}", "allow", None, 0.0)
            return _pack({"ok": True, "token": child.token.encode()})
        except Exception as exc:
            return self._deny(exc, data, authenticated=entry and entry.name, tool=target and f"delegate:{target}")

    def _granted(self, vt: VerifiedToken, child: VerifiedToken, target: str) -> list[str]:
        """The tools ``child`` hands on; DELEGATION_DENIED, the caller's, if none or if it named one it did not hold."""
        own = max(i for i, c in enumerate(vt.caveats) if isinstance(c, Holder))
        named = {t for i, c in enumerate(vt.caveats) if i > own and isinstance(c, Tools)
                 for t in set(c.names) - self._tools_of(vt.caveats[:i]) if t in self.tools}
        granted = sorted(self._tools_of(child.caveats))
        if named or not granted:
            raise DelegationDenied(f"delegation to {target!r} names {sorted(named)}, not held; it hands on {granted}")
        return granted

    def _tools_of(self, caveats: Any) -> set[str]:
        """The registered tools that every Tools and Effects caveat among ``caveats`` lets through."""
        return {t for t, spec in self.tools.items() if all(t in c.names for c in caveats if isinstance(c, Tools))
                and all(spec.effect in c.effects for c in caveats if isinstance(c, Effects))}
