"""Sharded supervisors without Ray: routing by the root agent, control changes between shards,
and a shard that restarts from its journal with its budgets, nonces, revocations and keys."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import msgpack
import pytest

from runtime.errors import ErrorCode, MalformedRequest, QuotaExceeded, TokenRejected
from runtime.protocol import decode_reply, encode_call, encode_delegate
from runtime.sandbox.worker import ToolWorker
from runtime.tool import tool
from runtime import auditlog
from runtime.trusted.audit import AuditLog
from runtime.trusted.capability import Audience, CallBudget, Expires, KeyRing, Tools
from runtime.protocol import first_holder
from runtime.trusted.ledger import AgentQuota
from runtime.trusted.state import StateJournal
from runtime.trusted.supervisor import AgentEntry, Supervisor, shard_of

JOB = "job-shards"
RAN: list[str] = []
GATE: dict[str, asyncio.Event] = {}


@tool(effect="read")
def note(text: str) -> str:
    """Echo a note."""
    RAN.append(text)
    return text


@tool(effect="read")
async def slow(text: str) -> str:
    """Waits until the test opens the gate."""
    RAN.append(text)
    await GATE["open"].wait()
    return text


TOOLS = {t.name: t for t in (note, slow)}
AGENTS = ("alice", "bob")


class Shard:
    """One supervisor shard with a real audit file and a real journal, restartable in place."""

    def __init__(self, tmp_path: Any, keys: dict[str, Any], roots: dict[str, bytes], request_keys: dict[str, bytes],
                 *, index: int = 0, shards: int = 1, compact_bytes: int = 16 << 20, peer_key: bytes = b"p" * 32):
        self.tmp, self.keys, self.roots, self.request_keys = tmp_path, keys, roots, request_keys
        self.index, self.shards, self.compact_bytes, self.peer_key = index, shards, compact_bytes, peer_key
        self.dispatch_key = secrets.token_bytes(32)
        self.worker = ToolWorker(dispatch_key=self.dispatch_key, tools=TOOLS, job=JOB)
        self.start()

    @property
    def audit_path(self) -> str:
        return str(self.tmp / f"audit-{self.index}.log")

    def start(self) -> int:
        worker = self.worker

        class Direct:
            async def dispatch(_, tool: str, message: bytes, agent: str = "") -> bytes:
                return await worker.execute(message)

        self.events: list[dict[str, Any]] = []
        self.audit = AuditLog(self.audit_path)
        self.journal = StateJournal(self.tmp / f"state-{self.index}.journal", compact_bytes=self.compact_bytes)
        self.sup = Supervisor(job_id=JOB, keyring=KeyRing.from_secret_dict(self.keys),
                              tools={n: t.spec for n, t in TOOLS.items()}, audit=self.audit, dispatcher=Direct(),
                              dispatch_key=self.dispatch_key, on_event=self.events.append,
                              shard=(self.index, self.shards), journal=self.journal, peer_key=self.peer_key)
        for name in AGENTS:
            self.sup.register_agent(AgentEntry(name, self.request_keys[name], frozenset({"bob"}),
                                               root_token_id=self.roots[name]), AgentQuota())
        return self.sup.restore()

    def crash_and_restart(self) -> int:
        """What Ray's max_restarts does: the process is gone, the constructor runs again."""
        self.audit.close()  # the kernel would drop the flock of a killed process
        self.journal.close()
        return self.start()

    async def call(self, agent: str, token: bytes, tool_name: str = "note", **args: Any) -> Any:
        return decode_reply(await self.sup.call(self.request(agent, token, tool_name, **args)))["value"]

    async def slow_call_running(self, agent: str, token: bytes, text: str) -> "asyncio.Task[Any]":
        """A call of ``slow`` that has been dispatched and is running in the tool, held at the gate."""
        GATE["open"] = asyncio.Event()
        task = asyncio.create_task(self.call(agent, token, "slow", text=text))
        while text not in RAN:
            await asyncio.sleep(0)
        return task

    def request(self, agent: str, token: bytes, tool_name: str = "note", **args: Any) -> bytes:
        return encode_call(agent=agent, token=token, tool=tool_name, args=args or {"text": "x"},
                           request_key=self.request_keys[agent])


@pytest.fixture
def world(tmp_path):
    RAN.clear()
    ring = KeyRing.generate()
    request_keys = {n: secrets.token_bytes(32) for n in AGENTS}
    tokens, roots = {}, {}
    for name in AGENTS:
        root = ring.mint(holder=name, caveats=[Audience(JOB), Expires(time.time() + 600), Tools(tuple(TOOLS)),
                                               CallBudget(3)])
        tokens[name], roots[name] = root.encode(), root.token_id
    return tmp_path, ring, request_keys, tokens, roots


