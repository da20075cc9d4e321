"""A worker's own threads for blocking tool functions, and what a call that never returns costs.

A thread stuck in a blocking system call cannot be killed from Python. Warden's own tools
are written so that they cannot block (the file tools open nothing that could wait; code
runs in a sandbox the worker kills at its wall limit), but a third-party tool can. So a
worker runs blocking tools on threads of its own, never on the event loop's shared default
executor (``min(32, cpus + 4)`` threads, six on a 2-core machine), and bounds the damage:

* every call has a deadline; at it the caller gets an answer (``Overdue``), whether the
  call was still waiting for a thread or running;
* one agent's calls occupy at most ``per_agent`` threads at once, running or stuck; its
  other calls wait, and other agents' calls go past them;
* a thread still running when its caller stopped waiting is written off as *stuck*: it no
  longer counts against ``size``, so a new thread takes its place and other agents' calls
  keep running; it ends when its call finally returns, and the result is dropped;
* stuck threads are counted (``counts()``), per agent and in all. An agent whose
  ``per_agent`` threads are all stuck, or a worker with ``max_stuck``, is refused further
  blocking calls at once (WORKER_UNAVAILABLE) until some return; no replacement thread is
  started past ``max_stuck``, so a worker never has more than ``size + max_stuck`` threads.

Threads start on demand and end after ``IDLE_EXIT_S`` without a call, or at ``close()``.
They are daemons: a stuck one does not keep the worker process from exiting.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ErrorCode, ToolFailed

_log = logging.getLogger(__name__)
IDLE_EXIT_S = 60.0  # a thread idle this long ends; the pool grows again on demand


class Overdue(Exception):
    """The call's deadline passed; ``started`` says whether it ever got a thread."""

    def __init__(self, started: bool) -> None:
        super().__init__("started, still running" if started else "never got a thread")
        self.started = started


@dataclass(eq=False)
class _Call:
    fn: Callable[[], Any]
    owner: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    state: str = "queued"  # queued -> running -> done, or dropped (deadline passed in the queue)
    abandoned: bool = False  # the caller stopped waiting: nothing is delivered
    stuck: bool = False  # abandoned while running: its thread is written off


