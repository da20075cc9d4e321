"""What survives a tool worker's crash, without Ray: where agents are placed (and moved when a
worker is dead for good), and the on-disk record of accepted dispatches that keeps a restarted
worker from running a replay. The real crashes are in tests/cluster/test_crash.py."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import pytest
import ray

from runtime.actors import _Placed, place
from runtime.errors import DispatchRefused, ErrorCode, ToolFailed
from runtime.sandbox.restart import WORKSPACES_PREFIX, DispatchJournal, boot_id, reclaim_workspaces, workspace_root
from runtime.sandbox.worker import ToolWorker
from runtime.testing import FakeClock
from runtime.tool import load_tools
from runtime.trusted.supervisor import sign_dispatch

from test_shards import RAN, assert_calls_left, one_shard, world  # noqa: F401  (world: a fixture)

KEY = bytes(range(32))


def test_agents_spread_evenly_whatever_their_names():
    assert place(["a0", "a1", "a2", "a3"], 2) == {"a0": 0, "a1": 1, "a2": 0, "a3": 1}
    for n_agents, n_workers in [(7, 3), (2, 5), (64, 4), (5, 1)]:
        load = Counter(place([f"x{i}" for i in range(n_agents)], n_workers).values())
        assert max(load.values()) - min(load.values(), default=0) <= 1
        assert len(load) == min(n_agents, n_workers)


class _Method:
    def __init__(self, worker: "_FakeWorker", name: str) -> None:
        self._worker, self._name = worker, name

    def remote(self, payload: Any = None) -> Any:
        return self._worker.call(self._name, payload)


class _FakeWorker:
    """A worker handle's shape: ``execute.remote(msg)`` awaitable; ``dead`` makes it raise as Ray does."""

    def __init__(self, index: int) -> None:
        self.index, self.dead, self.seen = index, False, []
        self.execute, self.execute_batch = _Method(self, "execute"), _Method(self, "execute_batch")

    async def call(self, method: str, payload: Any) -> Any:
        self.seen.append(payload)
        if self.dead:
            raise ray.exceptions.ActorDiedError()
        return (self.index, payload)


def test_a_dead_worker_fails_its_call_once_then_its_agents_move_to_the_least_loaded_live_one():
    workers = [_FakeWorker(i) for i in range(3)]
    d = _Placed(workers, place(["a", "b", "c", "d"], 3))  # a, d -> 0; b -> 1; c -> 2
    assert asyncio.run(d.dispatch("t", b"m1", "a")) == (0, b"m1")
    workers[0].dead = True
    with pytest.raises(ray.exceptions.ActorDiedError):
        asyncio.run(d.dispatch("t", b"m2", "a"))  # in flight at the death: not resent anywhere
    assert [w.seen for w in workers] == [[b"m1", b"m2"], [], []]
    assert asyncio.run(d.dispatch("t", b"m3", "a")) == (1, b"m3")  # b's worker, the lowest of the least loaded
    assert asyncio.run(d.dispatch("t", b"m4", "d")) == (2, b"m4")  # the next one away from 0 goes to 2
    assert asyncio.run(d.dispatch("t", b"m5", "a")) == (1, b"m5")  # and stays where it moved
    assert asyncio.run(d.dispatch_batch([b"m6"], "b")) == (1, [b"m6"])
    for w in workers[1:]:
        w.dead = True
    for agent in "ab":  # each death is learnt from one call, which is not resent
        with pytest.raises(ray.exceptions.ActorDiedError):
            asyncio.run(d.dispatch("t", b"x", agent))
    for agent in "abcd":
        with pytest.raises(ToolFailed) as info:
            asyncio.run(d.dispatch("t", b"y", agent))
        assert info.value.code is ErrorCode.WORKER_UNAVAILABLE
    assert [len(w.seen) for w in workers] == [2, 4, 2]


class _RestartingWorker(_FakeWorker):
    """Dies under a call; Ray has not noticed yet for the next ``unnoticed`` calls (each fails
    as the one in flight did), then the restarted process answers."""

    def __init__(self, index: int, unnoticed: int) -> None:
        super().__init__(index)
        self.counters, self.unnoticed, self.probes = _Method(self, "counters"), unnoticed, 0

    async def call(self, method: str, payload: Any) -> Any:
        if method == "counters":
            self.probes += 1
        else:
            self.seen.append(payload)
        if self.dead:
            self.unnoticed -= 1
            self.dead = self.unnoticed >= 0
            raise ray.exceptions.ActorUnavailableError("unavailable", b"x" * 16)
        return (self.index, payload)