def assert_calls_left(shard: Shard, token: bytes, n: int) -> None:
    """alice's 3-call budget has exactly ``n`` calls left on this shard."""
    for i in range(n):
        asyncio.run(shard.call("alice", token, text=f"left-{i}"))
    with pytest.raises(QuotaExceeded) as info:
        asyncio.run(shard.call("alice", token, text="one too many"))
    assert info.value.code is ErrorCode.BUDGET_EXHAUSTED


def one_shard(world, **kw) -> tuple[Shard, dict[str, bytes]]:
    tmp_path, ring, request_keys, tokens, roots = world
    return Shard(tmp_path, ring.to_secret_dict(), roots, request_keys, **kw), tokens


def test_budget_and_nonces_survive_a_restart(world):
    shard, tokens = one_shard(world)
    first = shard.request("alice", tokens["alice"], text="one")
    assert decode_reply(asyncio.run(shard.sup.call(first)))["value"] == "one"
    asyncio.run(shard.call("alice", tokens["alice"], text="two"))
    assert shard.crash_and_restart() == 0
    # The captured first request is still a replay after the restart.
    with pytest.raises(TokenRejected) as info:
        decode_reply(asyncio.run(shard.sup.call(first)))
    assert info.value.code is ErrorCode.REPLAY
    # Two of three calls were spent before the restart: one is left, not three.
    assert asyncio.run(shard.call("alice", tokens["alice"], text="three")) == "three"
    with pytest.raises(QuotaExceeded) as info:
        asyncio.run(shard.call("alice", tokens["alice"], text="four"))
    assert info.value.code is ErrorCode.BUDGET_EXHAUSTED
    assert RAN == ["one", "two", "three"]
    shard.audit.close()
    report = auditlog.verify(shard.audit_path)
    assert report.ok, report.problem
    kinds = [r["kind"] for r in auditlog.read_records(shard.audit_path)]
    assert "shard_restart" in kinds


def test_a_call_in_flight_at_the_crash_is_closed_charged_and_on_record(world):
    shard, tokens = one_shard(world)

    async def start_slow() -> None:
        task = await shard.slow_call_running("alice", tokens["alice"], "inflight")
        task.cancel()  # the process dies here: no outcome is ever recorded by this instance

    asyncio.run(start_slow())
    assert shard.crash_and_restart() == 1
    shard.audit.close()
    records = list(auditlog.read_records(shard.audit_path))
    allowed = [r for r in records if r["kind"] == "decision" and r.get("decision") == "allow"]
    closed = [r for r in records if r["kind"] == "outcome"]
    assert [r["call_id"] for r in closed] == [allowed[0]["call_id"]]
    assert closed[0]["code"] == "SUPERVISOR_UNAVAILABLE" and closed[0]["ok"] is False
    assert auditlog.verify(shard.audit_path).ok
    shard.audit = AuditLog(shard.audit_path)
    shard.sup.audit = shard.audit
    # The in-flight call stays charged (it may have run): two calls left, not three.
    assert_calls_left(shard, tokens["alice"], 2)


def test_revocation_quarantine_and_retired_keys_survive_a_restart(world):
    shard, tokens = one_shard(world)
    shard.sup.revoke_agent("bob", by="carol")
    shard.sup.quarantine("alice", reason="test")
    old_kid = shard.sup.keyring.current_kid
    shard.sup.add_key("k2", secrets.token_bytes(32))
    shard.sup.retire_key(old_kid)
    shard.crash_and_restart()
    assert shard.sup.quarantined == {"alice"}
    assert shard.sup.keyring.current_kid == "k2" and old_kid not in shard.sup.keyring.kids
    for agent in AGENTS:
        with pytest.raises(TokenRejected) as info:
            asyncio.run(shard.call(agent, tokens[agent]))
        assert info.value.code in (ErrorCode.TOKEN_REVOKED, ErrorCode.BAD_TOKEN)
    assert RAN == []


def test_a_compacted_journal_restores_the_same_state(world):
    shard, tokens = one_shard(world, compact_bytes=300)
    for i in range(3):
        asyncio.run(shard.call("alice", tokens["alice"], text=str(i)))
    shard.sup.revoke_agent("bob")
    frames = list(shard.journal.replay())
    assert frames[0][0] == "snap" and len(frames) < 12  # 3 calls are ~9 frames uncompacted, plus the rest
    before = shard.sup.ledger.snapshot()["used"]
    shard.crash_and_restart()
    assert shard.sup.ledger.snapshot()["used"] == before
    with pytest.raises(QuotaExceeded):
        asyncio.run(shard.call("alice", tokens["alice"]))
    with pytest.raises(TokenRejected):
        asyncio.run(shard.call("bob", tokens["bob"]))


