"""gVisor backend: each session gets its own user-space kernel, kept warm between calls.

Threat: the code that runs here is hostile. gVisor's Sentry implements the Linux system
calls itself, so that code never talks to the host kernel directly; what it can reach is
what the session's sandbox was given and nothing more.

Invariant: a session's sandbox is created through the official ``gvisor`` bindings with
no network (``network="none"``: only a private loopback, no DNS), a read-only root holding
only ``/usr``, ``/bin``, ``/lib*`` (read-only), a private ``/proc``, ``/dev`` and ``/tmp``,
the session's workspace read-write at ``/workspace``, and ``sandbox_env()`` as its only
environment. Its init is ``sleep infinity``; every call is one ``runsc exec`` into it,
so a call after the first pays no sandbox start-up. Two sessions never share a sandbox.

Each limit, the mechanism that enforces it, and what the worker observes to name it (never
the program's output or exit status; measured on Debian's runsc 20221219). The host cgroup
exists only when the worker runs as root (the bindings skip cgroups otherwise):

==============  ===========================================================  ==========
limit           mechanism                                                    reported
==============  ===========================================================  ==========
cpu_s           the sandbox cgroup's CPU time since the call began (its       "cpu"
                processes and the Sentry's work for them), read by the
                worker every 50 ms; over ``cpu_s`` it kills. RLIMIT_CPU
                inside stays as a backstop at ``CPU_BACKSTOP_FACTOR`` times
                the limit: gVisor's own CPU count, which the rlimit uses,
                ran up to twice as fast as the host's on a busy machine.
                Without a cgroup: RLIMIT_CPU at the limit, and no cause is
                named
memory_mb       the whole sandbox (processes, ``/tmp``, the Sentry) sits in    "memory"
                a host memory cgroup of ``memory_mb + SANDBOX_OVERHEAD_MB``
                (OCI ``linux.resources.memory``); breaching it kills the
                sandbox, and its ``oom_kill`` counter says so. Without a
                cgroup: RLIMIT_AS per process (MemoryError: the program's
                own failure, as far as the worker can tell)
max_pids        RLIMIT_NPROC, which the Sentry counts per uid across the      "pids"
                sandbox, so the resident init and warm processes are added,
                and one more: the worker counts the call's processes
                (``runsc ps``, every ``PIDS_WATCH_S``) and kills above
                ``max_pids``. A host pids cgroup is no use: it counts the
                Sentry's host threads and runsc cannot start under a small one
workspace_mb    the workspace tmpfs (ENOSPC), else RLIMIT_FSIZE per file      exit code
wall_s          ``supervise()``; the breach kills every process in the        "timeout"
                sandbox (``runsc kill --all``)
output bytes    ``supervise()``, killed the same way                          "output"
==============  ===========================================================  ==========

After a breach, or when a call leaves a process behind (anything still parented to the
sandbox's init once the call's own process has exited; an unreaped zombie counts too), every
process in the sandbox is killed at once and the sandbox is deleted in the background; the
next call creates a new one (the workspace persists on the host, ``/tmp`` does not). A
process left behind holding the call's stdout would otherwise also keep the call waiting.
The sandbox is created lazily, by ``prewarm()`` or the first ``run()``, because its memory
cgroup is sized from that call's limits; a call with a different ``memory_mb`` or
``max_pids`` gets a new sandbox. Deleting a sandbox waits until the Sentry and gofer are reaped (by this worker,
which is the subreaper of what runsc starts: see ``base.Reaper``, which reaps them at once while they are being
deleted); ``close()`` returns only when no runsc process of the session is left.

The rlimits are set by ``prlimit`` in every call, not once in the OCI spec
(``process.rlimits``): this runsc hands limits given that way to every process but never
arms the RLIMIT_CPU timer for them, so a busy loop would run on to the wall clock.

Start-up. The read-only system mounts are declared local to the sandbox (mount hints), so
the Sentry caches what it looked up there: a Python start-up does many such lookups. After a
call the next interpreter of its kind is started without the call waiting for it.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Mapping

from ..errors import ErrorCode, SandboxUnavailable
from . import cgroup
from .base import (REAPER, WARM_ARGV, WORKSPACE, Limits, Observed, RunResult, Watch, attribute, cpu_breach,
                   cpu_limit_s, require_binary, rlimit_args, sandbox_env, spawn, spawn_soon, started, supervise)

try:
    import gvisor
except ImportError:  # reported by check(), which names the package to install
    gvisor = None

MAX_WARM = len(WARM_ARGV)
# Processes of the sandbox's uid that are not the call's: init and the warm processes.
RESIDENT_PIDS = 1 + MAX_WARM
# Headroom in the sandbox's memory cgroup for the Sentry, the gofer and file caches.
SANDBOX_OVERHEAD_MB = 128
RUNSC_TIMEOUT_S = 30

# How often a running call's processes are counted (``runsc ps`` costs a runsc start).
PIDS_WATCH_S = 0.25
# Where the worker watches CPU time, RLIMIT_CPU inside is only a backstop this many times
# the limit: gVisor's own count, which the rlimit uses, runs ahead of the host's when busy
# (up to twice as fast here, at a load average of 30 on 2 cores).
CPU_BACKSTOP_FACTOR = 4
_PROBED: set[str] = set()  # runsc binaries that started a probe sandbox in this process


def _unavailable(reason: str) -> SandboxUnavailable:
    return SandboxUnavailable(f"gvisor sandbox unavailable: {reason}"[:800], code=ErrorCode.SANDBOX_UNAVAILABLE)


def _system_mount_hints(mounts: list[dict]) -> dict[str, str]:
    """Mark the read-only system mounts (``/usr``, ``/bin``, ``/lib*``) as seen by this sandbox only.

    runsc then caches what it looked up there instead of asking the gofer to revalidate every
    path on every access, which is most of what a Python start-up costs under gVisor. Only
    the mounts the sandbox cannot write get this: the workspace stays revalidated, because
    the worker writes into it from the host (``fs.write``). What the sandbox can reach, and
    that it cannot write there, is unchanged.
    """
    hints: dict[str, str] = {}
    for i, m in enumerate(mounts):
        if m.get("type") != "bind" or "ro" not in m.get("options", ()) or m.get("destination") == WORKSPACE:
            continue
        prefix = f"dev.gvisor.spec.mount.system{i}."
        hints.update({prefix + "source": m["source"], prefix + "type": "bind", prefix + "share": "container",
                      prefix + "options": "ro"})
    return hints


class _Sandbox(gvisor.Sandbox if gvisor is not None else object):  # type: ignore[misc]
    """The bindings' sandbox, plus what they do not do: a memory cgroup, kill-all, ps."""

    def __init__(self, *, runsc: str, memory_mb: int, runtime_dir: Path, max_pids: int = 0, **kwargs) -> None:
        self.runsc = runsc
        self.memory_mb = memory_mb
        # The Sentry keeps RLIMIT_NPROC per uid, for the whole sandbox: once a call lowered it,
        # a call with a higher ``max_pids`` cannot raise it again, so that call needs a new sandbox.
        self.max_pids = max_pids
        self.state_dir = str(runtime_dir / "state")
        self.broken = False  # set once its processes were killed; it is never used again
        super().__init__(runtime_dir=str(runtime_dir), **kwargs)
        self.cgroup = self.cgroup_dirs()

    def _create_bundle(self) -> str:
        bundle = super()._create_bundle()
        config = Path(bundle) / "config.json"
        spec = json.loads(config.read_text())
        spec["hostname"] = "sandbox"
        spec["process"]["noNewPrivileges"] = True
        spec["linux"]["cgroupsPath"] = f"/{self.id}"
        spec["linux"]["resources"] = {"memory": {"limit": (self.memory_mb + SANDBOX_OVERHEAD_MB) << 20}}
        spec.setdefault("annotations", {}).update(_system_mount_hints(spec["mounts"]))
        config.write_text(json.dumps(spec))
        return bundle

    def runsc_argv(self, *args: str) -> list[str]:
        return [self.runsc, "--root", self.state_dir, *args]

    def close(self) -> None:
        """The bindings' kill and ``delete --force``, which kills the Sentry and gofer and waits until they
        are gone: they are this worker's orphans (``base.Reaper``), reaped as soon as they die."""
        with REAPER.releasing(self._runsc_pids()):
            super().close()

    def _runsc_pids(self) -> list[int]:
        """The Sentry's and the gofer's pids, from runsc's state file (none where its format differs:
        the reaper's grace then applies, and closing takes a second or two longer)."""
        try:
            state = json.loads((Path(self.state_dir) / f"{self.id}_sandbox:{self.id}.state").read_text())
            pids = [state.get("goferPid"), state.get("sandbox", {}).get("pid")]
        except (OSError, ValueError, AttributeError):
            return []
        return [p for p in pids if type(p) is int and p > 1 and _runsc_child(p)]

    def kill_all(self) -> None:
        """SIGKILL every process in the sandbox; init dies with them, so the sandbox stops."""
        self.broken = True
        subprocess.run(self.runsc_argv("kill", "--all", self.id, "KILL"), capture_output=True, env={},
                       timeout=RUNSC_TIMEOUT_S)

    def strays(self) -> list[str] | None:
        """Processes that outlived the call that started them, or None if the sandbox is gone.

        A call's process is started by ``runsc exec`` (parent pid 0); anything it leaves
        behind is re-parented to init (pid 1).
        """
        ps = subprocess.run(self.runsc_argv("ps", self.id), capture_output=True, env={}, timeout=RUNSC_TIMEOUT_S)
        if ps.returncode != 0:
            return None
        rows = [line.split() for line in ps.stdout.decode(errors="replace").splitlines()[1:]]
        return [" ".join(r) for r in rows if len(r) >= 3 and r[1] != "1" and r[2] == "1"]

    def call_processes(self) -> int | None:
        """How many processes the running call has: its own (started by ``runsc exec``) and
        every descendant, wherever re-parented; None if the sandbox is gone. Init (pid 1) and
        the warm interpreters (also children of ``runsc exec``, parent pid 0) are not the call's."""
        ps = subprocess.run(self.runsc_argv("ps", self.id), capture_output=True, env={}, timeout=RUNSC_TIMEOUT_S)
        if ps.returncode != 0:
            return None
        rows = [line.split() for line in ps.stdout.decode(errors="replace").splitlines()[1:]]
        return 1 + sum(1 for r in rows if len(r) >= 3 and r[1] != "1" and r[2] != "0")

    def cgroup_dirs(self) -> "tuple[Path, Path] | None":
        """(memory, CPU) directories of the sandbox's host cgroup, or None if it has none
        (the bindings make one only as root)."""
        memory_dir, cpu_dir = cgroup.named(self.id)
        return (memory_dir, cpu_dir) if memory_dir.is_dir() else None

    def oom_killed(self) -> bool:
        """Whether the host killed the sandbox for breaching its memory cgroup."""
        return self.cgroup is not None and cgroup.oom_kills(self.cgroup[0]) > 0

    def cpu_s(self) -> float | None:
        """CPU seconds the whole sandbox (its processes and the gVisor kernel) has used so far."""
        return None if self.cgroup is None else cgroup.cpu_seconds(self.cgroup[1])


