"""What the CLI tells a person: run-summary reasons, audit filters, approvals in full (no Ray)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from runtime import cli
from runtime.auditlog import KINDS, digest_run
from runtime.cli import main, print_digest
from runtime.testing import FakeClock
from runtime.trusted.audit import AuditLog

ROOT = Path(__file__).resolve().parents[2]


def write_log(path: Path) -> Path:
    with AuditLog(path, clock=FakeClock()) as log:
        log.record("decision", decision="deny", agent="writer", tool="fs.write", code="MALFORMED",
                   reason="unknown arguments ['colour']", authenticated=True)
        log.record("decision", decision="deny", agent="writer", tool="fs.write", code="MALFORMED",
                   reason="unknown arguments ['colour']", authenticated=True)
        log.record("decision", decision="deny", agent="lead", tool="delegate:writer", code="DELEGATION_DENIED",
                   reason="delegation to 'writer' names ['http.fetch'], not held", authenticated=True)
        log.record("decision", decision="deny", agent="ghost", tool="fs.read", code="BAD_REQUEST_MAC",
                   reason="request MAC does not match agent 'ghost'", authenticated=False)
        log.record("outcome", call_id="c1", agent="coder", tool="code.run", ok=False, code="TOOL_FAILED",
                   reason="SyntaxError: invalid syntax\x1b[2J")
        log.record("outcome", call_id="c2", agent="coder", tool="code.run", ok=True)
        log.record("delegate", agent="lead", to="reader", token_id="ab", depth=1)  # an older record: no tool
        log.record("delegate", agent="lead", to="writer", tool="delegate:writer", tools=["fs.write"],
                   token_id="ab", depth=1)
        log.record("revoke", agent="coder", by="alice", cascade=False)
        log.record("revoke", agent="rogue", by="quarantine")
    return path


def test_run_summary_prints_every_failure_reason_and_revoked_agents(tmp_path, capsys):
    log = write_log(tmp_path / "audit.log")
    print_digest([str(log)], str(log))
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()]
    assert ["writer", "fs.write", "MALFORMED", "2", "unknown", "arguments", "['colour']"] in rows
    assert "names ['http.fetch'], not held" in out and "delegate:writer" in out
    assert "ghost (unauthenticated)" in out
    assert "SyntaxError: invalid syntax\\x1b[2J" in out and "\x1b" not in out  # no terminal escapes
    assert "REVOKED by an operator (every later call denied): coder (by alice)" in out
    assert "rogue" not in out.split("REVOKED")[1]  # a quarantine is reported on its own line


def test_run_summary_says_where_to_look_when_the_log_is_unreadable(tmp_path, capsys):
    print_digest([str(tmp_path / "gone.log")], str(tmp_path))
    assert f"see: warden audit show {tmp_path} --decision deny" in capsys.readouterr().out


def test_digest_orders_by_count_and_caps_reasons():
    recs = [{"kind": "decision", "decision": "deny", "agent": "a", "tool": "t", "code": "POLICY_DENIED",
             "reason": "x" * 1000}] + [{"kind": "outcome", "ok": False, "agent": "b", "tool": "u",
                                       "code": "TOOL_FAILED", "reason": "boom"}] * 3
    digest = digest_run(recs)
    assert [(f[0], f[4]) for f in digest.failures] == [("b", 3), ("a", 1)]
    assert len(digest.failures[1][3]) == 240


def test_audit_show_kind_rejects_unknown_kinds_and_lists_the_valid_ones(tmp_path, capsys):
    log = write_log(tmp_path / "audit.log")
    with pytest.raises(SystemExit) as info:
        main(["audit", "show", str(log), "--kind", "call"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'call'" in err and "'decision'" in err and "'outcome'" in err
    assert main(["audit", "show", str(log), "--kind", "revoke"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_every_kind_warden_writes_is_a_valid_kind():
    written = set()
    for path in (ROOT / "runtime").rglob("*.py"):
        written |= set(re.findall(r"\.record\(\s*\"([a-z_]+)\"", path.read_text()))
    assert written == set(KINDS)


def test_audit_show_tool_delegate_matches_delegations_and_their_denials(tmp_path, capsys):
    log = write_log(tmp_path / "audit.log")
    assert main(["audit", "show", str(log), "--tool", "delegate:writer"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "code=DELEGATION_DENIED" in lines[0]
    assert "kind=" not in lines[1] and " delegate " in lines[1] and "tools=['fs.write']" in lines[1]
    assert main(["audit", "show", str(log), "--tool", "delegate:reader"]) == 0
    assert "to=reader" in capsys.readouterr().out  # records written before delegations had a tool


class FakeControl:
    def __init__(self, pending):
        self.pending = pending

    def approvals(self):
        return self.pending


def test_approvals_list_full_shows_every_argument(monkeypatch, capsys):
    body = "rm -rf /data; " + "x" * 200 + " THE-END"
    pending = [{"id": "ap1", "agent": "ops", "tool": "shell.run", "args": {"command": body},
                "expires": time.time() + 60}]
    monkeypatch.setattr(cli, "_client", lambda args: FakeControl(pending))
    assert main(["approvals", "list"]) == 0
    assert "THE-END" not in capsys.readouterr().out
    assert main(["approvals", "list", "--full"]) == 0
    assert "THE-END" in capsys.readouterr().out


# --------------------------------------------------------------------------- policy explain


def policy(agent: str, tools: dict, delegate_to: tuple[str, ...] = ()):
    from runtime.policyfile import parse_policy

    return parse_policy({"agent": agent, "tools": {t: {"effect": e} for t, e in tools.items()},
                         "delegation": {"can_delegate_to": list(delegate_to), "max_depth": 1}})


def test_explain_shows_no_sandbox_for_tools_that_never_use_one():
    from runtime.cli import explain

    p = policy("mixed", {"chat.read": "read", "python.exec": "execute", "mystery": "read"})
    rows: dict[str, str] = {}
    for line in explain(p, sandboxed={"chat.read": False, "python.exec": True}).splitlines():
        if line.split():
            rows.setdefault(line.split()[0], line)  # the tools table (the flow section lists them again)
    assert rows["chat.read"].endswith("none (runs no code)")
    assert rows["python.exec"].endswith("gvisor")
    assert rows["mystery"].endswith("gvisor (if it runs code)")
    text = explain(policy("talker", {"chat.read": "read"}), sandboxed={"chat.read": False})
    assert "sandbox limits per call: none (no tool of this policy runs code)" in text
    assert "cpu_s=" not in text


def test_explain_shows_a_delegates_effective_rights():
    from runtime.cli import explain

    lead = policy("lead", {"chat.read": "read", "chat.post": "write"}, delegate_to=("helper", "mute", "far"))
    helper = policy("helper", {"chat.read": "read", "http.post": "write"})
    mute = policy("mute", {"http.post": "write"})
    text = explain(lead, delegates={"helper": helper, "mute": mute})
    assert "helper gets at most: chat.read; never http.post (lead does not hold it)" in text
    assert "mute gets at most: NOTHING (every delegation is DELEGATION_DENIED)" in text
    assert "far gets at most the tools both policies allow (its policy not given: --job JOB)" in text
    assert "its calls count against lead's budgets too" in text


def test_policy_explain_finds_delegates_policies_beside_the_file(capsys):
    assert main(["policy", "explain", str(ROOT / "policies" / "lead.yaml")]) == 0
    out = capsys.readouterr().out
    assert "summarizer gets at most: chat.list_channels, chat.read; never http.post" in out


def test_policy_explain_with_the_job_knows_which_tools_run_code(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["policy", "explain", "policies/analyst.yaml", "--job", "jobs/demo.yaml"]) == 0
    assert "python.exec  execute" in capsys.readouterr().out
    assert main(["policy", "explain", "policies/lead.yaml", "--job", "jobs/demo.yaml"]) == 0
    out = capsys.readouterr().out
    assert "none (runs no code)" in out and "if it runs code" not in out


def test_a_small_runs_calls_are_listed_in_order_allowed_or_denied_escaped(tmp_path, capsys):
    with AuditLog(tmp_path / "audit.log", clock=FakeClock()) as log:
        log.record("decision", decision="allow", call_id="c1", agent="dev", tool="git.git_status",
                   args={"repo_path": "/workspace/repo"})
        log.record("outcome", call_id="c1", agent="dev", tool="git.git_status", ok=True)
        log.record("decision", decision="deny", agent="dev", tool="git.git_reset", code="POLICY_DENIED",
                   reason="tool 'git.git_reset' not in the policy\x1b[2J", authenticated=True)
        log.record("decision", decision="allow", call_id="c2", agent="dev", tool="git.git_log", args={"repo_path": "x"})
        log.record("outcome", call_id="c2", agent="dev", tool="git.git_log", ok=False, code="TOOL_FAILED")
    cli.print_calls([str(tmp_path / "audit.log")])
    out = capsys.readouterr().out
    lines = out.split("calls in order (from the audit log):\n")[1].splitlines()[2:]
    assert [line.split()[:3] for line in lines] == [["dev", "git.git_status", "allowed"],
                                                    ["dev", "git.git_reset", "DENIED"],
                                                    ["dev", "git.git_log", "allowed,"]]
    assert '{"repo_path": "/workspace/repo"}' in lines[0] and "POLICY_DENIED" in lines[1]
    assert "allowed, then TOOL_FAILED" in lines[2]
    assert "\x1b" not in out and "\\x1b[2J" in out  # a reason cannot drive the terminal


def test_a_long_runs_calls_are_not_listed(tmp_path, capsys):
    with AuditLog(tmp_path / "audit.log", clock=FakeClock()) as log:
        for i in range(cli.CALLS_LISTED + 1):
            log.record("decision", decision="allow", call_id=f"c{i}", agent="a", tool="t", args={})
    cli.print_calls([str(tmp_path / "audit.log")])
    assert capsys.readouterr().out == ""
