"""A worker's own threads for blocking tool functions, and what a call that never returns costs.

A thread stuck in a blocking system call cannot be killed from Python. Warden's own tools
are written so that they cannot block (the file tools open nothing that could wait; code
runs in a sandbox the worker kills at its wall limit), but a third-party tool can. So a
worker runs blocking tools on threads of its own, never on the event loop's shared default
executor (``min(32, cpus + 4)`` threads, six on a 2-core machine), and bounds the damage:

* every call has a deadline; at it the caller gets an answer (``Overdue``), whether the
  call was still waiting for a thread or running;
* a thread still running when its caller stopped waiting is written off as *stuck*: it no
  longer counts against ``size``, so a new thread takes its place and other agents' calls
  keep running; it ends when its call finally returns, and the result is dropped;
* stuck threads are counted (``counts()``), per agent and in all. An agent with
  ``max_stuck_per_agent`` of them, or a worker with ``max_stuck``, is refused further
  blocking calls (WORKER_UNAVAILABLE) until some return, so no input can grow a worker's
  threads past ``size + max_stuck``.

Threads are daemons: a stuck one does not keep the worker process from exiting.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ErrorCode, ToolFailed


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
    def __init__(self, size: int = 16, *, max_stuck: int = 64, max_stuck_per_agent: int = 4,
                 name: str = "warden-tool") -> None:
        if size < 1 or max_stuck < 0 or max_stuck_per_agent < 0:
            raise ValueError("size must be >= 1 and the stuck limits >= 0")
        self.size, self.max_stuck, self.max_stuck_per_agent, self.name = size, max_stuck, max_stuck_per_agent, name
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._unstuck = threading.Condition(self._lock)
        self._queue: deque[_Call] = deque()
        self._threads = 0  # alive, stuck ones included
        self._idle = 0  # waiting for a call
        self._waking = 0  # idle threads already notified, not yet awake
        self._stuck: Counter[str] = Counter()
        self.written_off = 0  # threads ever written off

    def counts(self) -> dict[str, Any]:
        with self._lock:
            return {"threads": self._threads, "idle": self._idle, "queued": len(self._queue),
                    "stuck": sum(self._stuck.values()), "stuck_by_agent": dict(self._stuck),
                    "written_off": self.written_off, "size": self.size}

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
            self._refuse_if_stuck(owner)
            self._queue.append(call)
            self._wake()
        try:
            return await asyncio.wait_for(asyncio.shield(call.future), max(0.0, timeout_s))
        except asyncio.TimeoutError:
            raise Overdue(started=self._abandon(call)) from None
        finally:  # also when the caller is cancelled
            if not call.abandoned and not call.future.done():
                self._abandon(call)

    # ------------------------------------------------------------------ under the lock
    def _refuse_if_stuck(self, owner: str) -> None:
        total = sum(self._stuck.values())
        if total >= self.max_stuck or self._stuck[owner] >= self.max_stuck_per_agent:
            raise ToolFailed(f"refused: {self._stuck[owner]} of this agent's calls and {total} in all are stuck "
                             f"in this worker past their deadline (limits {self.max_stuck_per_agent} per agent, "
                             f"{self.max_stuck} in all)", code=ErrorCode.WORKER_UNAVAILABLE)

    def _wake(self) -> None:
        """A queued call gets an idle thread, or a new one while fewer than ``size`` are live."""
        if self._idle > self._waking:
            self._waking += 1
            self._ready.notify()
        elif self._threads - sum(self._stuck.values()) < self.size:
            self._threads += 1
            threading.Thread(target=self._work, name=f"{self.name}-{self._threads}", daemon=True).start()

    def _abandon(self, call: _Call) -> bool:
        """The caller stops waiting; True if the call had started."""
        with self._lock:
            call.abandoned = True
            if call.state == "queued":
                self._queue.remove(call)
                call.state = "dropped"
            elif call.state == "running":
                call.stuck = True
                self._stuck[call.owner] += 1
                self.written_off += 1
                if self._queue:
                    self._wake()  # its place among the live threads is free again
            return call.state != "dropped"

    # ------------------------------------------------------------------ the threads
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    self._idle += 1
                    self._ready.wait()
                    self._idle -= 1
                    self._waking -= 1
                call = self._queue.popleft()
                call.state = "running"
            try:
                outcome: tuple[bool, Any] = (True, call.fn())
            except BaseException as exc:  # handed to the caller, who reports it as the tool's failure
                outcome = (False, exc)
            with self._lock:
                call.state = "done"
                if call.stuck:  # nobody waits for this result; the thread was replaced long ago
                    self._stuck[call.owner] -= 1
                    if not self._stuck[call.owner]:
                        del self._stuck[call.owner]
                    self._threads -= 1
                    self._unstuck.notify_all()
                    return
            try:
                call.loop.call_soon_threadsafe(_deliver, call, outcome)
            except RuntimeError:  # the caller's event loop has closed: there is nobody to answer
                continue


def _deliver(call: _Call, outcome: tuple[bool, Any]) -> None:
    if call.abandoned or call.future.done():
        return
    ok, value = outcome
    if ok:
        call.future.set_result(value)
    else:
        call.future.set_exception(value)