def test_after_a_worker_failed_a_call_later_calls_wait_for_a_probe_and_are_sent_once():
    async def scenario() -> list[Any]:
        worker = _RestartingWorker(0, unnoticed=3)
        d = _Placed([worker], {"a": 0, "b": 0})
        worker.dead = True
        with pytest.raises(ray.exceptions.RayActorError):
            await d.dispatch("t", b"in-flight", "a")  # fails once, never resent
        replies = await asyncio.gather(d.dispatch("t", b"m1", "a"), d.dispatch("t", b"m2", "b"))
        return [replies, worker.seen, worker.probes]

    replies, seen, probes = asyncio.run(scenario())
    assert replies == [(0, b"m1"), (0, b"m2")]
    assert seen == [b"in-flight", b"m1", b"m2"]  # nothing sent twice, nothing sent to the dead process
    assert probes == 4  # three failed while Ray had not noticed, one shared probe answered


def test_worker_restarts_are_bounded_in_the_job_file():
    from pydantic import ValidationError

    from runtime.job import WorkerSpec

    assert WorkerSpec().max_restarts == 3 and WorkerSpec(max_restarts=0).max_restarts == 0
    with pytest.raises(ValidationError):
        WorkerSpec(max_restarts=-1)  # Ray's "forever": a worker that crashes on every call would never stop


def test_an_agent_unknown_at_start_is_placed_on_the_least_loaded_worker():
    workers = [_FakeWorker(i) for i in range(2)]
    d = _Placed(workers, {"a": 0, "b": 0, "c": 1})
    assert asyncio.run(d.dispatch("t", b"m", "new"))[0] == 1


# ---------------------------------------------------------------------------- the record on disk
def _message(call_id: str, deadline: float) -> bytes:
    return sign_dispatch(KEY, {"call_id": call_id, "job": "j", "agent": "a", "tool": "echo",
                               "args": {"text": call_id}, "deadline": deadline})


def _worker(path: Path | None, clock: FakeClock, *, restarted: bool, timeout_s: float = 60.0) -> ToolWorker:
    journal = DispatchJournal(path, restarted=restarted, call_timeout_s=timeout_s, clock=clock)
    return ToolWorker(dispatch_key=KEY, tools=load_tools(["tests.cluster.agents_under_test"]), job="j", clock=clock,
                      journal=journal)


def _code(reply: bytes) -> str:
    out = msgpack.unpackb(reply)
    return "ok" if out["ok"] else out["error"]["code"]


def test_a_restarted_worker_refuses_what_its_predecessor_ran_and_takes_what_it_did_not(tmp_path):
    clock, path = FakeClock(1000.0), tmp_path / "worker-0.dispatches"
    first = _worker(path, clock, restarted=False)
    ran, sent_during_restart = _message("c1", 1060.0), _message("c2", 1060.0)
    assert _code(asyncio.run(first.execute(ran))) == "ok"
    clock.advance(5)
    second = _worker(path, clock, restarted=True)  # the same node: the record is there
    assert _code(asyncio.run(second.execute(ran))) == "DISPATCH_REFUSED"
    assert _code(asyncio.run(second.execute(sent_during_restart))) == "ok"  # never ran: it may run now
    third = _worker(path, clock, restarted=True)
    assert _code(asyncio.run(third.execute(sent_during_restart))) == "DISPATCH_REFUSED"
    assert third.executed == 0


def test_a_restart_without_the_record_refuses_everything_issued_before_it(tmp_path):
    clock = FakeClock(1000.0)
    elsewhere = _worker(tmp_path / "not-here" / "w.dispatches", clock, restarted=True, timeout_s=60.0)
    before = _message("old", 1000.0 - 1 + 60.0)  # issued 1 s before the restart
    after = _message("new", 1000.0 + 60.0)
    assert _code(asyncio.run(elsewhere.execute(before))) == "DISPATCH_REFUSED"
    assert _code(asyncio.run(elsewhere.execute(after))) == "ok"


HEADER = f"boot {boot_id()}\n"


@pytest.mark.parametrize("damage", ["c1 not-a-number\n", "\xff\xfe\n", "one-field\n"])
def test_a_damaged_record_counts_as_lost(tmp_path, damage):
    clock, path = FakeClock(1000.0), tmp_path / "w.dispatches"
    path.write_bytes((HEADER + "c0 1050.0\n" + damage).encode("latin-1"))
    journal = DispatchJournal(path, restarted=True, call_timeout_s=60.0, clock=clock)
    assert journal.lost
    with pytest.raises(DispatchRefused):
        journal.admit("c0", 1059.0)


