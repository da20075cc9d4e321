"""Control plane in the supervisor, no Ray: human approvals, revocation of in-flight calls,
anomaly flags and quarantine. Each denial is typed and on record."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import pytest

from runtime.errors import ApprovalDenied, ErrorCode, PolicyDenied, TokenRejected
from runtime.protocol import decode_reply, encode_call, encode_delegate
from runtime.sandbox.worker import ToolWorker
from runtime.testing import MemoryAudit
from runtime.tool import tool
from runtime.anomaly import AnomalyConfig, AnomalyDetector
from runtime.trusted.approvals import ApprovalRule
from runtime.trusted.capability import Audience, Expires, KeyRing, Tools
from runtime.trusted.ledger import AgentQuota
from runtime.trusted.supervisor import AgentEntry, Supervisor

JOB = "job-control"
RAN: list[str] = []
GATE: dict[str, asyncio.Event] = {}


@tool(effect="delete")
def drop(channel: str) -> str:
    """Delete a channel."""
    RAN.append(channel)
    return f"dropped {channel}"


@tool(effect="read")
async def slow_read() -> str:
    """Waits until the test opens the gate."""
    await GATE["open"].wait()
    RAN.append("slow_read")
    return "data"


TOOLS = {t.name: t for t in (drop, slow_read)}


class Env:
    def __init__(self, **entry_kw: Any) -> None:
        RAN.clear()
        self.audit, self.keyring, key = MemoryAudit(), KeyRing.generate(), secrets.token_bytes(32)
        worker = ToolWorker(dispatch_key=key, tools=TOOLS, job=JOB)

        class Direct:
            async def dispatch(_, tool: str, message: bytes, agent: str = "") -> bytes:
                return await worker.execute(message)

        self.events: list[dict[str, Any]] = []
        self.sup = Supervisor(job_id=JOB, keyring=self.keyring, tools={n: t.spec for n, t in TOOLS.items()},
                              audit=self.audit, dispatcher=Direct(), dispatch_key=key, on_event=self.events.append)
        self.keys, self.tokens, self.roots = {}, {}, {}
        for name in ("alice", "bob"):
            self.keys[name] = secrets.token_bytes(32)
            root = self.keyring.mint(holder=name, caveats=[Audience(JOB), Expires(time.time() + 600),
                                                           Tools(tuple(TOOLS))])
            self.tokens[name], self.roots[name] = root.encode(), root.token_id
            self.sup.register_agent(AgentEntry(name, self.keys[name], frozenset({"bob"}) if name == "alice" else
                                               frozenset(), root_token_id=root.token_id, **entry_kw), AgentQuota())

    async def call(self, tool_name: str, agent: str = "alice", token: bytes | None = None, **args: Any) -> Any:
        req = encode_call(agent=agent, token=token or self.tokens[agent], tool=tool_name, args=args,
                          request_key=self.keys[agent])
        return decode_reply(await self.sup.call(req))["value"]

    async def delegated_token(self) -> bytes:
        req = encode_delegate(agent="alice", token=self.tokens["alice"], to="bob", request_key=self.keys["alice"])
        return decode_reply(await self.sup.delegate(req))["token"]

    async def parked(self, n: int = 1) -> list[dict[str, Any]]:
        while len(self.sup.approvals) < n:  # the call parks within the same event loop
            await asyncio.sleep(0)
        return self.sup.approvals.list()


APPROVE_GENERAL = {"drop": ApprovalRule("drop", (("channel", "one_of", ("general",)),), timeout_s=5)}


def test_approved_call_runs_once_and_the_approver_is_on_record():
    env = Env(approvals=APPROVE_GENERAL)

    async def scenario():
        task = asyncio.create_task(env.call("drop", channel="general"))
        (pending,) = await env.parked()
        assert pending["tool"] == "drop" and pending["args"] == {"channel": "general"} and RAN == []
        env.sup.decide_approval(pending["id"], approve=True, approver="carol", reason="planned cleanup")
        assert await task == "dropped general"
        # The approval covered that one call: the next one is parked again.
        again = asyncio.create_task(env.call("drop", channel="general"))
        (second,) = await env.parked()
        assert second["id"] != pending["id"]
        env.sup.decide_approval(second["id"], approve=False, approver="carol", reason="once is enough")
        with pytest.raises(ApprovalDenied) as info:
            await again
        assert info.value.code is ErrorCode.APPROVAL_DENIED

    asyncio.run(scenario())
    assert RAN == ["general"]
    decisions = env.audit.of("approval")
    assert [(d["decision"], d["approver"]) for d in decisions] == [("approve", "carol"), ("deny", "carol")]
    assert env.audit.of("approval_requested")[0]["args"] == {"channel": "general"}
    # Write-ahead order: request, approval, allow decision, outcome.
    kinds = [r["kind"] for r in env.audit.records]
    assert kinds[:4] == ["approval_requested", "approval", "decision", "outcome"]


def test_calls_not_matching_the_rule_need_no_approval():
    env = Env(approvals=APPROVE_GENERAL)
    assert asyncio.run(env.call("drop", channel="random")) == "dropped random"
    assert env.audit.of("approval_requested") == []


def test_no_answer_in_time_is_a_denial():
    env = Env(approvals={"drop": ApprovalRule("drop", (), timeout_s=0.05)})
    with pytest.raises(ApprovalDenied) as info:
        asyncio.run(env.call("drop", channel="x"))
    assert info.value.code is ErrorCode.APPROVAL_TIMEOUT and RAN == []
    assert env.audit.of("approval")[0]["approver"] == "(nobody)"
    assert env.audit.of("decision", decision="deny", code="APPROVAL_TIMEOUT")


def test_unknown_or_repeated_approval_ids_are_refused():
    env = Env(approvals=APPROVE_GENERAL)

    async def scenario():
        task = asyncio.create_task(env.call("drop", channel="general"))
        (pending,) = await env.parked()
        with pytest.raises(KeyError):
            env.sup.decide_approval("not-an-id", approve=True, approver="x")
        env.sup.decide_approval(pending["id"], approve=True, approver="x")
        with pytest.raises(KeyError):
            env.sup.decide_approval(pending["id"], approve=True, approver="x")
        await task

    asyncio.run(scenario())


def test_revoking_an_agent_denies_its_parked_and_in_flight_calls_and_later_ones():
    env = Env(approvals=APPROVE_GENERAL)

    async def scenario():
        GATE["open"] = asyncio.Event()
        parked = asyncio.create_task(env.call("drop", channel="general"))
        in_flight = asyncio.create_task(env.call("slow_read"))
        await env.parked()
        while env.sup.ledger.inflight("alice") < 1:  # slow_read reached the worker
            await asyncio.sleep(0)
        env.sup.revoke_agent("alice", by="operator-dan")
        GATE["open"].set()
        with pytest.raises(ApprovalDenied):
            await parked
        with pytest.raises(TokenRejected) as info:
            await in_flight  # it ran, but its result is withheld
        assert info.value.code is ErrorCode.TOKEN_REVOKED
        with pytest.raises(TokenRejected) as later:
            await env.call("drop", channel="random")
        assert later.value.code is ErrorCode.TOKEN_REVOKED

    asyncio.run(scenario())
    assert RAN == ["slow_read"]
    assert env.audit.of("revoke", agent="alice", by="operator-dan")
    assert env.audit.of("outcome", tool="slow_read")[0]["code"] == "TOKEN_REVOKED"


def test_denial_burst_is_flagged_and_quarantine_revokes_descendants():
    env = Env(anomaly=AnomalyConfig(window_s=60, denial_burst=2, quarantine_after=3))

    async def scenario():
        delegated = await env.delegated_token()
        assert await env.call("drop", agent="bob", token=delegated, channel="a") == "dropped a"
        narrow = env.keyring.mint(holder="alice", caveats=[Tools(("slow_read",))]).encode()
        for _ in range(2):  # two policy violations: a tool outside the token alice presents
            with pytest.raises(PolicyDenied):
                await env.call("drop", token=narrow, channel="x")
        return delegated

    delegated = asyncio.run(scenario())
    assert env.audit.of("anomaly", agent="alice", flag="denial_burst")
    assert "alice" in env.sup.quarantined
    assert env.events == [{"event": "quarantine", "agent": "alice", "reason": env.events[0]["reason"], "shard": 0}]
    assert env.audit.of("quarantine", agent="alice")
    # Quarantine revoked alice's tokens and every token derived from them (bob's delegated one),
    # but not bob's own.
    with pytest.raises(TokenRejected):
        asyncio.run(env.call("drop", channel="y"))
    with pytest.raises(TokenRejected) as info:
        asyncio.run(env.call("drop", agent="bob", token=delegated, channel="y"))
    assert info.value.code is ErrorCode.TOKEN_REVOKED
    assert asyncio.run(env.call("drop", agent="bob", channel="z")) == "dropped z"


def test_requests_forged_in_an_agents_name_do_not_count_against_it():
    env = Env(anomaly=AnomalyConfig(denial_burst=1, quarantine_after=1))
    forged = encode_call(agent="alice", token=env.tokens["alice"], tool="drop", args={"channel": "x"},
                         request_key=secrets.token_bytes(32))
    for _ in range(5):
        with pytest.raises(TokenRejected):
            decode_reply(asyncio.run(env.sup.call(forged)))
    assert env.sup.quarantined == set() and env.audit.of("anomaly") == []


def test_rate_baseline_flags_a_burst_after_warmup():
    det = AnomalyDetector()
    det.configure("a", AnomalyConfig(window_s=10, rate_factor=3, min_calls=5, warmup_windows=2))
    now = 0.0
    for window in range(3):  # a steady 4 calls per window
        for i in range(4):
            assert det.call("a", "t", now + window * 10 + i) == []
    flags = [det.call("a", "t", 30 + i * 0.1) for i in range(20)]
    assert flags.count(["rate"]) == 1  # flagged once in the burst window
    assert det.violations("a") == 1


def test_back_pressure_is_not_a_violation():
    det = AnomalyDetector()
    det.configure("a", AnomalyConfig(denial_burst=1, quarantine_after=1))
    assert det.denial("a", "RATE_LIMITED", 0.0) == []
    assert not det.should_quarantine("a")
    assert det.denial("a", "POLICY_DENIED", 0.0) == ["denial_burst"]
    assert det.should_quarantine("a") and not det.should_quarantine("a")  # once


# ------------------------------------------------------------- the operator HTTP API


def test_control_api_needs_the_operator_token_and_revokes_tokens(tmp_path):
    from runtime.control import ControlClient, ControlError, control_routes, write_control_file
    from runtime.metrics import MetricsServer

    env = Env(approvals=APPROVE_GENERAL)

    async def scenario():
        server = MetricsServer()
        server.add_routes(control_routes(env.sup, "s3cret-operator-token"))
        host, port = await server.start("127.0.0.1", 0)
        url = f"http://{host}:{port}"
        write_control_file(tmp_path, url=url, token="s3cret-operator-token", job_id=JOB)
        assert (tmp_path / "control.json").stat().st_mode & 0o777 == 0o600
        good = ControlClient.from_run_dir(tmp_path)
        bad = ControlClient(url, "guessed-token")
        try:
            with pytest.raises(ControlError, match="HTTP 401"):
                await asyncio.to_thread(bad.revoke, agent="alice", by="mallory")
            with pytest.raises(ControlError, match="HTTP 401"):
                await asyncio.to_thread(bad.approvals)
            assert "alice" not in env.sup.revocations.snapshot()["agents"]
            status = await asyncio.to_thread(good.status)
            assert status["agents"] == ["alice", "bob"]
            out = await asyncio.to_thread(good.revoke, token_id=env.roots["bob"].hex(), by="erin")
            assert out == {"revoked_token": env.roots["bob"].hex()}
            with pytest.raises(ControlError, match="HTTP 404"):
                await asyncio.to_thread(good.revoke, agent="nobody", by="erin")
            for short in (env.roots["alice"].hex()[:8], "deadbeef", "9c1f...e2"):  # a prefix would revoke nothing
                with pytest.raises(ControlError, match="HTTP 400.*(whole token id|not hex)"):
                    await asyncio.to_thread(good.revoke, token_id=short, by="erin")
            assert await env.call("drop", agent="alice", channel="still-allowed") == "dropped still-allowed"
            with pytest.raises(ControlError, match="HTTP 404.*no key 'abc'"):
                await asyncio.to_thread(good.keys, action="retire", kid="abc", by="erin")
            with pytest.raises(ControlError, match="HTTP 400"):
                await asyncio.to_thread(good.revoke, by="erin")
            with pytest.raises(TokenRejected) as info:
                await env.call("drop", agent="bob", channel="x")
            assert info.value.code is ErrorCode.TOKEN_REVOKED
            # Keys: rotate, refuse to retire the current one, retire the old one (alice's token dies).
            old = env.keyring.current_kid
            with pytest.raises(ControlError, match="HTTP 401"):
                await asyncio.to_thread(bad.keys, action="rotate", by="mallory")
            new = (await asyncio.to_thread(good.keys, action="rotate", by="erin"))["current"]
            assert env.sup.keyring.current_kid == new != old
            with pytest.raises(ControlError, match="HTTP 400"):
                await asyncio.to_thread(good.keys, action="retire", kid=new, by="erin")
            with pytest.raises(ControlError, match="HTTP 400"):
                await asyncio.to_thread(good.keys, action="explode", by="erin")
            assert await env.call("drop", channel="before") == "dropped before"
            await asyncio.to_thread(good.keys, action="retire", kid=old, by="erin")
            with pytest.raises(TokenRejected) as info:
                await env.call("drop", channel="after")
            assert info.value.code is ErrorCode.BAD_TOKEN
        finally:
            await server.stop()

    asyncio.run(scenario())
    assert env.audit.of("revoke", by="erin")
    assert env.audit.of("key_added", by="erin") and env.audit.of("key_retired", by="erin")


def test_control_api_says_503_when_a_change_did_not_reach_every_shard():
    from runtime.control import ControlClient, ControlError, LocalOperator, PeersBehind, control_routes
    from runtime.metrics import MetricsServer

    env = Env()

    class OnePeerDown(LocalOperator):
        async def revoke_agent(self, agent: str, by: str, cascade: bool = False) -> None:
            await super().revoke_agent(agent, by, cascade)
            raise PeersBehind("made here, but 1 peer shard(s) did not take it yet")

    async def scenario():
        server = MetricsServer()
        server.add_routes(control_routes(OnePeerDown(env.sup), "tok"))
        host, port = await server.start("127.0.0.1", 0)
        try:
            client = ControlClient(f"http://{host}:{port}", "tok")
            with pytest.raises(ControlError, match="HTTP 503.*did not take it"):
                await asyncio.to_thread(client.revoke, agent="alice", by="erin")
        finally:
            await server.stop()

    asyncio.run(scenario())
    assert "alice" in env.sup.revocations.snapshot()["agents"]  # made here all the same


def test_revoke_cascade_is_an_agent_option_and_a_boolean(tmp_path, capsys):
    from runtime.cli import EXIT_USAGE, main
    from runtime.control import ControlClient, ControlError, control_routes
    from runtime.metrics import MetricsServer

    assert main(["revoke", "--token", "ab" * 16, "--cascade", "--run", str(tmp_path)]) == EXIT_USAGE
    assert "--cascade goes with --agent" in capsys.readouterr().err
    env = Env()

    async def scenario():
        server = MetricsServer()
        server.add_routes(control_routes(env.sup, "tok"))
        host, port = await server.start("127.0.0.1", 0)
        client = ControlClient(f"http://{host}:{port}", "tok")
        try:
            with pytest.raises(ControlError, match="HTTP 400.*cascade"):
                await asyncio.to_thread(client._request, "POST", "/control/revoke",
                                        {"agent": "alice", "cascade": "yes", "by": "erin"})
        finally:
            await server.stop()

    asyncio.run(scenario())
    assert "alice" not in env.sup.revocations.snapshot()["agents"]  # a malformed request changes nothing
