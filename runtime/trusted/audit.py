"""Append-only, hash-chained audit log: no record, no call.

Invariant: every record ``AuditLog.record`` acknowledged (returned its seq) is in the log, in
order, chained to all records before it; ``verify`` reports any later edit of any byte,
deletion, reordering or truncation, of records or of whole segment files. A record that cannot
be written raises ``AuditUnavailable`` and the caller denies the call (write-ahead, fail closed).

Threat: someone with access to the host files (an operator covering tracks, a process outside
the sandboxes, a bad disk, a crash) changes what the log says happened. The chain is unkeyed,
so an attacker who rewrites the whole log *and* the head consistently is not caught: publish
``last_hash`` elsewhere (metrics, a remote store) to anchor it. Agents only choose field
values, which are size-capped and have secret-named keys redacted, so a model can neither
flood the log nor make it hold a credential; ``format_record`` escapes control characters so
a field cannot forge lines on a terminal.

Segments: segment 0 is the file ``<path>``, then come ``<path>.1``, ``<path>.2``, ... With
``rotate_bytes`` set, a record that would take the current segment past it starts the next
one (a segment holds at least one record). Seq and chain run on across segments, so the
segments concatenated are exactly a single-file log. Other files named ``<path>.<number>``
would be read as segments; archive old segments by copying, never by removing them. Each
segment is a sequence of frames and nothing else::

    frame  = length:u32 big-endian | body:length bytes | digest:32 bytes
    body   = msgpack map {"seq": int, "ts": float, "prev": bytes(32), "kind": str, **fields}
    digest = sha256(body)

``seq`` counts from 0 by one; ``prev`` is the previous record's digest (zeros for record 0),
and it is inside the body, so each digest covers the whole chain up to that record.

Head file ``<path>.head``, one per log, 48 bytes rewritten in place (pwrite at offset 0) after
each append; ``segment`` is the index of the segment holding the last record::

    head = b"WAH2" | segment:u32 | records:u64 | digest of the last record (zeros if none)

A chain that ends at record 9 looks like one whose last records or last segment were cut off;
the head tells them apart. Any other magic is rejected (``WAH1`` is the older single-file
head). The frame is written before the head, so a crash leaves the head behind the log, never
ahead: a head behind the log whose digest matches the record it names is accepted, and
brought up to date on open. Any chain problem, a missing segment, a head ahead of the log, or
no head beside a non-empty log makes ``AuditLog`` refuse to open.

fsync policy (``fsync=``; ``True`` means "always", ``False`` "never"). A process crash loses
nothing acknowledged under any policy; what survives a power loss or kernel crash::

    "never"   (default) what the OS had flushed. The head may reach the disk before the
              records it counts: the log then reports truncation and will not reopen.
    "rotate"  a segment and the head are fsync'd when the segment is closed (on rotation and
              on ``close``), before the next segment file is created and made durable in its
              directory: closed segments survive; the open one is as under "never".
    "always"  each record, then the head, is fsync'd before ``record`` returns: every
              acknowledged record survives and the head on disk is never ahead of the log.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import re
import struct
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Protocol, TextIO

import msgpack

from ..errors import AuditUnavailable

__all__ = ["FSYNC_POLICIES", "AuditChainError", "AuditFormatError", "AuditLog", "AuditSink",
           "VerifyReport", "export_jsonl", "filter_records", "format_record", "read_records",
           "segment_path", "verify"]

log = logging.getLogger(__name__)

ZERO_HASH = bytes(32)
MAX_RECORD_BYTES = 16 * 1024 * 1024
PREVIEW_LEN = 256
REDACTED = "[REDACTED]"
HEAD_MISSING = "head file missing: cannot rule out truncation"
FSYNC_POLICIES = ("never", "rotate", "always")
_HEAD = struct.Struct(">4sIQ32s")
_HEAD_MAGIC = b"WAH2"
_LEN = struct.Struct(">I")
_RESERVED = frozenset({"seq", "ts", "prev", "kind"})
_SECRET_WORDS = ("apikey", "token", "secret", "password", "passwd", "authorization",
                 "credential", "privatekey")
_ID_KEY = re.compile(r"(?:^|[_\-. ])ids?$|[a-z0-9](?:Id|ID)s?$")
_MAX_DEPTH = 64
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class AuditFormatError(ValueError):
    """The log is not a well-formed sequence of frames; ``offset`` is where it breaks."""

    def __init__(self, what: str, offset: int, *, partial: bool = False,
                 segment: str | None = None) -> None:
        super().__init__(f"{what} at byte {offset}" + (f" of {segment}" if segment else ""))
        self.what, self.offset, self.partial, self.segment = what, offset, partial, segment


class AuditSink(Protocol):
    """The seam the supervisor depends on; ``AuditLog`` is the real one."""

    def record(self, kind: str, **fields: Any) -> int: ...


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    records: int  # whole records whose digest, seq and chain link checked out
    first_bad_seq: int | None = None
    problem: str | None = None
    head_records: int | None = None  # what the head file claims (None: missing or corrupt)
    segments: int = 0  # segment files read in full (all of them when ok)
    segment: str | None = None  # file holding the first bad record, or the missing one


def _is_secret(key: str, value: Any) -> bool:
    norm = re.sub(r"[^a-z0-9]", "", key.lower())
    if not any(word in norm for word in _SECRET_WORDS):
        return False
    if _ID_KEY.search(key):  # token_id, keyId: identifiers are what the log is meant to carry
        return False
    # max_tokens=100 is a count, not a credential
    return not (norm.endswith("tokens") and type(value) is int)


def _scrub(value: Any, depth: int = 0) -> Any:
    """Plain msgpack-able copy of ``value`` with secret-named keys redacted at any depth."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"value nested deeper than {_MAX_DEPTH}")
    if isinstance(value, Enum):  # ErrorCode and friends are logged by value
        value = value.value
    if value is None or isinstance(value, (str, bool, int, float, bytes)):
        return value
    if isinstance(value, bytearray):
        return bytes(value)
    if isinstance(value, (list, tuple)):
        return [_scrub(v, depth + 1) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"dict key {k!r} is not a str")
            out[k] = REDACTED if _is_secret(k, v) else _scrub(v, depth + 1)
        return out
    raise TypeError(f"{type(value).__name__} is not an audit field type")


