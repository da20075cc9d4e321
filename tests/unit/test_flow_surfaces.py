"""What operators see of information flow: `audit show --kind flow`, `status` contexts (no Ray).

The audit log here is a real hash-chained file written by the trusted writer, with records in the
form the supervisor writes them (README: Audit log; decision, approval_requested and approval
records with a `flow` field). `status` reads a fake operator client: the display is under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime import cli
from runtime.auditlog import (FLOW, filter_records, format_flow, format_label, format_origin, is_flow_record,
                              read_records)
from runtime.cli import main
from runtime.testing import FakeClock
from runtime.trusted.audit import AuditLog

UNTRUSTED = {"integrity": "untrusted", "readers": "public"}
TRUSTED = {"integrity": "trusted", "readers": "public"}
PRIVATE = {"integrity": "trusted", "readers": [["alice@corp.example", "*@corp.example"], ["*@corp.example"]]}
ORIGIN = {"call_id": "5f5966f44d7b", "tool": "email.read", "agent": "mailer"}


def write_log(path: Path) -> Path:
    with AuditLog(path, clock=FakeClock()) as log:
        log.record("decision", decision="allow", agent="mailer", tool="email.read", call_id="c1",
                   args={"folder": "inbox"}, context=TRUSTED)  # no flow rule applied: not a flow record
        log.record("decision", decision="allow", agent="mailer", tool="calendar.read", call_id="c0",
                   args={}, context=TRUSTED, flow={"handles": [], "violations": []})  # rules, none about this tool
        log.record("outcome", call_id="c1", agent="mailer", tool="email.read", ok=True, label=UNTRUSTED,
                   context=TRUSTED, handle="h_00000000ab12")
        log.record("decision", decision="allow", agent="mailer", tool="email.send", call_id="c2",
                   args={"to": "bob@corp.example", "body": {"$handle": "h_00000000ab12"}}, context=TRUSTED,
                   flow={"checked": ["email.send.context", "email.send.args.to"], "handles": ["h_00000000ab12"],
                         "violations": []})
        log.record("decision", decision="deny", code="FLOW_DENIED", agent="mailer", tool="email.send", call_id="c3",
                   args={"to": "mallory@evil.example", "body": "hi"}, context=UNTRUSTED,
                   reason="rule email.send.args.to: argument 'to' is untrusted (from email.read call 5f5966f44d7b)",
                   flow={"rule": "email.send.args.to", "arg": "to", "label": UNTRUSTED, "origin": ORIGIN})
        log.record("approval_requested", agent="mailer", tool="chat.delete", approval_id="a1b2c3d4e5f6",
                   args={"channel": "general"}, context=UNTRUSTED,
                   flow={"violations": [{"rule": "ifc[0].context", "arg": None, "label": UNTRUSTED,
                                         "origin": ORIGIN}], "checked": ["ifc[0]"]})
        log.record("approval", agent="mailer", tool="chat.delete", decision="approve", approval_id="a1b2c3d4e5f6",
                   approver="alice", reason="planned", flow={"violations": [{"rule": "ifc[0].context",
                                                                             "label": UNTRUSTED, "origin": ORIGIN}]})
        log.record("approval", agent="careful", tool="note.write", decision="deny", approval_id="0335f16521ad",
                   approver="(nobody)", reason="no decision within 1s")  # not about flow
        log.record("decision", decision="deny", code="HANDLE_DENIED", agent="thief", tool="email.send",
                   call_id="c4", args={"body": {"$handle": "h_00000000ab12"}}, context=TRUSTED,
                   flow={"handles": ["h_00000000ab12"], "violations": []}, reason="handle issued to 'mailer'")
        log.record("outcome", call_id="c5", agent="mailer", tool="email.read", ok=False, code="HANDLE_LIMIT",
                   reason="'mailer' holds 16 handles of 9000 bytes; limits 16 and 1048576 bytes")
        log.record("decision", decision="deny", code="HANDLE_UNKNOWN", agent="mailer", tool="email.send",
                   call_id="c6", reason="handle 'h_1a2b00000000' was issued before this supervisor shard restarted")
        log.record("outcome", call_id="c2", agent="mailer", tool="email.send", ok=False, code="TOOL_FAILED",
                   reason="smtp down")  # not about flow
    return path


def test_kind_flow_selects_decision_and_approval_records_with_a_flow_field(tmp_path):
    records = list(read_records(str(write_log(tmp_path / "audit.log"))))
    chosen = list(filter_records(records, kind=FLOW))
    assert [(r["kind"], r.get("call_id") or r.get("approval_id")) for r in chosen] == [
        ("decision", "c2"), ("decision", "c3"), ("approval_requested", "a1b2c3d4e5f6"),
        ("approval", "a1b2c3d4e5f6"), ("decision", "c4"), ("outcome", "c5"), ("decision", "c6")]
    assert all(is_flow_record(r) for r in chosen)
    assert list(filter_records(records, kind=FLOW, decision="FLOW_DENIED")) == [chosen[1]]
    assert not is_flow_record({"kind": "outcome", "flow": {"x": 1}})  # only decisions and approvals


def test_audit_show_kind_flow_prints_decision_tool_argument_label_and_origin(tmp_path, capsys):
    log = write_log(tmp_path / "audit.log")
    assert main(["audit", "show", str(log), "--kind", "flow"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7
    assert "outcome agent=mailer tool=email.read code=HANDLE_LIMIT" in lines[5] and "limits 16" in lines[5]
    assert "code=HANDLE_UNKNOWN" in lines[6] and "restarted" in lines[6]
    denied = lines[1]
    for part in ("decision agent=mailer tool=email.send decision=deny code=FLOW_DENIED",
                 'rule="email.send.args.to" arg=to (mallory@evil.example)',
                 'label="untrusted, readers: public"',
                 'origin="email.read call 5f5966f44d7b (agent mailer)"',
                 'context="untrusted, readers: public"', "call_id=c3"):
        assert part in denied, part
    allowed = lines[0]
    assert "decision=allow" in allowed and 'checked="email.send.context; email.send.args.to"' in allowed
    assert "handles=h_00000000ab12" in allowed and 'context="trusted, readers: public"' in allowed
    assert "approval_requested agent=mailer tool=chat.delete" in lines[2] and 'rule="ifc[0].context"' in lines[2]
    assert "approval_id=a1b2c3d4e5f6" in lines[2]
    assert "decision=approve" in lines[3] and "approver=alice" in lines[3] and "origin=\"email.read" in lines[3]
    assert "code=HANDLE_DENIED" in lines[4] and "handles=h_00000000ab12" in lines[4]


def test_audit_show_kind_flow_json_is_the_records(tmp_path, capsys):
    log = write_log(tmp_path / "audit.log")
    assert main(["audit", "show", str(log), "--kind", "flow", "--json", "--decision", "deny"]) == 0
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["code"] for d in docs] == ["FLOW_DENIED", "HANDLE_DENIED", "HANDLE_UNKNOWN"]
    assert docs[0]["flow"] == {"rule": "email.send.args.to", "arg": "to", "label": UNTRUSTED, "origin": ORIGIN}


def test_audit_export_kind_flow(tmp_path, capsys):
    log = write_log(tmp_path / "audit.log")
    out = tmp_path / "flow.jsonl"
    assert main(["audit", "export", str(log), "--kind", "flow", "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 7 and lines[1]["fields"]["flow"]["rule"] == "email.send.args.to"


def test_flow_lines_escape_what_agents_chose():
    rec = {"kind": "decision", "ts": 0, "seq": 1, "agent": "a", "tool": "t", "decision": "deny",
           "args": {"to": "x\x1b[2J\ny"}, "flow": {"rule": "r\n", "arg": "to", "label": {"integrity": "untrusted\r",
                                                                                      "readers": [["a\x07"]]},
                                                 "origin": {"tool": "evil\x1b", "call_id": "c"}}}
    line = format_flow(rec)
    assert "\n" not in line and "\x1b" not in line and "\r" not in line and "\x07" not in line
    assert "\\x1b" in line and "\\x0a" in line


@pytest.mark.parametrize("label, text", [
    (UNTRUSTED, "untrusted, readers: public"),
    (PRIVATE, "trusted, readers: [alice@corp.example, *@corp.example] and [*@corp.example]"),
    ({"integrity": "endorsed", "readers": []}, "endorsed, readers: public"),
    (None, "-"),
    ("odd", "odd"),
])
def test_format_label(label, text):
    assert format_label(label) == text


def test_format_origin():
    assert format_origin(ORIGIN) == "email.read call 5f5966f44d7b (agent mailer)"
    assert format_origin(None) == "-" and format_origin({}) == "-"
    assert format_origin({"tool": "task"}) == "task"
    assert format_origin({"why": "a delegated run this shard has no state for"}) == \
        "a delegated run this shard has no state for"


# ------------------------------------------------------------------------------ status


class FakeClient:
    url = "http://127.0.0.1:1"

    def __init__(self, status):
        self._status = status

    def status(self):
        return self._status


STATUS = {"job": "mail-1", "agents": ["helper", "mailer"], "quarantined": [], "revoked_agents": [],
          "approvals_pending": [], "stats": [{"agent": "mailer", "tool": "email.read", "result": "allow",
                                              "count": 1}],
          "keys": ["k1"], "current_key": "k1",
          "contexts": [
              {"agent": "mailer", "run": "9c1f04d2", "depth": 0, "label": UNTRUSTED, "origin": ORIGIN, "handles": 2},
              {"agent": "helper", "run": "0a1b2c3d", "depth": 1, "label": PRIVATE, "origin": None, "handles": 0},
          ]}


def test_status_shows_each_runs_context(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_client", lambda args: FakeClient(STATUS))
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    table = out.split("contexts (one per agent run")[1].splitlines()[1:]
    assert table[0].split()[:6] == ["agent", "run", "depth", "label", "tainted", "by"]
    assert table[2].startswith("helper") and "0a1b2c3d" in table[2] and "[*@corp.example]" in table[2]
    assert table[3].startswith("mailer") and "untrusted, readers: public" in table[3]
    assert "email.read call 5f5966f44d7b (agent mailer)" in table[3] and table[3].rstrip().endswith("2")
    assert main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["contexts"] == STATUS["contexts"]


def test_status_without_contexts_prints_no_section(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_client", lambda args: FakeClient({**STATUS, "contexts": []}))
    assert main(["status"]) == 0
    assert "contexts" not in capsys.readouterr().out


class FakeApprovals:
    def __init__(self, pending):
        self.pending = pending

    def approvals(self):
        return self.pending


def test_approvals_list_says_which_flow_rule_parked_a_call(monkeypatch, capsys):
    import time

    violation = {"rule": "*[write,delete]: context must be trusted", "arg": "(context)", "label": UNTRUSTED,
                 "origin": ORIGIN}
    pending = [{"id": "ap1", "agent": "mailer", "tool": "chat.delete", "args": {"channel": "general"},
                "expires": time.time() + 60, "flow": [violation]},
               {"id": "ap2", "agent": "ops", "tool": "shell.run", "args": {"command": "ls"},
                "expires": time.time() + 60, "flow": None}]
    monkeypatch.setattr(cli, "_client", lambda args: FakeApprovals(pending))
    assert main(["approvals", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].rstrip().endswith("flow rule broken (argument: label, from)")
    assert lines[2].rstrip().endswith("*[write,delete]: context must be trusted ((context): untrusted, readers: "
                                      "public, from email.read call 5f5966f44d7b (agent mailer))")
    assert lines[3].rstrip().endswith("-")
    monkeypatch.setattr(cli, "_client", lambda args: FakeApprovals(pending[1:]))
    assert main(["approvals", "list"]) == 0
    assert "flow rule" not in capsys.readouterr().out  # no column when nothing was parked for flow


def test_sharded_status_gathers_every_shards_contexts():
    import asyncio
    from types import SimpleNamespace

    from runtime.actors import ShardOperator

    def shard_status(i: int, contexts: list) -> dict:
        return {"shard": i, "pid": 100 + i, "node_id": "n", "restarted": False, "quarantined": [],
                "revoked_agents": [], "approvals_pending": [], "stats": [], "contexts": contexts}

    async def answer(status: dict) -> dict:
        return status

    mine = [{**STATUS["contexts"][0]}]
    theirs = [{**STATUS["contexts"][1]}]
    peer = SimpleNamespace(status=SimpleNamespace(remote=lambda secret: answer(shard_status(1, theirs))))
    old = SimpleNamespace(status=SimpleNamespace(remote=lambda secret: answer({  # a shard of an older version
        k: v for k, v in shard_status(2, []).items() if k != "contexts"})))
    sup = SimpleNamespace(job_id="mail-1", agents={"mailer": 1, "helper": 2},
                          keyring=SimpleNamespace(kids=["k1"], current_kid="k1"))
    shard = SimpleNamespace(sup=sup, peers=[peer, old], host_secret=b"s", status=lambda: shard_status(0, mine))
    status = asyncio.run(ShardOperator(shard).status())
    assert status["contexts"] == mine + theirs
