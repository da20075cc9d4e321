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

Which limit a call breached is the worker's finding, never the program's claim (``attribute``):
a sandboxed program chooses its own output, exit status and even the signal it dies by, so
only what the worker observes names a limit: its wall clock and output count
(``supervise``), host cgroup counters the sandbox cannot reach, and ``wait4``'s CPU time of
a tree it reaped. A program that merely fails gets its exit status back.

The worker reaps its own children (``Reaper``): it is their subreaper, so the orphans a
sandbox leaves never depend on the host's pid 1, which in many containers does not reap.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import threading
from contextlib import contextmanager
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

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
    cpu_s: float | None = None  # CPU time of the call's processes, where the worker could measure it

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
    return _SPAWNER.submit(_popen, argv, **popen)


def _popen(argv: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            process_group=0, close_fds=True, **popen)
    REAPER.own(proc)
    return proc


def started(pending: "Future[subprocess.Popen[bytes]] | None") -> subprocess.Popen[bytes] | None:
    """The process a ``spawn_soon`` started, or None if there is none or it could not start
    (the call that wanted it then starts its own, and reports that one's failure)."""
    if pending is None:
        return None
    try:
        return pending.result()
    except (OSError, subprocess.SubprocessError):
        return None


# The exit statuses of a process the kernel killed at its CPU rlimit (SIGKILL at the hard
# limit, SIGXCPU at the soft one), as Popen reports them and as a sandbox wrapper relays them.
_CPU_KILL_EXITS = frozenset({-9, -24, 128 + 9, 128 + 24})
# RLIMIT_CPU is checked against tick-sampled CPU time, which on a busy machine runs ahead of
# the scheduler's exact figure that rusage and cgroups report (measured here under load: a
# process killed at a 1 s limit had used 0.92 s). A kill at the limit is recognised down to
# this fraction of it. Only where no cgroup measures the call: a program must still burn
# most of its CPU budget before its chosen exit status could pass for a kill.
CPU_SLACK = 0.2


def cpu_limit_s(limits: Limits) -> int:
    """The RLIMIT_CPU a call runs under: whole seconds, at least one."""
    return max(1, int(limits.cpu_s + 0.999))


def rlimit_args(limits: Limits, *, extra_pids: int = 0, address_space: bool = True,
                nproc: int | None = None, cpu_s: int | None = None) -> list[str]:
    """``prlimit`` options for a call: CPU (SIGKILL at the limit), address space (unless a
    memory cgroup bounds the sandbox instead), processes, file size, no core dumps, few open
    files. ``nproc`` and ``cpu_s`` replace the limits' own figures where a cgroup enforces
    those and the rlimit stays only as a backstop."""
    cpu = cpu_limit_s(limits) if cpu_s is None else cpu_s
    mem = limits.memory_mb << 20
    nproc = limits.max_pids + extra_pids if nproc is None else nproc
    args = [f"--cpu={cpu}:{cpu}", f"--nproc={nproc}:{nproc}", f"--fsize={limits.workspace_mb << 20}",
            "--core=0", "--nofile=256"]
    return [f"--as={mem}:{mem}", *args] if address_space else args


@dataclass(frozen=True)
class Observed:
    """What the worker itself saw of a finished call, besides its exit status.

    Only this names a limit: the program's output and its exit status are its own to choose.
    ``cpu_s`` is the CPU time of the call measured outside it, or None where nothing outside
    can measure it. ``cpu_watched`` says it is the call's whole CPU time from a cgroup, which
    the worker enforces itself; otherwise it is ``wait4``'s figure for the tree, and only
    corroborates a kill by the kernel's rlimit. ``memory`` / ``pids`` describe a breach a
    cgroup (or the worker's own count of processes) saw, else "".
    """

    cpu_s: float | None = None
    cpu_watched: bool = False
    memory: str = ""
    pids: str = ""


