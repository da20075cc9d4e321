"""Reading an audit log for people and other systems: one-line format, filters, JSON Lines export.

Nothing here writes a log or decides a call, so it lives outside the trusted core: it runs in the
operator's CLI (``warden audit show|export``), on logs ``runtime.trusted.audit`` wrote and
verifies. Field values were chosen partly by agents (so by models): ``format_record`` escapes
control characters so that a field cannot forge lines on a terminal, and ``export_jsonl``
exports only what verified, unless told to export a broken log.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, TextIO

from .trusted.audit import (RESERVED, AuditFormatError, VerifyReport, _decode, _frames, _scan, _segment_indices,
                            segment_path)


def verify(path: str | os.PathLike[str]) -> VerifyReport:
    """Check every segment in order, and the head: the trusted core's own check (the one the writer
    runs before it resumes a log), with a record found out of place told apart as deleted or moved.
    Never raises: every failure is a reported problem, naming the first bad record
    (``first_bad_seq``) and its file (``segment``)."""
    try:
        report = _scan(os.fspath(path))[0]
    except Exception as exc:
        return VerifyReport(False, 0, None, f"verify failed: {exc}")
    m = re.fullmatch(r"record (\d+): record (\d+) in its place(.*)", report.problem or "", re.S)
    return replace(report, problem=_misplaced(os.fspath(path), int(m[1]), int(m[2])) + m[3]) if m else report


def _misplaced(path: str, n: int, seq: int) -> str:
    """Name the problem when record ``seq`` stands where record ``n`` should."""
    if seq < n:
        return f"record {n}: out of order (found record {seq} in its place)"
    try:  # look for record n further on (to the last segment) only to tell a move from a deletion
        if any(rec.get("seq") == n for rec, _ in read_with_digests(path)):
            return f"record {n}: out of order (record {seq} comes before it)"
    except (OSError, AuditFormatError) as exc:
        log.debug("look-ahead stopped: %s", exc)
    return f"record {n} missing: seq jumps {n - 1} -> {seq} (deleted)"


def read_with_digests(path: str) -> Iterator[tuple[dict[str, Any], bytes]]:
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
    return (rec for rec, _ in read_with_digests(os.fspath(path)))


__all__ = ["FLOW", "KINDS", "KIND_FILTERS", "AuditChainError", "RunDigest", "digest_run", "export_jsonl", "filter_records", "format_flow",
           "format_label", "format_origin", "format_record", "is_flow_record"]

log = logging.getLogger(__name__)
# Every kind of record Warden writes (a unit test keeps this list in step with the code).
KINDS = ("anomaly", "approval", "approval_requested", "calls_unsettled", "decision", "delegate", "job_end",
         "job_start", "key_added", "key_retired", "outcome", "peer_unreachable", "quarantine", "revoke",
         "shard_restart", "shard_state_lost")
# ``--kind flow`` selects the decision and approval records that carry a ``flow`` field (information flow).
FLOW = "flow"
FLOW_RECORD_KINDS = ("decision", "approval_requested", "approval")
FLOW_CODES = frozenset({"FLOW_DENIED", "HANDLE_UNKNOWN", "HANDLE_DENIED", "HANDLE_LIMIT", "READER_INVALID"})
KIND_FILTERS = (*KINDS, FLOW)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _short(value: Any, limit: int = 60) -> str:
    text = value.hex() if isinstance(value, bytes) else value if isinstance(value, str) else repr(value)
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _agent(rec: dict[str, Any]) -> Any:
    return rec.get("agent", rec.get("agent_id"))


def _tool(rec: dict[str, Any]) -> Any:
    """A delegation's records read as tool ``delegate:TARGET`` (older logs name only ``to``)."""
    if rec.get("kind") == "delegate" and "tool" not in rec:
        return f"delegate:{rec.get('to')}"
    return rec.get("tool")


def _head(rec: dict[str, Any]) -> list[str]:
    """Time (UTC, ISO), #seq, kind, agent, tool, decision, code: how every line starts."""
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
    return parts


def format_record(rec: dict[str, Any]) -> str:
    """One readable line: time (UTC, ISO), #seq, kind, agent, tool, decision, code, other fields."""
    shown = RESERVED | {"agent", "agent_id", "tool", "decision", "code"}
    return " ".join(_head(rec) + [f"{_short(k, 30)}={_short(v)}" for k, v in rec.items() if k not in shown])


def is_flow_record(rec: dict[str, Any]) -> bool:
    """A decision or approval record on which an information-flow rule was checked or handles were used,
    or a decision or outcome the flow layer refused (``FLOW_DENIED``, ``HANDLE_*``: a handle unknown,
    not this agent's, or over the agent's limits; ``READER_INVALID``), or a reader's answer."""
    kind = rec.get("kind")
    return ((kind in FLOW_RECORD_KINDS and _says_something(rec.get("flow")))
            or (kind in ("decision", "outcome") and rec.get("code") in FLOW_CODES)
            or (kind == "outcome" and rec.get("tool") == "reader.ask" and rec.get("ok") is True))


