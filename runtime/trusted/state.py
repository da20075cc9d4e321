"""A supervisor shard's durable state: an append-only journal of what changed.

The supervisor appends one small msgpack frame per state change (a nonce accepted, a quota
reserved, settled or refunded, a revocation, a quarantine, a key added or retired) before
the change can matter to anyone: a nonce before the request is answered, a reservation
before the call is recorded allowed and dispatched. A restarted shard replays the journal and is where it was: no
budget reset, no nonce accepted twice, no revocation forgotten. Calls that were reserved
but never settled were in flight when the shard died; the supervisor closes them.

Each write is one ``write(2)``, so a killed process leaves at most one torn frame at the end,
which ``replay`` drops. A frame appended with ``defer`` (a nonce) waits for the next write (group
commit); the supervisor writes it before it answers: a crash loses only unanswered requests'.
Past ``compact_bytes`` the supervisor writes a snapshot frame into a fresh file, renamed over the old.

The file may hold key material (keys added by rotation): it is created 0600 and belongs
on the trusted node, next to the audit log.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator

import msgpack

log = logging.getLogger(__name__)


class StateJournal:
    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False,
                 compact_bytes: int = 16 << 20) -> None:
        self.path = os.fspath(path)
        self.compact_bytes = compact_bytes
        self._fsync = fsync
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self._fd).st_size
        self._held = b""  # deferred frames, not yet written

    def replay(self) -> Iterator[list[Any]]:
        """Every whole frame on file, in order; a torn last frame is cut off."""
        with open(self.path, "rb") as f:
            data = f.read()
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(data), 1 << 20))
        unpacker.feed(data)
        good = 0
        try:
            for frame in unpacker:
                if not isinstance(frame, list) or not frame:
                    raise ValueError(f"journal frame at byte {good} is not a list")
                good = unpacker.tell()
                yield frame
        except (msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError, ValueError) as exc:
            raise ValueError(f"state journal {self.path} corrupt at byte {good}: {exc}") from exc
        if good < len(data):
            log.warning("state journal %s: dropping a torn frame of %d bytes", self.path, len(data) - good)
            os.truncate(self.path, good)
            self.size = good

    def append(self, *frame: Any, defer: bool = False) -> None:
        """Write ``frame`` after any held ones (no frame: just those); ``defer``: hold it for the next write."""
        data = self._held + (msgpack.packb(frame, use_bin_type=True) if frame else b"")
        if defer or not data:
            self._held = data
            return
        written = os.write(self._fd, data)
        if written != len(data):
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")
        if self._fsync:
            os.fsync(self._fd)
        self._held = b""  # only once written: a failed write keeps the held frames for the next one
        self.size += written

    def compact(self, snapshot: list[Any]) -> None:
        """Replace the journal with one frame holding the whole state."""
        tmp = f"{self.path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            data = msgpack.packb(snapshot, use_bin_type=True)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        self._held = b""  # what they recorded is in the snapshot (a change is journaled after it is made)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        self.size, self.compact_bytes = len(data), max(self.compact_bytes, 2 * len(data))  # no rewrite per frame

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # a frame still held belongs to a request never answered: as in a crash
            self._fd = -1