def attribute(code: int | None, seen: Observed, limits: Limits) -> tuple[str | None, str]:
    """The limit a finished call ran into, from what the worker observed; (None, "") if none.

    A CPU kill by the rlimit needs both the kernel's way of ending a process (SIGKILL,
    SIGXCPU) and the CPU time to go with it: a program that calls ``os._exit(152)`` after a
    few milliseconds merely failed. Without a measurement nothing is claimed.
    """
    if seen.memory:
        return "memory", seen.memory
    if seen.pids:
        return "pids", seen.pids
    if seen.cpu_watched:
        return cpu_breach(seen.cpu_s, limits) or (None, "")
    limit = cpu_limit_s(limits)
    if code in _CPU_KILL_EXITS and seen.cpu_s is not None and seen.cpu_s >= limit * (1 - CPU_SLACK):
        return "cpu", f"killed by the kernel at the CPU limit ({limit}s; {seen.cpu_s:.2f}s measured)"
    return None, ""


def cpu_breach(used_s: float | None, limits: Limits) -> tuple[str, str] | None:
    """A breach of ``cpu_s`` the worker measured itself (a cgroup's exact CPU time), or None."""
    if used_s is not None and used_s > limits.cpu_s:
        return "cpu", f"CPU time {used_s:.2f}s > {limits.cpu_s}s"
    return None


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


def reap(proc: subprocess.Popen[bytes]) -> float | None:
    """Wait for ``proc`` with ``wait4``; the CPU seconds it and every descendant it reaped used.

    None if something else reaped it first (its usage is then unknown)."""
    with proc._waitpid_lock:  # the lock Popen.wait/poll take: one of us reaps, the other sees returncode
        if proc.returncode is not None:
            return None
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except ChildProcessError:
            proc.returncode = -signal.SIGKILL  # gone without a status we could read: not a success
            return None
        proc.returncode = os.waitstatus_to_exitcode(status)
    REAPER.poke()  # the tree may have left orphans behind
    return usage.ru_utime + usage.ru_stime


def _wait_exit(proc: subprocess.Popen[bytes], timeout_s: float, watch: "Watch | None",
               interval_s: float) -> tuple[str, str] | None:
    """Wait until ``proc`` exits (woken by the kernel through a pidfd), the wall clock runs out
    (``("timeout", ...)``), or ``watch`` reports a breach (its ``(kind, detail)``)."""
    deadline = time.monotonic() + timeout_s
    try:
        fd = os.pidfd_open(proc.pid)
    except ProcessLookupError:  # already reaped (a warm process found dead)
        return None
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout", ""
            ready, _, _ = select.select([fd], [], [], min(left, interval_s) if watch else left)
            if ready:
                return None
            if watch is not None and (breach := watch()) is not None:
                return breach
    finally:
        os.close(fd)


Watch = Callable[[], "tuple[str, str] | None"]


@dataclass
class Exit:
    """How one supervised process ended."""

    code: int | None
    stdout: bytes
    stderr: bytes
    wall_s: float
    killed: str | None  # a breach the worker saw while it ran (wall clock, output, ``watch``)
    detail: str
    cpu_s: float | None  # from ``wait4``: the process and every descendant it reaped


def supervise(proc: subprocess.Popen[bytes], *, stdin: bytes, limits: Limits,
              kill: Callable[[], None] | None = None, watch: Watch | None = None,
              watch_interval_s: float = 0.05) -> Exit:
    """Feed stdin, read stdout/stderr with a shared byte cap, enforce the wall clock, and ask
    ``watch`` every ``watch_interval_s`` whether a limit it can see was breached.

    On a breach the whole process group is killed (``kill`` if given, else SIGKILL to the
    group). The process is reaped here, with ``wait4``, so its CPU time is known.
    """
    started = time.monotonic()
    cap = _Capture(limits.max_output_bytes)
    lock = threading.Lock()
    breach: list[tuple[str, str]] = []

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
                    breach.append(("output", f"output {cap.size} bytes > {limits.max_output_bytes}"))
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
    seen = _wait_exit(proc, limits.wall_s, watch, watch_interval_s)
    if seen is not None:
        kind, detail = seen
        if kind == "timeout":
            detail = f"wall {time.monotonic() - started:.2f}s > {limits.wall_s}s"
        breach.append((kind, detail))
        do_kill()
    cpu_s = reap(proc)
    for t in readers:
        t.join(timeout=5)
    wall = time.monotonic() - started
    killed, detail = breach[0] if breach else (None, "")
    return Exit(proc.returncode, b"".join(out), b"".join(err), wall, killed, detail, cpu_s)


