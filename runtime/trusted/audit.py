"""Append-only, hash-chained audit log: no record, no call.

Invariant: every record ``AuditLog.record`` acknowledged (returned its seq) is in the file, in
order, chained to all records before it; ``verify`` reports any later edit of any byte,
deletion, reordering or truncation. A record that cannot be written raises ``AuditUnavailable``
and the caller denies the call (write-ahead, fail closed).

Threat: someone with access to the host file (an operator covering tracks, a process outside
the sandboxes, a bad disk, a crash) changes what the log says happened. The chain is unkeyed,
so an attacker who rewrites the whole file *and* the head consistently is not caught: publish
``last_hash`` elsewhere (metrics, a remote store) to anchor it. Agents only choose field
values, which are size-capped and have secret-named keys redacted, so a model can neither
flood the log nor make it hold a credential; ``format_record`` escapes control characters so
a field cannot forge lines on a terminal.

Log file ``<path>``, a sequence of frames and nothing else::

    frame  = length:u32 big-endian | body:length bytes | digest:32 bytes
    body   = msgpack map {"seq": int, "ts": float, "prev": bytes(32), "kind": str, **fields}
    digest = sha256(body)

``seq`` counts from 0 by one; ``prev`` is the previous record's digest (zeros for record 0),
and it is inside the body, so each digest covers the whole chain up to that record.

Head file ``<path>.head``, 44 bytes rewritten in place (pwrite at offset 0) after each append::

    head = b"WAH1" | records:u64 big-endian | digest of the last record (zeros if none)

A chain that ends at record 9 looks like one whose records 10 and 11 were cut off; the head
tells them apart. The frame is written (and fsync'd, with ``fsync=True``) before the head, so
a crash leaves the head behind the file, never ahead: a head behind the file whose digest
matches the record it names is accepted, and brought up to date on open. Any chain problem,
a head ahead of the file, or no head beside a non-empty log makes ``AuditLog`` refuse to open.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import struct
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Protocol

import msgpack

from ..errors import AuditUnavailable

__all__ = ["AuditFormatError", "AuditLog", "AuditSink", "VerifyReport",
           "filter_records", "format_record", "read_records", "verify"]

log = logging.getLogger(__name__)

ZERO_HASH = bytes(32)
MAX_RECORD_BYTES = 16 * 1024 * 1024
PREVIEW_LEN = 256
REDACTED = "[REDACTED]"
HEAD_MISSING = "head file missing: cannot rule out truncation"
_HEAD = struct.Struct(">4sQ32s")
_HEAD_MAGIC = b"WAH1"
_LEN = struct.Struct(">I")
_RESERVED = frozenset({"seq", "ts", "prev", "kind"})
_SECRET_WORDS = ("apikey", "token", "secret", "password", "passwd", "authorization",
                 "credential", "privatekey")
_ID_KEY = re.compile(r"(?:^|[_\-. ])ids?$|[a-z0-9](?:Id|ID)s?$")
_MAX_DEPTH = 64
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class AuditFormatError(ValueError):
    """The log is not a well-formed sequence of frames; ``offset`` is where it breaks."""

    def __init__(self, what: str, offset: int, *, partial: bool = False) -> None:
        super().__init__(f"{what} at byte {offset}")
        self.offset, self.partial = offset, partial


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


class AuditLog:
    """The one writer of an audit log file (an exclusive flock keeps out a second one).

    Thread-safe: ``record`` holds a lock from numbering to head update. After a failed append
    the log stays unavailable (the file may end in a partial frame); reopening re-verifies.
    """

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time,
                 fsync: bool = False, max_field_bytes: int = 4096) -> None:
        self.path = os.fspath(path)
        self._clock, self._fsync, self._max_field_bytes = clock, fsync, max_field_bytes
        self._lock = threading.Lock()
        self._fd = self._head_fd = -1
        self._broken: str | None = None
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
        self._head_fd = os.open(f"{self.path}.head", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if head_state == "lags":
            log.warning("audit head of %s named %s of %d records (crash during an append?); "
                        "updating it", self.path, report.head_records, report.records)
        if head_state != "ok":
            self._write_head(report.records, last_hash)
        return report.records, last_hash

    @property
    def last_seq(self) -> int:
        """Seq of the last record, -1 for an empty log."""
        return self._records - 1

    @property
    def last_hash(self) -> bytes:
        """Digest of the last record: publish it elsewhere to anchor the chain."""
        return self._last_hash

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
                written = os.write(self._fd, frame)
                if written != len(frame):
                    raise OSError(f"short write: {written} of {len(frame)} bytes")
                if self._fsync:
                    os.fsync(self._fd)
                self._write_head(seq + 1, digest)
            except Exception as exc:
                # The file may now end in a partial frame: appending more would break the chain.
                self._broken = f"audit log {self.path} unusable after failed append of record {seq}: {exc}"
                raise AuditUnavailable(self._broken) from exc
            self._records, self._last_hash = seq + 1, digest
            return seq

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
        blob = _HEAD.pack(_HEAD_MAGIC, records, digest)
        written = os.pwrite(self._head_fd, blob, 0)
        if written != len(blob):
            raise OSError(f"short head write: {written} of {len(blob)} bytes")
        if self._fsync:
            os.fsync(self._head_fd)

    def _close_fds(self) -> None:
        fds, self._fd, self._head_fd = (self._fd, self._head_fd), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def close(self) -> None:
        with self._lock:
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


def read_records(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Yield each record in file order. Checks framing and decoding, not the chain (that is
    ``verify``): yields every good record, then raises ``AuditFormatError`` at the first bad frame."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for offset, body, _ in _frames(f, size):
            yield _decode(body, offset)


def _read_head(path: str) -> tuple[int, bytes] | str:
    try:
        with open(f"{path}.head", "rb") as f:
            blob = f.read(_HEAD.size + 1)
    except FileNotFoundError:
        return HEAD_MISSING
    except OSError as exc:
        return f"head file unreadable: {exc}"
    if len(blob) != _HEAD.size or not blob.startswith(_HEAD_MAGIC):
        return f"head file corrupt ({len(blob)} bytes)"
    _, records, digest = _HEAD.unpack(blob)
    return records, digest


def _misplaced(n: int, seq: int, rest: Iterator[tuple[int, bytes, bytes]]) -> str:
    """Name the problem when record ``seq`` stands where record ``n`` should."""
    if seq < n:
        return f"record {n}: out of order (found record {seq} in its place)"
    try:  # look ahead only to tell a move from a deletion; the log is bad either way
        if any(_decode(body, off)["seq"] == n for off, body, _ in rest):
            return f"record {n}: out of order (record {seq} comes before it)"
    except AuditFormatError as exc:
        log.debug("look-ahead stopped: %s", exc)
    return f"record {n} missing: seq jumps {n - 1} -> {seq} (deleted)"


def _scan(path: str) -> tuple[VerifyReport, bytes, str | None]:
    """Return (report, digest of the last good record, head state) where head state is
    ok / lags / missing / bad, or None when the chain already failed."""
    head = _read_head(path)  # before the log: a live writer only ever moves the file ahead
    head_records = head[0] if isinstance(head, tuple) else None
    n, prev, head_hash = 0, ZERO_HASH, ZERO_HASH

    def bad(problem: str, seq: int | None) -> tuple[VerifyReport, bytes, str | None]:
        return VerifyReport(False, n, seq, problem, head_records), prev, None

    try:
        with open(path, "rb") as f:
            frames = _frames(f, os.fstat(f.fileno()).st_size)
            try:
                for offset, body, digest in frames:
                    if hashlib.sha256(body).digest() != digest:
                        return bad(f"record {n}: hash mismatch at byte {offset} (edited)", n)
                    rec = _decode(body, offset)
                    if rec["seq"] != n:
                        return bad(_misplaced(n, rec["seq"], frames), n)
                    if rec["prev"] != prev:
                        return bad(f"record {n}: does not chain to record {n - 1} "
                                   f"(one of them was rewritten)", n)
                    prev, n = digest, n + 1
                    if n == head_records:
                        head_hash = digest
            except AuditFormatError as exc:
                if exc.partial:
                    return bad(f"truncated: partial frame at byte {exc.offset}", n)
                return bad(f"record {n}: {exc}", n)
    except Exception as exc:  # verify reports, it never raises
        return bad(f"cannot read log: {exc}", None)
    if isinstance(head, str):
        state = "missing" if head == HEAD_MISSING else "bad"
        return VerifyReport(False, n, None, head), prev, state
    records, digest = head
    if records > n:
        return VerifyReport(False, n, n, f"truncated: head says {records} records, file has {n}",
                            records), prev, "bad"
    if digest != head_hash:
        where = f"record {records - 1} (edited or replaced)" if records else "an empty log"
        return VerifyReport(False, n, records - 1 if records else None,
                            f"head does not match {where}", records), prev, "bad"
    return VerifyReport(True, n, None, None, records), prev, "ok" if records == n else "lags"


def verify(path: str | os.PathLike[str]) -> VerifyReport:
    """Check the whole log and its head. Never raises: every failure is a reported problem."""
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


def filter_records(records: Iterable[dict[str, Any]], agent: str | None = None,
                   tool: str | None = None, decision: str | None = None,
                   since: float | datetime | None = None,
                   until: float | datetime | None = None) -> Iterator[dict[str, Any]]:
    """Records matching every given criterion; ``since`` inclusive, ``until`` exclusive
    (epoch seconds or aware datetimes). ``agent`` matches field ``agent`` or ``agent_id``."""
    lo, hi = _epoch(since), _epoch(until)
    for rec in records:
        ts = rec.get("ts", 0.0)
        if ((agent is None or _agent(rec) == agent) and (tool is None or rec.get("tool") == tool)
                and (decision is None or rec.get("decision") == decision)
                and (lo is None or ts >= lo) and (hi is None or ts < hi)):
            yield rec
