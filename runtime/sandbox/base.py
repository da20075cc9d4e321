"""The sandbox interface: one agent's isolated place to run untrusted code.

A ``Backend`` (gVisor, bubblewrap) opens a ``Session`` for one agent: a private workspace
directory and whatever the backend keeps warm. ``Session.run`` executes one command under
``Limits`` and returns a ``RunResult``; a breached limit kills the whole process tree and
is reported in ``RunResult.killed``, which ``raise_for_kill`` turns into a typed error.

What every backend must guarantee (each is tested against both): no network at all
(loopback and DNS included); no host home, Ray session files or host environment (only
the variables the tool passes); ``/proc`` shows only the sandbox; a read-only root with
writes only in the workspace; CPU, wall time, memory, process count and output bounded;
the worker process survives any breach and the next call works.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Mapping, Protocol

from ..errors import ErrorCode, SandboxKilled, SandboxUnavailable

WORKSPACE = "/workspace"  # where the session's workspace appears inside every sandbox
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
# The interpreters the built-in tools use (python.exec, shell.exec). A backend keeps one of
# each started ahead of the next call; they read their program from stdin, so nothing about
# a call is decided before it arrives.
WARM_ARGV = (("python3", "-I", "-"), ("/bin/sh", "-s"))


@dataclass(frozen=True)
class Limits:
    """Per-call limits. Every field is enforced by every backend."""

    cpu_s: float = 10.0
    wall_s: float = 30.0
    memory_mb: int = 512
    max_pids: int = 64
    max_output_bytes: int = 1 << 20
    workspace_mb: int = 64

    @classmethod
    def from_dict(cls, d: Mapping[str, object] | None) -> "Limits":
        known = {k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__ and v is not None}
        return cls(**known)  # type: ignore[arg-type]


KILL_CODES = {
    "timeout": ErrorCode.SANDBOX_TIMEOUT,
    "cpu": ErrorCode.SANDBOX_CPU,
    "memory": ErrorCode.SANDBOX_MEMORY,
    "pids": ErrorCode.SANDBOX_PIDS,
    "output": ErrorCode.SANDBOX_OUTPUT,
}


@dataclass
class RunResult:
    exit_code: int | None
    stdout: bytes
    stderr: bytes
    wall_s: float
    killed: str | None = None  # one of KILL_CODES, or None
    detail: str = ""
    backend: str = ""

    def raise_for_kill(self, tool: str | None = None) -> "RunResult":
        if self.killed is not None:
            raise SandboxKilled(f"{self.backend}: {self.killed} limit breached: {self.detail}"[:500],
                                code=KILL_CODES[self.killed], tool=tool)
        return self


class Session(Protocol):
    backend: str
    workspace: Path

    def run(self, argv: list[str], *, stdin: bytes = b"", limits: Limits,
            env: Mapping[str, str] | None = None) -> RunResult: ...

    def close(self) -> None: ...


class Backend(Protocol):
    name: str

    def check(self) -> None:
        """Raise SandboxUnavailable, saying which package to install, if this host cannot run it."""

    def open(self, workspace: Path, *, workspace_mb: int) -> Session: ...


_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="warden-sandbox-spawn")


def spawn(argv: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Start a sandbox process from one long-lived thread.

    A parent-death signal (bwrap's ``--die-with-parent``) fires when the *thread* that forked
    the process exits, and a warm process outlives the call (and the executor thread) that
    started it; a dedicated thread that never exits keeps it alive exactly as long as the worker.
    Never pass ``user``/``group``/``extra_groups`` or ``preexec_fn``: they make Python fork
    instead of vfork, and a fork costs in proportion to the worker's memory.
    """
    return spawn_soon(argv, **popen).result()


def spawn_soon(argv: list[str], **popen: Any) -> "Future[subprocess.Popen[bytes]]":
    """``spawn`` without waiting: for a warm process, so the call that asks for it returns now."""
    return _SPAWNER.submit(subprocess.Popen, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, process_group=0, close_fds=True, **popen)


def started(pending: "Future[subprocess.Popen[bytes]] | None") -> subprocess.Popen[bytes] | None:
    """The process a ``spawn_soon`` started, or None if there is none or it could not start
    (the call that wanted it then starts its own, and reports that one's failure)."""
    if pending is None:
        return None
    try:
        return pending.result()
    except (OSError, subprocess.SubprocessError):
        return None


