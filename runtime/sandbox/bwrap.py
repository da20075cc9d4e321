"""bubblewrap backend: Linux namespaces plus cgroups and rlimits, the fastest isolation we have.

Each command runs as::

    sh (joins the call's cgroups) -> setpriv (uid) -> prlimit (cpu, nproc, fsize, nofile, core)
        -> bwrap --unshare-all --as-pid-1 ... -> argv

started with an empty environment, as an unprivileged host uid of its own (when the worker
runs as root; ``setpriv`` switches real, effective and saved ids and drops supplementary
groups and every capability before anything else runs), in a new session. bwrap gives it
new user, pid, network, ipc, uts and cgroup namespaces, a read-only ``/usr`` (with the
usual ``/bin``, ``/lib`` links), a private ``/proc``, ``/dev`` and a ``/tmp`` tmpfs of at
most ``memory_mb``, and the session's workspace at ``/workspace``; nothing else of the host
file system exists inside. ``--die-with-parent`` and the pid namespace mean that killing
bwrap kills every process the command started.

The command is the namespace's pid 1 (``--as-pid-1``), bwrap's own child, so bwrap reaps it
and exits with its status: no namespace init is left behind as an orphan on every call (it
was, and under a host init that does not reap, those zombies filled the uid's process limit
after some 30 calls), and the worker's ``wait4`` of bwrap includes the CPU time of every
process of the call.

Limits, when the worker runs as root: each call gets cgroups of its own (``cgroup.py``),
joined before anything runs: memory (``memory_mb``, ``/tmp`` included, since tmpfs pages are
charged to the cgroup that writes them), pids (``max_pids`` plus bwrap) and CPU accounting.
The worker watches their counters while the call runs and kills on a breach: an OOM kill is
``memory``, a refused fork ``pids``, CPU time over ``cpu_s`` ``cpu``. RLIMIT_CPU and
RLIMIT_NPROC stay as backstops above those limits; there is no RLIMIT_AS (the memory cgroup
bounds what is resident, and an address-space refusal could not be told from a program
printing ``MemoryError``). Without root there are no cgroups: RLIMIT_AS, RLIMIT_NPROC and
RLIMIT_CPU bound the call, and only a CPU kill the rusage corroborates is named.

RLIMIT_NPROC counts processes per host uid, and root is exempt from it; that is why the
command runs under a uid derived from the session and never as root. The uid is switched by
``setpriv`` rather than by the worker between fork and exec: that lets Python start the
child with vfork, whose cost does not grow with the worker's memory (a fork of a worker
holding 300 MiB took 14 ms here; the extra exec about 1 ms). Warm processes
(``python3 -I -``, ``sh -s``) are started ahead of time so that a call pays only for its own
work; they read their program from stdin, so nothing is decided before the call arrives.
The next one is started after a call without the call waiting for it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import zlib
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..errors import ErrorCode, SandboxUnavailable
from .base import (REAPER, WARM_ARGV, WORKSPACE, Limits, Observed, RunResult, Watch, attribute, cpu_breach,
                   cpu_limit_s, reap,
                   require_binary, rlimit_args, sandbox_env, spawn_soon, started, supervise)
from .cgroup import CallCgroup

UID_BASE = 200_000
UID_SPAN = 100_000
# Where a cgroup bounds the call, RLIMIT_NPROC (per host uid, so shared by an agent's
# concurrent calls) stays only as a backstop this many times the cgroup's limit.
NPROC_BACKSTOP = 2
# ... and RLIMIT_CPU this many seconds above the call's CPU time, which the worker watches.
CPU_BACKSTOP_S = 1


def _ro_system_binds() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib64", "lib32"):
        target = os.readlink(f"/{name}") if os.path.islink(f"/{name}") else None
        if target is not None:
            args += ["--symlink", target, f"/{name}"]
        elif os.path.isdir(f"/{name}"):
            args += ["--ro-bind", f"/{name}", f"/{name}"]
    # A few files programs expect; never the host's passwd secrets, resolv.conf or hostname.
    for f in ("/etc/alternatives", "/etc/ld.so.cache", "/etc/localtime", "/etc/mime.types"):
        if os.path.exists(f):
            args += ["--ro-bind", f, f]
    return args


@dataclass
class _Launch:
    """A started (or starting) sandbox process and the cgroup it runs in, if any."""

    pending: "Future[subprocess.Popen[bytes]]"
    cgroup: CallCgroup | None

    def discard(self) -> None:
        proc = started(self.pending)
        if proc is not None:
            _kill(proc, self.cgroup)
            reap(proc)
        if self.cgroup is not None:
            self.cgroup.remove()


def _kill(proc: subprocess.Popen[bytes], cgroup: CallCgroup | None) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if cgroup is not None:
        cgroup.kill()  # the namespace's pid 1 started a session of its own: not in bwrap's group


def _watch(cgroup: CallCgroup, limits: Limits) -> Watch:
    """The breaches the cgroup counts, looked at while the call runs (a fork bomb does not end)."""

    def seen() -> tuple[str, str] | None:
        observed = _observed(cgroup, limits, None)
        if observed.memory:
            return "memory", observed.memory
        if observed.pids:
            return "pids", observed.pids
        return cpu_breach(observed.cpu_s, limits)

    return seen


def _observed(cgroup: CallCgroup | None, limits: Limits, rusage_cpu_s: float | None) -> Observed:
    if cgroup is None:
        return Observed(cpu_s=rusage_cpu_s)
    kills, refused = cgroup.oom_kills(), cgroup.forks_refused()
    memory = f"memory > {limits.memory_mb} MiB (processes, /tmp, /dev/shm): {kills} killed"
    pids = f"processes > {limits.max_pids}: {refused} fork(s) refused"
    return Observed(cpu_s=cgroup.cpu_s(), cpu_watched=True, memory=memory if kills else "",
                    pids=pids if refused else "")


def _scratch_mounts(limits: Limits) -> list[str]:
    """Memory-backed places a call can write: ``/tmp`` and ``/dev/shm``, each a tmpfs of at
    most ``memory_mb`` (their pages are charged to the call's memory cgroup, so together they
    count against ``memory_mb`` too), and ``/dev`` itself read-only (bwrap makes it an
    unbounded tmpfs)."""
    size = str(limits.memory_mb << 20)
    return ["--size", size, "--tmpfs", "/tmp", "--size", size, "--tmpfs", "/dev/shm", "--remount-ro", "/dev"]


class BwrapSession:
    backend = "bwrap"

    def __init__(self, workspace: Path, *, uid: int | None, bwrap: str, prlimit: str, setpriv: str = "setpriv",
                 system_binds: list[str] | None = None) -> None:
        self.workspace = workspace
        self._uid = uid
        self._bwrap, self._prlimit, self._setpriv = bwrap, prlimit, setpriv
        self._system_binds = list(system_binds) if system_binds is not None else _ro_system_binds()
        self._warm: dict[tuple, _Launch] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _argv(self, argv: list[str], limits: Limits, env: Mapping[str, str], cgroup: CallCgroup | None) -> list[str]:
        if cgroup is None:
            rlimits = rlimit_args(limits)
        else:  # the cgroup bounds memory, processes and CPU, and says when they were breached
            nproc = NPROC_BACKSTOP * (limits.max_pids + 1) + 2 * len(WARM_ARGV)  # + the warm bwrap/program pairs
            rlimits = rlimit_args(limits, address_space=False, nproc=nproc,
                                  cpu_s=cpu_limit_s(limits) + CPU_BACKSTOP_S)
        drop = ([] if self._uid is None else
                [self._setpriv, f"--reuid={self._uid}", f"--regid={self._uid}", "--clear-groups", "--"])
        sandbox = [self._bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--as-pid-1",
                   "--cap-drop", "ALL", "--hostname", "sandbox", *self._system_binds, "--proc", "/proc",
                   "--dev", "/dev", *_scratch_mounts(limits),
                   "--bind", str(self.workspace), WORKSPACE, "--remount-ro", "/", "--chdir", WORKSPACE, "--clearenv"]
        for k, v in env.items():
            sandbox += ["--setenv", k, v]
        full = [*drop, self._prlimit, *rlimits, "--", *sandbox, "--", *argv]
        return full if cgroup is None else cgroup.join_argv(full)

    def _start(self, argv: list[str], limits: Limits, env: Mapping[str, str]) -> _Launch:
        # One pid for bwrap, ``max_pids`` for the call (bwrap runs the command as the
        # namespace's pid 1, and reaps it).
        cgroup = CallCgroup.create(memory_limit_bytes=limits.memory_mb << 20, pids_max=limits.max_pids + 1)
        # env={} : bwrap's environment would show in /proc of the sandbox.
        return _Launch(spawn_soon(self._argv(argv, limits, env, cgroup), env={}), cgroup)

    def _take_warm(self, key: tuple) -> tuple[subprocess.Popen[bytes], CallCgroup | None] | None:
        with self._lock:
            launch = self._warm.pop(key, None)
        if launch is None:
            return None
        proc = started(launch.pending)
        if proc is None or proc.poll() is not None:
            launch.discard()
            return None
        return proc, launch.cgroup

    def prewarm(self, argv: list[str], limits: Limits, env: Mapping[str, str] | None = None) -> None:
        full_env = sandbox_env(env)
        key = (tuple(argv), limits, tuple(sorted(full_env.items())))
        with self._lock:
            if self._closed or key in self._warm:
                return
            self._warm[key] = self._start(argv, limits, full_env)

    def run(self, argv: list[str], *, stdin: bytes = b"", limits: Limits,
            env: Mapping[str, str] | None = None) -> RunResult:
        full_env = sandbox_env(env)
        key = (tuple(argv), limits, tuple(sorted(full_env.items())))
        taken = self._take_warm(key)
        if taken is None:
            launch = self._start(argv, limits, full_env)
            try:
                taken = (launch.pending.result(), launch.cgroup)
            except BaseException:
                launch.discard()
                raise
        proc, cgroup = taken
        try:
            ex = supervise(proc, stdin=stdin, limits=limits, kill=lambda: _kill(proc, cgroup),
                           watch=None if cgroup is None else _watch(cgroup, limits))
            seen = _observed(cgroup, limits, ex.cpu_s)
        finally:
            if cgroup is not None:
                cgroup.remove()
        if tuple(argv) in WARM_ARGV:
            self.prewarm(argv, limits, env)  # the next call of this kind starts warm
        killed, detail = (ex.killed, ex.detail) if ex.killed else attribute(ex.code, seen, limits)
        return RunResult(ex.code, ex.stdout, ex.stderr, ex.wall_s, killed, detail, self.backend, cpu_s=seen.cpu_s)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            warm, self._warm = list(self._warm.values()), {}
        for launch in warm:
            launch.discard()


class BwrapBackend:
    name = "bwrap"

    def __init__(self) -> None:
        self._bwrap: str | None = None
        self._prlimit: str | None = None
        self._setpriv: str | None = None
        self._system_binds: list[str] | None = None

    def check(self) -> None:
        self._bwrap = require_binary("bwrap", "bubblewrap", self.name)
        self._prlimit = require_binary("prlimit", "util-linux", self.name)
        if os.geteuid() == 0:  # only root switches to a sandbox uid
            self._setpriv = require_binary("setpriv", "util-linux", self.name)
        self._system_binds = _ro_system_binds()  # the host's layout, read once rather than per call
        REAPER.start()
        # --as-pid-1 and --size (a bounded /tmp) need bubblewrap 0.5 or later.
        probe = subprocess.run([self._bwrap, "--unshare-all", "--as-pid-1", *self._system_binds,
                                "--size", str(1 << 20), "--tmpfs", "/tmp", "--", "/bin/true"],
                               capture_output=True, env={}, timeout=30)
        if probe.returncode != 0:
            raise SandboxUnavailable(f"bwrap cannot create namespaces here: {probe.stderr[-300:].decode(errors='replace')}"
                                     " (are unprivileged user namespaces disabled? bubblewrap older than 0.5?)",
                                     code=ErrorCode.SANDBOX_UNAVAILABLE)

    def open(self, workspace: Path, *, workspace_mb: int, key: str = "") -> BwrapSession:
        if self._bwrap is None:
            self.check()
        uid = None
        if os.geteuid() == 0:
            uid = UID_BASE + zlib.crc32(f"{workspace}|{key}".encode()) % UID_SPAN
            os.chown(workspace, uid, uid)
            os.chmod(workspace, 0o700)
        return BwrapSession(workspace, uid=uid, bwrap=self._bwrap or "bwrap", prlimit=self._prlimit or "prlimit",
                            setpriv=self._setpriv or "setpriv", system_binds=self._system_binds)
