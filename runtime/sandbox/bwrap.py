"""bubblewrap backend: Linux namespaces plus rlimits, the fastest isolation we have.

Each command runs as::

    setpriv (uid) -> prlimit (cpu, as, nproc, fsize, nofile, core) -> bwrap --unshare-all ... -> argv

started with an empty environment, as an unprivileged host uid of its own (when the worker
runs as root; ``setpriv`` switches real, effective and saved ids and drops supplementary
groups and every capability before anything else runs), in a new session. bwrap gives it
new user, pid, network, ipc, uts and cgroup namespaces, a read-only ``/usr`` (with the
usual ``/bin``, ``/lib`` links), a private
``/proc``, ``/dev`` and ``/tmp``, and the session's workspace at ``/workspace``; nothing
else of the host file system exists inside. ``--die-with-parent`` and the pid namespace
mean that killing bwrap kills every process the command started.

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
import subprocess
import threading
import zlib
from concurrent.futures import Future
from pathlib import Path
from typing import Mapping

from ..errors import ErrorCode, SandboxUnavailable
from .base import (WARM_ARGV, WORKSPACE, Limits, RunResult, classify_exit, require_binary, rlimit_args,
                   sandbox_env, spawn, spawn_soon, started, supervise)

UID_BASE = 200_000
UID_SPAN = 100_000


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


class BwrapSession:
    backend = "bwrap"

    def __init__(self, workspace: Path, *, uid: int | None, bwrap: str, prlimit: str, setpriv: str = "setpriv",
                 system_binds: list[str] | None = None) -> None:
        self.workspace = workspace
        self._uid = uid
        self._bwrap, self._prlimit, self._setpriv = bwrap, prlimit, setpriv
        self._system_binds = list(system_binds) if system_binds is not None else _ro_system_binds()
        self._warm: dict[tuple, Future[subprocess.Popen[bytes]]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _argv(self, argv: list[str], limits: Limits, env: Mapping[str, str]) -> list[str]:
        rlimits = rlimit_args(limits)
        drop = ([] if self._uid is None else
                [self._setpriv, f"--reuid={self._uid}", f"--regid={self._uid}", "--clear-groups", "--"])
        sandbox = [self._bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
                   "--hostname", "sandbox", *self._system_binds, "--proc", "/proc", "--dev", "/dev",
                   "--tmpfs", "/tmp", "--bind", str(self.workspace), WORKSPACE, "--remount-ro", "/",
                   "--chdir", WORKSPACE, "--clearenv"]
        for k, v in env.items():
            sandbox += ["--setenv", k, v]
        return [*drop, self._prlimit, *rlimits, "--", *sandbox, "--", *argv]

    def _spawn(self, argv: list[str], limits: Limits, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        # env={} : bwrap itself is pid 1 of the sandbox, so its own environment shows in /proc/1/environ.
        return spawn(self._argv(argv, limits, env), env={})

    def _take_warm(self, key: tuple) -> subprocess.Popen[bytes] | None:
        with self._lock:
            pending = self._warm.pop(key, None)
        proc = started(pending)
        if proc is not None and proc.poll() is not None:
            return None
        return proc

    def prewarm(self, argv: list[str], limits: Limits, env: Mapping[str, str] | None = None) -> None:
        full_env = sandbox_env(env)
        key = (tuple(argv), limits, tuple(sorted(full_env.items())))
        with self._lock:
            if self._closed or key in self._warm:
                return
            self._warm[key] = spawn_soon(self._argv(argv, limits, full_env), env={})

    def run(self, argv: list[str], *, stdin: bytes = b"", limits: Limits,
            env: Mapping[str, str] | None = None) -> RunResult:
        full_env = sandbox_env(env)
        key = (tuple(argv), limits, tuple(sorted(full_env.items())))
        proc = self._take_warm(key) or self._spawn(argv, limits, full_env)
        code, out, err, wall, killed, detail = supervise(proc, stdin=stdin, limits=limits)
        if tuple(argv) in WARM_ARGV:
            self.prewarm(argv, limits, env)  # the next call of this kind starts warm
        if killed is None:
            killed, detail = classify_exit(code, err, limits)
        return RunResult(code, out, err, wall, killed, detail, self.backend)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            warm, self._warm = list(self._warm.values()), {}
        for pending in warm:
            proc = started(pending)
            if proc is None:
                continue
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            proc.wait()


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
        probe = subprocess.run([self._bwrap, "--unshare-all", *self._system_binds, "--", "/bin/true"],
                               capture_output=True, env={}, timeout=30)
        if probe.returncode != 0:
            raise SandboxUnavailable(f"bwrap cannot create namespaces here: {probe.stderr[-300:].decode(errors='replace')}"
                                     " (are unprivileged user namespaces disabled?)",
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
