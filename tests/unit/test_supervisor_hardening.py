"""Attacks on the supervisor's bookkeeping, each performed through the real path: a real
``Supervisor`` with real tokens, a real audit log file, a real state journal and a real tool
worker. Each test shows the typed outcome the agent gets and the audit record behind it."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from typing import Any

import msgpack
import pytest
from prometheus_client import generate_latest

from runtime.errors import (ApprovalDenied, AuditUnavailable, ErrorCode, QuotaExceeded, TokenRejected, ToolFailed,
                            WardenError)
from runtime.metrics import PrometheusObserver, parse_metrics, sum_samples
from runtime.protocol import decode_reply, encode_batch, encode_call, encode_delegate
from runtime.sandbox.worker import ToolWorker
from runtime.testing import FakeClock
from runtime.tool import ToolContext, tool
from runtime.anomaly import AnomalyConfig
from runtime.trusted.approvals import ApprovalRule
from runtime.trusted.audit import AuditLog
from runtime.auditlog import verify
from runtime.auditlog import read_records
from runtime.trusted.capability import Audience, CallBudget, Expires, KeyRing, Tools
from runtime.protocol import first_holder
from runtime.trusted.ledger import AgentQuota, QuotaLedger
from runtime.trusted.state import StateJournal
from runtime.trusted.supervisor import OTHER_TOOL, UNAUTHENTICATED, AgentEntry, Supervisor, shard_of
from runtime.trusted.wire import MAX_NAME_CHARS

JOB = "job-hardening"
RAN: list[tuple[str, Any]] = []
GATE: dict[str, asyncio.Event] = {}
CREDENTIAL = "Bearer sk-live-7f3a9c2e51d8"


@tool(effect="write")
def write(name: str) -> str:
    """Write a document."""
    RAN.append(("write", name))
    return name


@tool(effect="delete")
def drop(channel: str) -> str:
    """Delete a channel."""
    RAN.append(("drop", channel))
    return channel


@tool(effect="write")
def post(body: dict, *, ctx: ToolContext) -> str:
    """Post to a service that refuses, quoting the request's headers back (as some services do)."""
    RAN.append(("post", body))
    raise RuntimeError(f"403 Forbidden for a request with headers {ctx.credentials}")


@tool(effect="read")
async def slow(text: str) -> str:
    """Runs until the test opens the gate."""
    RAN.append(("slow", text))
    await GATE["open"].wait()
    return text


TOOLS = {t.name: t for t in (write, drop, post, slow)}
ALWAYS = {"drop": ApprovalRule("drop", timeout_s=60)}


