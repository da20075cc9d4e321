"""The policy harness: the real supervisor in one process, its decisions and their reasons.

Also the two pieces it is built on: ``register_agent`` (the job driver's registration) and
``load_policy`` from text and dicts."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import msgpack
import pytest

import runtime
from runtime import Decision, PolicyHarness, register_agent
from runtime.errors import ConfigError, ErrorCode, PolicyDenied
from runtime.tool import tool
from runtime.auditlog import read_records
from runtime.trusted.capability import KeyRing
from runtime.policyfile import load_policy, parse_policy

RAN: list[tuple[str, dict[str, Any]]] = []


@tool(effect="read", name="notes.read")
def notes_read(folder: str, limit: int = 10) -> dict:
    """Read notes."""
    RAN.append(("notes.read", {"folder": folder, "limit": limit}))
    return {"folder": folder, "limit": limit}


@tool(effect="write", name="notes.write")
def notes_write(folder: str, text: str) -> bool:
    """Write a note."""
    RAN.append(("notes.write", {"folder": folder, "text": text}))
    return True


@tool(effect="read", name="notes.fail")
def notes_fail() -> None:
    """Always fails."""
    raise RuntimeError("disk on fire")


TOOLS = [notes_read, notes_write, notes_fail]

WRITER = {
    "agent": "writer",
    "tools": {
        "notes.read": {"effect": "read", "args": {"folder": {"one_of": ["inbox", "drafts"]}, "limit": {"max": 50}}},
        "notes.write": {"effect": "write", "args": {"folder": {"exact": "drafts"}},
                        "approval": {"when": {"text": {"regex": "(?s).*URGENT.*"}}, "timeout_s": 60}},
        "notes.fail": {"effect": "read"},
    },
    "quotas": {"rate_per_s": 1, "burst": 3, "max_calls": 5, "ttl_s": 600},
    "delegation": {"can_delegate_to": ["reader"], "max_depth": 1},
}
READER = {"agent": "reader", "tools": {"notes.read": {"effect": "read", "args": {"folder": {"exact": "inbox"}}}}}


@pytest.fixture
def h():
    RAN.clear()
    with PolicyHarness(TOOLS) as harness:
        harness.add_agent(WRITER)
        harness.add_agent(READER)
        yield harness


# ---------------------------------------------------------------------- load_policy


POLICY_TEXT = textwrap.dedent("""\
    agent: reader
    tools:
      notes.read:
        effect: read
        args: {folder: {exact: inbox}}
    """)


def test_load_policy_from_text_dict_and_file_gives_the_same_policy(tmp_path):
    path = tmp_path / "reader.yaml"
    path.write_text(POLICY_TEXT)
    from_file, from_str_path = load_policy(path), load_policy(str(path))
    assert load_policy(POLICY_TEXT) == from_file == from_str_path == load_policy(READER)
    assert load_policy("{agent: reader, tools: {notes.read: {effect: read, args: {folder: {exact: inbox}}}}}") \
        == from_file


@pytest.mark.parametrize("source, where", [
    ({"agent": "x", "tools": {"t": {"effect": "reed"}}}, "<policy dict>"),
    ("agent: x\ntool:\n  t: {effect: read}\n", "<policy str>"),
    ("agent: x\ntools: [unclosed\n", "<policy str>"),
    ("agent: x\n- a list\n", "<policy str>"),
])
def test_load_policy_text_and_dicts_go_through_the_same_validator(source, where):
    with pytest.raises(ConfigError) as info:
        load_policy(source)
    assert info.value.code is ErrorCode.POLICY_INVALID
    assert info.value.reason.startswith(where)


def test_load_policy_dict_errors_match_parse_policy():
    bad = {"agent": "x", "tools": {"t": {"effect": "read", "args": {"a": {}}}}, "extra": 1}
    with pytest.raises(ConfigError) as a:
        load_policy(bad)
    with pytest.raises(ConfigError) as b:
        parse_policy(bad, source="<policy dict>")
    assert a.value.reason == b.value.reason and "extra" in a.value.reason


def test_a_one_line_string_is_a_path():
    with pytest.raises(ConfigError) as info:
        load_policy("no/such/policy.yaml")
    assert "no/such/policy.yaml: cannot read policy" in info.value.reason


# ---------------------------------------------------------------------- register_agent


def test_register_agent_mints_the_policy_root_token_for_the_named_holder():
    keyring, policy = KeyRing.generate(), load_policy(WRITER)
    reg = register_agent(keyring, policy, job_id="j1", now=1000.0, name="writer-2")
    vt = keyring.verify(reg.token)
    assert vt.holder == "writer-2" and reg.entry.name == "writer-2"
    same = keyring.mint(holder="writer-2", caveats=policy.root_caveats(job_id="j1", now=1000.0))
    assert list(vt.token.caveats)[1:] == list(same.caveats)[1:]  # the policy's caveats, after the holder seal
    assert reg.entry.root_token_id == vt.token_id
    assert reg.entry.request_key == reg.request_key and len(reg.request_key) == 32
    assert reg.entry.can_delegate_to == frozenset({"reader"})
    assert reg.entry.delegate_caveats == tuple(policy.delegate_caveats(job_id="j1"))
    assert set(reg.entry.approvals) == {"notes.write"}
    assert reg.quota == policy.agent_quota() and reg.unsandboxed_tools == ()
    assert reg.entry.max_parked == policy.quotas.max_parked
    capped = register_agent(keyring, load_policy({**load_policy(WRITER).model_dump(exclude_unset=True),
                                                  "quotas": {"max_parked": 2}}), job_id="j1", now=1000.0)
    assert capped.entry.max_parked == 2
    other = register_agent(keyring, policy, job_id="j1", now=1000.0)
    assert other.name == "writer" and other.request_key != reg.request_key  # a fresh key each time


def test_register_agent_refuses_a_short_request_key():
    with pytest.raises(ValueError):
        register_agent(KeyRing.generate(), load_policy(READER), job_id="j", now=0.0, request_key=b"short")


def test_the_job_driver_registers_agents_with_register_agent():
    source = (Path(runtime.__file__).parent / "job.py").read_text()
    assert "register_agent(keyring, job.policies[a.name]" in source
    assert "keyring.mint(" not in source and "AgentEntry(" not in source


# ---------------------------------------------------------------------- decisions


def test_an_allowed_call_runs_the_real_tool_and_is_on_record(h):
    d = h.call("writer", "notes.read", {"folder": "inbox", "limit": 3})
    assert isinstance(d, Decision) and d.allowed and d.result == "allow" and d.code is None
    assert d.value == {"folder": "inbox", "limit": 3}
    assert RAN == [("notes.read", {"folder": "inbox", "limit": 3})]
    assert d.audit["kind"] == "decision" and d.audit["decision"] == "allow" and d.audit["agent"] == "writer"
    assert d.outcome["ok"] is True and [r["kind"] for r in d.records] == ["decision", "outcome"]


def test_defaults_are_filled_in_before_the_caveats(h):
    d = h.call("writer", "notes.read", {"folder": "drafts"})
    assert d.allowed and d.value == {"folder": "drafts", "limit": 10}


def test_a_denial_carries_its_reason_but_the_agent_is_told_only_the_code(h):
    d = h.call("writer", "notes.write", {"folder": "inbox", "text": "hi"})
    assert not d.allowed and d.code == "POLICY_DENIED" and d.result == "POLICY_DENIED"
    assert "'inbox' is not 'drafts'" in d.reason
    assert isinstance(d.error, PolicyDenied) and d.error.code is ErrorCode.POLICY_DENIED
    assert d.error.reason == "POLICY_DENIED" and d.error.tool == "notes.write"  # no values reach the agent
    assert d.audit["decision"] == "deny" and d.audit["reason"] == d.reason
    assert RAN == [] and d.outcome is None


def test_the_agent_reply_on_the_wire_holds_no_reason(h):
    req = h._request("writer", {"op": "call", "tool": "notes.read", "args": {"folder": "secret-stuff"}}, None)
    reply = msgpack.unpackb(h._run(h.supervisor.call(req)), raw=False)
    assert reply == {"ok": False, "error": {"code": "POLICY_DENIED", "tool": "notes.read"}}
    assert "secret-stuff" in h.records[-1]["reason"]


def test_decisions_are_in_the_real_audit_log_file_with_an_intact_chain(h):
    h.call("writer", "notes.read", {"folder": "inbox"})
    d = h.call("writer", "notes.read", {"folder": "trash"})
    on_disk = list(read_records(h.audit_path))
    assert len(on_disk) == len(h.records) == 3
    written = on_disk[d.audit["seq"]]
    assert written["kind"] == "decision" and written["decision"] == "deny" and written["reason"] == d.reason
    report = h.verify()
    assert report.ok and report.records == 3


def test_unknown_tool_unknown_argument_and_wrong_type(h):
    assert h.call("writer", "notes.delete", {}).code == "UNKNOWN_TOOL"
    d = h.call("writer", "notes.read", {"folder": "inbox", "where": "x"})
    assert d.code == "MALFORMED" and "where" in d.reason
    assert h.call("writer", "notes.read", {"folder": "inbox", "limit": "3"}).code == "MALFORMED"
    assert h.call("writer", "notes.read", {"folder": "inbox", "limit": 51}).code == "POLICY_DENIED"


def test_a_tool_not_in_the_policy_is_denied(h):
    d = h.call("reader", "notes.write", {"folder": "drafts", "text": "x"})
    assert d.code == "POLICY_DENIED" and "not in" in d.reason


def test_a_failing_tool_is_an_allow_with_a_failed_outcome(h):
    d = h.call("writer", "notes.fail")
    assert d.allowed and d.outcome_code == "TOOL_FAILED" and "disk on fire" in d.outcome["reason"]
    assert d.error is not None and d.error.code is ErrorCode.TOOL_FAILED


# ---------------------------------------------------------------------- quotas, time, tokens


def test_rate_and_call_budget_with_the_fake_clock(h):
    results = [h.call("writer", "notes.read", {"folder": "inbox"}).result for _ in range(4)]
    assert results == ["allow", "allow", "allow", "RATE_LIMITED"]
    h.advance(2.0)
    assert [h.call("writer", "notes.read", {"folder": "inbox"}).result for _ in range(2)] == ["allow", "allow"]
    h.advance(10.0)
    d = h.call("writer", "notes.read", {"folder": "inbox"})
    assert d.code == "BUDGET_EXHAUSTED" and "limit=5" in d.reason


def test_token_expiry_follows_the_policy_ttl(h):
    h.advance(599)
    assert h.call("writer", "notes.read", {"folder": "inbox"}).allowed
    h.advance(2)
    assert h.call("writer", "notes.read", {"folder": "inbox"}).code == "TOKEN_EXPIRED"
    assert h.call("reader", "notes.read", {"folder": "inbox"}).allowed  # ttl_s defaults to 3600


def test_another_agents_token_is_refused(h):
    d = h.call("reader", "notes.read", {"folder": "inbox"}, token=h.token("writer"))
    assert d.code == "WRONG_HOLDER"


# ---------------------------------------------------------------------- delegation


def test_delegation_binds_a_narrower_token_to_the_delegate(h):
    g = h.delegate("writer", "reader", max_calls=1)
    assert g.allowed and g.tool == "delegate:reader" and g.token and g.audit["kind"] == "delegate"
    assert h.call("reader", "notes.read", {"folder": "inbox"}, token=g.token).allowed
    # the reader's own policy narrows the writer's token: only inbox, never drafts
    d = h.call("reader", "notes.read", {"folder": "drafts"}, token=g.token)
    assert d.code == "POLICY_DENIED"
    assert h.call("reader", "notes.read", {"folder": "inbox"}, token=g.token).code == "BUDGET_EXHAUSTED"
    # the delegated token is the reader's: the writer cannot use it
    assert h.call("writer", "notes.read", {"folder": "inbox"}, token=g.token).code == "WRONG_HOLDER"


def test_delegation_args_are_policy_argument_rules(h):
    g = h.delegate("writer", "reader", args={"notes.read.limit": {"max": 5}, "notes.read.folder": {"one_of": ["inbox"]}})
    assert g.allowed
    assert h.call("reader", "notes.read", {"folder": "inbox", "limit": 5}, token=g.token).allowed
    assert h.call("reader", "notes.read", {"folder": "inbox", "limit": 6}, token=g.token).code == "POLICY_DENIED"
    with pytest.raises(ValueError, match="did you mean 'one_of'"):  # refused before anything is sent
        h.delegate("writer", "reader", args={"notes.read.folder": {"one_off": ["inbox"]}})
    with pytest.raises(ValueError, match="'tool.argument'"):
        h.delegate("writer", "reader", args={"limit": {"max": 5}})


def test_delegation_outside_the_policy_is_denied_with_its_reason(h):
    d = h.delegate("reader", "writer")
    assert d.code == "DELEGATION_DENIED" and "may not delegate to 'writer'" in d.reason and d.token is None


# ---------------------------------------------------------------------- approvals


def test_a_parked_call_is_answered_by_the_test(h):
    assert h.call("writer", "notes.write", {"folder": "drafts", "text": "calm"}).allowed  # no approval needed
    d = h.call("writer", "notes.write", {"folder": "drafts", "text": "URGENT: ship"})
    assert d.code == "APPROVAL_DENIED" and "did not approve" in d.reason
    h.advance(1)
    ok = h.call("writer", "notes.write", {"folder": "drafts", "text": "URGENT: ship"}, approve=True)
    assert ok.allowed and [r["kind"] for r in ok.records] == ["approval_requested", "approval", "decision", "outcome"]
    assert ok.records[1]["approver"] == "policy-test"


# ---------------------------------------------------------------------- stubs and set-up


def test_stubs_keep_the_contract_and_replace_the_body():
    RAN.clear()
    seen = []
    stubs = {"notes.read": lambda folder, limit: seen.append((folder, limit)) or ["stubbed"],
             "notes.write": {"id": 7}}
    with PolicyHarness(TOOLS, stubs=stubs) as h:
        h.add_agent(WRITER)
        assert h.call("writer", "notes.read", {"folder": "inbox"}).value == ["stubbed"]
        assert h.call("writer", "notes.write", {"folder": "drafts", "text": "x"}).value == {"id": 7}
        assert h.call("writer", "notes.read", {"folder": "inbox", "x": 1}).code == "MALFORMED"
    assert seen == [("inbox", 10)] and RAN == []


def test_run_tools_false_runs_no_tool_code():
    RAN.clear()
    with PolicyHarness(TOOLS, run_tools=False) as h:
        h.add_agent(WRITER)
        d = h.call("writer", "notes.read", {"folder": "inbox"})
    assert d.allowed and d.value is None and RAN == []


def test_set_up_errors_are_clear():
    with PolicyHarness([notes_read]) as h:
        with pytest.raises(ConfigError) as info:
            h.add_agent(WRITER)
        assert "names tool 'notes.fail', which the harness does not offer" in info.value.reason
        with pytest.raises(ConfigError, match="effect 'read', policy says 'write'"):
            h.add_agent({"agent": "w", "tools": {"notes.read": {"effect": "write"}}})
        with pytest.raises(ConfigError, match="has no parameter 'foldr'.*did you mean 'folder'"):
            h.add_agent({"agent": "m", "tools": {"notes.read": {"effect": "read", "args": {"foldr": {"exact": "x"}}}}})
        with pytest.raises(ConfigError, match="no agent 'ghost'"):
            h.call("ghost", "notes.read", {"folder": "inbox"})
    with pytest.raises(ConfigError, match="stubs for tools that are not given"):
        PolicyHarness([notes_read], stubs={"nope": 1})


def test_audit_dir_is_kept_and_a_temporary_one_removed(tmp_path):
    with PolicyHarness(TOOLS, audit_dir=tmp_path / "a") as h:
        h.add_agent(READER)
        h.call("reader", "notes.read", {"folder": "inbox"})
        temp = PolicyHarness(TOOLS)
        temp_dir = temp.dir
        temp.close()
    assert (tmp_path / "a" / "audit.log").exists() and not temp_dir.exists()


def test_the_tools_of_a_module_by_name():
    with PolicyHarness(["runtime.toolbox"], run_tools=False) as h:
        assert {"python.exec", "fs.read", "http.fetch"} <= set(h.tools)
        h.add_agent({"agent": "a", "tools": {"fs.read": {"effect": "read", "args": {"path": {"path_under": "/w"}}}}})
        d = h.call("a", "fs.read", {"path": "/w/../etc/passwd"})
        assert d.code == "POLICY_DENIED" and "'/etc/passwd' not under '/w'" in d.reason
        assert h.call("a", "fs.read", {"path": "/w/x"}).audit["sandbox"] == "gvisor"  # the policy's, on record


@tool(effect="read", name="notes.wait")
async def notes_wait(ms: int) -> str:
    """Waits."""
    await asyncio.sleep(ms / 1000)
    return "done"


def test_concurrent_calls_meet_the_concurrency_limit():
    policy = {"agent": "w", "tools": {"notes.wait": {"effect": "read"}}, "quotas": {"max_concurrent": 1}}

    async def two_at_once(h: PolicyHarness) -> list[str]:
        # The first call holds its slot until its tool returns; the second arrives meanwhile.
        first = asyncio.ensure_future(h.acall("w", "notes.wait", {"ms": 200}))
        await asyncio.sleep(0)
        second = await h.acall("w", "notes.wait", {"ms": 0})
        return [(await first).result, second.result]

    with PolicyHarness([notes_wait]) as h:
        h.add_agent(policy)
        assert asyncio.run(two_at_once(h)) == ["allow", "CONCURRENCY_LIMIT"]


def test_a_stub_may_ask_for_the_tool_context():
    def post(folder: str, text: str, ctx) -> dict:
        return {"agent": ctx.agent, "job": ctx.job, "folder": folder}

    with PolicyHarness(TOOLS, stubs={"notes.write": post}, job_id="j-ctx") as h:
        h.add_agent(WRITER)
        d = h.call("writer", "notes.write", {"folder": "drafts", "text": "x"})
    assert d.value == {"agent": "writer", "job": "j-ctx", "folder": "drafts"}