def test_a_record_from_before_a_reboot_counts_as_lost(tmp_path):
    """Its tail may have been in the page cache when the machine went down."""
    path = tmp_path / "w.dispatches"
    path.write_text("boot 00000000-another-boot\nc0 1050.0\n")
    journal = DispatchJournal(path, restarted=True, call_timeout_s=60.0, clock=FakeClock(1000.0))
    assert journal.lost and journal.not_before_deadline == 1060.0
    journal.admit("c1", 1060.0)  # issued after the restart


def test_expired_ids_are_dropped_from_the_record(tmp_path, monkeypatch):
    clock, path = FakeClock(1000.0), tmp_path / "w.dispatches"
    path.write_text(HEADER + "gone 999.0\nkept 1001.0\n")
    DispatchJournal(path, restarted=True, call_timeout_s=60.0, clock=clock).close()
    assert path.read_text() == HEADER + "kept 1001.0\n"
    monkeypatch.setattr("runtime.sandbox.restart.COMPACT_LINES", 3)
    journal = DispatchJournal(path, restarted=True, call_timeout_s=60.0, clock=clock)
    journal.admit("a", 1000.5)
    journal.admit("b", 1100.0)
    clock.advance(2)
    journal.admit("c", 1100.0)  # the third line since the rewrite: a and kept have expired
    assert path.read_text() == HEADER + "b 1100.0\nc 1100.0\n"
    with pytest.raises(DispatchRefused):
        journal.admit("b", 1100.0)


def test_an_unrecordable_dispatch_is_refused(tmp_path):
    journal = DispatchJournal(tmp_path / "w.dispatches", restarted=False, call_timeout_s=60.0, clock=FakeClock(0.0))
    journal.close()  # writing now fails: unrecorded would mean a restart could run it again
    with pytest.raises(DispatchRefused) as info:
        journal.admit("c1", 10.0)
    assert info.value.code is ErrorCode.DISPATCH_REFUSED


# ---------------------------------------------------------------------------- a dead worker's workspaces
def _mounted(path: Path) -> bool:
    return any(line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines())


def test_a_restarted_worker_removes_its_predecessors_workspaces(tmp_path):
    from runtime.sandbox.workspace import Workspace

    note = tmp_path / "worker-0.workspaces"
    root = workspace_root(note)
    ws = Workspace(root / "ws-1", size_mb=1)  # a tmpfs when run as root, as a worker does
    ws.write("/workspace/secret.txt", b"agent data")
    assert ws.mounted == _mounted(ws.root)
    assert reclaim_workspaces(note) == ["ws-1"]
    assert not root.exists() and not _mounted(ws.root)


def test_a_note_naming_anything_but_a_workspace_root_of_ours_removes_nothing(tmp_path):
    note, victim = tmp_path / "worker-0.workspaces", tmp_path / "keep"
    victim.mkdir()
    (victim / "f").write_text("x")
    link = Path(tempfile.gettempdir()) / f"{WORKSPACES_PREFIX}link-{os.getpid()}"
    link.symlink_to(victim)
    try:
        for named in (victim, link, Path("/"), Path(tempfile.gettempdir()) / "warden-ws-../keep", "no such"):
            note.write_text(str(named))
            assert reclaim_workspaces(note) == []
        assert (victim / "f").read_text() == "x"
    finally:
        link.unlink()
    assert reclaim_workspaces(tmp_path / "missing-note") == []


# ---------------------------------------------------------------------------- a shard killed between its two files
class Killed(BaseException):
    """The process dying at this instruction (nothing after it runs; ``except Exception`` does not see it)."""


def _killed_at(shard: Any, kind: str) -> None:
    record = shard.audit.record

    def dying(k: str, **fields: Any) -> int:
        if k == kind:
            raise Killed(k)
        return record(k, **fields)

    shard.audit.record = dying


@pytest.fixture
def reading_restore(monkeypatch):
    """Restart as ``runtime.actors.Shard`` does: the audit log read for calls with no outcome."""
    from runtime.actors import unsettled_calls
    from runtime.trusted.supervisor import Supervisor

    restore = Supervisor.restore
    monkeypatch.setattr(Supervisor, "restore", lambda self: restore(self, unsettled_calls(self.audit.path)))


def _outcomes(path: str) -> list[dict[str, Any]]:
    from runtime import auditlog

    return [r for r in auditlog.read_records(path) if r["kind"] == "outcome"]


def test_killed_after_reserving_before_the_decision_record_the_call_is_refunded_not_recorded(world,
                                                                                               reading_restore):
    from runtime import auditlog

    shard, tokens = one_shard(world)
    _killed_at(shard, "decision")  # the reservation is in the journal; the decision never reached the log
    with pytest.raises(Killed):
        asyncio.run(shard.call("alice", tokens["alice"], text="never dispatched"))
    assert shard.crash_and_restart() == 1
    assert _outcomes(shard.audit_path) == []  # no outcome without a decision
    assert_calls_left(shard, tokens["alice"], 3)  # it never reached a worker: refunded
    assert auditlog.verify(shard.audit_path).ok


