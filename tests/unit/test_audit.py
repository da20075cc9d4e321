"""The audit log finds every edit, deletion, reordering and truncation, and fails closed."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import struct
import threading
from datetime import datetime, timezone

import msgpack
import pytest

from runtime.cli import main
from runtime.errors import AuditUnavailable, ErrorCode
from runtime.auditlog import AuditChainError, export_jsonl, filter_records, format_record
from runtime.trusted import audit
from runtime.trusted.audit import AuditFormatError, AuditLog, segment_path
from runtime.auditlog import verify
from runtime.auditlog import read_records


class FakeClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def make_log(path, n: int = 5, **kw) -> None:
    with AuditLog(path, clock=FakeClock(), **kw) as log:
        for i in range(n):
            log.record("call", agent=f"agent-{i % 2}", tool="fs.read", decision="allow",
                       args={"path": f"data/payload-{i}"})


def frames(path) -> list[tuple[int, int]]:
    """(start, end) byte range of each frame in the log."""
    data, out, off = path.read_bytes(), [], 0
    while off < len(data):
        (length,) = struct.unpack(">I", data[off:off + 4])
        out.append((off, off + 4 + length + 32))
        off = out[-1][1]
    return out


def flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def log_path(tmp_path):
    path = tmp_path / "audit.log"
    make_log(path)
    return path


def test_clean_log_verifies_and_reads_back(log_path):
    report = verify(log_path)
    assert report == audit.VerifyReport(True, 5, None, None, 5, 1)
    recs = list(read_records(log_path))
    assert [r["seq"] for r in recs] == [0, 1, 2, 3, 4]
    assert recs[0]["prev"] == bytes(32)
    assert recs[3]["args"] == {"path": "data/payload-3"}
    assert recs[1]["kind"] == "call" and recs[1]["agent"] == "agent-1"


def test_empty_log_verifies(tmp_path):
    AuditLog(tmp_path / "a.log").close()
    assert verify(tmp_path / "a.log").ok


def _region_offset(path, rec: int, region: str) -> int:
    start, end = frames(path)[rec]
    body = path.read_bytes()[start + 4:end - 32]
    if region == "length":
        return start + 3
    if region == "digest":
        return end - 1
    if region == "seq":
        return start + 4 + body.index(b"\xa3seq") + 4
    if region == "prev":  # inside the hash chain link
        return start + 4 + body.index(b"\xa4prev") + 5 + 2 + 10
    if region == "field":
        return start + 4 + body.index(f"payload-{rec}".encode()) + 3
    raise AssertionError(region)


@pytest.mark.parametrize("rec", [0, 2, 4])
@pytest.mark.parametrize("region", ["length", "seq", "prev", "field", "digest"])
def test_single_byte_flip_is_found_and_located(log_path, rec, region):
    flip(log_path, _region_offset(log_path, rec, region))
    report = verify(log_path)
    assert not report.ok
    assert report.first_bad_seq == rec
    assert report.records == rec
    assert f"record {rec}" in report.problem or "truncated" in report.problem


def test_flip_in_body_is_reported_as_edit(log_path):
    flip(log_path, _region_offset(log_path, 2, "field"))
    assert verify(log_path).problem.startswith("record 2: hash mismatch")
    assert "(edited)" in verify(log_path).problem


def test_every_single_byte_flip_is_found(tmp_path):
    path = tmp_path / "a.log"
    make_log(path, n=3)
    clean = path.read_bytes()
    for rec, (start, end) in enumerate(frames(path)):
        for offset in range(start, end):
            path.write_bytes(clean)
            flip(path, offset)
            report = verify(path)
            assert not report.ok and report.first_bad_seq == rec, (offset, report)


def test_head_file_edit_is_found(log_path):
    head = log_path.with_name("audit.log.head")
    for offset in range(len(head.read_bytes())):
        saved = head.read_bytes()
        flip(head, offset)
        assert not verify(log_path).ok, offset
        head.write_bytes(saved)
    assert verify(log_path).ok


def _cut(path, keep_ranges) -> None:
    data = path.read_bytes()
    path.write_bytes(b"".join(data[s:e] for s, e in keep_ranges))


def test_deleted_middle_record(log_path):
    ranges = frames(log_path)
    _cut(log_path, ranges[:2] + ranges[3:])
    report = verify(log_path)
    assert not report.ok and report.first_bad_seq == 2
    assert report.problem == "record 2 missing: seq jumps 1 -> 3 (deleted)"


def test_deleted_first_record(log_path):
    _cut(log_path, frames(log_path)[1:])
    report = verify(log_path)
    assert report.first_bad_seq == 0 and "(deleted)" in report.problem


@pytest.mark.parametrize("a,b", [(1, 2), (0, 4), (3, 4)])
def test_swapped_records(log_path, a, b):
    ranges = frames(log_path)
    ranges[a], ranges[b] = ranges[b], ranges[a]
    _cut(log_path, ranges)
    report = verify(log_path)
    assert not report.ok and report.first_bad_seq == a
    assert report.problem.startswith(f"record {a}: out of order")


def test_duplicated_record(log_path):
    ranges = frames(log_path)
    _cut(log_path, ranges[:3] + [ranges[1]] + ranges[3:])
    report = verify(log_path)
    assert report.first_bad_seq == 3 and "out of order" in report.problem


@pytest.mark.parametrize("into", [1, 3, 20, -1])
def test_truncated_mid_frame(log_path, into):
    start, end = frames(log_path)[3]
    cut = start + into if into > 0 else end + into
    log_path.write_bytes(log_path.read_bytes()[:cut])
    report = verify(log_path)
    assert not report.ok and report.first_bad_seq == 3 and report.records == 3
    assert report.problem == f"truncated: partial frame at byte {start}"


def test_truncated_whole_trailing_records_caught_by_head(log_path):
    _cut(log_path, frames(log_path)[:3])
    report = verify(log_path)
    assert not report.ok and report.first_bad_seq == 3 and report.records == 3
    assert report.problem == "truncated: head says 5 records, log has 3"


def test_rechained_replacement_of_last_record_caught_by_head(log_path):
    # A self-consistent forgery: same prev, new body, digest recomputed. Only the head sees it.
    start, end = frames(log_path)[-1]
    data = log_path.read_bytes()
    rec = msgpack.unpackb(data[start + 4:end - 32], raw=False)
    rec["decision"] = "deny"
    body = msgpack.packb(rec, use_bin_type=True)
    log_path.write_bytes(data[:start] + struct.pack(">I", len(body)) + body
                         + hashlib.sha256(body).digest())
    report = verify(log_path)
    assert not report.ok and report.first_bad_seq == 4 and report.records == 5
    assert report.problem == "head does not match record 4 (edited or replaced)"


def test_rechained_edit_in_the_middle_breaks_the_next_link(log_path):
    start, end = frames(log_path)[2]
    data = log_path.read_bytes()
    rec = msgpack.unpackb(data[start + 4:end - 32], raw=False)
    rec["tool"] = "shell.exec"
    body = msgpack.packb(rec, use_bin_type=True)
    log_path.write_bytes(data[:start] + struct.pack(">I", len(body)) + body
                         + hashlib.sha256(body).digest() + data[end:])
    report = verify(log_path)
    assert not report.ok and report.first_bad_seq == 3
    assert report.problem.startswith("record 3: does not chain to record 2")


def test_missing_head_is_a_problem_but_chain_is_checked(log_path):
    log_path.with_name("audit.log.head").unlink()
    report = verify(log_path)
    assert not report.ok and report.records == 5 and report.first_bad_seq is None
    assert report.problem == "head file missing: cannot rule out truncation"
    flip(log_path, _region_offset(log_path, 1, "field"))
    assert verify(log_path).first_bad_seq == 1  # chain problems come first


def test_reopen_continues_the_chain(log_path):
    with AuditLog(log_path, clock=FakeClock()) as log:
        assert log.last_seq == 4
        assert log.record("outcome", agent="agent-0", tool="fs.read", bytes_out=12) == 5
        assert log.record("outcome", agent="agent-1", tool="fs.read", bytes_out=3) == 6
        last = log.last_hash
    report = verify(log_path)
    assert report.ok and report.records == 7
    assert [r["seq"] for r in read_records(log_path)] == list(range(7))
    body = log_path.read_bytes()[frames(log_path)[-1][0] + 4:-32]
    assert hashlib.sha256(body).digest() == last


def test_head_behind_file_is_accepted_and_repaired(log_path):
    head = log_path.with_name("audit.log.head")
    end = frames(log_path)[3][1]
    stale = struct.pack(">4sIQ32s", b"WAH2", 0, 4, log_path.read_bytes()[end - 32:end])
    head.write_bytes(stale)  # as after a crash between writing record 4 and the head
    report = verify(log_path)
    assert report.ok and report.head_records == 4 and report.records == 5
    with AuditLog(log_path) as log:
        assert log.record("call") == 5
    assert verify(log_path).head_records == 6


@pytest.mark.parametrize("damage", ["flip", "truncate_frame", "drop_records", "no_head", "swap"])
def test_corrupt_existing_log_refuses_to_open(log_path, damage):
    ranges = frames(log_path)
    if damage == "flip":
        flip(log_path, _region_offset(log_path, 2, "field"))
    elif damage == "truncate_frame":
        log_path.write_bytes(log_path.read_bytes()[:-5])
    elif damage == "drop_records":
        _cut(log_path, ranges[:3])
    elif damage == "no_head":
        log_path.with_name("audit.log.head").unlink()
    else:
        ranges[1], ranges[2] = ranges[2], ranges[1]
        _cut(log_path, ranges)
    before = log_path.read_bytes()
    with pytest.raises(AuditUnavailable) as err:
        AuditLog(log_path)
    assert err.value.code is ErrorCode.AUDIT_UNAVAILABLE
    assert "refusing to append" in err.value.reason
    assert log_path.read_bytes() == before


def test_second_writer_is_refused(log_path):
    with AuditLog(log_path):
        with pytest.raises(AuditUnavailable, match="another writer"):
            AuditLog(log_path)
    AuditLog(log_path).close()


def test_unwritable_fd_raises_and_stays_unavailable(tmp_path):
    log = AuditLog(tmp_path / "a.log")
    log.record("call")
    # Put the read end of a pipe where the log fd was (closing it outright would let the
    # number be reused by another file): every write now fails with EBADF.
    read_end, write_end = os.pipe()
    os.dup2(read_end, log._fd)
    os.close(read_end)
    os.close(write_end)
    with pytest.raises(AuditUnavailable, match="failed append of record 1") as err:
        log.record("call", agent="a")
    assert err.value.code is ErrorCode.AUDIT_UNAVAILABLE
    with pytest.raises(AuditUnavailable):
        log.record("call", agent="a")
    log.close()
    assert verify(tmp_path / "a.log").ok


def test_oserror_on_write_raises_audit_unavailable(tmp_path, monkeypatch):
    log = AuditLog(tmp_path / "a.log")
    log.record("call")

    def no_space(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit.os, "write", no_space)
    with pytest.raises(AuditUnavailable, match="No space left") as err:
        log.record("call")
    assert err.value.code is ErrorCode.AUDIT_UNAVAILABLE
    monkeypatch.undo()
    with pytest.raises(AuditUnavailable):  # no appending after a failed append
        log.record("call")
    log.close()


def test_short_write_raises(tmp_path, monkeypatch):
    log = AuditLog(tmp_path / "a.log")
    real_write = os.write
    monkeypatch.setattr(audit.os, "write", lambda fd, data: real_write(fd, data[:3]))
    with pytest.raises(AuditUnavailable, match="short write"):
        log.record("call")
    monkeypatch.undo()
    log.close()
    assert "partial frame" in verify(tmp_path / "a.log").problem
    with pytest.raises(AuditUnavailable):
        AuditLog(tmp_path / "a.log")


def test_head_write_failure_raises_then_reopen_recovers(tmp_path, monkeypatch):
    log = AuditLog(tmp_path / "a.log")
    log.record("call")

    def fail(fd, data, offset):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(audit.os, "pwrite", fail)
    with pytest.raises(AuditUnavailable, match="Input/output error"):
        log.record("call")
    monkeypatch.undo()
    log.close()
    with AuditLog(tmp_path / "a.log") as log:
        assert log.last_seq == 1
    assert verify(tmp_path / "a.log").ok


def test_fsync_mode_writes_a_valid_log(tmp_path):
    make_log(tmp_path / "a.log", n=3, fsync=True)
    assert verify(tmp_path / "a.log").records == 3


def _hash(value) -> dict:
    return {"redacted": True, "sha256": hashlib.sha256(msgpack.packb(value, use_bin_type=True)).hexdigest()}


def test_secret_named_fields_are_redacted_whatever_their_type(tmp_path):
    path = tmp_path / "a.log"
    with AuditLog(path) as log:
        log.record("call", api_key="sk-top", password=48213907, secret=[7, 7, 7], client_secret={"pin": 1234},
                   auth_token=0.5, privateKey=b"pk-bytes", token_id="tok-123", max_tokens=100, total_tokens=7,
                   apiKeyId="k1", token_ids=["t1", "t2"])
    rec = next(read_records(path))
    for name, value in [("api_key", "sk-top"), ("password", 48213907), ("secret", [7, 7, 7]),
                        ("client_secret", {"pin": 1234}), ("auth_token", 0.5), ("privateKey", b"pk-bytes")]:
        assert rec[name] == _hash(value), name  # gone, but a known value can be matched by its hash
    assert rec["token_id"] == "tok-123" and rec["apiKeyId"] == "k1" and rec["token_ids"] == ["t1", "t2"]
    assert rec["max_tokens"] == 100 and rec["total_tokens"] == 7  # counters, not credentials
    raw = path.read_bytes()
    assert b"sk-top" not in raw and b"pk-bytes" not in raw and msgpack.packb(48213907) not in raw


def test_keys_inside_a_field_are_logged_as_written(tmp_path):
    # A model chooses the keys of its arguments: naming one "token" must not hide it from the log.
    path = tmp_path / "a.log"
    args = {"token": "exfiltrated-data", "headers": {"Authorization": "not-a-credential"},
            "items": [{"PASSWORD": "hunter2"}], "nested": {"deeper": {"clientSecret": b"raw"}}}
    with AuditLog(path) as log:
        log.record("decision", args=args)
    assert next(read_records(path))["args"] == args


def test_values_given_to_redact_are_redacted_at_any_depth(tmp_path):
    path = tmp_path / "a.log"
    with AuditLog(path) as log:
        log.redact(["sk-live-4242", "", None])  # empty and non-str values are ignored
        log.record("outcome", reason="HTTP 401 for header Bearer sk-live-4242",
                   args={"q": ["ok", {"h": b"x-sk-live-4242-y"}], "n": 4242})
    rec = next(read_records(path))
    assert rec["reason"] == _hash("HTTP 401 for header Bearer sk-live-4242")
    assert rec["args"] == {"q": ["ok", {"h": _hash(b"x-sk-live-4242-y")}], "n": 4242}
    assert b"sk-live" not in path.read_bytes()


def test_oversized_field_is_replaced_by_a_marker(tmp_path):
    path = tmp_path / "a.log"
    big = "x" * 10_000
    with AuditLog(path, max_field_bytes=1024) as log:
        log.record("outcome", small="ok", output=big, blob=b"\x00" * 2000,
                   args={"data": "y" * 2000}, password="sk-hidden" * 300)
    rec = next(read_records(path))
    assert rec["small"] == "ok"
    packed = msgpack.packb(big, use_bin_type=True)
    assert rec["output"] == {"truncated": True, "bytes": len(packed),
                             "sha256": hashlib.sha256(packed).hexdigest(), "preview": "x" * 256}
    assert rec["blob"]["preview"] == b"\x00" * 256 and rec["blob"]["truncated"]
    assert rec["args"]["truncated"] and isinstance(rec["args"]["preview"], str)
    assert rec["password"] == _hash("sk-hidden" * 300)  # redaction happens before the cap
    assert b"sk-hidden" not in path.read_bytes()
    assert verify(path).ok


@pytest.mark.parametrize("fields", [
    {"seq": 3}, {"prev": b""}, {"args": {1: "int key"}}, {"args": {"s": {1, 2}}},
    {"obj": object()}, {"n": 2**70},
])
def test_bad_fields_are_rejected_and_log_stays_usable(tmp_path, fields):
    path = tmp_path / "a.log"
    with AuditLog(path) as log:
        with pytest.raises(AuditUnavailable, match="rejected"):
            log.record("call", **fields)
        assert log.record("call", ok=True) == 0
    assert verify(path).ok


def test_enum_values_are_logged_by_value(tmp_path):
    with AuditLog(tmp_path / "a.log") as log:
        log.record("decision", decision="deny", code=ErrorCode.POLICY_DENIED,
                   detail={"codes": [ErrorCode.RATE_LIMITED]})
    rec = next(read_records(tmp_path / "a.log"))
    assert rec["code"] == "POLICY_DENIED" and rec["detail"] == {"codes": ["RATE_LIMITED"]}


def test_bad_kind_is_rejected(tmp_path):
    with AuditLog(tmp_path / "a.log") as log:
        with pytest.raises(AuditUnavailable):
            log.record("")


def test_closed_log_refuses_records(tmp_path):
    log = AuditLog(tmp_path / "a.log")
    log.close()
    log.close()
    with pytest.raises(AuditUnavailable, match="closed"):
        log.record("call")


def test_concurrent_records_form_one_chain(tmp_path):
    path = tmp_path / "a.log"
    with AuditLog(path) as log:
        def work(t: int) -> None:
            for i in range(50):
                log.record("call", agent=f"a{t}", i=i)
        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert verify(path) == audit.VerifyReport(True, 400, None, None, 400, 1)


@pytest.mark.parametrize("seed", range(8))
def test_verify_on_garbage_reports_without_raising(tmp_path, seed):
    rng = random.Random(seed)
    path = tmp_path / "g.log"
    path.write_bytes(rng.randbytes(rng.choice([1, 3, 4, 40, 500, 5000])))
    if seed % 2:
        path.with_name("g.log.head").write_bytes(rng.randbytes(44))
    report = verify(path)
    assert not report.ok and report.problem
    with pytest.raises(AuditFormatError):
        list(read_records(path))
    with pytest.raises(AuditUnavailable):
        AuditLog(path)


def test_verify_on_plausible_frames_with_garbage_bodies(tmp_path):
    path = tmp_path / "g.log"
    body = msgpack.packb([1, 2, 3])
    path.write_bytes(struct.pack(">I", len(body)) + body + hashlib.sha256(body).digest())
    report = verify(path)
    assert not report.ok and report.first_bad_seq == 0 and "record 0:" in report.problem


def test_verify_missing_or_unreadable_path(tmp_path):
    assert not verify(tmp_path / "nope.log").ok
    assert not verify(tmp_path).ok  # a directory


def test_format_record_is_one_escaped_line():
    rec = {"seq": 7, "ts": 0.5, "prev": bytes(32), "kind": "call", "agent": "a1",
           "tool": "fs.read", "decision": "deny", "code": "POLICY_DENIED",
           "reason": "evil\nfake line\x1b[31m", "args": {"path": "ab" * 100}}
    line = format_record(rec)
    assert "\n" not in line and "\x1b" not in line
    assert line.startswith("1970-01-01T00:00:00.500Z #7 call agent=a1 tool=fs.read "
                           "decision=deny code=POLICY_DENIED reason=evil\\x0afake line\\x1b[31m")
    assert "prev=" not in line and len(line) < 250
    assert format_record({"kind": "x"}).startswith("? #? x")


def test_filter_records():
    recs = [{"seq": i, "ts": 100.0 + i, "kind": "call", "agent_id" if i % 2 else "agent": f"a{i % 2}",
             "tool": "t" if i < 3 else "u", "decision": "allow" if i % 3 else "deny"}
            for i in range(6)]
    seqs = lambda **kw: [r["seq"] for r in filter_records(recs, **kw)]  # noqa: E731
    assert seqs(agent="a1") == [1, 3, 5]
    assert seqs(tool="u", decision="allow") == [4, 5]
    assert seqs(since=102.0, until=104.0) == [2, 3]
    assert seqs(since=datetime.fromtimestamp(104, tz=timezone.utc)) == [4, 5]
    assert seqs() == list(range(6))


def test_filter_by_error_code_and_kind():
    recs = [{"seq": 0, "ts": 1.0, "kind": "call", "decision": "allow"},
            {"seq": 1, "ts": 2.0, "kind": "call", "decision": "deny", "code": "POLICY_DENIED"},
            {"seq": 2, "ts": 3.0, "kind": "call", "decision": "deny", "code": "RATE_LIMITED"},
            {"seq": 3, "ts": 4.0, "kind": "outcome", "decision": "allow"}]
    seqs = lambda **kw: [r["seq"] for r in filter_records(recs, **kw)]  # noqa: E731
    assert seqs(decision="POLICY_DENIED") == [1]
    assert seqs(decision="deny") == [1, 2]
    assert seqs(decision="allow") == [0, 3]
    assert seqs(kind="outcome") == [3]
    assert seqs(kind="call", decision="allow") == [0]


# ------------------------------------------------------------------ segments and rotation

ROTATE = 600  # make_log's records are ~172 bytes: three to a segment


def segments(path) -> list:
    """Every segment file of the log at ``path``, in order."""
    out, k = [], 0
    while os.path.exists(segment_path(path, k)):
        out.append(type(path)(segment_path(path, k)))
        k += 1
    return out


def seqs_in(segment) -> list[int]:
    data = segment.read_bytes()
    return [msgpack.unpackb(data[s + 4:e - 32], raw=False)["seq"] for s, e in frames(segment)]


@pytest.fixture
def rotated(tmp_path):
    path = tmp_path / "audit.log"
    make_log(path, n=12, rotate_bytes=ROTATE)
    assert [seqs_in(seg) for seg in segments(path)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    return path


def test_rotation_makes_segments_that_verify_as_one_chain(rotated):
    segs = segments(rotated)
    assert [seg.name for seg in segs] == ["audit.log", "audit.log.1", "audit.log.2", "audit.log.3"]
    assert all(seg.stat().st_size <= ROTATE for seg in segs)
    assert sorted(p.name for p in rotated.parent.iterdir()) == sorted(
        [seg.name for seg in segs] + ["audit.log.head"])
    assert verify(rotated) == audit.VerifyReport(True, 12, None, None, 12, 4)
    recs = list(read_records(rotated))
    assert [r["seq"] for r in recs] == list(range(12))
    # the first record of each segment chains to the last record of the one before
    last_digest = segs[0].read_bytes()[-32:]
    assert recs[3]["prev"] == last_digest
    single = rotated.parent / "single.log"
    make_log(single, n=12)
    assert b"".join(seg.read_bytes() for seg in segs) == single.read_bytes()


def test_head_names_the_last_segment(rotated):
    head = (rotated.parent / "audit.log.head").read_bytes()
    magic, segment, records, digest = struct.unpack(">4sIQ32s", head)
    assert (magic, segment, records) == (b"WAH2", 3, 12)
    assert digest == segments(rotated)[-1].read_bytes()[-32:]


def test_reopen_continues_in_the_last_segment(rotated):
    last = segments(rotated)[-1]
    size = last.stat().st_size
    with AuditLog(rotated, clock=FakeClock(), rotate_bytes=10_000) as log:
        assert log.segment == 3 and log.last_seq == 11
        assert log.record("outcome", agent="agent-0", tool="fs.read") == 12
    assert len(segments(rotated)) == 4 and last.stat().st_size > size
    assert seqs_in(last) == [9, 10, 11, 12]
    with AuditLog(rotated, clock=FakeClock(), rotate_bytes=ROTATE) as log:
        assert log.record("outcome", agent="agent-1", tool="fs.read") == 13  # segment 3 is full
        assert log.segment == 4
    assert seqs_in(segments(rotated)[-1]) == [13]
    assert verify(rotated) == audit.VerifyReport(True, 14, None, None, 14, 5)


def test_oversized_record_gets_a_segment_of_its_own(tmp_path):
    path = tmp_path / "a.log"
    with AuditLog(path, rotate_bytes=200) as log:
        log.record("call", blob="x" * 1000)
        log.record("call", blob="y" * 1000)
        log.record("call", n=1)
    assert [seqs_in(seg) for seg in segments(path)] == [[0], [1], [2]]
    assert verify(path).ok


@pytest.mark.parametrize("value", [0, -5, 1.5, "100"])
def test_bad_rotate_bytes_is_rejected(tmp_path, value):
    with pytest.raises(ValueError, match="rotate_bytes"):
        AuditLog(tmp_path / "a.log", rotate_bytes=value)


def test_deleted_middle_segment_is_named(rotated):
    os.unlink(segment_path(rotated, 2))
    report = verify(rotated)
    assert not report.ok and report.first_bad_seq == 6 and report.records == 6
    assert report.problem == "segment audit.log.2 missing (deleted): record 6 onwards should be in it"
    assert report.segment == segment_path(rotated, 2)


def test_deleted_last_segment_is_named(rotated):
    os.unlink(segment_path(rotated, 3))
    report = verify(rotated)
    assert not report.ok and report.first_bad_seq == 9 and report.records == 9
    assert report.problem.startswith("segment audit.log.3 missing (deleted)")


def test_deleted_middle_segment_and_renumbered_rest(rotated):
    os.unlink(segment_path(rotated, 1))
    os.rename(segment_path(rotated, 2), segment_path(rotated, 1))
    os.rename(segment_path(rotated, 3), segment_path(rotated, 2))
    report = verify(rotated)
    assert not report.ok and report.first_bad_seq == 3
    assert report.problem == "record 3 missing: seq jumps 2 -> 6 (deleted) at the start of audit.log.1"


def test_swapped_segments_are_named(rotated):
    one, two = segment_path(rotated, 1), segment_path(rotated, 2)
    os.rename(one, one + ".tmp")
    os.rename(two, one)
    os.rename(one + ".tmp", two)
    report = verify(rotated)
    assert not report.ok and report.first_bad_seq == 3 and report.segment == one
    assert report.problem == "record 3: out of order (record 6 comes before it) at the start of audit.log.1"


def test_edited_byte_in_segment_2_is_named(rotated):
    seg = segments(rotated)[2]
    start, _ = frames(seg)[1]
    flip(seg, start + seg.read_bytes()[start:].index(b"payload-7") + 3)
    report = verify(rotated)
    assert not report.ok and report.first_bad_seq == 7 and report.records == 7
    assert report.problem == f"record 7: hash mismatch at byte {start} in audit.log.2 (edited)"
    assert report.segment == segment_path(rotated, 2)


def test_truncated_segment_1_mid_frame_is_named(rotated):
    seg = segments(rotated)[1]
    start, _ = frames(seg)[2]
    seg.write_bytes(seg.read_bytes()[:start + 10])
    report = verify(rotated)
    assert not report.ok and report.first_bad_seq == 5 and report.records == 5
    assert report.problem == f"truncated: partial frame at byte {start} in audit.log.1"


def test_truncated_segment_1_at_a_frame_boundary_is_named(rotated):
    seg = segments(rotated)[1]
    _cut(seg, frames(seg)[:2])
    report = verify(rotated)
    assert not report.ok and report.first_bad_seq == 5
    assert report.problem == "record 5 missing: seq jumps 4 -> 6 (deleted) at the start of audit.log.2"


def test_truncated_last_segment_caught_by_head(rotated):
    seg = segments(rotated)[-1]
    _cut(seg, frames(seg)[:1])
    report = verify(rotated)
    assert not report.ok and report.first_bad_seq == 10
    assert report.problem == "truncated: head says 12 records, log has 10"


def test_stray_segment_after_a_gap_is_found(rotated):
    open(segment_path(rotated, 6), "wb").close()
    report = verify(rotated)
    assert not report.ok and report.problem.startswith("segment audit.log.4 missing")


def test_head_naming_the_wrong_segment_is_found(rotated):
    head = rotated.parent / "audit.log.head"
    magic, _, records, digest = struct.unpack(">4sIQ32s", head.read_bytes())
    head.write_bytes(struct.pack(">4sIQ32s", magic, 2, records, digest))
    report = verify(rotated)
    assert not report.ok and report.problem == "head names segment 2 but record 11 is in segment 3"


def test_old_format_head_is_rejected_clearly(log_path):
    head = log_path.with_name("audit.log.head")
    head.write_bytes(struct.pack(">4sQ32s", b"WAH1", 5, log_path.read_bytes()[-32:]))
    report = verify(log_path)
    assert not report.ok and "WAH1" in report.problem and "older single-file" in report.problem
    with pytest.raises(AuditUnavailable, match="WAH1"):
        AuditLog(log_path)


@pytest.mark.parametrize("damage", ["delete_middle", "delete_last", "swap", "edit", "truncate"])
def test_damaged_rotated_log_refuses_to_open(rotated, damage):
    one, two = segment_path(rotated, 1), segment_path(rotated, 2)
    if damage == "delete_middle":
        os.unlink(one)
    elif damage == "delete_last":
        os.unlink(segment_path(rotated, 3))
    elif damage == "swap":
        os.rename(one, one + ".tmp")
        os.rename(two, one)
        os.rename(one + ".tmp", two)
    elif damage == "edit":
        flip(segments(rotated)[2], 40)
    else:
        seg = segments(rotated)[1]
        seg.write_bytes(seg.read_bytes()[:-5])
    with pytest.raises(AuditUnavailable, match="refusing to append"):
        AuditLog(rotated, rotate_bytes=ROTATE)


def test_crash_after_creating_a_segment_is_recovered(rotated):
    # rotation created the next segment, then the process died before writing to it
    empty = segment_path(rotated, 4)
    open(empty, "wb").close()
    report = verify(rotated)
    assert report.ok and report.segments == 5
    with AuditLog(rotated, rotate_bytes=ROTATE) as log:
        assert log.segment == 4 and log.record("call") == 12
    assert seqs_in(type(rotated)(empty)) == [12] and verify(rotated).ok


def test_head_behind_across_a_rotation_is_accepted_and_repaired(tmp_path):
    path, head = tmp_path / "audit.log", tmp_path / "audit.log.head"
    make_log(path, n=9, rotate_bytes=ROTATE)
    stale = head.read_bytes()
    with AuditLog(path, rotate_bytes=ROTATE) as log:
        assert log.record("call") == 9 and log.segment == 3
    head.write_bytes(stale)  # as after a crash between writing record 9 and the head
    report = verify(path)
    assert report.ok and report.head_records == 9 and report.records == 10
    with AuditLog(path, rotate_bytes=ROTATE) as log:
        assert log.segment == 3 and log.record("call") == 10
    assert verify(path).head_records == 11
    assert struct.unpack(">4sIQ32s", head.read_bytes())[1] == 3


def test_rotation_refuses_to_reuse_an_existing_file(tmp_path):
    path = tmp_path / "a.log"
    with AuditLog(path, rotate_bytes=300) as log:
        log.record("call", blob="x" * 200)
        (tmp_path / "a.log.1").write_bytes(b"planted")
        with pytest.raises(AuditUnavailable, match="failed append of record 1"):
            log.record("call", blob="y" * 200)
    assert (tmp_path / "a.log.1").read_bytes() == b"planted"


def test_read_records_names_the_bad_segment(rotated):
    seg = segments(rotated)[2]
    seg.write_bytes(seg.read_bytes()[:-5])
    with pytest.raises(AuditFormatError, match="audit.log.2") as err:
        list(read_records(rotated))
    assert err.value.partial and err.value.segment == segment_path(rotated, 2)


# ------------------------------------------------------------------------- fsync policy

@pytest.fixture
def fsyncs(monkeypatch):
    calls: list[int] = []
    real = os.fsync

    def counting(fd):
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(audit.os, "fsync", counting)
    return calls


@pytest.mark.parametrize("fsync", ["always", True])
def test_fsync_always_syncs_record_and_head(tmp_path, fsyncs, fsync):
    with AuditLog(tmp_path / "a.log", fsync=fsync) as log:
        opened = len(fsyncs)  # the new log's directory entry
        log.record("call")
        log.record("call")
        assert len(fsyncs) - opened == 4  # record then head, twice
    assert verify(tmp_path / "a.log").ok


@pytest.mark.parametrize("fsync", ["never", False])
def test_fsync_never_does_not_sync(tmp_path, fsyncs, fsync):
    make_log(tmp_path / "a.log", n=12, rotate_bytes=ROTATE, fsync=fsync)
    assert fsyncs == [] and verify(tmp_path / "a.log").ok


def test_fsync_rotate_syncs_on_rotation_and_close(tmp_path, fsyncs):
    path = tmp_path / "a.log"
    log = AuditLog(path, fsync="rotate", rotate_bytes=ROTATE, clock=FakeClock())
    opened = len(fsyncs)
    for i in range(3):  # fills segment 0
        log.record("call", agent="a", tool="fs.read", decision="allow", args={"path": f"data/payload-{i}"})
    assert len(fsyncs) == opened
    log.record("call", agent="a", tool="fs.read", decision="allow", args={"path": "data/payload-3"})
    assert len(fsyncs) == opened + 3  # old segment, head, directory
    log.close()
    assert len(fsyncs) == opened + 5  # open segment and head
    assert verify(path) == audit.VerifyReport(True, 4, None, None, 4, 2)


@pytest.mark.parametrize("value", ["sometimes", "ALWAYS", None, 1])
def test_bad_fsync_policy_is_rejected(tmp_path, value):
    with pytest.raises(ValueError, match="fsync"):
        AuditLog(tmp_path / "a.log", fsync=value)
    assert not (tmp_path / "a.log").exists()


# ------------------------------------------------------------------------------- export

def make_mixed_log(path, **kw) -> None:
    with AuditLog(path, clock=FakeClock(), **kw) as log:
        for i in range(6):
            log.record("call", agent=f"a{i % 2}", tool="fs.read", decision="allow" if i % 3 else "deny",
                       code=None if i % 3 else "POLICY_DENIED", args={"n": i}, blob=b"\x00\xff")
            log.record("outcome", agent=f"a{i % 2}", tool="fs.read", bytes_out=i)


def digests(path) -> list[bytes]:
    return [seg.read_bytes()[e - 32:e] for seg in segments(path) for _, e in frames(seg)]


@pytest.mark.parametrize("rotate_bytes", [None, 400])
def test_export_writes_json_lines_with_hashes(tmp_path, rotate_bytes):
    path = tmp_path / "a.log"
    make_mixed_log(path, rotate_bytes=rotate_bytes)
    out = io.StringIO()
    assert export_jsonl(path, out) == 12
    lines = out.getvalue().splitlines()
    assert len(lines) == 12
    objs = [json.loads(line) for line in lines]
    assert [o["seq"] for o in objs] == list(range(12))
    assert [o["hash"] for o in objs] == [d.hex() for d in digests(path)]
    assert objs[0]["prev"] == "00" * 32
    assert all(b["prev"] == a["hash"] for a, b in zip(objs, objs[1:]))
    assert objs[0] == {"seq": 0, "ts": 1_700_000_001.0, "prev": "00" * 32, "kind": "call",
                       "hash": digests(path)[0].hex(),
                       "fields": {"agent": "a0", "tool": "fs.read", "decision": "deny",
                                  "code": "POLICY_DENIED", "args": {"n": 0}, "blob": "00ff"}}
    assert set(objs[1]) == {"seq", "ts", "prev", "kind", "hash", "fields"}


def test_export_honours_filters(tmp_path):
    path = tmp_path / "a.log"
    make_mixed_log(path)
    exported = lambda **kw: [json.loads(x)["seq"] for x in _export(path, **kw)]  # noqa: E731
    assert exported(kind="outcome") == [1, 3, 5, 7, 9, 11]
    assert exported(decision="POLICY_DENIED") == [0, 6]
    assert exported(decision="allow", agent="a1") == [2, 10]
    assert exported(since=1_700_000_005.0, until=1_700_000_007.0) == [4, 5]
    out = io.StringIO()
    assert export_jsonl(path, out, kind="nothing") == 0 and out.getvalue() == ""
    with pytest.raises(TypeError):
        export_jsonl(path, io.StringIO(), colour="red")


def _export(path, **kw) -> list[str]:
    out = io.StringIO()
    count = export_jsonl(path, out, **kw)
    lines = out.getvalue().splitlines()
    assert count == len(lines)
    return lines


def test_export_refuses_a_broken_log(rotated):
    flip(segments(rotated)[2], 40)
    out = io.StringIO()
    with pytest.raises(AuditChainError, match="does not verify") as err:
        export_jsonl(rotated, out)
    assert out.getvalue() == ""
    assert err.value.report.first_bad_seq == 6 and "audit.log.2" in str(err.value)


def test_export_of_a_broken_log_when_allowed(rotated):
    seg = segments(rotated)[2]
    seg.write_bytes(seg.read_bytes()[:-5])  # record 8 cut short
    assert [json.loads(x)["seq"] for x in _export(rotated, allow_broken=True)] == list(range(8))
    os.unlink(segment_path(rotated, 1))
    assert [json.loads(x)["seq"] for x in _export(rotated, allow_broken=True)] == [0, 1, 2, 6, 7]


def test_export_output_is_plain_json(tmp_path):
    path = tmp_path / "a.log"
    with AuditLog(path) as log:
        log.record("call", x=float("nan"), y=float("inf"), line="a\nb\x1b[31m")
    (line,) = _export(path)
    assert json.loads(line)["fields"] == {"x": "nan", "y": "inf", "line": "a\nb\x1b[31m"}
    assert "\x1b" not in line and line.isascii()


# ---------------------------------------------------------------------------------- CLI

def test_cli_verify(rotated, capsys):
    assert main(["audit", "verify", str(rotated)]) == 0
    assert capsys.readouterr().out == f"{rotated}: ok, 12 records in 4 segments, chain intact\n"
    flip(segments(rotated)[2], 40)
    assert main(["audit", "verify", str(rotated)]) == 1
    err = capsys.readouterr().err
    assert f"BROKEN (first bad record: seq 6 in {segment_path(rotated, 2)})" in err
    assert "hash mismatch" in err


def test_cli_verify_single_segment(log_path, capsys):
    assert main(["audit", "verify", str(log_path)]) == 0
    assert "ok, 5 records in 1 segment, chain intact" in capsys.readouterr().out


def test_cli_export_to_stdout_and_file(tmp_path, capsys):
    path = tmp_path / "a.log"
    make_mixed_log(path, rotate_bytes=400)
    assert main(["audit", "export", str(path), "--kind", "outcome", "--agent", "a0"]) == 0
    captured = capsys.readouterr()
    assert [json.loads(x)["seq"] for x in captured.out.splitlines()] == [1, 5, 9]
    assert "exported 3 records" in captured.err
    dest = tmp_path / "out.jsonl"
    assert main(["audit", "export", str(path), "--out", str(dest), "--decision", "POLICY_DENIED"]) == 0
    assert [json.loads(x)["seq"] for x in dest.read_text().splitlines()] == [0, 6]
    assert capsys.readouterr().out == ""


def test_cli_export_broken_log(rotated, tmp_path, capsys):
    os.unlink(segment_path(rotated, 1))
    dest = tmp_path / "out.jsonl"
    assert main(["audit", "export", str(rotated), "--out", str(dest)]) == 1
    assert "segment audit.log.1 missing" in capsys.readouterr().err and not dest.exists()
    assert main(["audit", "export", str(rotated), "--allow-broken"]) == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 9 and "BROKEN" in captured.err


def test_cli_show_kind_and_code(tmp_path, capsys):
    path = tmp_path / "a.log"
    make_mixed_log(path)
    assert main(["audit", "show", str(path), "--kind", "outcome", "--json"]) == 0
    assert [json.loads(x)["seq"] for x in capsys.readouterr().out.splitlines()] == [1, 3, 5, 7, 9, 11]
    assert main(["audit", "show", str(path), "--decision", "POLICY_DENIED"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all("code=POLICY_DENIED" in line for line in out)
    assert main(["audit", "show", str(tmp_path / "missing.log")]) == 1
    assert "missing.log: no such file or directory" in capsys.readouterr().err
    assert main(["audit", "verify", str(tmp_path / "missing.log")]) == 1  # missing, not "BROKEN"
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # a usage error, not a traceback
        main(["audit", "show", str(path), "--since", "yesterday"])
    assert info.value.code == 2 and "neither an ISO time" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # a filter that can match nothing is a usage error too
        main(["audit", "show", str(path), "--decision", "denied"])
    assert info.value.code == 2 and "invalid choice: 'denied'" in capsys.readouterr().err


def test_cli_verify_and_show_every_shard_chain_of_a_run_directory(tmp_path, capsys):
    clock = iter(float(t) for t in (1, 4, 5, 2, 3, 6))
    for name, kinds in (("audit-0.log", ("a", "d", "e")), ("audit-1.log", ("b", "c", "f"))):
        with AuditLog(tmp_path / name, clock=lambda: next(clock)) as log:
            for kind in kinds:
                log.record(kind)
    assert main(["audit", "verify", str(tmp_path)]) == 0
    assert "2 chains, 2 intact" in capsys.readouterr().out
    assert main(["audit", "show", str(tmp_path), "--json"]) == 0
    merged = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["kind"] for r in merged] == ["a", "b", "c", "d", "e", "f"]  # time order across the shards
    assert [r["log"] for r in merged[:2]] == ["audit-0.log", "audit-1.log"]
    flip(tmp_path / "audit-1.log", 30)
    assert main(["audit", "verify", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "audit-0.log: ok" in captured.out and "1 BROKEN" in captured.out and "audit-1.log: BROKEN" in captured.err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["audit", "verify", str(empty)]) == 1
    assert "no audit.log or audit-N.log" in capsys.readouterr().err