class GVisorSession:
    backend = "gvisor"

    def __init__(self, workspace: Path, *, runsc: str, prlimit: str) -> None:
        self.workspace = workspace
        self._runsc, self._prlimit = runsc, prlimit
        self._runtime_dir = Path(tempfile.mkdtemp(prefix="warden-gvisor-"))
        self._lock = threading.Lock()  # one call at a time: the stray sweep assumes it
        self._box: _Sandbox | None = None
        self._warm: dict[tuple, Future[subprocess.Popen[bytes]]] = {}  # started after a call, not waited for
        self._sweeper: threading.Thread | None = None
        self._retiring: list[threading.Thread] = []
        self._closed = False

    def _sandbox(self, limits: Limits) -> _Sandbox:
        if self._sweeper is not None:
            self._sweeper.join()
            self._sweeper = None
        if self._box is not None and (self._box.broken or self._box.memory_mb != limits.memory_mb
                                      or self._box.max_pids != limits.max_pids):
            self._retire()
        if self._box is None:
            try:
                self._box = _Sandbox(runsc=self._runsc, memory_mb=limits.memory_mb, max_pids=limits.max_pids,
                                     runtime_dir=self._runtime_dir,
                                     sandbox_id=f"warden-{secrets.token_hex(8)}", network="none",
                                     env=sandbox_env(None), mounts=[gvisor.Mount.bind(str(self.workspace), WORKSPACE)],
                                     working_dir=WORKSPACE)
            except (gvisor.Error, OSError, subprocess.SubprocessError) as e:
                raise _unavailable(f"runsc did not start the sandbox: {str(e)[-400:]}") from None
        return self._box

    def _retire(self) -> None:
        """Kill the current sandbox's processes and delete it in the background."""
        box, warm, sweeper = self._box, list(self._warm.values()), self._sweeper
        self._box, self._warm, self._sweeper = None, {}, None
        if box is None:
            return
        thread = threading.Thread(target=_destroy, args=(box, warm, sweeper), daemon=True)
        thread.start()
        self._retiring.append(thread)

    def _exec_argv(self, box: _Sandbox, argv: list[str], limits: Limits, env: Mapping[str, str]) -> list[str]:
        cmd = box.runsc_argv("exec", "--cwd", WORKSPACE)
        for k, v in env.items():
            cmd += ["--env", f"{k}={v}"]
        return [*cmd, box.id, self._prlimit, *_rlimits(limits, cgroup=box.cgroup is not None), "--", *argv]

    def _spawn(self, box: _Sandbox, argv: list[str], limits: Limits, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        return spawn(self._exec_argv(box, argv, limits, env), env={})

    def _take_warm(self, key: tuple) -> subprocess.Popen[bytes] | None:
        proc = started(self._warm.pop(key, None))
        if proc is not None and proc.poll() is not None:
            return None
        return proc

    def _prewarm(self, box: _Sandbox, key: tuple, argv: list[str], limits: Limits, env: Mapping[str, str]) -> None:
        if key in self._warm:
            return
        if len(self._warm) >= MAX_WARM:  # RESIDENT_PIDS assumes no more than this many
            oldest = started(self._warm.pop(next(iter(self._warm))))
            if oldest is not None:
                _stop(oldest)
        self._warm[key] = spawn_soon(self._exec_argv(box, argv, limits, env), env={})

    def prewarm(self, argv: list[str], limits: Limits, env: Mapping[str, str] | None = None) -> None:
        full_env = sandbox_env(env)
        with self._lock:
            if self._closed:
                return
            box = self._sandbox(limits)
            self._prewarm(box, _key(argv, limits, full_env), argv, limits, full_env)

    def run(self, argv: list[str], *, stdin: bytes = b"", limits: Limits,
            env: Mapping[str, str] | None = None) -> RunResult:
        full_env = sandbox_env(env)
        key = _key(argv, limits, full_env)
        with self._lock:
            if self._closed:
                raise _unavailable("the session is closed")
            box = self._sandbox(limits)
            proc = self._take_warm(key) or self._spawn(box, argv, limits, full_env)
            # Opened before anyone can reap the process, so the sweep cannot miss its exit.
            self._sweeper = threading.Thread(target=_sweep, args=(box, os.pidfd_open(proc.pid)), daemon=True)
            self._sweeper.start()

            def kill() -> None:
                try:
                    box.kill_all()
                except (OSError, subprocess.SubprocessError):
                    box.broken = True  # retired below; the bindings' close() kills it again
                _stop(proc, wait=False)

            cpu_before_s = box.cpu_s()
            try:
                ex = supervise(proc, stdin=stdin, limits=limits, kill=kill, watch=_watch(box, limits, cpu_before_s))
            except BaseException:
                kill()
                self._retire()
                raise
            seen = _observed(box, limits, cpu_before_s)
            killed, detail = (ex.killed, ex.detail) if ex.killed else attribute(ex.code, seen, limits)
            if killed is not None:
                if not box.broken:
                    box.kill_all()
                self._retire()
            elif tuple(argv) in WARM_ARGV and not box.broken:
                self._prewarm(box, key, argv, limits, full_env)  # the next call of this kind starts warm
        return RunResult(ex.code, ex.stdout, ex.stderr, ex.wall_s, killed, detail, self.backend, cpu_s=seen.cpu_s)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._retire()
            retiring, self._retiring = self._retiring, []
        for thread in retiring:
            thread.join()
        shutil.rmtree(self._runtime_dir, ignore_errors=True)


def _runsc_child(pid: int) -> bool:
    """Is ``pid`` a child of this worker that runsc re-executed (``exe``): not a pid since reused by a
    process someone here waits for."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.index("(") + 1:stat.rindex(")")] == "exe" and int(stat[stat.rindex(")") + 2:].split()[1]) == os.getpid()


def _key(argv: list[str], limits: Limits, env: Mapping[str, str]) -> tuple:
    return (tuple(argv), limits, tuple(sorted(env.items())))


def _rlimits(limits: Limits, *, cgroup: bool) -> list[str]:
    """One process over ``max_pids`` (the watch sees it and kills the call). Where the
    sandbox has a host cgroup, the worker enforces memory and CPU time from it and says when
    they were breached: no address-space limit then, and RLIMIT_CPU only as a backstop."""
    if not cgroup:
        return rlimit_args(limits, extra_pids=RESIDENT_PIDS + 1)
    return rlimit_args(limits, extra_pids=RESIDENT_PIDS + 1, address_space=False,
                       cpu_s=CPU_BACKSTOP_FACTOR * cpu_limit_s(limits) + 1)


def _stop(proc: subprocess.Popen[bytes], *, wait: bool = True) -> None:
    """Kill a ``runsc exec`` client. Only the sandbox's kill stops what it started inside."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if wait:
        proc.wait()


def _sweep(box: _Sandbox, pidfd: int) -> None:
    """Once a call's process has exited, kill the sandbox if anything it started lives on.

    Runs beside ``supervise()``: a leftover process holding the call's stdout would
    otherwise keep the output pipes open.
    """
    try:
        waiter = select.poll()
        waiter.register(pidfd, select.POLLIN)
        waiter.poll()
    finally:
        os.close(pidfd)
    if box.broken:
        return
    try:
        strays = box.strays()
    except (OSError, subprocess.SubprocessError):
        strays = None
    if strays is None or strays:
        try:
            box.kill_all()
        except (OSError, subprocess.SubprocessError):
            box.broken = True


def _destroy(box: _Sandbox, warm: list[Future[subprocess.Popen[bytes]]], sweeper: threading.Thread | None) -> None:
    try:
        box.kill_all()  # first: it ends the call the sweeper may still be waiting for
    except (OSError, subprocess.SubprocessError):
        pass  # close() below kills and deletes it again
    if sweeper is not None:
        sweeper.join()
    for pending in warm:
        proc = started(pending)
        if proc is not None:
            _stop(proc)
    box.close()  # the bindings' kill + delete --force; waits until the Sentry is reaped


def _memory_breach(limits: Limits) -> str:
    return f"sandbox memory > {limits.memory_mb} MiB + {SANDBOX_OVERHEAD_MB} MiB overhead"


def _watch(box: _Sandbox, limits: Limits, cpu_before_s: float | None) -> Watch:
    """What the worker looks at while a call runs: the memory cgroup, the sandbox's CPU time
    since the call began, and (every ``PIDS_WATCH_S``) how many processes the call has:
    RLIMIT_NPROC lets it have one more than ``max_pids``, so a breach can be seen."""
    next_count_at = [time.monotonic() + PIDS_WATCH_S]

    def seen() -> tuple[str, str] | None:
        observed = _observed(box, limits, cpu_before_s)
        if observed.memory:
            return "memory", observed.memory
        if (breach := cpu_breach(observed.cpu_s, limits)) is not None:
            return breach
        if time.monotonic() < next_count_at[0]:
            return None
        next_count_at[0] = time.monotonic() + PIDS_WATCH_S
        try:
            count = box.call_processes()
        except (OSError, subprocess.SubprocessError):
            return None
        if count is not None and count > limits.max_pids:
            return "pids", f"processes {count} > {limits.max_pids}"
        return None

    return seen


def _observed(box: _Sandbox, limits: Limits, cpu_before_s: float | None) -> Observed:
    """What the worker saw of a call: the memory cgroup, and the sandbox's CPU time since the
    call began (its processes and the gVisor kernel's work for them: gVisor's own count,
    which its RLIMIT_CPU uses, runs ahead of the host's on a busy machine)."""
    after = box.cpu_s()
    cpu_s = None if after is None or cpu_before_s is None else after - cpu_before_s
    return Observed(cpu_s=cpu_s, cpu_watched=cpu_s is not None,
                    memory=_memory_breach(limits) if box.oom_killed() else "")


class GVisorBackend:
    name = "gvisor"

    def __init__(self) -> None:
        self._runsc: str | None = None
        self._prlimit: str | None = None

    def check(self) -> None:
        runsc = require_binary("runsc", "runsc", self.name)
        prlimit = require_binary("prlimit", "util-linux", self.name)
        REAPER.start()  # runsc leaves its sandbox and gofer processes to us
        if gvisor is None:
            raise _unavailable("the Python bindings are missing; install the pip package 'gvisor' (pip install gvisor)")
        if runsc not in _PROBED:  # a probe costs a sandbox start and teardown (over a second)
            runtime_dir = Path(tempfile.mkdtemp(prefix="warden-gvisor-probe-"))
            try:
                probe = _Sandbox(runsc=runsc, memory_mb=64, runtime_dir=runtime_dir, network="none",
                                 sandbox_id=f"warden-probe-{secrets.token_hex(8)}", env=sandbox_env(None))
            except (gvisor.Error, OSError, subprocess.SubprocessError) as e:
                shutil.rmtree(runtime_dir, ignore_errors=True)
                raise _unavailable(f"runsc cannot start a sandbox here: {str(e)[-400:]}") from None

            def teardown() -> None:  # deleting a sandbox takes over a second here: not on the caller's path
                probe.close()
                shutil.rmtree(runtime_dir, ignore_errors=True)

            threading.Thread(target=teardown, name="warden-gvisor-probe-teardown", daemon=True).start()
            _PROBED.add(runsc)
        self._runsc, self._prlimit = runsc, prlimit

    def open(self, workspace: Path, *, workspace_mb: int, key: str = "") -> GVisorSession:
        """A session for one agent. ``key`` is accepted for parity with bwrap; every session
        has a kernel of its own, so there is no host uid to derive from it."""
        if self._runsc is None:
            self.check()
        return GVisorSession(workspace, runsc=self._runsc or "runsc", prlimit=self._prlimit or "prlimit")
