"""The call ids a tool worker accepted, on its node's disk, so a restart cannot reopen a replay.

Invariant: a dispatch accepted by one incarnation of a tool-worker actor is refused by every
later incarnation (Ray restarts a crashed worker with an empty memory). Each accepted call id
is appended, with its deadline, before the tool runs; ``write`` has returned by then, so a
killed process (SIGKILL, the OOM killer) loses nothing: the page cache outlives it. A restarted
worker loads the ids whose deadline has not passed and refuses them.

Where the record is not (the worker came back on another node, or the file is damaged), the
restarted worker cannot know what its predecessor ran: it refuses every dispatch issued before
it started (deadline < start + the supervisor's call timeout), and takes only new ones.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, TextIO

from ..errors import DispatchRefused


class DispatchJournal:
    def __init__(self, path: Path | None, *, restarted: bool, call_timeout_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        now = clock()
        self._earlier: dict[str, float] = {}  # call id -> deadline, accepted by an earlier incarnation
        self.not_before_deadline = 0.0
        self.lost = False
        if path is not None and path.exists():
            self.lost = not self._load(path, now)
        elif restarted:
            self.lost = True
        if self.lost:  # what the predecessor ran is unknown: nothing issued before now is taken
            self.not_before_deadline = now + call_timeout_s
        self._file: TextIO | None = self._open(path) if path is not None else None

    def _load(self, path: Path, now: float) -> bool:
        """The unexpired ids of earlier incarnations; False if the file cannot be trusted whole."""
        try:
            lines = path.read_text(encoding="ascii").splitlines()
            for line in lines:
                call_id, deadline = line.split(" ")
                if float(deadline) >= now:
                    self._earlier[call_id] = float(deadline)
        except (OSError, ValueError, UnicodeDecodeError):
            self._earlier.clear()
            return False
        return True

    def _open(self, path: Path) -> TextIO:
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = "".join(f"{c} {d!r}\n" for c, d in self._earlier.items())  # expired ids need no record
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(kept, encoding="ascii")
        os.replace(tmp, path)
        return open(path, "a", encoding="ascii")

    def admit(self, call_id: str, deadline: float) -> None:
        """Record a dispatch about to run; refuse one an earlier incarnation may have run."""
        if deadline < self.not_before_deadline:
            raise DispatchRefused("dispatch issued before this tool worker restarted, and its predecessor's "
                                  "record of the calls it ran is not here")
        if call_id in self._earlier:
            raise DispatchRefused(f"dispatch {call_id} replayed (run before this tool worker restarted)")
        if self._file is None:
            return
        if not call_id.isprintable() or " " in call_id or "\n" in call_id or not call_id.isascii():
            raise DispatchRefused("call id cannot be recorded")
        try:
            self._file.write(f"{call_id} {deadline!r}\n")
            self._file.flush()
        except (OSError, ValueError) as exc:  # unrecorded means a restart could run it again: refuse
            raise DispatchRefused(f"cannot record the dispatch: {type(exc).__name__}") from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
