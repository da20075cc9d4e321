"""Sessions per agent, a warm pool of spare sessions, and the handle a sandboxed tool gets.

The worker keeps one workspace and, per backend, one session for each agent it serves;
agents never share either. The backend and the limits of a call come from the agent's
policy, carried in the supervisor-signed dispatch, never from the agent or the tool.

Warm pool. Starting a sandbox is most of a new agent's first call (gVisor's ``runsc run``,
and the first interpreter on both backends), so for every (backend, limits) the pool has
been asked for it keeps ``spares`` sessions ready: each with a fresh, empty workspace of its
own, its sandbox started and one interpreter of each warm kind waiting. A new agent claims
one: it is taken out of the pool under the lock and bound to that agent alone, for good. A
session or workspace is never handed back to the pool and never reaches a second agent; an
agent that already has a workspace (it used another backend first) gets a new session on
that workspace instead. Spares are made by one background thread, started when a call has
finished rather than on the path of one; a spare that cannot be made is logged and the key
is dropped for ``SPARE_RETRY_S``, so the next new agent takes the ordinary path and gets
its typed error there. Spares are kept for at most ``MAX_SPARE_KEYS`` (backend, limits) at a
time, so a worker serving many policies holds a bounded number of idle sandboxes.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import ErrorCode, SandboxUnavailable, WardenError
from .base import REAPER, WARM_ARGV, Limits, Observed, RunResult, attribute, rlimit_args, sandbox_env, spawn, supervise
from .workspace import Workspace

BACKENDS = ("gvisor", "bwrap", "none")
# At most this many (backend, limits) keys keep spares; the least recently asked for goes first.
MAX_SPARE_KEYS = 4
# After a spare could not be made, none is tried for that key for this long.
SPARE_RETRY_S = 60.0

_log = logging.getLogger(__name__)


def make_backend(name: str) -> Any:
    if name == "bwrap":
        from .bwrap import BwrapBackend

        return BwrapBackend()
    if name == "gvisor":
        from .gvisor import GVisorBackend

        return GVisorBackend()
    if name == "none":
        return UnsandboxedBackend()
    raise SandboxUnavailable(f"unknown sandbox backend {name!r}; choose one of {BACKENDS}",
                             code=ErrorCode.SANDBOX_UNAVAILABLE)


class UnsandboxedSession:
    """Explicit opt-out (``unsandboxed: true``): a child process with rlimits and a clean
    environment, in the workspace directory, and nothing else. Never the worker process."""

    backend = "none"

    def __init__(self, workspace: Path) -> None:
        self.workspace = workspace

    def run(self, argv: list[str], *, stdin: bytes = b"", limits: Limits,
            env: Mapping[str, str] | None = None) -> RunResult:
        full = ["prlimit", *[a for a in rlimit_args(limits) if not a.startswith("--nproc")], "--", *argv]
        proc = spawn(full, env=sandbox_env(env), cwd=self.workspace)
        ex = supervise(proc, stdin=stdin, limits=limits)
        # prlimit execs the program, so wait4 saw it and every descendant it reaped.
        killed, detail = (ex.killed, ex.detail) if ex.killed else attribute(ex.code, Observed(cpu_s=ex.cpu_s), limits)
        return RunResult(ex.code, ex.stdout, ex.stderr, ex.wall_s, killed, detail, self.backend, cpu_s=ex.cpu_s)

    def prewarm(self, *args: Any, **kwargs: Any) -> None:
        return None

    def close(self) -> None:
        return None


class UnsandboxedBackend:
    name = "none"

    def check(self) -> None:
        REAPER.start()  # a tool's daemon is this worker's to reap, not the host's

    def open(self, workspace: Path, *, workspace_mb: int, key: str = "") -> UnsandboxedSession:
        print(f"warden: WARNING: running tools of {key!r} UNSANDBOXED (policy says unsandboxed: true)",
              file=sys.stderr, flush=True)
        return UnsandboxedSession(workspace)


@dataclass
class SandboxHandle:
    """What a sandboxed tool sees as ``ctx.sandbox``: run in this agent's sandbox, under these limits."""

    session: Any
    workspace: Workspace
    limits: Limits
    after_call: Callable[[], None] | None = None  # the pool's cue that it may use the CPU now

    @property
    def backend(self) -> str:
        return self.session.backend

    def run(self, argv: list[str], *, stdin: bytes = b"", env: Mapping[str, str] | None = None,
            tool: str | None = None) -> RunResult:
        try:
            return self.session.run(argv, stdin=stdin, limits=self.limits, env=env).raise_for_kill(tool)
        finally:
            if self.after_call is not None:
                self.after_call()


