"""`warden policy test`: the shipped case files pass, and a mismatch is exit 1 with a readable diff."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runtime import run_cases
from runtime.cli import main
from runtime.errors import ConfigError, ErrorCode
from runtime.policy_cases import load_cases

ROOT = Path(__file__).resolve().parents[2]
CASE_FILES = sorted((ROOT / "policies" / "tests").glob("*.cases.yaml"))


@pytest.fixture(autouse=True)
def in_project(monkeypatch):
    monkeypatch.chdir(ROOT)  # tool modules (agents.chat) are imported by name from the project directory


def test_every_example_policy_has_a_case_file():
    policies = {p.stem for p in (ROOT / "policies").glob("*.yaml")}
    assert policies and policies == {p.name.removesuffix(".cases.yaml") for p in CASE_FILES}


@pytest.mark.parametrize("cases", CASE_FILES, ids=lambda p: p.name)
def test_shipped_cases_pass(cases, capsys):
    policy = ROOT / "policies" / cases.name.replace(".cases.yaml", ".yaml")
    assert main(["policy", "test", str(policy), "--cases", str(cases)]) == 0
    out = capsys.readouterr().out
    assert "passed" in out and "FAIL" not in out


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cases.yaml"
    path.write_text(textwrap.dedent(text))
    return path


LEAD = str(ROOT / "policies" / "lead.yaml")


def test_a_mismatch_is_exit_1_with_case_expected_got_and_reason(tmp_path, capsys):
    cases = write(tmp_path, """\
        tools: [agents.chat]
        cases:
          - name: reads general
            call: chat.read
            args: {channel: general}
            expect: allow
          - name: wrongly thinks it may post to general
            call: chat.post
            args: {channel: general, text: hi}
            expect: allow
          - name: wrongly thinks reading summaries is a rate limit
            call: chat.read
            args: {channel: summaries}
            expect: RATE_LIMITED
        """)
    assert main(["policy", "test", LEAD, "--cases", str(cases)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {cases}: case 2 'wrongly thinks it may post to general'" in out
    assert 'lead -> chat.post {"channel": "general", "text": "hi"}' in out
    assert "expected: allow\n" in out and "got:      POLICY_DENIED\n" in out
    assert "reason:   argument 'channel': 'general' is not 'summaries'" in out
    assert "case 3 'wrongly thinks reading summaries is a rate limit'" in out
    assert "expected: RATE_LIMITED" in out
    assert "case 1" not in out
    assert out.rstrip().endswith("3 cases, 1 passed, 2 FAILED")


def test_an_unexpected_allow_shows_the_audit_record(tmp_path, capsys):
    cases = write(tmp_path, """\
        tools: [agents.chat]
        cases:
          - {name: thinks listing is denied, call: chat.list_channels, expect: POLICY_DENIED}
        """)
    assert main(["policy", "test", LEAD, "--cases", str(cases)]) == 1
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines()]
    assert lines[2:5] == ["expected: POLICY_DENIED", "got:      allow", "reason:   allowed (audit record #0)"]


def test_a_reason_that_does_not_match_fails(tmp_path):
    cases = write(tmp_path, """\
        tools: [agents.chat]
        cases:
          - {call: chat.post, args: {channel: general, text: hi}, expect: POLICY_DENIED, reason: "max_bytes"}
        """)
    report = run_cases(LEAD, cases)
    assert not report.ok
    problem = report.results[0].problem
    assert "expected: POLICY_DENIED with reason containing 'max_bytes'" in problem
    assert "got:      POLICY_DENIED" in problem and "'general' is not 'summaries'" in problem


def test_repeated_calls_name_the_call_that_differed(tmp_path):
    cases = write(tmp_path, """\
        tools: [agents.chat]
        cases:
          - name: burst
            steps:
              - {call: chat.list_channels, repeat: 25, expect: allow}
        """)
    problem = run_cases(LEAD, cases).results[0].problem
    assert problem.startswith("lead -> chat.list_channels {} (call 21 of 25)")
    assert "got:      RATE_LIMITED" in problem and "rate 20.0/s burst 20 exceeded" in problem


def test_a_delegated_call_names_the_chain(tmp_path):
    cases = write(tmp_path, f"""\
        tools: [agents.chat]
        agents: {{summarizer: {ROOT / 'policies' / 'summarizer.yaml'}}}
        cases:
          - name: the delegate may post (it may not)
            delegate: {{to: summarizer, max_calls: 3}}
            call: chat.post
            args: {{channel: summaries, text: hi}}
            expect: allow
        """)
    problem = run_cases(LEAD, cases).results[0].problem
    assert "summarizer -> chat.post" in problem and "(delegated by lead -> summarizer)" in problem
    assert "got:      POLICY_DENIED" in problem and "chat.post" in problem


def test_steps_share_one_harness_and_cases_do_not(tmp_path):
    cases = write(tmp_path, """\
        tools: [agents.chat]
        cases:
          - steps:
              - {call: chat.list_channels, repeat: 20, expect: allow}
              - {call: chat.list_channels, expect: RATE_LIMITED}
          - {call: chat.list_channels, expect: allow}
        """)
    report = run_cases(LEAD, cases)
    assert report.ok and len(report.results) == 2


def test_a_case_that_cannot_run_is_a_failure(tmp_path):
    cases = write(tmp_path, """\
        tools: [agents.chat]
        cases:
          - {as: ghost, call: chat.read, args: {channel: general}, expect: allow}
        """)
    report = run_cases(LEAD, cases)
    assert not report.ok and "could not run: JOB_INVALID: no agent 'ghost'" in report.results[0].problem


@pytest.mark.parametrize("text, message", [
    ("tools: [agents.chat]\ncases:\n  - {call: chat.read, expect: POLICY_DENY}\n", "expect must be allow, deny"),
    ("tools: [agents.chat]\ncases:\n  - {args: {}, expect: allow}\n", "needs 'call' or 'delegate'"),
    ("tools: [agents.chat]\ncases:\n  - {call: chat.read, expect: allow, colour: red}\n", "colour"),
    ("tools: [agents.chat]\ncases:\n  - {call: x, repeat: 3, expect: [allow, deny]}\n", "one per call"),
    ("tools: [agents.chat]\ncases: []\n", "cases"),
    ("cases:\n  - {call: chat.read, expect: allow}\n", "tools"),
])
def test_a_bad_case_file_is_a_clear_error(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_cases(path)
    assert info.value.code is ErrorCode.POLICY_INVALID and message in info.value.reason
    assert info.value.reason.startswith(str(path))


def test_bad_case_file_through_the_cli_is_exit_1(tmp_path, capsys):
    path = write(tmp_path, "tools: [agents.chat]\ncases:\n  - {call: chat.read, expect: nope}\n")
    assert main(["policy", "test", LEAD, "--cases", str(path)]) == 1
    assert "POLICY_INVALID" in capsys.readouterr().err


def test_the_warden_command_exits_1_on_a_mismatch(tmp_path):
    cases = write(tmp_path, """\
        tools: [agents.chat]
        cases:
          - {name: posts anywhere, call: chat.post, args: {channel: random, text: x}, expect: allow}
        """)
    done = subprocess.run([sys.executable, "-m", "runtime.cli", "policy", "test", LEAD, "--cases", str(cases)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "case 1 'posts anywhere'" in done.stdout and "'random' is not 'summaries'" in done.stdout


def test_tool_modules_that_do_not_import_are_named(tmp_path):
    cases = write(tmp_path, """\
        tools: [no_such_tools_module]
        cases:
          - {call: chat.read, expect: allow}
        """)
    problem = run_cases(LEAD, cases).results[0].problem
    assert "could not run: JOB_INVALID: cannot load tools from 'no_such_tools_module'" in problem


def test_run_tools_runs_the_real_tools_and_a_failure_code_can_be_expected(tmp_path):
    cases = write(tmp_path, """\
        tools: [agents.chat]
        run_tools: true
        cases:
          - name: the real chat tool deletes a seeded message
            steps:
              - {call: chat.delete_message, args: {channel: random, message_id: 2}, expect: allow}
              - {call: chat.delete_message, args: {channel: random, message_id: 2}, expect: TOOL_FAILED}
          - {name: any denial, call: chat.delete_message, args: {channel: general, message_id: 1}, expect: deny}
          - {name: not a denial, call: chat.delete_message, args: {channel: random, message_id: 999}, expect: deny}
        """)
    report = run_cases(ROOT / "policies" / "moderator.yaml", cases)
    assert [r.ok for r in report.results] == [True, True, False]
    problem = report.results[2].problem
    assert "expected: deny" in problem and "got:      allow" in problem
    assert "the tool then failed: TOOL_FAILED: KeyError" in problem


def test_a_handle_reference_before_any_handle_is_a_clear_failure(tmp_path):
    cases = tmp_path / "c.yaml"
    cases.write_text("tools: [agents.chat, runtime.toolbox]\ncases:\n"
                     "  - {call: chat.post, args: {channel: {$handle_of: chat.export}, text: x}, expect: FLOW_DENIED}\n")
    report = run_cases(ROOT / "policies" / "digest.yaml", cases)
    assert not report.ok and "no handle from 'chat.export' yet" in report.results[0].problem
