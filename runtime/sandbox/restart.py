"""What a restarted tool worker takes over from the process that died: which dispatches it must
refuse, and which workspaces it must remove.

The call ids a tool worker accepted are kept on its node's disk, so a restart cannot reopen a
replay. Invariant: a dispatch accepted by one incarnation of a tool-worker actor is refused by every
later incarnation (Ray restarts a crashed worker with an empty memory). Each accepted call id
is appended, with its deadline, before the tool runs; ``write`` has returned by then, so a
killed process (SIGKILL, the OOM killer) loses nothing: the page cache outlives it. A restarted
worker loads the ids whose deadline has not passed and refuses them.

Where the record cannot be trusted whole (the worker came back on another node, the machine
rebooted since it was written so its tail may be gone with the page cache, or it is damaged),
the restarted worker cannot know what its predecessor ran: it refuses every dispatch issued
before it started (deadline < start + the supervisor's call timeout), and takes only new ones.

Workspaces of a dead worker (tmpfs mounts, when it ran as root) outlive it and hold the agents'
files in memory: the worker notes its workspace root beside the record, and its successor
unmounts and removes what is under it, after checking the note names a directory of ours.
"""

from __future__ import annotations

import os
import stat
import subprocess
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, TextIO

from ..errors import DispatchRefused

COMPACT_LINES = 50_000  # rewrite the file (unexpired ids only) past this many lines


def boot_id() -> str:
    """This boot of this machine: a record written before a reboot may have lost its tail."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return "unknown"  # never equal to itself across a load: such a record counts as lost


class DispatchJournal:
    def __init__(self, path: Path | None, *, restarted: bool, call_timeout_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        now = clock()
        self._clock = clock
        self._path = path
        self._boot = boot_id()
        self._ids: dict[str, float] = {}  # call id -> deadline: accepted, not yet expired
        self.not_before_deadline = 0.0
        self.lost = False
        if path is not None and path.exists():
            self.lost = not self._load(path, now)
        elif restarted:
            self.lost = True
        if self.lost:  # what the predecessor ran is unknown: nothing issued before now is taken
            self.not_before_deadline = now + call_timeout_s
        self._lines = self._kept = 0
        self._file: TextIO | None = self._rewrite() if path is not None else None

    def _load(self, path: Path, now: float) -> bool:
        """The unexpired ids of earlier incarnations; False if the file cannot be trusted whole."""
        try:
            header, *lines = path.read_text(encoding="ascii").splitlines()
            if header != f"boot {self._boot}" or self._boot == "unknown":
                return False
            for line in lines:
                call_id, deadline = line.split(" ")
                if float(deadline) >= now:
                    self._ids[call_id] = float(deadline)
        except (OSError, ValueError, UnicodeDecodeError):
            self._ids.clear()
            return False
        return True

    def _rewrite(self) -> TextIO:
        """The file with only the unexpired ids (atomically replaced), open for appending."""
        assert self._path is not None
        self._path.parent.mkdir(parents=True, exist_ok=True)
        now = self._clock()
        self._ids = {c: d for c, d in self._ids.items() if d >= now}  # expired ids can no longer run
        tmp = self._path.with_name(self._path.name + ".tmp")
        tmp.write_text(f"boot {self._boot}\n" + "".join(f"{c} {d!r}\n" for c, d in self._ids.items()),
                       encoding="ascii")
        os.replace(tmp, self._path)
        self._lines = self._kept = len(self._ids)
        return open(self._path, "a", encoding="ascii")

    def admit(self, call_id: str, deadline: float) -> None:
        """Record a dispatch about to run; refuse one an earlier incarnation may have run."""
        if deadline < self.not_before_deadline:
            raise DispatchRefused("dispatch issued before this tool worker restarted, and its predecessor's "
                                  "record of the calls it ran is not here")
        if call_id in self._ids:
            raise DispatchRefused(f"dispatch {call_id} replayed (accepted before this tool worker restarted)")
        if self._file is None:
            return
        if not (call_id.isascii() and call_id.isprintable()) or " " in call_id:
            raise DispatchRefused("call id cannot be recorded")
        try:
            self._file.write(f"{call_id} {deadline!r}\n")
            self._file.flush()
            self._ids[call_id] = deadline
            self._lines += 1
            if self._lines - self._kept >= COMPACT_LINES:
                self._file.close()
                self._file = self._rewrite()
        except (OSError, ValueError) as exc:  # unrecorded means a restart could run it again: refuse
            raise DispatchRefused(f"cannot record the dispatch: {type(exc).__name__}") from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


WORKSPACES_PREFIX = "warden-ws-"


def workspace_root(note: Path | None) -> Path:
    """A fresh private directory for this worker's workspaces, named in ``note`` for a successor."""
    root = Path(tempfile.mkdtemp(prefix=WORKSPACES_PREFIX))
    if note is not None:
        note.parent.mkdir(parents=True, exist_ok=True)
        note.write_text(str(root), encoding="utf-8")
    return root


def reclaim_workspaces(note: Path) -> list[str]:
    """Unmount and remove the workspaces of the dead worker that wrote ``note``; returns what was
    removed. Only a directory of ours in the temp dir, named like ours, is touched: the note is a
    file in the run directory, and a path written there must not choose what gets deleted."""
    try:
        root = Path(note.read_text(encoding="utf-8").strip())
        info = os.lstat(root)
    except (OSError, ValueError):
        return []
    if (root.parent != Path(tempfile.gettempdir()) or not root.name.startswith(WORKSPACES_PREFIX)
            or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid()):
        return []
    removed = []
    for ws in sorted(root.iterdir()):
        if not ws.is_symlink() and os.path.ismount(ws):
            subprocess.run(["umount", "-l", str(ws)], capture_output=True, check=False, env={})
        removed.append(ws.name)
    shutil.rmtree(root, ignore_errors=True)
    return removed