def test_a_torn_last_frame_is_dropped_and_a_corrupt_journal_refused(tmp_path):
    j = StateJournal(tmp_path / "s.journal")
    j.append("va", "alice")
    j.append("v", b"x" * 16)
    j.close()
    whole = (tmp_path / "s.journal").read_bytes()
    (tmp_path / "s.journal").write_bytes(whole + msgpack.packb(["va", "bob"])[:-2])
    j = StateJournal(tmp_path / "s.journal")
    assert list(j.replay()) == [["va", "alice"], ["v", b"x" * 16]]
    assert (tmp_path / "s.journal").read_bytes() == whole
    (tmp_path / "s.journal").write_bytes(whole + msgpack.packb("not a frame"))
    with pytest.raises(ValueError, match="corrupt"):
        list(StateJournal(tmp_path / "s.journal").replay())


def two_shards(world) -> tuple[list[Shard], dict[str, bytes]]:
    tmp_path, ring, request_keys, tokens, roots = world
    keys = ring.to_secret_dict()
    return [Shard(tmp_path, keys, roots, request_keys, index=i, shards=2) for i in range(2)], tokens


def owner_and_other(agent: str, n: int = 2) -> tuple[int, int]:
    own = shard_of(agent, n)
    return own, (own + 1) % n


def test_calls_are_decided_only_on_the_shard_of_the_root_agent(world):
    shards, tokens = two_shards(world)
    own, other = owner_and_other("alice")
    assert first_holder(tokens["alice"]) == "alice"
    with pytest.raises(TokenRejected) as info:
        asyncio.run(shards[other].call("alice", tokens["alice"]))
    assert info.value.code is ErrorCode.WRONG_SHARD
    shards[other].audit.close()
    assert any(r.get("code") == "WRONG_SHARD" for r in auditlog.read_records(shards[other].audit_path))
    assert asyncio.run(shards[own].call("alice", tokens["alice"], text="home")) == "home"


def test_a_delegate_spends_the_delegators_budget_on_the_delegators_shard(world):
    shards, tokens = two_shards(world)
    own = shard_of("alice", 2)
    req = encode_delegate(agent="alice", token=tokens["alice"], to="bob",
                          request_key=shards[own].request_keys["alice"])
    for_bob = decode_reply(asyncio.run(shards[own].sup.delegate(req)))["token"]
    assert first_holder(for_bob) == "alice"  # routed with alice's budget, whoever holds it
    asyncio.run(shards[own].call("alice", tokens["alice"], text="a1"))
    asyncio.run(shards[own].call("bob", for_bob, text="b1"))
    asyncio.run(shards[own].call("bob", for_bob, text="b2"))
    with pytest.raises(QuotaExceeded):  # alice's 3 calls are spent, by her and her delegate together
        asyncio.run(shards[own].call("bob", for_bob, text="b3"))
    with pytest.raises(TokenRejected) as info:  # and the other shard will not decide it at all
        asyncio.run(shards[1 - own].call("bob", for_bob, text="b4"))
    assert info.value.code is ErrorCode.WRONG_SHARD
    assert RAN == ["a1", "b1", "b2"]


def test_peer_changes_apply_once_and_forgeries_are_refused(world):
    shards, tokens = two_shards(world)
    a_own = shard_of("alice", 2)
    src, dst = shards[1 - a_own], shards[a_own]
    msg = src.sup.peer_message("quarantine", agent="alice", reason="burst", by="anomaly")
    dst.sup.apply_peer(msg)
    assert dst.sup.quarantined == {"alice"} and dst.events == []  # the deciding shard announces, not this one
    with pytest.raises(TokenRejected) as info:
        asyncio.run(dst.call("alice", tokens["alice"]))
    assert info.value.code is ErrorCode.TOKEN_REVOKED
    with pytest.raises(TokenRejected) as info:  # the same message again
        dst.sup.apply_peer(msg)
    assert info.value.code is ErrorCode.REPLAY
    forged = Supervisor(job_id=JOB, keyring=KeyRing.generate(), tools={}, audit=dst.audit, dispatcher=None,
                        dispatch_key=b"", peer_key=b"q" * 32).peer_message("add_key", kid="evil", key=b"k" * 32)
    with pytest.raises(TokenRejected) as info:
        dst.sup.apply_peer(forged)
    assert info.value.code is ErrorCode.BAD_REQUEST_MAC and "evil" not in dst.sup.keyring.kids
    with pytest.raises(MalformedRequest):
        dst.sup.apply_peer(b"\x93garbage")
    other_job = Supervisor(job_id="other", keyring=KeyRing.generate(), tools={}, audit=dst.audit, dispatcher=None,
                           dispatch_key=b"", peer_key=src.peer_key).peer_message("revoke_agent", agent="bob")
    with pytest.raises(MalformedRequest):
        dst.sup.apply_peer(other_job)
    assert "bob" not in dst.sup.revocations.snapshot()["agents"]