def _says_something(flow: Any) -> bool:
    """A flow field that names a rule checked or broken, or a handle: ``{"handles": [], "violations": []}``
    (a token with sink rules, none of them about this tool) is left out."""
    if isinstance(flow, dict):
        return bool(flow.get("rule") or flow.get("checked") or flow.get("handles") or flow.get("violations"))
    return bool(flow)


def _violations(flow: Any) -> list[Any]:
    """A FLOW_DENIED denial's flow is one violation; an allowed or parked call's lists them."""
    if isinstance(flow, dict):
        return [flow] if "rule" in flow else list(flow.get("violations") or [])
    return list(flow) if isinstance(flow, list) else []


def _violation_text(v: Any, args: Any) -> str:
    if not isinstance(v, dict):
        return f"violation={_short(v, 120)}"
    arg = v.get("arg")
    text = f'rule="{_short(v.get("rule", "?"), 80)}"'  # rule names have spaces: quoted, like labels
    if arg is not None:
        value = args.get(arg) if isinstance(args, dict) and isinstance(arg, str) else None
        text += f" arg={_short(arg, 40)}" + (f" ({_short(value, 60)})" if value is not None else "")
    if "label" in v:
        text += f' label="{format_label(v["label"])}"'
    return text + f' origin="{format_origin(v.get("origin"))}"'


def format_flow(rec: dict[str, Any]) -> str:
    """A flow record in one line: decision, tool, then each violated rule with its argument (and value),
    the argument's label and its origin (the earlier result that tainted it); the rules checked, the
    handles used and the context label of the call; the approval's id and approver when there is one."""
    flow = rec.get("flow")
    parts = _head(rec)
    parts += [_violation_text(v, rec.get("args")) for v in _violations(flow)]
    if isinstance(flow, dict):
        for key in ("checked", "handles", "sources"):
            if flow.get(key):
                items = flow[key] if isinstance(flow[key], list) else [flow[key]]
                sep, quote = ("; ", '"') if key in ("checked", "sources") else (",", "")  # rule names have spaces
                show = format_origin if key == "sources" else (lambda i: _short(i, 60))
                parts.append(f"{key}={quote}{sep.join(show(i) for i in items)}{quote}")
    if rec.get("tool") == "reader.ask" and rec.get("kind") == "outcome" and rec.get("ok"):
        parts.append(f"answer={_short(rec['answer'], 80)}" if "answer" in rec else f"handle={_short(rec.get('handle'))}")
        parts.append(f'label="{format_label(rec.get("label"))}"')
    if "context" in rec:
        parts.append(f'context="{format_label(rec["context"])}"')
    for key in ("approval_id", "approver", "call_id", "reason"):
        if rec.get(key) not in (None, ""):
            parts.append(f"{key}={_short(rec[key], 120 if key == 'reason' else 60)}")
    return " ".join(parts)


def format_label(label: Any) -> str:
    """A label in one short line: ``untrusted, readers: public`` or
    ``trusted, readers: [alice@corp.example, *@corp.example] and [*@corp.example]`` (every set must admit
    a reader). Anything else (an older log, a missing label) is shown as it is, escaped."""
    if not isinstance(label, dict) or "integrity" not in label:
        return "-" if label is None else _short(label, 120)
    readers = label.get("readers", "public")
    if isinstance(readers, list) and all(isinstance(r, (list, tuple)) for r in readers):
        readers = " and ".join("[" + ", ".join(_short(p, 60) for p in r) + "]" for r in readers) or "public"
    else:
        readers = _short(readers, 120)
    return f"{_short(label['integrity'], 20)}, readers: {readers}"


def format_origin(origin: Any) -> str:
    """Where a label came from: ``email.read call 5f5966f44d7b (agent mailer)``; ``-`` when untainted."""
    if not isinstance(origin, dict) or not origin:
        return "-" if not origin else _short(origin)
    if "tool" not in origin and origin.get("why"):  # no earlier result: the supervisor says why
        return _short(origin["why"], 120)
    text = _short(origin.get("tool", "?"), 60)
    if origin.get("call_id"):
        text += f" call {_short(origin['call_id'], 40)}"
    if origin.get("agent"):
        text += f" (agent {_short(origin['agent'], 40)})"
    return text


def _epoch(when: float | datetime | None) -> float | None:
    return when.timestamp() if isinstance(when, datetime) else when


def _matcher(agent: str | None = None, tool: str | None = None, decision: str | None = None,
             since: float | datetime | None = None, until: float | datetime | None = None,
             kind: str | None = None) -> Callable[[dict[str, Any]], bool]:
    lo, hi = _epoch(since), _epoch(until)
    is_flow = _flow_matcher()

    def match(rec: dict[str, Any]) -> bool:
        ts = rec.get("ts", 0.0)
        return ((kind is None or rec.get("kind") == kind or (kind == FLOW and is_flow(rec)))
                and (agent is None or _agent(rec) == agent) and (tool is None or _tool(rec) == tool)
                and (decision is None or decision in (rec.get("decision"), rec.get("code")))
                and (lo is None or ts >= lo) and (hi is None or ts < hi))
    return match


