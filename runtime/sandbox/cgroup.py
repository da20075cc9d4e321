"""One host cgroup per sandboxed process tree: the kernel's count of its memory and processes.

Threat: the code in the tree is hostile and lies. It can print ``MemoryError``, exit with any
status (137, 152) or kill itself with any signal, so none of that says which limit, if any,
it ran into. A cgroup's own counters do: ``oom_kill`` counts the processes the kernel killed
for breaching the memory limit, ``pids.events``' ``max`` counts the forks it refused at the
process limit. The tree cannot write to them (they belong to root on the host, and the
sandbox sees none of the host's cgroup file system).

Invariant: a ``CallCgroup`` is created before its process is started, the process joins it
before it runs anything of the call's (``join_argv``: a shell that writes its own pid into
``cgroup.procs`` and then execs the rest), so every descendant is inside from its first
instruction; it is removed once nothing lives in it.

Where cgroups cannot be made (not root; a cgroup v2 tree whose controllers are not
delegated to us), ``CallCgroup.create`` returns None and the caller falls back to rlimits,
whose breaches it cannot attribute (see ``base.attribute``).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
# A shell that moves itself into each cgroup given, then becomes the command: Python cannot
# start a child inside a cgroup without fork + preexec_fn, which costs in proportion to the
# worker's memory (see ``base.spawn``).
_JOIN_SH = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n - 1)); done; exec "$@"'
_RMDIR_TRIES = 20

_log = logging.getLogger(__name__)
_warned: set[str] = set()


def _layout() -> str | None:
    """``"v1"`` (separate memory, pids and cpuacct hierarchies), ``"v2"`` (unified) or None."""
    if all((ROOT / c).is_dir() for c in ("memory", "pids", "cpuacct")):
        return "v1"
    controllers = ROOT / "cgroup.controllers"
    if controllers.exists() and {"memory", "pids"} <= set(controllers.read_text().split()):
        return "v2"
    return None


def counter(path: Path, name: str) -> int:
    """The value of ``name`` in a flat-keyed cgroup file (``memory.events``, ``pids.events``); 0 if absent."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cpu_seconds(directory: Path) -> float | None:
    """CPU seconds used by everything that ever ran in a cgroup directory (v1 ``cpuacct`` or
    v2): the scheduler's exact figure, not the tick samples rlimits are checked against."""
    try:
        return int((directory / "cpuacct.usage").read_text()) / 1e9
    except (OSError, ValueError):
        pass
    stat = directory / "cpu.stat"
    return counter(stat, "usage_usec") / 1e6 if stat.exists() else None


def named(cgroup_name: str) -> "tuple[Path, Path]":
    """(memory directory, CPU directory) of the cgroup ``/cgroup_name`` that runsc made, either layout."""
    if (ROOT / "memory" / cgroup_name).is_dir():
        return ROOT / "memory" / cgroup_name, ROOT / "cpuacct" / cgroup_name
    return ROOT / cgroup_name, ROOT / cgroup_name


def oom_kills(memory_dir: Path) -> int:
    """Processes the kernel killed for breaching the memory limit of the cgroup."""
    return max(counter(memory_dir / "memory.oom_control", "oom_kill"),  # v1
               counter(memory_dir / "memory.events", "oom_kill"))       # v2


def owned_prefix(prefix: str) -> str:
    """``prefix`` with this process's pid: ``remove_orphans`` can tell whose cgroups outlived their owner."""
    return f"{prefix}-{os.getpid()}"


def remove_orphans(prefix: str) -> int:
    """Remove the empty cgroups named ``owned_prefix(prefix)`` by processes that are gone (a worker killed
    before it could remove its own); how many. A cgroup in use cannot be removed (the kernel refuses), and
    a live owner's are never touched."""
    layout = _layout() if os.geteuid() == 0 else None
    parents = [ROOT / c for c in ("memory", "pids", "cpuacct")] if layout == "v1" else [ROOT] if layout else []
    removed = 0
    for parent in parents:
        try:
            names = [n for n in os.listdir(parent) if n.startswith(prefix + "-")]
        except OSError:
            continue
        for name in names:
            owner = name[len(prefix) + 1:].split("-", 1)[0]
            if not owner.isdigit() or os.path.exists(f"/proc/{owner}"):
                continue
            try:
                (parent / name).rmdir()
                removed += 1
            except OSError:
                continue  # still holds a process, or another sweep was first
    return removed


@dataclass
class CallCgroup:
    """A memory, a pids and a CPU-accounting cgroup (one directory on v2, three on v1) for one
    process tree."""

    memory_dir: Path
    pids_dir: Path
    cpu_dir: Path
    memory_limit_bytes: int
    pids_max: int

    @classmethod
    def create(cls, *, memory_limit_bytes: int, pids_max: int, prefix: str = "warden-bwrap") -> "CallCgroup | None":
        layout = _layout() if os.geteuid() == 0 else None
        if layout is None:
            return None
        name = f"{prefix}-{secrets.token_hex(8)}"
        if layout == "v1":
            group = cls(ROOT / "memory" / name, ROOT / "pids" / name, ROOT / "cpuacct" / name,
                        memory_limit_bytes, pids_max)
        else:
            group = cls(ROOT / name, ROOT / name, ROOT / name, memory_limit_bytes, pids_max)
        try:
            group._make(layout)
        except OSError as exc:
            group.remove()
            if layout not in _warned:
                _warned.add(layout)
                _log.warning("warden: no cgroup for sandboxes (%s): %s; limits fall back to rlimits", layout, exc)
            return None
        return group

    def _make(self, layout: str) -> None:
        if layout == "v2":
            (ROOT / "cgroup.subtree_control").write_text("+memory +pids")
        for d in self._dirs():
            d.mkdir()
        if layout == "v1":
            (self.memory_dir / "memory.limit_in_bytes").write_text(str(self.memory_limit_bytes))
            (self.memory_dir / "memory.swappiness").write_text("0")
        else:
            (self.memory_dir / "memory.max").write_text(str(self.memory_limit_bytes))
            (self.memory_dir / "memory.swap.max").write_text("0")
        (self.pids_dir / "pids.max").write_text(str(self.pids_max))

    def join_argv(self, argv: list[str]) -> list[str]:
        """``argv``, started inside this cgroup."""
        procs = [str(d / "cgroup.procs") for d in self._dirs()]
        return ["/bin/sh", "-c", _JOIN_SH, "sh", str(len(procs)), *procs, *argv]

    def _dirs(self) -> list[Path]:
        return list(dict.fromkeys((self.memory_dir, self.pids_dir, self.cpu_dir)))

    def cpu_s(self) -> float | None:
        return cpu_seconds(self.cpu_dir)

    def oom_kills(self) -> int:
        return oom_kills(self.memory_dir)

    def forks_refused(self) -> int:
        return counter(self.pids_dir / "pids.events", "max")

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.pids_dir / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    def kill(self) -> None:
        """SIGKILL every process inside (a tree whose parent was killed may not have noticed yet)."""
        for pid in self.pids():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass

    def remove(self) -> bool:
        """Remove the cgroup once it is empty; False if something still lives in it."""
        for attempt in range(_RMDIR_TRIES):
            try:
                for d in self._dirs():
                    if d.exists():
                        d.rmdir()
                return True
            except OSError:
                # A killed process leaves its cgroup a moment after its parent saw it die.
                self.kill()
                time.sleep(0.01 * (attempt + 1))
        _log.warning("warden: cgroup %s still busy; left behind", self.pids_dir.name)
        return False