@dataclass
class _Spare:
    workspace: Workspace
    session: Any


class SandboxPool:
    """Workspaces live under a private directory of the system temp dir (mode 0711, so that a
    sandbox uid can reach its own 0700 workspace without seeing the others, whatever the
    permissions of the job's run directory). Each has a random name, never the agent's, so
    no agent name can pick or guess another workspace's directory.

    ``spares`` is how many ready sessions to keep per (backend, limits); 0 turns the warm
    pool off, and every new agent then pays the full start-up.
    """

    def __init__(self, root: Path | None = None, *, spares: int = 1) -> None:
        self._root = root  # created on first use, so a worker that never sandboxes leaves nothing behind
        self._spare_count = max(0, spares)
        self._backends: dict[str, Any] = {}
        self._workspaces: dict[str, Workspace] = {}
        self._sessions: dict[tuple[str, str], Any] = {}
        self._spares: dict[tuple[str, Limits], list[_Spare]] = {}
        self._wanted: OrderedDict[tuple[str, Limits], None] = OrderedDict()
        self._refiller: threading.Thread | None = None
        self._discarding: list[threading.Thread] = []  # spares of keys no longer wanted, being closed
        self._retry_at: dict[tuple[str, Limits], float] = {}  # keys whose last spare could not be made
        self._lock = threading.Lock()
        self._closed = False
        self.claimed = 0  # new agents that got a spare
        self.spare_failures: list[str] = []

    def _backend(self, name: str) -> Any:
        backend = self._backends.get(name)
        if backend is None:
            backend = make_backend(name)
            backend.check()  # a missing backend is an error with the package to install, never a fall-back
            self._backends[name] = backend
        return backend

    @property
    def root(self) -> Path:
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="warden-ws-"))
        self._root.mkdir(parents=True, exist_ok=True)
        os.chmod(self._root, 0o711)
        return self._root

    def handle(self, agent: str, backend: str, limits: Limits) -> SandboxHandle:
        with self._lock:
            if self._closed:
                raise SandboxUnavailable("the worker's sandbox pool is closed", code=ErrorCode.SANDBOX_UNAVAILABLE)
            ws = self._workspaces.get(agent)
            session = self._sessions.get((agent, backend))
            if ws is None and session is None:
                spare = self._claim(backend, limits)
                if spare is not None:
                    self.claimed += 1
                    ws, session = spare.workspace, spare.session
                    self._workspaces[agent] = ws
                    self._sessions[(agent, backend)] = session
            if ws is None:
                ws = _fresh_workspace(self.root, limits.workspace_mb)
                self._workspaces[agent] = ws
            if session is None:
                session = self._backend(backend).open(ws.root, workspace_mb=limits.workspace_mb, key=agent)
                self._sessions[(agent, backend)] = session
            self._want(backend, limits)
        return SandboxHandle(session, ws, limits, after_call=self._refill_soon)

    # ----------------------------------------------------------------------- warm pool
    def _claim(self, backend: str, limits: Limits) -> _Spare | None:
        """Take a spare out of the pool (the caller holds the lock): it is nobody else's now."""
        spares = self._spares.get((backend, limits))
        return spares.pop(0) if spares else None

    def _want(self, backend: str, limits: Limits) -> None:
        key = (backend, limits)
        if self._spare_count == 0 or backend == "none" or time.monotonic() < self._retry_at.get(key, 0.0):
            return
        self._wanted[key] = None
        self._wanted.move_to_end(key)
        while len(self._wanted) > MAX_SPARE_KEYS:
            old, _ = self._wanted.popitem(last=False)
            for spare in self._spares.pop(old, []):
                thread = threading.Thread(target=_discard, args=(spare,), daemon=True)
                thread.start()
                self._discarding.append(thread)

    def prepare(self, backend: str, limits: Limits) -> None:
        """Keep spares for (backend, limits) from now on, and start making them."""
        with self._lock:
            if self._closed:
                return
            self._backend(backend)
            self._want(backend, limits)
        self._refill_soon()

    def _refill_soon(self) -> None:
        with self._lock:
            if self._closed or self._refiller is not None or self._next_wanted() is None:
                return
            self._refiller = threading.Thread(target=self._refill, name="warden-sandbox-spares", daemon=True)
            self._refiller.start()

    def _next_wanted(self) -> tuple[str, Limits] | None:
        for key in reversed(self._wanted):  # the most recently asked for first
            if len(self._spares.get(key, ())) < self._spare_count:
                return key
        return None

    def _refill(self) -> None:
        try:
            while True:
                with self._lock:
                    key = None if self._closed else self._next_wanted()
                    if key is None:
                        return
                    backend = self._backends[key[0]]
                    root = self.root
                try:
                    spare = _make_spare(backend, root, key[1])
                except (WardenError, OSError, subprocess.SubprocessError) as exc:
                    with self._lock:
                        self._wanted.pop(key, None)
                        self._retry_at[key] = time.monotonic() + SPARE_RETRY_S
                        self.spare_failures.append(f"{key[0]}: {exc}"[:500])
                    _log.warning("warden: no spare %s sandbox for the warm pool: %s", key[0], exc)
                    continue
                with self._lock:
                    keep = not self._closed and key in self._wanted
                    if keep:
                        self._spares.setdefault(key, []).append(spare)
                if not keep:
                    _discard(spare)
        finally:
            with self._lock:
                self._refiller = None

    def wait_ready(self, timeout_s: float = 30.0) -> bool:
        """Block until no spare is being made (all wanted spares exist, or could not be made)."""
        with self._lock:
            refiller = self._refiller
        if refiller is not None:
            refiller.join(timeout_s)
            return not refiller.is_alive()
        return True

    def workspaces(self) -> dict[str, Workspace]:
        """agent -> its workspace, for collecting a job's artifacts before ``close``."""
        with self._lock:
            return dict(self._workspaces)

    def spare_count(self, backend: str, limits: Limits) -> int:
        with self._lock:
            return len(self._spares.get((backend, limits), ()))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            refiller = self._refiller
        if refiller is not None:
            refiller.join()  # it finishes the spare it is making, sees the pool closed and discards it
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
            workspaces, self._workspaces = list(self._workspaces.values()), {}
            spares, self._spares = [s for group in self._spares.values() for s in group], {}
            discarding, self._discarding = self._discarding, []
            self._wanted.clear()
        # gVisor waits for each Sentry to be reaped (over a second): close them side by side.
        closers = [threading.Thread(target=s.close, daemon=True) for s in sessions]
        closers += [threading.Thread(target=_discard, args=(s,), daemon=True) for s in spares]
        for t in closers:
            t.start()
        for t in closers + discarding:
            t.join()
        for ws in workspaces:
            ws.remove()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)


def _fresh_workspace(root: Path, size_mb: int) -> Workspace:
    """A new, empty workspace under a random name (never an agent's name)."""
    return Workspace(root / f"ws-{secrets.token_hex(8)}", size_mb=size_mb)


def _make_spare(backend: Any, root: Path, limits: Limits) -> _Spare:
    """A ready session on a fresh workspace of its own, bound to no agent yet."""
    ws = _fresh_workspace(root, limits.workspace_mb)
    session = None
    try:
        session = backend.open(ws.root, workspace_mb=limits.workspace_mb, key=ws.root.name)
        for argv in WARM_ARGV:
            session.prewarm(list(argv), limits)
    except BaseException:
        if session is not None:
            session.close()
        ws.remove()
        raise
    return _Spare(ws, session)


def _discard(spare: _Spare) -> None:
    spare.session.close()
    spare.workspace.remove()