# How a process that ran into an rlimit ends, as a sandbox wrapper reports it (128 + signal).
_SIGXCPU_EXIT = 128 + 24
_SIGKILL_EXIT = 128 + 9
_MEMORY_MARKS = (b"MemoryError", b"Cannot allocate memory", b"std::bad_alloc", b"out of memory")
_FORK_MARKS = (b"BlockingIOError", b"Resource temporarily unavailable", b"can't fork", b"Cannot fork")


def rlimit_args(limits: Limits, *, extra_pids: int = 0) -> list[str]:
    """``prlimit`` options for a call: CPU (soft, then SIGKILL one second later), address space,
    processes, file size, no core dumps, few open files."""
    cpu = max(1, int(limits.cpu_s + 0.999))
    mem = limits.memory_mb << 20
    nproc = limits.max_pids + extra_pids
    return [f"--cpu={cpu}:{cpu + 1}", f"--as={mem}:{mem}", f"--nproc={nproc}:{nproc}",
            f"--fsize={limits.workspace_mb << 20}", "--core=0", "--nofile=256"]


def classify_exit(code: int | None, stderr: bytes, limits: Limits) -> tuple[str | None, str]:
    """Name the limit a finished process ran into, from its exit status and last words.

    The words are the sandboxed program's own, so it can only mislabel its own failure."""
    tail = stderr[-4096:]
    if code in (_SIGXCPU_EXIT, -24):
        return "cpu", f"CPU time > {limits.cpu_s}s"
    if code not in (0, None) and any(m in tail for m in _MEMORY_MARKS):
        return "memory", f"address space > {limits.memory_mb} MiB"
    if code not in (0, None) and any(m in tail for m in _FORK_MARKS):
        return "pids", f"processes > {limits.max_pids}"
    if code == _SIGKILL_EXIT:
        return "cpu", f"killed at the hard CPU limit ({limits.cpu_s}s + 1)"
    return None, ""


def require_binary(path_or_name: str, package: str, backend: str) -> str:
    from shutil import which

    found = which(path_or_name)
    if found is None:
        raise SandboxUnavailable(f"{backend} sandbox unavailable: '{path_or_name}' not found; "
                                 f"install the Debian package '{package}' (apt-get install {package})",
                                 code=ErrorCode.SANDBOX_UNAVAILABLE)
    return found


def sandbox_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    """The only environment a sandboxed process gets: nothing of the host's."""
    env = {"PATH": SANDBOX_PATH, "HOME": WORKSPACE, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    env.update(extra or {})
    return env


@dataclass
class _Capture:
    limit: int
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    over: bool = False


def _wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Wait for exit, woken by the kernel (pidfd) rather than by Popen.wait's polling sleeps."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (old kernel, or already reaped)
        try:
            proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        ready, _, _ = select.select([fd], [], [], timeout_s)
    finally:
        os.close(fd)
    if ready:
        proc.wait()
    return bool(ready)


def supervise(proc: subprocess.Popen[bytes], *, stdin: bytes, limits: Limits,
              kill: "callable[[], None] | None" = None) -> tuple[int | None, bytes, bytes, float, str | None, str]:
    """Feed stdin, read stdout/stderr with a shared byte cap, enforce the wall clock.

    On a breach the whole process group is killed (``kill`` if given, else SIGKILL to the
    group). Returns ``(exit_code, stdout, stderr, wall_s, killed, detail)``.
    """
    started = time.monotonic()
    cap = _Capture(limits.max_output_bytes)
    lock = threading.Lock()
    breach: list[str] = []

    def do_kill() -> None:
        if kill is not None:
            kill()
        else:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def pump(stream, sink: list[bytes]) -> None:
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
            if not chunk:
                return
            with lock:
                room = cap.limit - cap.size
                sink.append(chunk[:max(room, 0)])
                cap.size += len(chunk)
                if cap.size > cap.limit and not cap.over:
                    cap.over = True
                    breach.append("output")
                    do_kill()

    out: list[bytes] = []
    err: list[bytes] = []
    readers = [threading.Thread(target=pump, args=(proc.stdout, out), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err), daemon=True)]
    for t in readers:
        t.start()
    try:
        if stdin:
            proc.stdin.write(stdin)
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass  # the process exited or closed stdin early; its exit status tells the story
    if not _wait_exit(proc, limits.wall_s):
        breach.append("timeout")
        do_kill()
        proc.wait()
    for t in readers:
        t.join(timeout=5)
    wall = time.monotonic() - started
    killed = breach[0] if breach else None
    detail = {"timeout": f"wall {wall:.2f}s > {limits.wall_s}s",
              "output": f"output {cap.size} bytes > {limits.max_output_bytes}"}.get(killed or "", "")
    return proc.returncode, b"".join(out), b"".join(err), wall, killed, detail
