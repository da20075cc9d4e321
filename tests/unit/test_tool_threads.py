"""A tool call can never hold a worker past its deadline: calls stuck in a real blocking
system call (``open`` of a FIFO nobody writes) are answered with a typed error in time,
their threads are written off and counted, and other agents' calls keep running."""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from pathlib import Path
from typing import Any

import msgpack
import pytest

from runtime.errors import ErrorCode
from runtime.sandbox.threads import ToolThreads
from runtime.sandbox.worker import ToolWorker
from runtime.testing import FakeClock
from runtime.tool import tool
from runtime.trusted.supervisor import sign_dispatch

KEY = bytes(range(32))
JOB = "job-threads"


ENTERED = threading.Semaphore(0)  # released by each blocking call as it starts


@tool(effect="read", name="third.party.wait")
def wait_for_writer(path: str) -> str:
    """A badly written third-party tool: opens a FIFO and blocks until someone writes."""
    ENTERED.release()
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)
    return "released"


@tool(effect="read", name="third.party.await")
async def await_forever() -> None:
    """An async tool that never finishes."""
    await asyncio.Event().wait()


@tool(effect="read")
def echo(text: str) -> str:
    """Echo."""
    return text


TOOLS = {t.name: t for t in (wait_for_writer, await_forever, echo)}


class Fifos:
    """FIFOs nobody writes to; ``release`` holds every one open read-write (which never blocks),
    so a reader blocked in open(2) returns and a later one does not block."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.paths, self.held = tmp, [], []

    def new(self) -> str:
        path = self.tmp / f"fifo-{len(self.paths)}"
        os.mkfifo(path)
        self.paths.append(path)
        return str(path)

    def release(self) -> None:
        self.held += [os.open(p, os.O_RDWR) for p in self.paths[len(self.held):]]

    def close(self) -> None:
        for fd in self.held:
            os.close(fd)


@pytest.fixture
def fifos(tmp_path):
    f = Fifos(tmp_path)
    yield f
    f.release()
    f.close()


def make_worker(clock: FakeClock, **threads: Any) -> ToolWorker:
    return ToolWorker(dispatch_key=KEY, tools=TOOLS, job=JOB, clock=clock, threads=ToolThreads(**threads))


def message(clock: FakeClock, agent: str, tool: str, args: dict[str, Any], within_s: float = 30.0) -> bytes:
    return sign_dispatch(KEY, {"call_id": secrets.token_hex(8), "job": JOB, "agent": agent, "tool": tool,
                               "args": args, "deadline": clock() + within_s})


async def call(worker: ToolWorker, msg: bytes) -> dict[str, Any]:
    return msgpack.unpackb(await worker.execute(msg), raw=False)


def blocked(clock: FakeClock, fifos: Fifos, agent: str, within_s: float = 0.5) -> bytes:
    return message(clock, agent, "third.party.wait", {"path": fifos.new()}, within_s)


def test_more_stuck_calls_than_threads_and_another_agent_still_runs(fifos, caplog):
    clock = FakeClock()
    worker = make_worker(clock, size=2, max_stuck=16, per_agent=2)

    async def scenario() -> None:
        for round_ in range(3):  # six calls stuck in open(2), three times the pool's size
            agents = [f"agent-{2 * round_}", f"agent-{2 * round_ + 1}"]
            results = await asyncio.gather(*[call(worker, blocked(clock, fifos, a)) for a in agents])
            for r in results:
                assert r["ok"] is False and r["error"]["code"] == ErrorCode.WORKER_UNAVAILABLE.value
                assert "still running at its dispatch deadline" in r["error"]["reason"]
        counts = worker.threads()
        assert counts["stuck"] == 6 and counts["written_off"] == 6
        assert counts["stuck_by_agent"] == {f"agent-{i}": 1 for i in range(6)}
        assert caplog.text.count("its thread is written off") == 6  # said in the worker's log, once each
        # Another agent's call runs on a fresh thread: the stuck ones no longer count.
        assert await call(worker, message(clock, "bob", "echo", {"text": "hi"})) == {
            "ok": True, "value": "hi", "cost": None}

    asyncio.run(scenario())
    fifos.release()
    assert worker._threads.wait_unstuck(30.0)
    assert worker.threads()["stuck"] == 0 and worker.threads()["threads"] <= 2


def test_an_agent_with_stuck_calls_is_refused_until_they_return(fifos):
    clock = FakeClock()
    worker = make_worker(clock, size=2, max_stuck=3, per_agent=2)

    async def scenario() -> None:
        stuck = await asyncio.gather(*[call(worker, blocked(clock, fifos, "mallory")) for _ in range(2)])
        assert {r["error"]["code"] for r in stuck} == {ErrorCode.WORKER_UNAVAILABLE.value}
        refused = await call(worker, message(clock, "mallory", "echo", {"text": "again"}))
        assert refused["error"]["code"] == ErrorCode.WORKER_UNAVAILABLE.value
        assert "2 of this agent's calls" in refused["error"]["reason"]
        assert (await call(worker, message(clock, "bob", "echo", {"text": "hi"})))["ok"] is True
        # The worker-wide limit: one more stuck call from anyone and every blocking call is refused.
        assert (await call(worker, blocked(clock, fifos, "eve")))["ok"] is False
        everyone = await call(worker, message(clock, "bob", "echo", {"text": "hi"}))
        assert everyone["error"]["code"] == ErrorCode.WORKER_UNAVAILABLE.value
        assert "3 in all" in everyone["error"]["reason"]

    asyncio.run(scenario())
    fifos.release()
    assert worker._threads.wait_unstuck(30.0)

    async def after() -> dict[str, Any]:
        return await call(worker, message(clock, "mallory", "echo", {"text": "back"}))

    assert asyncio.run(after())["value"] == "back"


def test_one_agent_cannot_take_every_thread(fifos):
    """A batch of blocking calls from one agent runs on at most ``per_agent`` threads; another
    agent's call runs at once beside them, long before their deadline."""
    clock = FakeClock()
    worker = make_worker(clock, size=4, per_agent=2)

    async def bob_then_release() -> dict[str, Any]:
        for _ in range(2):  # mallory's first two calls are blocked in open(2)
            await asyncio.to_thread(ENTERED.acquire)
        result = await call(worker, message(clock, "bob", "echo", {"text": "hi"}))
        counts = worker.threads()
        assert (counts["running"], counts["queued"], counts["stuck"]) == (2, 8, 0)  # mallory's, still blocked
        fifos.release()
        return result

    async def scenario() -> None:
        batch = [blocked(clock, fifos, "mallory", within_s=60.0) for _ in range(10)]
        mallory, bob = await asyncio.gather(worker.execute_batch(batch), bob_then_release())
        assert bob == {"ok": True, "value": "hi", "cost": None}
        assert [msgpack.unpackb(r, raw=False)["value"] for r in mallory] == ["released"] * 10

    while ENTERED.acquire(blocking=False):  # left over from other tests
        continue

    asyncio.run(scenario())
    assert worker.threads()["threads"] <= 4