def test_killed_after_settling_before_the_outcome_record_the_outcome_is_written_once(world, reading_restore):
    from runtime import auditlog

    shard, tokens = one_shard(world)
    _killed_at(shard, "outcome")  # the call ran and was settled in the journal; its outcome never reached the log
    with pytest.raises(Killed):
        asyncio.run(shard.call("alice", tokens["alice"], text="ran"))
    assert RAN == ["ran"]
    assert shard.crash_and_restart() == 0  # nothing open in the journal...
    (outcome,) = _outcomes(shard.audit_path)  # ...but the log is told what became of the call
    allowed = [r for r in auditlog.read_records(shard.audit_path) if r["kind"] == "decision"]
    assert outcome["call_id"] == allowed[0]["call_id"] and outcome["code"] == "SUPERVISOR_UNAVAILABLE"
    shard.crash_and_restart()
    assert len(_outcomes(shard.audit_path)) == 1  # a second restart does not write it again
    assert_calls_left(shard, tokens["alice"], 2)  # it ran: charged
    assert auditlog.verify(shard.audit_path).ok


# ---------------------------------------------------------------------------- group commit of the state journal
def _journal_writes(shard: Any, monkeypatch) -> list[bytes]:
    """Every write(2) to the shard's state journal from now on."""
    writes, real = [], os.write
    fd = shard.journal._fd

    def counting(f: int, data: bytes) -> int:
        if f == fd:
            writes.append(bytes(data))
        return real(f, data)

    monkeypatch.setattr(os, "write", counting)
    return writes


def test_a_calls_nonce_and_reservation_are_one_write_before_its_decision_record(world, monkeypatch):
    shard, tokens = one_shard(world)
    writes = _journal_writes(shard, monkeypatch)
    seen: list[list[str]] = []
    record = shard.audit.record

    def watching(kind: str, **fields: Any) -> int:  # what the journal holds when each record is written
        seen.append([f[0] for f in shard.journal.replay()])
        return record(kind, **fields)

    shard.audit.record = watching
    asyncio.run(shard.call("alice", tokens["alice"], text="one"))
    frames = []
    for data in writes:
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(data)
        frames.append([f[0] for f in unpacker])
    assert frames[0] == ["n", "r"]  # group commit: one write(2) for both
    assert frames[-1] == ["s"]  # and the settlement after the call ran (the result's label, "c", between)
    assert seen[0][-2:] == ["n", "r"]  # write-ahead: on disk before the decision record, so before dispatch


def test_a_denied_requests_nonce_is_on_disk_before_the_denial_and_survives_a_crash(world):
    from runtime.errors import TokenRejected
    from runtime.protocol import decode_reply

    shard, tokens = one_shard(world)
    denied = shard.request("alice", tokens["alice"], "no such tool")
    reply = msgpack.unpackb(asyncio.run(shard.sup.call(denied)), raw=False)
    assert reply["error"]["code"] == "UNKNOWN_TOOL"
    assert shard.journal._held == b""  # written before the denial was answered
    assert shard.crash_and_restart() == 0
    with pytest.raises(TokenRejected) as info:  # the captured request is a replay after the restart
        decode_reply(asyncio.run(shard.sup.call(denied)))
    assert info.value.code is ErrorCode.REPLAY


def test_a_crash_before_anything_is_answered_loses_only_that_requests_nonce(world):
    from runtime.protocol import decode_reply
    shard, tokens = one_shard(world)
    request = shard.request("alice", tokens["alice"], text="never answered")
    shard.sup._authenticate(request, "call")  # the nonce is taken, held back; then the process dies
    shard.journal._held = b""  # (a crash: what was held is gone)
    assert shard.crash_and_restart() == 0
    assert decode_reply(asyncio.run(shard.sup.call(request)))["value"] == "never answered"  # it had no effect
    assert_calls_left(shard, tokens["alice"], 2)


def test_a_failed_journal_write_keeps_the_held_frames_for_the_next_write(tmp_path, monkeypatch):
    from runtime.trusted.state import StateJournal

    journal = StateJournal(tmp_path / "state.journal")
    journal.append("n", b"nonce-1", defer=True)  # a request's nonce, held for the write of its reservation
    real_write = os.write

    def failing(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", failing)
    with pytest.raises(OSError):
        journal.append("r", b"reservation-1")
    monkeypatch.setattr(os, "write", real_write)
    journal.append("r", b"reservation-2")
    assert list(journal.replay()) == [["n", b"nonce-1"], ["r", b"reservation-2"]]  # the nonce was not lost