def _flow_matcher() -> Callable[[dict[str, Any]], bool]:
    """``is_flow_record``, and the human's ``approval`` of a call parked for a flow rule (that record has
    no flow field: it is known by the id of the ``approval_requested`` before it). Records in log order."""
    parked_for_flow: set[Any] = set()

    def match(rec: dict[str, Any]) -> bool:
        if is_flow_record(rec):
            if rec.get("kind") == "approval_requested":
                parked_for_flow.add(rec.get("approval_id"))
            return True
        return rec.get("kind") == "approval" and rec.get("approval_id") in parked_for_flow
    return match


def filter_records(records: Iterable[dict[str, Any]], agent: str | None = None,
                   tool: str | None = None, decision: str | None = None,
                   since: float | datetime | None = None,
                   until: float | datetime | None = None,
                   kind: str | None = None) -> Iterator[dict[str, Any]]:
    """Records matching every given criterion; ``since`` inclusive, ``until`` exclusive
    (epoch seconds or aware datetimes). ``agent`` matches field ``agent`` or ``agent_id``;
    ``decision`` matches field ``decision`` ("allow", "deny") or ``code`` ("POLICY_DENIED");
    ``kind="flow"`` matches the decision and approval records that carry a ``flow`` field."""
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
    pairs = read_with_digests(path)
    if report.ok:
        pairs = itertools.islice(pairs, report.records)
    count = 0
    try:
        for rec, digest in pairs:
            if match(rec):
                fields = {k: v for k, v in rec.items() if k not in RESERVED}
                line = {"seq": rec["seq"], "ts": rec["ts"], "prev": rec["prev"], "kind": rec["kind"],
                        "hash": digest, "fields": fields}
                out.write(json.dumps(_jsonable(line), allow_nan=False) + "\n")
                count += 1
    except AuditFormatError as exc:
        if report.ok:
            raise
        log.warning("export of broken audit log %s stopped: %s", path, exc)
    return count


@dataclass
class RunDigest:
    """What a run summary reports from the audit log, beyond the counts."""

    failures: list[tuple[str, str, str, str, int]] = field(default_factory=list)  # agent, tool, code, reason, n
    revoked: dict[str, str] = field(default_factory=dict)  # agent -> who revoked it (operator, not quarantine)


def calls_in_order(records: Iterable[dict[str, Any]], *, limit: int) -> list[list[str]]:
    """A run's calls in time order, one row each: agent, tool, ``allowed`` (with the outcome's code if
    it then failed) or ``DENIED CODE``, and the arguments or the denial's reason; escaped and shortened.
    No rows when the run made more than ``limit`` decisions (a long run is for ``warden audit show``)."""
    decisions: list[dict[str, Any]] = []
    failed: dict[Any, str] = {}
    for r in records:
        if r.get("kind") == "decision":
            decisions.append(r)
            if len(decisions) > limit:
                return []
        elif r.get("kind") == "outcome" and not r.get("ok"):
            failed[r.get("call_id")] = str(r.get("code") or "failed")
    rows = []
    for r in sorted(decisions, key=lambda r: r.get("ts", 0)):  # shards' logs interleaved by time
        if r.get("decision") == "allow":
            ended = failed.get(r.get("call_id"))
            said, detail = "allowed" + (f", then {ended}" if ended else ""), json.dumps(r.get("args", {}), default=str)
        else:
            said, detail = f"DENIED {r.get('code')}", r.get("reason", "")
        rows.append([_short(_agent(r), 30), _short(_tool(r), 40), _short(said, 40), _short(detail, 70)])
    return rows


def digest_run(records: Iterable[dict[str, Any]], *, reason_chars: int = 240) -> RunDigest:
    """The reason of every denial and failed outcome (grouped, most frequent first) and the agents
    an operator revoked. Reasons are the audit log's, with values: for the operator, not the agent."""
    failures: Counter[tuple[str, str, str, str]] = Counter()
    revoked: dict[str, str] = {}
    for rec in records:
        kind = rec.get("kind")
        if (kind == "decision" and rec.get("decision") == "deny") or (kind == "outcome" and rec.get("ok") is False):
            who = _short(_agent(rec), 40) + ("" if rec.get("authenticated", True) else " (unauthenticated)")
            failures[(who, _short(rec.get("tool") or "-", 60), _short(rec.get("code", "?"), 40),
                      _short(rec.get("reason", ""), reason_chars))] += 1
        elif kind == "revoke" and rec.get("agent") and not str(rec.get("by", "")).startswith("quarantine"):
            revoked.setdefault(_short(rec["agent"], 40), _short(rec.get("by", "operator"), 40))
    ordered = sorted(failures.items(), key=lambda kv: (-kv[1], kv[0]))
    return RunDigest([(*key, n) for key, n in ordered], revoked)