# --------------------------------------------------------------------------- reaping
_PR_SET_CHILD_SUBREAPER = 36
# How often the reaper looks for orphans when nothing woke it.
REAP_PERIOD_S = 0.5
# A zombie child in the worker's own session is reaped only after this long, so a
# ``subprocess.run`` of this process (which reaps its child itself, at once) keeps its status.
ORPHAN_GRACE_S = 2.0


def _children() -> list[int]:
    """This process's children (every thread's: an orphan is handed to any of them)."""
    pids: list[int] = []
    for tid in os.listdir("/proc/self/task"):
        try:
            pids += [int(p) for p in Path(f"/proc/self/task/{tid}/children").read_text().split()]
        except (OSError, ValueError):
            continue
    return pids


def _state_and_session(pid: int) -> tuple[str, int] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ", which may hold spaces
    return fields[0], int(fields[3])


class Reaper:
    """Makes this process the reaper of its own descendants, and reaps the orphans among them.

    A sandbox leaves orphans: bwrap's namespace init when bwrap is killed, gVisor's sandbox
    and gofer once ``runsc`` has started them. Without a subreaper they go to the host's pid 1,
    and where that does not reap (many containers and pods) each stays a zombie of the
    sandbox uid, counted against its process limit until no call can start. With
    ``PR_SET_CHILD_SUBREAPER`` they come here instead, and this thread reaps them.

    It never takes the status of a process someone in this process still waits for: not a
    live ``spawn``ed process, and not a zombie of this process's own session until it has
    been one for ``ORPHAN_GRACE_S`` (sandbox trees start sessions of their own, bwrap's with
    ``--new-session``, so their orphans are reaped at once).
    """

    def __init__(self) -> None:
        self._owned: "weakref.WeakValueDictionary[int, subprocess.Popen[bytes]]" = weakref.WeakValueDictionary()
        self._first_seen: dict[int, float] = {}
        self._released: set[int] = set()  # no one here waits for them: reaped without the grace
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.reaped = 0

    def start(self) -> None:
        """Become a subreaper and start reaping (idempotent)."""
        with self._lock:
            if self._thread is not None:
                return
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
                raise SandboxUnavailable(f"cannot become a child subreaper: {os.strerror(ctypes.get_errno())}",
                                         code=ErrorCode.SANDBOX_UNAVAILABLE)
            self._thread = threading.Thread(target=self._loop, name="warden-reaper", daemon=True)
            self._thread.start()

    def own(self, proc: subprocess.Popen[bytes]) -> None:
        """``proc`` is reaped by whoever waits for it, never by the reaper."""
        self._owned[proc.pid] = proc

    def poke(self) -> None:
        self._wake.set()

    @contextmanager
    def releasing(self, pids: Iterable[int], every_s: float = 0.02) -> Iterator[None]:
        """While inside, ``pids`` (processes a tool started that nobody in this process waits for: a
        sandbox's Sentry and gofer, which ``runsc delete`` kills and then waits to see gone) are reaped
        as soon as they are zombies, without the grace, the reaper woken every ``every_s``."""
        pids = set(pids)
        with self._lock:
            self._released |= pids
        done = threading.Event()

        def nudge() -> None:
            while not done.wait(every_s):
                self._wake.set()

        nudger = threading.Thread(target=nudge, name="warden-reaper-nudge", daemon=True)
        nudger.start()
        try:
            yield
        finally:
            done.set()
            nudger.join()
            with self._lock:
                self._released -= pids

    def _loop(self) -> None:
        while True:
            self._wake.wait(REAP_PERIOD_S)
            self._wake.clear()
            self.sweep()

    def sweep(self) -> int:
        """Reap the orphans that are zombies now; how many."""
        now, session, zombies, reaped = time.monotonic(), os.getsid(0), set(), 0
        for pid in _children():
            seen = _state_and_session(pid)
            owner = self._owned.get(pid)
            if seen is None or seen[0] != "Z" or (owner is not None and owner.returncode is None):
                continue
            zombies.add(pid)
            first = self._first_seen.setdefault(pid, now)
            if seen[1] == session and now - first < ORPHAN_GRACE_S and pid not in self._released:
                continue
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    reaped += 1
                    zombies.discard(pid)
            except ChildProcessError:
                zombies.discard(pid)
        self._first_seen = {p: t for p, t in self._first_seen.items() if p in zombies}
        self.reaped += reaped
        return reaped


REAPER = Reaper()