def test_a_call_waiting_for_a_thread_is_answered_at_its_deadline(fifos):
    clock = FakeClock()
    worker = make_worker(clock, size=1, max_stuck=4, per_agent=4)

    async def bob_then_release() -> dict[str, Any]:
        queued = await call(worker, message(clock, "bob", "echo", {"text": "hi"}, within_s=0.3))
        fifos.release()  # alice's call returns in time
        return queued

    async def scenario() -> None:
        # gather starts alice's call first: it takes the only thread, bob's waits in the queue.
        running, queued = await asyncio.gather(call(worker, blocked(clock, fifos, "alice", within_s=5.0)),
                                               bob_then_release())
        assert queued["error"]["code"] == ErrorCode.WORKER_UNAVAILABLE.value
        assert "no free tool thread" in queued["error"]["reason"]
        assert running == {"ok": True, "value": "released", "cost": None}

    asyncio.run(scenario())
    assert worker.threads()["stuck"] == 0


def test_an_async_tool_past_its_deadline_is_cancelled_not_stuck():
    clock = FakeClock()
    worker = make_worker(clock)

    async def scenario() -> dict[str, Any]:
        return await call(worker, message(clock, "alice", "third.party.await", {}, within_s=0.3))

    result = asyncio.run(scenario())
    assert result["error"]["code"] == ErrorCode.WORKER_UNAVAILABLE.value
    assert worker.threads()["stuck"] == 0


def join_threads(prefix: str) -> None:
    for t in threading.enumerate():
        if t.name.startswith(prefix + "-"):
            t.join(30.0)


def test_idle_threads_end_and_the_pool_grows_again(monkeypatch):
    from runtime.sandbox import threads as threads_module

    monkeypatch.setattr(threads_module, "IDLE_EXIT_S", 0.05)
    clock = FakeClock()
    worker = make_worker(clock, name="idle-test")

    async def one(text: str) -> dict[str, Any]:
        return await call(worker, message(clock, "alice", "echo", {"text": text}))

    assert asyncio.run(one("a"))["value"] == "a"
    join_threads("idle-test")
    assert worker.threads()["threads"] == 0
    assert asyncio.run(one("b"))["value"] == "b"


def test_close_lets_idle_threads_go_and_refuses_later_calls():
    clock = FakeClock()
    worker = make_worker(clock, name="close-test")

    async def one() -> dict[str, Any]:
        return await call(worker, message(clock, "alice", "echo", {"text": "x"}))

    assert asyncio.run(one())["ok"] is True
    worker.close()
    join_threads("close-test")
    assert worker.threads()["threads"] == 0
    refused = asyncio.run(one())
    assert refused["error"]["code"] == ErrorCode.WORKER_UNAVAILABLE.value and "shutting down" in refused["error"]["reason"]


def test_thread_limits_are_checked():
    with pytest.raises(ValueError):
        ToolThreads(size=0)
