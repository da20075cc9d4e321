"""Append-only, hash-chained audit log: no record, no call.

Invariant: every record ``AuditLog.record`` acknowledged (returned its seq) is in the log, in
order, chained to all records before it; ``_scan`` (``runtime.auditlog.verify`` for people) finds any
later edit of any byte, deletion, reordering or truncation, of records or of whole segment files. A record that cannot
be written raises ``AuditUnavailable`` and the caller denies the call (write-ahead, fail closed).

Threat: someone with access to the host files (an operator covering tracks, a process outside
the sandboxes, a bad disk, a crash) changes what the log says happened. The chain is unkeyed,
so an attacker who rewrites the whole log *and* the head consistently is not caught: publish
``last_hash`` elsewhere (metrics, a remote store) to anchor it. Agents only choose field
values, which are size-capped, so a model cannot flood the log; what it writes is logged as
written, whatever its keys are called, so it cannot hide an argument either. Redacted (replaced
by its sha256) are only a top-level field the writing code names as a secret, and any string
holding a value passed to ``redact`` (the credentials the supervisor attaches to dispatches).

Segments: ``<path>``, then ``<path>.1``, ``<path>.2``, ... (a record that would take a segment
past ``rotate_bytes`` starts the next; seq and chain run on across them, so the segments
concatenated are a single-file log; archive old ones by copying, never by removing them). A
segment is frames and nothing else, ``prev`` being the previous record's digest (zeros first)::

    frame = length:u32 big-endian | body = msgpack {"seq", "ts", "prev", "kind", **fields} | sha256(body)
    head  = b"WAH2" | segment:u32 | records:u64 | digest of the last record   (file <path>.head)

The head is rewritten in place after each append, so a cut-off tail is told from a short log.
The frame is written first: a crash leaves the head behind the log (accepted if its digest
matches, and brought up to date on open), never ahead. Any chain problem, a missing segment, a
head ahead of the log, or no head beside a non-empty log makes ``AuditLog`` refuse to open:
appending after a cut would seal it into the chain.

fsync policy ``never`` (default), ``rotate`` (a segment and the head, when the segment closes) or
``always`` (each record, then the head): a process crash loses nothing acknowledged under any of
them; what a power loss keeps is in the README (*Operating a job*).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import re
import struct
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Protocol

import msgpack

from ..errors import AuditUnavailable

__all__ = ["FSYNC_POLICIES", "AuditFormatError", "AuditLog", "AuditSink", "VerifyReport", "segment_path"]

log = logging.getLogger(__name__)

ZERO_HASH = bytes(32)
MAX_RECORD_BYTES = 16 * 1024 * 1024
PREVIEW_LEN = 256
HEAD_MISSING = "head file missing: cannot rule out truncation"
FSYNC_POLICIES = ("never", "rotate", "always")
_HEAD = struct.Struct(">4sIQ32s")
_HEAD_MAGIC = b"WAH2"
_LEN = struct.Struct(">I")
RESERVED = frozenset({"seq", "ts", "prev", "kind"})
_SECRET_WORDS = ("apikey", "token", "secret", "password", "passwd", "authorization",
                 "credential", "privatekey")
_ID_KEY = re.compile(r"(?:^|[_\-. ])ids?$|[a-z0-9](?:Id|ID)s?$")
_MAX_DEPTH = 64


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


@functools.lru_cache(maxsize=1024)  # field names: the writing code's, a small set
def _is_secret(key: str, is_int: bool) -> bool:
    """A field the writing code named as a secret, whatever its type (counters like max_tokens aside)."""
    norm = re.sub(r"[^a-z0-9]", "", key.lower())
    if not any(word in norm for word in _SECRET_WORDS):
        return False
    if _ID_KEY.search(key):  # token_id, keyId: identifiers are what the log is meant to carry
        return False
    return not (norm.endswith("tokens") and is_int)


def _redacted(value: Any) -> dict[str, Any]:
    """What stands in for a secret: its hash, to match it against a value known elsewhere."""
    return {"redacted": True, "sha256": hashlib.sha256(msgpack.packb(value, use_bin_type=True)).hexdigest()}


def _scrub(value: Any, secrets: tuple[str, ...] = (), depth: int = 0) -> Any:
    """Plain msgpack-able copy of ``value``; a string holding one of ``secrets`` is redacted. Keys
    nested in a field are chosen by whoever filled it (a model, for tool arguments): never a reason."""
    if (kind := type(value)) is str or value is None or kind is int or kind is float or kind is bool:  # most
        return _redacted(value) if kind is str and secrets and any(s in value for s in secrets) else value
    if depth > _MAX_DEPTH:
        raise ValueError(f"value nested deeper than {_MAX_DEPTH}")
    if isinstance(value, Enum):  # ErrorCode and friends are logged by value
        value = value.value
    if isinstance(value, (str, bytes, bytearray)):
        value = bytes(value) if isinstance(value, bytearray) else value
        hit = any((s if isinstance(value, str) else s.encode()) in value for s in secrets)
        return _redacted(value) if hit else value
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_scrub(v, secrets, depth + 1) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("dict keys must be str")
        return {k: _scrub(v, secrets, depth + 1) for k, v in value.items()}
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
        self._secrets: tuple[str, ...] = ()
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

    def redact(self, values: Iterable[str]) -> None:
        """Values never to store (credentials): a string holding one is replaced by its hash."""
        with self._lock:
            self._secrets = tuple(sorted({*self._secrets, *(v for v in values if isinstance(v, str) and v)}))

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
        if RESERVED & fields.keys():
            raise ValueError(f"reserved field names {sorted(RESERVED & fields.keys())}")
        rec = {"seq": seq, "ts": float(self._clock()), "prev": self._last_hash, "kind": kind}
        for k, v in fields.items():
            v = _scrub(v, self._secrets)
            rec[k] = _redacted(v) if _is_secret(k, type(v) is int) else v
        body = msgpack.packb(rec, use_bin_type=True)
        if len(body) > self._max_field_bytes:  # else no field can be over the cap: each is packed inside body
            for k in fields:
                rec[k] = _cap(rec[k], self._max_field_bytes)
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
                        if rec["seq"] != n:  # deleted or moved: runtime.auditlog.verify tells which
                            return bad(f"record {n}: record {rec['seq']} in its place{at}", n)
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