class World:
    """Supervisor shards of one job: one key ring, real audit files and journals, one fake clock.

    ``agents`` maps a name to its settings: ``quota`` (AgentQuota), ``tools`` (what its root
    token allows), ``caveats`` (more root caveats) and AgentEntry fields (``approvals``,
    ``anomaly``, ``max_parked``, ``can_delegate_to``)."""

    def __init__(self, tmp_path: Any, agents: dict[str, dict[str, Any]], *, shards: int = 1,
                 credentials: dict[str, dict[str, str]] | None = None, observer: Any = None) -> None:
        RAN.clear()
        self.tmp, self.agents, self.n, self.credentials, self.observer = tmp_path, agents, shards, credentials, observer
        self.clock = FakeClock(time.time())  # requests carry wall-clock timestamps
        ring = KeyRing.generate()
        self.secret = ring.to_secret_dict()
        self.keys = {name: secrets.token_bytes(32) for name in agents}
        self.tokens: dict[str, bytes] = {}
        for name, spec in agents.items():
            caveats = [Audience(JOB), Expires(time.time() + 3600), Tools(spec.get("tools", tuple(TOOLS))),
                       *spec.get("caveats", ())]
            self.tokens[name] = ring.mint(holder=name, caveats=caveats).encode()
        self.dispatch_key, self.peer_key = secrets.token_bytes(32), secrets.token_bytes(32)
        self.worker = ToolWorker(dispatch_key=self.dispatch_key, tools=TOOLS, job=JOB, clock=self.clock)
        self.events: list[dict[str, Any]] = []
        self.sups: list[Supervisor] = []
        self.logs: list[AuditLog] = []
        self.journals: list[StateJournal] = []
        for i in range(shards):
            self._start(i)

    def _start(self, i: int) -> int:
        worker = self.worker

        class Direct:
            async def dispatch(_, tool: str, message: bytes, agent: str = "") -> bytes:
                return await worker.execute(message)

            async def dispatch_batch(_, messages: list[bytes], agent: str = "") -> list[bytes]:
                return await worker.execute_batch(messages)

        log = AuditLog(self.audit_path(i))
        journal = StateJournal(self.tmp / f"state-{i}.journal")
        sup = Supervisor(job_id=JOB, keyring=KeyRing.from_secret_dict(self.secret),
                         tools={n: t.spec for n, t in TOOLS.items()}, audit=log, dispatcher=Direct(),
                         dispatch_key=self.dispatch_key, clock=self.clock, ledger=QuotaLedger(clock=self.clock),
                         credentials=self.credentials, observer=self.observer, on_event=self.events.append,
                         shard=(i, self.n), journal=journal, peer_key=self.peer_key if self.n > 1 else None)
        entry_fields = ("approvals", "anomaly", "max_parked")
        for name, spec in self.agents.items():
            extra = {k: spec[k] for k in entry_fields if k in spec}
            sup.register_agent(AgentEntry(name, self.keys[name], frozenset(spec.get("can_delegate_to", ())), **extra),
                               spec.get("quota", AgentQuota()))
        if i < len(self.sups):
            self.sups[i], self.logs[i], self.journals[i] = sup, log, journal
        else:
            self.sups.append(sup), self.logs.append(log), self.journals.append(journal)
        return sup.restore()

    def restart(self, i: int = 0) -> int:
        """What Ray's max_restarts does: the process is gone (the kernel drops its locks), it starts again."""
        self.logs[i].close()
        self.journals[i].close()
        return self._start(i)

    def audit_path(self, i: int = 0) -> str:
        return str(self.tmp / f"audit-{i}.log")

    def records(self, i: int = 0, **match: Any) -> list[dict[str, Any]]:
        return [r for r in read_records(self.audit_path(i)) if all(r.get(k) == v for k, v in match.items())]

    def shard_for(self, token: bytes) -> Supervisor:
        return self.sups[shard_of(first_holder(token), self.n)]

    def request(self, agent: str, tool_name: str, token: bytes | None = None, key: bytes | None = None,
                **args: Any) -> bytes:
        return encode_call(agent=agent, token=token or self.tokens[agent], tool=tool_name, args=args,
                           request_key=key or self.keys[agent])

    async def call(self, agent: str, tool_name: str, token: bytes | None = None, **args: Any) -> Any:
        token = token or self.tokens[agent]
        return decode_reply(await self.shard_for(token).call(self.request(agent, tool_name, token, **args)))["value"]

    async def send(self, request: bytes, i: int = 0) -> Any:
        """A request as built (forged, replayed, ...), to shard ``i``: its reply, or its typed error raised."""
        return decode_reply(await self.sups[i].call(request))

    async def batch(self, agent: str, calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        req = encode_batch(agent=agent, token=self.tokens[agent], calls=calls, request_key=self.keys[agent])
        return decode_reply(await self.shard_for(self.tokens[agent]).call_batch(req))["batch"]

    async def delegate(self, agent: str, to: str, token: bytes | None = None) -> bytes:
        token = token or self.tokens[agent]
        req = encode_delegate(agent=agent, token=token, to=to, request_key=self.keys[agent])
        return decode_reply(await self.shard_for(token).delegate(req))["token"]


def refused(coro: Any, cls: type[WardenError], code: ErrorCode) -> WardenError:
    with pytest.raises(cls) as info:
        asyncio.run(coro)
    assert info.value.code is code, info.value
    return info.value


async def until(predicate: Any) -> None:
    """Let the other tasks on this loop run until ``predicate()`` holds (each step is an event, not a delay)."""
    while not predicate():
        await asyncio.sleep(0)


def codes(replies: list[dict[str, Any]]) -> list[str]:
    return ["ok" if r["ok"] else r["error"]["code"] for r in replies]


# ------------------------------------------------------------- item 7: batches and quarantine


def test_a_batch_stops_where_its_own_denials_get_the_agent_quarantined(tmp_path):
    w = World(tmp_path, {"a": {"tools": ("write",), "caveats": [CallBudget(20)],
                               "anomaly": AnomalyConfig(quarantine_after=3)}})
    sup = w.sups[0]
    budget = sup.keyring.verify(w.tokens["a"]).budgets[0][0]
    calls = [("write", {"name": "early"}), *[("drop", {"channel": f"c{i}"}) for i in range(3)],
             *[("write", {"name": f"w{i}"}) for i in range(5)]]
    replies = asyncio.run(w.batch("a", calls))
    # Three denials quarantine the agent: the five writes after them are denied, and the write
    # decided before them is withdrawn before the batch leaves for the worker.
    assert codes(replies) == ["TOKEN_REVOKED", *["POLICY_DENIED"] * 3, *["TOKEN_REVOKED"] * 5]
    assert RAN == []
    assert sup.quarantined == {"a"} and [e["event"] for e in w.events] == ["quarantine"]
    assert sup.ledger.used(budget) == 0 and sup.ledger.inflight("a") == 0  # nothing charged for what never ran
    allowed = w.records(kind="decision", decision="allow")
    assert [r["args"] for r in allowed] == [{"name": "early"}]
    (withdrawn,) = w.records(kind="outcome")
    assert withdrawn["call_id"] == allowed[0]["call_id"]
    assert (withdrawn["ok"], withdrawn["code"], withdrawn["dispatched"]) == (False, "TOKEN_REVOKED", False)
    later = w.records(kind="decision", decision="deny", code="TOKEN_REVOKED")
    assert [r["tool"] for r in later] == ["write"] * 5
    quarantine = w.records(kind="quarantine")[0]["seq"]
    assert all(r["seq"] > quarantine for r in later)
    assert verify(w.audit_path()).ok
    # The charge-free refund is on the journal too.
    assert w.restart() == 0 and w.sups[0].ledger.used(budget) == 0


def test_a_revocation_while_a_batch_item_is_parked_stops_the_rest_of_the_batch(tmp_path):
    w = World(tmp_path, {"a": {"approvals": ALWAYS}})
    sup = w.sups[0]

    async def scenario() -> list[dict[str, Any]]:
        task = asyncio.create_task(w.batch("a", [("write", {"name": "first"}), ("drop", {"channel": "general"}),
                                                 ("write", {"name": "after"})]))
        await until(lambda: len(sup.approvals) == 1)
        sup.revoke_agent("a", by="dan")
        return await task

    replies = asyncio.run(scenario())
    assert codes(replies) == ["TOKEN_REVOKED", "APPROVAL_DENIED", "TOKEN_REVOKED"]
    assert RAN == [] and sup.ledger.inflight("a") == 0
    (approval,) = w.records(kind="approval")
    assert (approval["decision"], approval["approver"]) == ("deny", "dan")
    assert [r["tool"] for r in w.records(kind="decision", decision="deny", code="TOKEN_REVOKED")] == ["write"]
    assert w.records(kind="outcome")[0]["dispatched"] is False


def test_a_batch_item_is_not_dispatched_once_its_token_expired_while_a_later_item_parked(tmp_path):
    w = World(tmp_path, {"a": {"approvals": ALWAYS, "caveats": [Expires(time.time() + 60)]}})
    sup = w.sups[0]

    async def scenario() -> list[dict[str, Any]]:
        task = asyncio.create_task(w.batch("a", [("write", {"name": "first"}), ("drop", {"channel": "general"})]))
        await until(lambda: len(sup.approvals) == 1)
        w.clock.advance(3600)  # the human answers an hour later; the token expired meanwhile
        sup.decide_approval(sup.approvals.list()[0]["id"], approve=True, approver="dan")
        return await task

    assert codes(asyncio.run(scenario())) == ["TOKEN_EXPIRED", "TOKEN_EXPIRED"]
    assert RAN == [] and sup.ledger.inflight("a") == 0
    assert [r["dispatched"] for r in w.records(kind="outcome")] == [False]


# ------------------------------------------------- item 10: invented names cost nothing


def test_invented_tool_names_do_not_grow_the_supervisor(tmp_path):
    observer = PrometheusObserver(JOB, agents=["a"], tools=list(TOOLS))
    w = World(tmp_path, {"a": {}}, observer=observer)
    sup = w.sups[0]
    for i in range(40):  # 1 MB names, as in the issue, with a good MAC and with a forged one
        for key in (w.keys["a"], secrets.token_bytes(32)):
            refused(w.send(w.request("a", f"{i:02d}" + "x" * 999_998, key=key)), WardenError, ErrorCode.MALFORMED)
    for i in range(500):
        refused(w.send(w.request("a", f"tool-{i}-{secrets.token_hex(8)}")), WardenError, ErrorCode.UNKNOWN_TOOL)
    assert dict(sup.counts) == {(UNAUTHENTICATED, "None", "MALFORMED"): 80, ("a", OTHER_TOOL, "UNKNOWN_TOOL"): 500}
    assert set(sup.anomaly._state["a"].rates) == {OTHER_TOOL}  # one rate for every invented name
    series = parse_metrics(observer_text(observer))
    tools = {value for _, labels in series for name, value in labels if name == "tool"}
    assert tools <= {*TOOLS, OTHER_TOOL, "None"}
    # 80 MB of names offered (half with a good MAC); none of it stored, in memory or in the log.
    assert os.path.getsize(w.audit_path()) < 300_000
    records = w.records(kind="decision", code="MALFORMED")
    assert len(records) == 80 and all(r["tool"] is None for r in records)
    assert f"longer than {MAX_NAME_CHARS}" in records[0]["reason"]
    assert all(len(r["tool"]) < 40 for r in w.records(kind="decision", code="UNKNOWN_TOOL"))


def observer_text(observer: PrometheusObserver) -> str:
    return generate_latest(observer.registry).decode()


# --------------------------------------- item 15: forged requests are not the agent's figures


def test_forged_and_replayed_requests_are_counted_apart_from_the_agent_they_name(tmp_path):
    observer = PrometheusObserver(JOB, agents=["a", "b"], tools=list(TOOLS))
    w = World(tmp_path, {"a": {}, "b": {"anomaly": AnomalyConfig(quarantine_after=3)}}, observer=observer)
    sup = w.sups[0]
    genuine = w.request("b", "write", name="mine")
    assert asyncio.run(w.send(genuine))["value"] == "mine"
    for i in range(10):  # mallory, who does not hold b's request key, writes in b's name
        forged = w.request("b", "write", key=secrets.token_bytes(32), name=f"forged-{i}")
        refused(w.send(forged), TokenRejected, ErrorCode.BAD_REQUEST_MAC)
    for _ in range(3):  # and replays b's captured request
        refused(w.send(genuine), TokenRejected, ErrorCode.REPLAY)
    refused(w.call("b", "nope"), WardenError, ErrorCode.UNKNOWN_TOOL)  # b's own mistake is b's
    assert dict(sup.counts) == {("b", "write", "allow"): 1, ("b", OTHER_TOOL, "UNKNOWN_TOOL"): 1,
                                (UNAUTHENTICATED, "write", "BAD_REQUEST_MAC"): 10,
                                (UNAUTHENTICATED, "write", "REPLAY"): 3}
    assert sup.anomaly.violations("b") == 1 and sup.quarantined == set()
    m = parse_metrics(observer_text(observer))
    assert sum_samples(m, "warden_denials_total", agent="b") == 1
    assert sum_samples(m, "warden_denials_total", agent=UNAUTHENTICATED) == 13
    forged_records = w.records(kind="decision", code="BAD_REQUEST_MAC")
    assert len(forged_records) == 10 and all(r["agent"] == "b" and r["authenticated"] is False
                                             for r in forged_records)
    assert w.records(kind="decision", code="UNKNOWN_TOOL")[0]["authenticated"] is True
    assert RAN == [("write", "mine")]


# ---------------------------------------------------- item 11: parking is limited like calls


def test_a_rate_limited_agent_cannot_park_more_than_its_rate_allows(tmp_path):
    w = World(tmp_path, {"a": {"quota": AgentQuota(rate_per_s=1.0, burst=1), "approvals": ALWAYS},
                         "b": {}})
    sup = w.sups[0]

    async def scenario() -> list[Any]:
        tasks = [asyncio.create_task(w.call("a", "drop", channel=f"c{i}")) for i in range(1500)]
        await until(lambda: sum(t.done() for t in tasks) == 1499)
        assert len(sup.approvals) == 1 and sup.ledger.inflight("a") == 1
        assert await w.call("b", "write", name="real work") == "real work"  # not buried
        (pending,) = sup.approvals.list()
        sup.decide_approval(pending["id"], approve=True, approver="carol")
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(scenario())
    denied = [r for r in results if isinstance(r, WardenError)]
    assert len(denied) == 1499 and {e.code for e in denied} == {ErrorCode.RATE_LIMITED}
    assert all(e.retry_after_s and e.retry_after_s > 0 for e in denied)
    assert RAN == [("write", "real work"), ("drop", next(r for r in results if isinstance(r, str)))]
    assert len(w.records(kind="approval_requested")) == 1
    assert len(w.records(kind="decision", code="RATE_LIMITED")) == 1499
    (requested,) = w.records(kind="approval_requested")
    assert requested["call_id"] in {r["call_id"] for r in w.records(kind="decision", decision="allow")}


@pytest.mark.parametrize("quota, max_parked, parked, code", [
    (AgentQuota(), 3, 3, ErrorCode.APPROVAL_QUEUE_FULL),
    (AgentQuota(max_concurrent=2), 8, 2, ErrorCode.CONCURRENCY_LIMIT),
])
def test_parked_calls_are_capped_and_refunded_when_denied(tmp_path, quota, max_parked, parked, code):
    w = World(tmp_path, {"a": {"quota": quota, "approvals": ALWAYS, "max_parked": max_parked,
                               "caveats": [CallBudget(100)]}})
    sup = w.sups[0]
    budget = sup.keyring.verify(w.tokens["a"]).budgets[0][0]

    async def scenario() -> list[Any]:
        tasks = [asyncio.create_task(w.call("a", "drop", channel=f"c{i}")) for i in range(parked + 4)]
        await until(lambda: sum(t.done() for t in tasks) == 4)
        assert len(sup.approvals) == parked and sup.ledger.used(budget) == parked  # each holds its reservation
        for p in sup.approvals.list():
            sup.decide_approval(p["id"], approve=False, approver="carol", reason="no")
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(scenario())
    over = [r for r in results if isinstance(r, QuotaExceeded)]
    assert len(over) == 4 and {e.code for e in over} == {code} and all(e.retryable for e in over)
    assert sum(isinstance(r, ApprovalDenied) for r in results) == parked
    assert RAN == [] and sup.ledger.inflight("a") == 0 and sup.ledger.used(budget) == 0
    assert len(w.records(kind="decision", decision="deny", code=code.value)) == 4
    assert len(w.records(kind="decision", decision="deny", code="APPROVAL_DENIED")) == parked


def test_the_parked_cap_is_a_policy_quota():
    from runtime.errors import ConfigError
    from runtime.policyfile import parse_policy

    tools = {"t": {"effect": "write", "approval": True}}
    assert parse_policy({"agent": "a", "tools": tools}).quotas.max_parked == 8
    assert parse_policy({"agent": "a", "tools": tools, "quotas": {"max_parked": 2}}).quotas.max_parked == 2
    with pytest.raises(ConfigError) as info:
        parse_policy({"agent": "a", "tools": tools, "quotas": {"max_parked": 0}})
    assert info.value.code is ErrorCode.POLICY_INVALID


# -------------------------------- item 14 (and 18): what is redacted in the log, and what is not


def test_the_model_cannot_hide_an_argument_and_attached_credentials_never_reach_the_log(tmp_path):
    w = World(tmp_path, {"a": {}},
              credentials={"post": {"Authorization": {"value": CREDENTIAL, "origin": "https://api.example:443"}}})
    body = {"token": "exfiltrated-customer-list", "password": "hunter2", "n": [1, 2]}
    refused(w.call("a", "post", body=body), ToolFailed, ErrorCode.TOOL_FAILED)
    assert RAN == [("post", body)]
    (allowed,) = w.records(kind="decision", decision="allow")
    assert allowed["args"] == {"body": body}  # logged as the model wrote it, whatever the keys are called
    (outcome,) = w.records(kind="outcome")
    assert outcome["reason"]["redacted"] is True and len(outcome["reason"]["sha256"]) == 64
    assert CREDENTIAL.split()[1].encode() not in open(w.audit_path(), "rb").read()


# ----------------------------------------------------- item 16: revoke --cascade


def test_cascade_revokes_what_the_agent_was_delegated_and_passed_on(tmp_path):
    from runtime.control import ControlClient, control_routes
    from runtime.metrics import MetricsServer

    w = World(tmp_path, {"lead": {"can_delegate_to": ("a",)}, "a": {"can_delegate_to": ("c",)}, "c": {}})
    sup = w.sups[0]

    async def scenario() -> None:
        to_a = await w.delegate("lead", "a")
        lead_via_a = await w.delegate("a", "c", token=to_a)  # what a was given, passed on
        own_via_a = await w.delegate("a", "c")  # a's own authority, passed on
        server = MetricsServer()
        server.add_routes(control_routes(sup, "op-token"))
        host, port = await server.start("127.0.0.1", 0)
        client = ControlClient(f"http://{host}:{port}", "op-token")
        try:
            await asyncio.to_thread(client.revoke, agent="a", by="erin")
            # Without --cascade a's delegates keep what a gave them (documented).
            assert await w.call("c", "write", token=lead_via_a, name="x1") == "x1"
            assert await w.call("c", "write", token=own_via_a, name="x2") == "x2"
            out = await asyncio.to_thread(client.revoke, agent="a", by="erin", cascade=True)
            assert out == {"revoked_agent": "a", "cascade": True}
        finally:
            await server.stop()
        for token in (lead_via_a, own_via_a, to_a):
            holder = "a" if token is to_a else "c"
            with pytest.raises(TokenRejected) as info:
                await w.call(holder, "write", token=token, name="after")
            assert info.value.code is ErrorCode.TOKEN_REVOKED
        # Nobody else lost anything: lead's and c's own tokens work.
        assert await w.call("lead", "write", name="lead") == "lead"
        assert await w.call("c", "write", name="c") == "c"

    asyncio.run(scenario())
    assert [r.get("cascade") for r in w.records(kind="revoke", agent="a", by="erin")] == [False, True]
    denied = w.records(kind="decision", decision="deny", code="TOKEN_REVOKED")
    assert [r["agent"] for r in denied] == ["c", "c", "a"]
    w.restart()  # and it is on the journal
    refused(w.call("a", "write", name="a"), TokenRejected, ErrorCode.TOKEN_REVOKED)
    assert asyncio.run(w.call("c", "write", name="c again")) == "c again"


def test_a_quarantine_also_kills_what_the_agent_was_delegated_and_passed_on(tmp_path):
    w = World(tmp_path, {"lead": {"can_delegate_to": ("a",)}, "a": {"can_delegate_to": ("c",),
                                                                     "anomaly": AnomalyConfig(quarantine_after=2)},
                         "c": {}})

    async def scenario() -> bytes:
        lead_via_a = await w.delegate("a", "c", token=await w.delegate("lead", "a"))
        for _ in range(2):  # a misbehaves: two violations quarantine it
            with pytest.raises(WardenError):
                await w.call("a", "nope")
        with pytest.raises(TokenRejected) as info:
            await w.call("c", "write", token=lead_via_a, name="x")
        assert info.value.code is ErrorCode.TOKEN_REVOKED
        assert await w.call("lead", "write", name="lead") == "lead"
        return lead_via_a

    lead_via_a = asyncio.run(scenario())
    assert w.sups[0].quarantined == {"a"} and w.records(kind="quarantine")
    assert w.records(kind="decision", code="TOKEN_REVOKED")[0]["agent"] == "c"
    w.restart()  # the journal's quarantine frame restores it
    refused(w.call("c", "write", token=lead_via_a, name="y"), TokenRejected, ErrorCode.TOKEN_REVOKED)
    assert RAN == [("write", "lead")]


def test_a_cascade_made_on_one_shard_holds_on_the_other(tmp_path):
    # dave's chains are decided on shard 1, bob's on shard 0.
    assert (shard_of("dave", 2), shard_of("bob", 2), shard_of("carol", 2)) == (1, 0, 0)
    w = World(tmp_path, {"dave": {"can_delegate_to": ("bob",)}, "bob": {"can_delegate_to": ("carol",)},
                         "carol": {}}, shards=2)

    async def scenario() -> None:
        dave_via_bob = await w.delegate("bob", "carol", token=await w.delegate("dave", "bob"))
        bob_own = await w.delegate("bob", "carol")
        w.sups[0].revoke_agent("bob", by="erin", cascade=True)
        w.sups[1].apply_peer(w.sups[0].peer_message("revoke_agent", agent="bob", by="erin", cascade=True))
        for token in (dave_via_bob, bob_own):
            with pytest.raises(TokenRejected) as info:
                await w.call("carol", "write", token=token, name="x")
            assert info.value.code is ErrorCode.TOKEN_REVOKED
        assert await w.call("dave", "write", name="dave") == "dave"

    asyncio.run(scenario())
    assert w.records(1, kind="revoke", agent="bob", by="erin via shard 0")[0]["cascade"] is True
    assert w.records(1, kind="decision", code="TOKEN_REVOKED")[0]["agent"] == "carol"
    assert w.records(0, kind="decision", code="TOKEN_REVOKED")[0]["agent"] == "carol"


# -------------------------------------------- item 18: breaks the older tests did not notice


def test_a_reservation_that_cannot_be_journaled_is_denied_and_charges_nothing(tmp_path):
    w = World(tmp_path, {"a": {"caveats": [CallBudget(5)], "quota": AgentQuota(max_concurrent=1)}})
    sup, journal = w.sups[0], w.journals[0]
    budget = sup.keyring.verify(w.tokens["a"]).budgets[0][0]
    append = journal.append

    def disk_full_for_reservations(*frame: Any, **kw: Any) -> None:
        if frame[:1] == ("r",):
            raise OSError(28, "No space left on device")
        append(*frame, **kw)

    journal.append = disk_full_for_reservations  # type: ignore[method-assign]
    refused(w.call("a", "write", name="x"), AuditUnavailable, ErrorCode.AUDIT_UNAVAILABLE)
    assert RAN == [] and sup.ledger.used(budget) == 0 and sup.ledger.inflight("a") == 0 and not sup._open
    assert w.records(kind="decision", decision="allow") == []
    (deny,) = w.records(kind="decision", decision="deny")
    assert deny["code"] == "AUDIT_UNAVAILABLE" and "No space left" in deny["reason"]
    journal.append = append  # type: ignore[method-assign]
    assert asyncio.run(w.call("a", "write", name="y")) == "y"  # the concurrency slot was given back
    assert sup.ledger.used(budget) == 1


def test_a_token_revoked_on_a_peer_shard_fails_on_the_receiving_shard(tmp_path):
    assert shard_of("alice", 2) == 1
    w = World(tmp_path, {"alice": {}, "bob": {}}, shards=2)
    token_id = w.sups[1].keyring.verify(w.tokens["alice"]).token_id
    assert asyncio.run(w.call("alice", "write", name="before")) == "before"
    w.sups[0].revoke_token(token_id, by="erin")  # the operator's API answered on shard 0
    w.sups[1].apply_peer(w.sups[0].peer_message("revoke_token", token_id=token_id, by="erin"))
    refused(w.call("alice", "write", name="after"), TokenRejected, ErrorCode.TOKEN_REVOKED)
    assert w.records(1, kind="revoke", token_id=token_id.hex(), by="erin via shard 0")
    (deny,) = w.records(1, kind="decision", decision="deny")
    assert (deny["agent"], deny["code"]) == ("alice", "TOKEN_REVOKED")
    w.restart(1)
    refused(w.call("alice", "write", name="after restart"), TokenRejected, ErrorCode.TOKEN_REVOKED)
    assert RAN == [("write", "before")]


def test_after_a_restart_with_a_call_in_flight_rate_and_concurrency_limits_hold_exactly(tmp_path):
    w = World(tmp_path, {"a": {"quota": AgentQuota(rate_per_s=1.0, burst=2, max_concurrent=2)}})
    GATE["open"] = asyncio.Event()

    async def scenario() -> None:
        lost = asyncio.create_task(w.call("a", "slow", text="in flight at the crash"))
        await until(lambda: RAN)
        lost.cancel()  # the process dies here
        assert w.restart() == 1  # closed, charged, on record
        sup = w.sups[0]
        assert sup.ledger.inflight("a") == 0
        # Rate: the restarted shard starts with an empty bucket, refilled at exactly 1 call/s.
        e = await expect(w.call("a", "write", name="now"), QuotaExceeded)
        assert e.code is ErrorCode.RATE_LIMITED and e.retry_after_s == pytest.approx(1.0)
        w.clock.advance(0.999)
        assert (await expect(w.call("a", "write", name="too soon"), QuotaExceeded)).code is ErrorCode.RATE_LIMITED
        w.clock.advance(0.001)
        first = asyncio.create_task(w.call("a", "slow", text="one"))
        await until(lambda: ("slow", "one") in RAN)
        assert (await expect(w.call("a", "write", name="same second"), QuotaExceeded)).code is ErrorCode.RATE_LIMITED
        # Concurrency: exactly two at once, the in-flight call of the dead process not among them.
        w.clock.advance(1.0)
        second = asyncio.create_task(w.call("a", "slow", text="two"))
        await until(lambda: ("slow", "two") in RAN)
        assert sup.ledger.inflight("a") == 2
        w.clock.advance(1.0)
        assert (await expect(w.call("a", "write", name="third"), QuotaExceeded)).code is ErrorCode.CONCURRENCY_LIMIT
        GATE["open"].set()
        assert await first == "one" and await second == "two"
        assert sup.ledger.inflight("a") == 0

    asyncio.run(scenario())
    closed = w.records(kind="outcome", code="SUPERVISOR_UNAVAILABLE")
    assert len(closed) == 1
    assert [r["code"] for r in w.records(kind="decision", decision="deny")] == [
        "RATE_LIMITED", "RATE_LIMITED", "RATE_LIMITED", "CONCURRENCY_LIMIT"]


async def expect(coro: Any, cls: type[WardenError]) -> WardenError:
    with pytest.raises(cls) as info:
        await coro
    return info.value


def test_batch_replies_are_plain_data(tmp_path):
    """A withdrawn batch item's reply is the same shape as any other denial (code and tool, no reason)."""
    w = World(tmp_path, {"a": {"tools": ("write",), "anomaly": AnomalyConfig(quarantine_after=1)}})
    replies = asyncio.run(w.batch("a", [("write", {"name": "x"}), ("drop", {"channel": "c"})]))
    assert replies[0] == {"ok": False, "error": {"code": "TOKEN_REVOKED", "tool": "write"}}
    assert msgpack.unpackb(msgpack.packb(replies)) == replies