def _cap(value: Any, max_bytes: int) -> Any:
    packed = msgpack.packb(value, use_bin_type=True)
    if len(packed) <= max_bytes:
        return value
    preview = value if isinstance(value, (str, bytes)) else repr(value)
    return {"truncated": True, "bytes": len(packed),
            "sha256": hashlib.sha256(packed).hexdigest(), "preview": preview[:PREVIEW_LEN]}


def segment_path(path: str | os.PathLike[str], index: int) -> str:
    """File of segment ``index``: ``path`` itself for 0, else ``path.<index>``."""
    path = os.fspath(path)
    return path if index == 0 else f"{path}.{index}"


def _segment_indices(path: str) -> list[int]:
    """Indices of the segment files that exist, ascending (gaps included as gaps)."""
    directory, base = os.path.split(path)
    numbered = re.compile(re.escape(base) + r"\.([1-9][0-9]*)")
    found = sorted(int(m.group(1)) for name in os.listdir(directory or ".")
                   if (m := numbered.fullmatch(name)))
    return [0, *found] if os.path.exists(path) else found


class AuditLog:
    """The one writer of an audit log (an exclusive flock on segment 0 keeps out a second one).

    Thread-safe: ``record`` holds a lock from numbering to head update. After a failed append
    the log stays unavailable (a segment may end in a partial frame); reopening re-verifies and
    resumes in the last segment.
    """

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time,
                 fsync: bool | str = "never", max_field_bytes: int = 4096,
                 rotate_bytes: int | None = None) -> None:
        self.path = os.fspath(path)
        self._fsync = ("always" if fsync else "never") if isinstance(fsync, bool) else fsync
        if self._fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be a bool or one of {FSYNC_POLICIES}, not {fsync!r}")
        if rotate_bytes is not None and (type(rotate_bytes) is not int or rotate_bytes <= 0):
            raise ValueError(f"rotate_bytes must be a positive int or None, not {rotate_bytes!r}")
        self._clock, self._max_field_bytes, self._rotate_bytes = clock, max_field_bytes, rotate_bytes
        self._lock = threading.Lock()
        self._fd = self._head_fd = self._lock_fd = -1
        self._segment = self._segment_bytes = 0
        self._broken: str | None = None
        try:
            self._lock_fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._records, self._last_hash = self._resume()
        except Exception as exc:
            self._close_fds()
            if isinstance(exc, AuditUnavailable):
                raise
            why = "held by another writer" if isinstance(exc, BlockingIOError) else exc
            raise AuditUnavailable(f"cannot open audit log {self.path}: {why}") from exc

    def _resume(self) -> tuple[int, bytes]:
        report, last_hash, head_state = _scan(self.path)
        fresh = head_state == "missing" and report.records == 0
        if not report.ok and not fresh:
            raise AuditUnavailable(
                f"existing audit log {self.path} is not intact, refusing to append: {report.problem}")
        self._segment = report.segments - 1  # _scan saw every segment up to this one
        self._fd = os.open(segment_path(self.path, self._segment),
                           os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._segment_bytes = os.fstat(self._fd).st_size
        self._head_fd = os.open(f"{self.path}.head", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if head_state == "lags":
            log.warning("audit head of %s named %s of %d records (crash during an append?); "
                        "updating it", self.path, report.head_records, report.records)
        if head_state != "ok":
            self._write_head(report.records, last_hash)
        if fresh and self._fsync != "never":
            self._fsync_dir()
        return report.records, last_hash

    @property
    def last_seq(self) -> int:
        """Seq of the last record, -1 for an empty log."""
        return self._records - 1

    @property
    def last_hash(self) -> bytes:
        """Digest of the last record: publish it elsewhere to anchor the chain."""
        return self._last_hash

    @property
    def segment(self) -> int:
        """Index of the segment being appended to (see ``segment_path``)."""
        return self._segment

    def record(self, kind: str, **fields: Any) -> int:
        """Append one record and return its seq; raise ``AuditUnavailable`` if it is not written."""
        with self._lock:
            if self._broken or self._fd < 0:
                raise AuditUnavailable(self._broken or f"audit log {self.path} is closed")
            seq = self._records
            try:
                body = self._body(seq, kind, fields)
            except Exception as exc:
                raise AuditUnavailable(f"audit record {kind!r} rejected: {exc}") from exc
            digest = hashlib.sha256(body).digest()
            frame = _LEN.pack(len(body)) + body + digest
            try:
                if (self._rotate_bytes and self._segment_bytes
                        and self._segment_bytes + len(frame) > self._rotate_bytes):
                    self._rotate()
                written = os.write(self._fd, frame)
                if written != len(frame):
                    raise OSError(f"short write: {written} of {len(frame)} bytes")
                self._segment_bytes += written
                if self._fsync == "always":
                    os.fsync(self._fd)
                self._write_head(seq + 1, digest)
            except Exception as exc:
                # The segment may now end in a partial frame: appending more would break the chain.
                self._broken = f"audit log {self.path} unusable after failed append of record {seq}: {exc}"
                raise AuditUnavailable(self._broken) from exc
            self._records, self._last_hash = seq + 1, digest
            return seq

    def _rotate(self) -> None:
        """Close the current segment and continue in a new, empty next one."""
        if self._fsync == "rotate":  # "always" has synced both already
            os.fsync(self._fd)
            os.fsync(self._head_fd)
        nxt = segment_path(self.path, self._segment + 1)
        # O_EXCL: never append to a file this writer did not just create
        fd = os.open(nxt, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.close(self._fd)
        self._fd, self._segment, self._segment_bytes = fd, self._segment + 1, 0
        if self._fsync != "never":
            self._fsync_dir()

    def _fsync_dir(self) -> None:
        fd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _body(self, seq: int, kind: str, fields: dict[str, Any]) -> bytes:
        if not isinstance(kind, str) or not kind:
            raise ValueError("kind must be a non-empty str")
        if _RESERVED & fields.keys():
            raise ValueError(f"reserved field names {sorted(_RESERVED & fields.keys())}")
        rec = {"seq": seq, "ts": float(self._clock()), "prev": self._last_hash, "kind": kind}
        for k, v in fields.items():
            rec[k] = REDACTED if _is_secret(k, v) else _cap(_scrub(v), self._max_field_bytes)
        body = msgpack.packb(rec, use_bin_type=True)
        if len(body) > MAX_RECORD_BYTES:
            raise ValueError(f"record is {len(body)} bytes, limit {MAX_RECORD_BYTES}")
        return body

    def _write_head(self, records: int, digest: bytes) -> None:
        blob = _HEAD.pack(_HEAD_MAGIC, self._segment, records, digest)
        written = os.pwrite(self._head_fd, blob, 0)
        if written != len(blob):
            raise OSError(f"short head write: {written} of {len(blob)} bytes")
        if self._fsync == "always":
            os.fsync(self._head_fd)

    def _close_fds(self) -> None:
        fds, self._fd, self._head_fd, self._lock_fd = (self._fd, self._head_fd, self._lock_fd), -1, -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def close(self) -> None:
        """Close the log; under fsync="rotate" the open segment and the head are synced first."""
        with self._lock:
            try:
                if self._fsync == "rotate" and self._fd >= 0 and not self._broken:
                    os.fsync(self._fd)
                    os.fsync(self._head_fd)
            finally:
                self._close_fds()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _frames(f: BinaryIO, size: int) -> Iterator[tuple[int, bytes, bytes]]:
    offset = 0
    while offset < size:
        header = f.read(_LEN.size)
        if len(header) < _LEN.size:
            raise AuditFormatError("partial frame", offset, partial=True)
        (length,) = _LEN.unpack(header)
        if not 0 < length <= MAX_RECORD_BYTES:
            raise AuditFormatError(f"bad frame length {length}", offset)
        body, digest = f.read(length), f.read(32)
        if len(body) < length or len(digest) < 32:
            raise AuditFormatError("partial frame", offset, partial=True)
        yield offset, body, digest
        offset += _LEN.size + length + 32


def _decode(body: bytes, offset: int) -> dict[str, Any]:
    try:
        rec = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:
        raise AuditFormatError(f"undecodable record ({type(exc).__name__})", offset) from exc
    if not (isinstance(rec, dict) and type(rec.get("seq")) is int
            and isinstance(rec.get("ts"), (int, float)) and isinstance(rec.get("kind"), str)
            and isinstance(rec.get("prev"), bytes) and len(rec["prev"]) == 32):
        raise AuditFormatError("record without seq/ts/prev/kind", offset)
    return rec


def _read(path: str) -> Iterator[tuple[dict[str, Any], bytes]]:
    """(record, stored digest) from every segment file that exists, in segment order."""
    for index in sorted({0, *_segment_indices(path)}):  # a missing <path> raises, as it should
        seg = segment_path(path, index)
        with open(seg, "rb") as f:
            try:
                for offset, body, digest in _frames(f, os.fstat(f.fileno()).st_size):
                    yield _decode(body, offset), digest
            except AuditFormatError as exc:
                raise AuditFormatError(exc.what, exc.offset, partial=exc.partial, segment=seg) from exc


def read_records(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Yield each record, segment by segment in file order. Checks framing and decoding, not the
    chain (that is ``verify``): yields every good record, then raises ``AuditFormatError`` at the
    first bad frame."""
    return (rec for rec, _ in _read(os.fspath(path)))


def _read_head(path: str) -> tuple[int, int, bytes] | str:
    try:
        with open(f"{path}.head", "rb") as f:
            blob = f.read(_HEAD.size + 1)
    except FileNotFoundError:
        return HEAD_MISSING
    except OSError as exc:
        return f"head file unreadable: {exc}"
    if blob[:4] == b"WAH1":
        return "head file is format WAH1 (older single-file log); this version reads WAH2 only"
    if len(blob) != _HEAD.size or not blob.startswith(_HEAD_MAGIC):
        return f"head file corrupt ({len(blob)} bytes)"
    _, segment, records, digest = _HEAD.unpack(blob)
    return segment, records, digest


def _misplaced(n: int, seq: int, rest: Iterator[tuple[int, bytes, bytes]]) -> str:
    """Name the problem when record ``seq`` stands where record ``n`` should."""
    if seq < n:
        return f"record {n}: out of order (found record {seq} in its place)"
    try:  # look ahead (to the last segment) only to tell a move from a deletion; bad either way
        if any(_decode(body, off)["seq"] == n for off, body, _ in rest):
            return f"record {n}: out of order (record {seq} comes before it)"
    except (OSError, AuditFormatError) as exc:
        log.debug("look-ahead stopped: %s", exc)
    return f"record {n} missing: seq jumps {n - 1} -> {seq} (deleted)"


def _frames_after(path: str, k: int, last: int) -> Iterator[tuple[int, bytes, bytes]]:
    for j in range(k + 1, last + 1):
        with open(segment_path(path, j), "rb") as f:
            yield from _frames(f, os.fstat(f.fileno()).st_size)


def _scan(path: str) -> tuple[VerifyReport, bytes, str | None]:
    """Return (report, digest of the last good record, head state) where head state is
    ok / lags / missing / bad, or None when the chain already failed."""
    head = _read_head(path)  # before the log: a live writer only ever moves the log ahead
    head_segment, head_records = head[:2] if isinstance(head, tuple) else (0, None)
    n, prev, head_hash, head_hash_segment = 0, ZERO_HASH, ZERO_HASH, 0
    k = last = 0
    seg = path

    def bad(problem: str, seq: int | None) -> tuple[VerifyReport, bytes, str | None]:
        return VerifyReport(False, n, seq, problem, head_records, k, seg), prev, None

    try:
        present = _segment_indices(path)
        last = max([*present, head_segment])
        for k in range(last + 1):
            seg = segment_path(path, k)
            name = os.path.basename(seg)
            inside, start = (f" in {name}", f" at the start of {name}") if last else ("", "")
            if k not in present:
                return bad(f"segment {name} missing (deleted): record {n} onwards should be in it", n)
            with open(seg, "rb") as f:
                frames = _frames(f, os.fstat(f.fileno()).st_size)
                try:
                    for offset, body, digest in frames:
                        at = start if k and not offset else inside
                        if hashlib.sha256(body).digest() != digest:
                            return bad(f"record {n}: hash mismatch at byte {offset}{at} (edited)", n)
                        rec = _decode(body, offset)
                        if rec["seq"] != n:
                            rest = itertools.chain(frames, _frames_after(path, k, last))
                            return bad(_misplaced(n, rec["seq"], rest) + at, n)
                        if rec["prev"] != prev:
                            return bad(f"record {n}: does not chain to record {n - 1}{at} "
                                       f"(one of them was rewritten)", n)
                        prev, n = digest, n + 1
                        if n == head_records:
                            head_hash, head_hash_segment = digest, k
                except AuditFormatError as exc:
                    if exc.partial:
                        return bad(f"truncated: partial frame at byte {exc.offset}{inside}", n)
                    return bad(f"record {n}: {exc}{inside}", n)
    except Exception as exc:  # verify reports, it never raises
        return bad(f"cannot read log: {exc}", None)
    segments, seg = last + 1, segment_path(path, last)
    if isinstance(head, str):
        state = "missing" if head == HEAD_MISSING else "bad"
        return VerifyReport(False, n, None, head, None, segments), prev, state
    _, records, digest = head

    def bad_head(problem: str, seq: int | None) -> tuple[VerifyReport, bytes, str | None]:
        return VerifyReport(False, n, seq, problem, records, segments, seg), prev, "bad"

    if records > n:
        return bad_head(f"truncated: head says {records} records, log has {n}", n)
    if digest != head_hash:
        where = f"record {records - 1} (edited or replaced)" if records else "an empty log"
        return bad_head(f"head does not match {where}", records - 1 if records else None)
    if head_segment != head_hash_segment:
        return bad_head(f"head names segment {head_segment} but record {records - 1} is in "
                        f"segment {head_hash_segment}", records - 1)
    return (VerifyReport(True, n, None, None, records, segments), prev,
            "ok" if records == n else "lags")


def verify(path: str | os.PathLike[str]) -> VerifyReport:
    """Check every segment in order, and the head. Never raises: every failure is a reported
    problem, naming the first bad record (``first_bad_seq``) and its file (``segment``)."""
    try:
        return _scan(os.fspath(path))[0]
    except Exception as exc:
        return VerifyReport(False, 0, None, f"verify failed: {exc}")


def _short(value: Any, limit: int = 60) -> str:
    text = value.hex() if isinstance(value, bytes) else value if isinstance(value, str) else repr(value)
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _agent(rec: dict[str, Any]) -> Any:
    return rec.get("agent", rec.get("agent_id"))


def format_record(rec: dict[str, Any]) -> str:
    """One readable line: time (UTC, ISO), #seq, kind, agent, tool, decision, code, other fields."""
    try:
        when = datetime.fromtimestamp(rec["ts"], tz=timezone.utc).isoformat(timespec="milliseconds")
        when = when.replace("+00:00", "Z")
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        when = "?"
    parts = [when, f"#{_short(rec.get('seq', '?'))}", _short(rec.get("kind", "?"))]
    for key, value in (("agent", _agent(rec)), ("tool", rec.get("tool")),
                       ("decision", rec.get("decision")), ("code", rec.get("code"))):
        if value is not None:
            parts.append(f"{key}={_short(value)}")
    shown = _RESERVED | {"agent", "agent_id", "tool", "decision", "code"}
    parts += [f"{_short(k, 30)}={_short(v)}" for k, v in rec.items() if k not in shown]
    return " ".join(parts)


def _epoch(when: float | datetime | None) -> float | None:
    return when.timestamp() if isinstance(when, datetime) else when


def _matcher(agent: str | None = None, tool: str | None = None, decision: str | None = None,
             since: float | datetime | None = None, until: float | datetime | None = None,
             kind: str | None = None) -> Callable[[dict[str, Any]], bool]:
    lo, hi = _epoch(since), _epoch(until)

    def match(rec: dict[str, Any]) -> bool:
        ts = rec.get("ts", 0.0)
        return ((agent is None or _agent(rec) == agent) and (tool is None or rec.get("tool") == tool)
                and (decision is None or decision in (rec.get("decision"), rec.get("code")))
                and (kind is None or rec.get("kind") == kind)
                and (lo is None or ts >= lo) and (hi is None or ts < hi))
    return match


def filter_records(records: Iterable[dict[str, Any]], agent: str | None = None,
                   tool: str | None = None, decision: str | None = None,
                   since: float | datetime | None = None,
                   until: float | datetime | None = None,
                   kind: str | None = None) -> Iterator[dict[str, Any]]:
    """Records matching every given criterion; ``since`` inclusive, ``until`` exclusive
    (epoch seconds or aware datetimes). ``agent`` matches field ``agent`` or ``agent_id``;
    ``decision`` matches field ``decision`` ("allow", "deny") or ``code`` ("POLICY_DENIED")."""
    return filter(_matcher(agent, tool, decision, since, until, kind), records)


class AuditChainError(ValueError):
    """``export_jsonl`` refused a log that does not verify; ``report`` says why."""

    def __init__(self, path: str, report: VerifyReport) -> None:
        super().__init__(f"audit log {path} does not verify ({report.problem}); refusing to "
                         "export it (allow_broken=True exports what can be read)")
        self.report = report


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # JSON has no NaN or infinity
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {(k.hex() if isinstance(k, bytes) else k): _jsonable(v) for k, v in value.items()}
    return value


def export_jsonl(path: str | os.PathLike[str], out: TextIO, *, allow_broken: bool = False,
                 **filters: Any) -> int:
    """Write the records matching ``filters`` (the criteria of ``filter_records``) to ``out``
    as JSON Lines for a SIEM, and return how many were written. One object per record::

        {"seq": int, "ts": float, "prev": hex, "kind": str, "hash": hex, "fields": {...}}

    ``hash`` is the record's digest (the next record's ``prev``); bytes anywhere are hex.
    The log is verified first and ``AuditChainError`` raised if it does not verify, before
    anything is written; only the records verified are exported (not ones appended since).
    With ``allow_broken=True`` a broken log is exported up to its first unreadable frame.
    """
    path = os.fspath(path)
    match = _matcher(**filters)  # unknown filters fail here, before anything is written
    report = verify(path)
    if not report.ok and not allow_broken:
        raise AuditChainError(path, report)
    pairs = _read(path)
    if report.ok:
        pairs = itertools.islice(pairs, report.records)
    count = 0
    try:
        for rec, digest in pairs:
            if match(rec):
                fields = {k: v for k, v in rec.items() if k not in _RESERVED}
                line = {"seq": rec["seq"], "ts": rec["ts"], "prev": rec["prev"], "kind": rec["kind"],
                        "hash": digest, "fields": fields}
                out.write(json.dumps(_jsonable(line), allow_nan=False) + "\n")
                count += 1
    except AuditFormatError as exc:
        if report.ok:
            raise
        log.warning("export of broken audit log %s stopped: %s", path, exc)
    return count
