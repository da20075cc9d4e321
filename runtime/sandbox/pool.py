"""Sessions per agent, and the handle a sandboxed tool gets.

The worker keeps one workspace and, per backend, one session for each agent it serves;
agents never share either. The backend and the limits of a call come from the agent's
policy, carried in the supervisor-signed dispatch, never from the agent or the tool.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import ErrorCode, SandboxUnavailable
from .base import Limits, RunResult, rlimit_args, sandbox_env, supervise
from .workspace import Workspace

BACKENDS = ("gvisor", "bwrap", "none")


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
        proc = subprocess.Popen(full, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=sandbox_env(env), cwd=self.workspace, process_group=0)
        code, out, err, wall, killed, detail = supervise(proc, stdin=stdin, limits=limits)
        return RunResult(code, out, err, wall, killed, detail, self.backend)

    def prewarm(self, *args: Any, **kwargs: Any) -> None:
        return None

    def close(self) -> None:
        return None


class UnsandboxedBackend:
    name = "none"

    def check(self) -> None:
        return None

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

    @property
    def backend(self) -> str:
        return self.session.backend

    def run(self, argv: list[str], *, stdin: bytes = b"", env: Mapping[str, str] | None = None,
            tool: str | None = None) -> RunResult:
        return self.session.run(argv, stdin=stdin, limits=self.limits, env=env).raise_for_kill(tool)


class SandboxPool:
    """Workspaces live under a private directory of the system temp dir (mode 0711, so that a
    sandbox uid can reach its own 0700 workspace without seeing the others, whatever the
    permissions of the job's run directory)."""

    def __init__(self, root: Path | None = None) -> None:
        self._root = root  # created on first use, so a worker that never sandboxes leaves nothing behind
        self._backends: dict[str, Any] = {}
        self._workspaces: dict[str, Workspace] = {}
        self._sessions: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

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
            ws = self._workspaces.get(agent)
            if ws is None:
                ws = Workspace(self.root / agent, size_mb=limits.workspace_mb)
                self._workspaces[agent] = ws
            session = self._sessions.get((agent, backend))
            if session is None:
                session = self._backend(backend).open(ws.root, workspace_mb=limits.workspace_mb, key=agent)
                self._sessions[(agent, backend)] = session
        return SandboxHandle(session, ws, limits)

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
            workspaces, self._workspaces = list(self._workspaces.values()), {}
        for s in sessions:
            s.close()
        for ws in workspaces:
            ws.remove()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