class ToolThreads:
    def __init__(self, size: int = 16, *, per_agent: int = 4, max_stuck: int = 64, name: str = "warden-tool") -> None:
        if size < 1 or per_agent < 1 or max_stuck < 0:
            raise ValueError("size and per_agent must be >= 1, max_stuck >= 0")
        self.size, self.per_agent, self.max_stuck, self.name = size, per_agent, max_stuck, name
        self._lock = threading.Lock()
        self._unstuck = threading.Condition(self._lock)
        self._queue: deque[_Call] = deque()
        self._threads = 0  # alive, stuck ones included
        self._idle: list[threading.Event] = []  # one per thread waiting for a call; set = take one
        self._closed = False
        self._running: Counter[str] = Counter()  # per agent, not written off
        self._stuck: Counter[str] = Counter()
        self.written_off = 0  # threads ever written off

    def counts(self) -> dict[str, Any]:
        with self._lock:
            return {"threads": self._threads, "idle": len(self._idle), "queued": len(self._queue),
                    "running": sum(self._running.values()), "stuck": sum(self._stuck.values()),
                    "stuck_by_agent": dict(self._stuck), "written_off": self.written_off, "size": self.size}

    def wait_unstuck(self, timeout_s: float) -> bool:
        """Block until no thread is stuck (their calls returned); False if some still are after ``timeout_s``."""
        with self._lock:
            return self._unstuck.wait_for(lambda: not self._stuck, timeout_s)

    async def run(self, fn: Callable[[], Any], *, owner: str, timeout_s: float) -> Any:
        """``fn()`` on one of these threads; ``Overdue`` after ``timeout_s``, ``ToolFailed``
        (WORKER_UNAVAILABLE) at once if ``owner`` or the worker has too many stuck threads."""
        loop = asyncio.get_running_loop()
        call = _Call(fn, owner, loop, loop.create_future())
        with self._lock:
            if self._closed:
                raise ToolFailed("the worker is shutting down", code=ErrorCode.WORKER_UNAVAILABLE)
            self._refuse_if_stuck(owner)
            self._queue.append(call)
            self._kick()
        try:
            return await asyncio.wait_for(asyncio.shield(call.future), max(0.0, timeout_s))
        except asyncio.TimeoutError:
            raise Overdue(started=self._abandon(call)) from None
        finally:  # also when the caller is cancelled
            if not call.abandoned and not call.future.done():
                self._abandon(call)

    def close(self) -> None:
        """Idle threads end now, busy ones after their call; later calls are refused."""
        with self._lock:
            self._closed = True
            for wake in self._idle:
                wake.set()

    def _abandon(self, call: _Call) -> bool:
        """The caller stops waiting; True if the call had started."""
        with self._lock:
            call.abandoned = True
            if call.state == "queued":
                self._queue.remove(call)
                call.state = "dropped"
            elif call.state == "running":
                call.stuck = True
                _less(self._running, call.owner)
                self._stuck[call.owner] += 1
                self.written_off += 1
                self._kick()  # its place among the live threads is free again
            stuck = sum(self._stuck.values())
        if call.stuck:
            _log.warning("a tool call of agent %r is still running past its deadline: its thread is written off "
                         "(%d stuck in this worker)", call.owner, stuck)
        return call.state != "dropped"

    # ------------------------------------------------------------------ under the lock
    def _refuse_if_stuck(self, owner: str) -> None:
        total = sum(self._stuck.values())
        if total >= self.max_stuck or self._stuck[owner] >= self.per_agent:
            raise ToolFailed(f"refused: {self._stuck[owner]} of this agent's calls and {total} in all are stuck "
                             f"in this worker past their deadline (limits {self.per_agent} per agent, "
                             f"{self.max_stuck} in all)", code=ErrorCode.WORKER_UNAVAILABLE)

    def _startable(self) -> int:
        """Queued calls that could start now, each agent within its ``per_agent`` threads."""
        room: dict[str, int] = {}
        n = 0
        for call in self._queue:
            left = room.get(call.owner, self.per_agent - self._running[call.owner] - self._stuck[call.owner])
            if left > 0:
                n += 1
            room[call.owner] = left - 1
        return n

    def _kick(self) -> None:
        """Wake idle threads for the queued calls that can start, or start new ones while
        fewer than ``size`` are live and fewer than ``max_stuck`` are stuck."""
        wanted = self._startable() if self._queue else 0
        while wanted > 0 and self._idle:
            self._idle.pop().set()  # the most recently idle first: the others age out
            wanted -= 1
        stuck = sum(self._stuck.values())
        while wanted > 0 and self._threads - stuck < self.size and stuck < self.max_stuck:
            self._threads += 1
            threading.Thread(target=self._work, name=f"{self.name}-{self._threads}", daemon=True).start()
            wanted -= 1

    def _wait_for_call(self, wake: threading.Event) -> _Call | None:
        """The next call this thread may run; None when the thread should end (idle too long, or closed)."""
        while True:
            with self._lock:
                call = self._next()
                if call is not None or self._closed:
                    if call is None:
                        self._threads -= 1
                    return call
                wake.clear()
                self._idle.append(wake)
            if not wake.wait(IDLE_EXIT_S):
                with self._lock:
                    if wake in self._idle:  # nobody handed it a call while it timed out: it ends
                        self._idle.remove(wake)
                        self._threads -= 1
                        return None

    def _next(self) -> _Call | None:
        for call in self._queue:
            if self._running[call.owner] + self._stuck[call.owner] < self.per_agent:
                self._queue.remove(call)
                call.state = "running"
                self._running[call.owner] += 1
                return call
        return None

    # ------------------------------------------------------------------ the threads
    def _work(self) -> None:
        wake = threading.Event()
        while True:
            call = self._wait_for_call(wake)
            if call is None:
                return
            try:
                outcome: tuple[bool, Any] = (True, call.fn())
            except BaseException as exc:  # handed to the caller, who reports it as the tool's failure
                outcome = (False, exc)
            with self._lock:
                call.state = "done"
                if call.stuck:  # nobody waits for this result; the thread was replaced long ago
                    _less(self._stuck, call.owner)
                    self._threads -= 1
                    self._unstuck.notify_all()
                    self._kick()  # the agent may start another call
                    return
                _less(self._running, call.owner)
                if self._queue:
                    self._kick()  # the agent's queued calls may start on idle threads, not only on this one
            try:
                call.loop.call_soon_threadsafe(_deliver, call, outcome)
            except RuntimeError:  # the caller's event loop has closed: there is nobody to answer
                continue


def _less(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def _deliver(call: _Call, outcome: tuple[bool, Any]) -> None:
    if call.abandoned or call.future.done():
        return
    ok, value = outcome
    if ok:
        call.future.set_result(value)
    else:
        call.future.set_exception(value)