def test_unsharded_supervisors_have_no_peers():
    sup = Supervisor(job_id=JOB, keyring=KeyRing.generate(), tools={}, audit=None, dispatcher=None, dispatch_key=b"")
    with pytest.raises(Exception, match="not part of a sharded job"):
        sup.peer_message("revoke_agent", agent="x")


def test_a_restarted_shard_catches_up_on_changes_it_missed(world):
    shards, tokens = two_shards(world)
    a_own = shard_of("alice", 2)
    live, restarted = shards[1 - a_own], shards[a_own]
    # While alice's shard was down, an operator used the other one.
    live.sup.quarantine("alice", reason="burst")
    live.sup.revoke_token(b"t" * 16)
    old = live.sup.keyring.current_kid
    live.sup.add_key("k2", secrets.token_bytes(32))
    live.sup.retire_key(old)
    restarted.crash_and_restart()
    restarted.sup.apply_peer(live.sup.sync_message())
    assert restarted.sup.quarantined == {"alice"} and restarted.events == []
    assert restarted.sup.revocations.snapshot() == live.sup.revocations.snapshot()
    assert restarted.sup.keyring.kids == ["k2"] and restarted.sup.keyring.current_kid == "k2"
    with pytest.raises(TokenRejected):
        asyncio.run(restarted.call("alice", tokens["alice"]))
    # And it keeps what it learned across another restart.
    restarted.crash_and_restart()
    assert restarted.sup.quarantined == {"alice"} and restarted.sup.keyring.kids == ["k2"]


def test_a_result_in_flight_when_its_key_is_retired_is_withheld(world):
    shard, tokens = one_shard(world)

    async def scenario() -> None:
        task = await shard.slow_call_running("alice", tokens["alice"], "late")
        old = shard.sup.keyring.current_kid
        shard.sup.add_key("k2", secrets.token_bytes(32))
        shard.sup.retire_key(old)
        GATE["open"].set()
        with pytest.raises(TokenRejected) as info:
            await task
        assert info.value.code is ErrorCode.TOKEN_REVOKED

    asyncio.run(scenario())


def test_compaction_while_a_call_is_in_flight_charges_it_once(world):
    shard, tokens = one_shard(world, compact_bytes=10 << 20)

    async def scenario() -> None:
        task = await shard.slow_call_running("alice", tokens["alice"], "inflight")
        shard.journal.compact(shard.sup._snapshot())  # what a full journal does at this moment
        task.cancel()

    asyncio.run(scenario())
    shard.crash_and_restart()
    assert list(shard.sup.ledger.snapshot()["used"].values()) == [1.0]  # one call, charged once
    assert_calls_left(shard, tokens["alice"], 2)


def test_a_quarantine_frame_alone_restores_its_revocations(world):
    shard, tokens = one_shard(world)
    shard.journal.append("q", "alice")  # the process died right after this frame
    shard.crash_and_restart()
    with pytest.raises(TokenRejected) as info:
        asyncio.run(shard.call("alice", tokens["alice"]))
    assert info.value.code is ErrorCode.TOKEN_REVOKED


def test_a_stale_sync_cannot_bring_back_a_retired_key_or_roll_back_a_rotation(world):
    shards, tokens = two_shards(world)
    a, b = shards
    stale = b.sup.sync_message()  # b before any rotation
    old = a.sup.keyring.current_kid
    a.sup.add_key("k2", secrets.token_bytes(32))
    a.sup.retire_key(old)
    a.sup.apply_peer(stale)
    assert a.sup.keyring.kids == ["k2"] and a.sup.keyring.current_kid == "k2" and a.sup.retired == {old}
    # And the other way: b catches up from a, and keeps it across a restart.
    b.sup.apply_peer(a.sup.sync_message())
    assert b.sup.keyring.kids == ["k2"] and b.sup.keyring.current_kid == "k2"
    b.crash_and_restart()
    assert b.sup.keyring.kids == ["k2"] and b.sup.key_epoch == 1 and old in b.sup.retired
    with pytest.raises(ValueError, match="never returns"):
        b.sup.add_key(old, secrets.token_bytes(32))


def test_a_journal_that_cannot_be_written_denies(world):
    shard, tokens = one_shard(world)
    shard.journal.close()  # every write now fails with EBADF
    with pytest.raises(Exception) as info:
        asyncio.run(shard.call("alice", tokens["alice"]))
    assert getattr(info.value, "code", None) is ErrorCode.AUDIT_UNAVAILABLE
    assert RAN == []
