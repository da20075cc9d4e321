"""Attacks on the rules themselves (issue 10, items 9, 12, 13, 17), through the real path.

Each test loads a real policy (YAML, ``parse_policy``, ``check_policy_tools``), mints the agent's
root token from it, registers the agent with the real ``Supervisor`` (real key ring, real tool
worker, a real ``AuditLog`` file), sends sealed requests, and checks the typed reply, that the
tool did not run, and the audit record on disk.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import secrets
import time
from pathlib import Path
from typing import Annotated, Any

import msgpack
import pytest
import yaml

from runtime.errors import ApprovalDenied, ConfigError, ErrorCode, PolicyDenied, TokenRejected, WardenError
from runtime.job import load_job
from runtime.protocol import REQUEST_VERSION, decode_reply, encode_batch, encode_call, seal_request
from runtime.sandbox.worker import ToolWorker
from runtime.testing import FakeClock, InProcessDispatcher
from runtime.tool import HOST, PATH, URL, tool
from runtime.trusted.audit import AuditLog
from runtime.auditlog import read_records
from runtime.trusted.capability import MAX_REGEX_CAVEATS, Arg, KeyRing
from runtime.observe import NullObserver
from runtime.policyfile import check_policy_tools, parse_policy
from runtime.trusted.supervisor import AgentEntry, Supervisor

JOB = "job-rules"
RAN: list[tuple[str, Any]] = []


@tool(effect="read")
def read_raw(path: str) -> str:
    """Reads a file by a path it receives as given (no PATH annotation)."""
    RAN.append(("read_raw", path))
    with open(path, encoding="utf-8") as f:
        return f.read()


@tool(effect="read")
def read_file(path: Annotated[str, PATH]) -> str:
    """Reads a file by a canonicalised path."""
    RAN.append(("read_file", path))
    return path


@tool(effect="write")
def transfer(amount: float, memo: str = "") -> str:
    """Moves money."""
    RAN.append(("transfer", amount))
    return "sent"


@tool(effect="execute")
def run(cmd: str) -> str:
    """Runs a command (here: records it)."""
    RAN.append(("run", cmd))
    return "ran"


TOOLS = {t.name: t for t in (read_raw, read_file, transfer, run)}
SPECS = {n: t.spec for n, t in TOOLS.items()}


class PendingWatch(NullObserver):
    """Sets an event when a call is parked for approval, so a test awaits it instead of sleeping."""

    def __init__(self) -> None:
        self.parked = asyncio.Event()

    def approvals_pending(self, count: int) -> None:
        if count:
            self.parked.set()


class Rig:
    """A real supervisor, key ring, tool worker and audit log file; agents come from policy YAML."""

    def __init__(self, tmp_path: Path) -> None:
        self.clock = FakeClock(time.time())
        self.audit_path = tmp_path / "audit.log"
        self.audit = AuditLog(self.audit_path)
        self.keyring = KeyRing.generate()
        self.observer = PendingWatch()
        dispatch_key = secrets.token_bytes(32)
        worker = ToolWorker(dispatch_key=dispatch_key, tools=TOOLS, job=JOB, clock=self.clock)
        self.sup = Supervisor(job_id=JOB, keyring=self.keyring, tools=SPECS, audit=self.audit,
                              dispatcher=InProcessDispatcher(worker), dispatch_key=dispatch_key, clock=self.clock,
                              observer=self.observer)
        self.keys: dict[str, bytes] = {}
        self.tokens: dict[str, bytes] = {}
        RAN.clear()

    def add_policy(self, text: str, *extra_caveats: Any) -> str:
        import yaml

        policy = parse_policy(yaml.safe_load(text), source="test-policy")
        check_policy_tools(policy, SPECS, source="test-policy")
        name = policy.agent
        self.keys[name] = secrets.token_bytes(32)
        root = self.keyring.mint(holder=name, caveats=policy.root_caveats(job_id=JOB, now=self.clock()))
        entry = AgentEntry(name, self.keys[name], approvals=policy.approval_rules(), root_token_id=root.token_id)
        self.sup.register_agent(entry, policy.agent_quota())
        self.tokens[name] = root.attenuate(*extra_caveats).encode()
        return name

    def request(self, agent: str, tool_name: str, **args: Any) -> bytes:
        return encode_call(agent=agent, token=self.tokens[agent], tool=tool_name, args=args,
                           request_key=self.keys[agent])

    def send(self, data: bytes) -> bytes:
        return asyncio.run(self.sup.call(data))

    def records(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        return [r for r in read_records(self.audit_path)
                if r.get("kind") == kind and all(r.get(k) == v for k, v in match.items())]

    def denied(self, raw: bytes, cls: type[WardenError], code: ErrorCode) -> WardenError:
        """The reply is the typed refusal, and the last decision record on disk says so."""
        with pytest.raises(cls) as info:
            decode_reply(raw)
        assert info.value.code is code, info.value
        decisions = self.records("decision")
        assert decisions and decisions[-1]["decision"] == "deny" and decisions[-1]["code"] == code.value
        return info.value

    def close(self) -> None:
        self.audit.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def policy(agent: str, tools: str) -> str:
    return f"agent: {agent}\ntools:\n{tools}"


# ------------------------------------------------------------------ 9. slow regular expressions


@pytest.mark.parametrize("pattern,value", [("(a|a)*b", "a" * 60_000), (r"\w+\d+", "a" * 60_000),
                                           (".*a.*b", "a" * 60_000), ("(a+)+b", "a" * 60_000)])
def test_backtracking_patterns_on_a_long_model_chosen_argument_are_decided_by_re2(rig, pattern, value):
    """These stalled Python's engine for seconds; RE2 decides in one linear pass, here a denial."""
    a = rig.add_policy(policy("a", f"  run:\n    effect: execute\n    args:\n      cmd: {{regex: '{pattern}'}}\n"))
    rig.denied(rig.send(rig.request(a, "run", cmd=value)), PolicyDenied, ErrorCode.POLICY_DENIED)
    assert RAN == []
    assert decode_reply(rig.send(rig.request(a, "run", cmd=value + ("b" if "b" in pattern else "1"))))["value"] == "ran"


@pytest.mark.parametrize("pattern", [r"(a)\1", "a(?=b)", "x" * 513, ".{0,1000}"])
def test_a_pattern_the_token_check_would_refuse_fails_at_policy_load_not_at_run_time(pattern):
    text = policy("a", f"  run:\n    effect: execute\n    args:\n      cmd: {{regex: '{pattern}'}}\n")
    import yaml

    with pytest.raises(ConfigError) as info:
        parse_policy(yaml.safe_load(text), source="p.yaml")
    assert info.value.code is ErrorCode.POLICY_INVALID
    assert "at tools.run.args.cmd" in info.value.reason


HEAVY = "[ab]*a[ab]{990}"  # 15 characters, ~1,000 RE2 instructions, defeats RE2's fast path


def test_a_heavy_pattern_on_a_long_value_is_denied_before_it_runs(rig):
    """Linear is not free: a holder appends a pattern built to be slow and the model sends 64 KiB.
    The check refuses work over MAX_REGEX_WORK (program size x bytes) instead of running it."""
    a = rig.add_policy(policy("a", "  run:\n    effect: execute\n"), Arg("run", "cmd", "regex", HEAVY))
    err = rig.denied(rig.send(rig.request(a, "run", cmd="ab" * 32768)), PolicyDenied, ErrorCode.POLICY_DENIED)
    assert "regex work" in rig.records("decision")[-1]["reason"] and RAN == []
    assert err.tool == "run"
    assert decode_reply(rig.send(rig.request(a, "run", cmd="a" * 991)))["value"] == "ran"  # short: judged


def test_a_token_with_more_regex_caveats_than_allowed_is_refused(rig):
    cmd_rules = [Arg("run", "cmd", "regex", f".*{i}.*") for i in range(MAX_REGEX_CAVEATS + 1)]
    a = rig.add_policy(policy("a", "  run:\n    effect: execute\n"), *cmd_rules)
    rig.denied(rig.send(rig.request(a, "run", cmd="0123456789")), TokenRejected, ErrorCode.BAD_TOKEN)
    assert "regex caveats" in rig.records("decision")[-1]["reason"] and RAN == []
    rules = "".join(f"        x{i}: {{regex: 'a{i}'}}\n" for i in range(MAX_REGEX_CAVEATS + 1))
    with pytest.raises(ConfigError, match="its token would be refused: more than 8 regex caveats"):
        parse_policy(yaml.safe_load(policy("a", f"  run:\n    effect: execute\n    args:\n{rules}")), source="p")


def test_a_batch_is_rate_limited_before_its_caveats_are_evaluated(rig, monkeypatch):
    """A batch of slow checks cannot outrun the agent's rate: past its burst, items are refused
    before any caveat is evaluated."""
    from runtime.trusted import capability

    a = rig.add_policy(policy("a", "  run:\n    effect: execute\n    args:\n      cmd: {regex: 'go.*'}\n"
                                   "quotas: {rate_per_s: 1, burst: 1}\n"))
    judged = []
    real = capability._regex_reason
    monkeypatch.setattr(capability, "_regex_reason", lambda p, v: judged.append(v) or real(p, v))
    raw = asyncio.run(rig.sup.call_batch(encode_batch(agent=a, token=rig.tokens[a], request_key=rig.keys[a],
                                                      calls=[("run", {"cmd": f"go{i}"}) for i in range(15)])))
    codes = [r["error"]["code"] if not r["ok"] else "ok" for r in msgpack.unpackb(raw)["batch"]]
    assert codes == ["ok"] + ["RATE_LIMITED"] * 14
    assert judged == ["go0"] and RAN == [("run", "go0")]


def test_a_regex_value_over_64_kib_is_denied(rig):
    a = rig.add_policy(policy("a", "  run:\n    effect: execute\n    args:\n      cmd: {regex: '.*'}\n"))
    assert decode_reply(rig.send(rig.request(a, "run", cmd="x" * 65536)))["value"] == "ran"
    rig.denied(rig.send(rig.request(a, "run", cmd="x" * 65537)), PolicyDenied, ErrorCode.POLICY_DENIED)
    assert len(RAN) == 1


# ---------------------------------------------------------- 12. values an approval rule or replay check cannot judge


def approve_big_transfers(agent: str = "a") -> str:
    return policy(agent, "  transfer:\n    effect: write\n    approval: {when: {amount: {min: 1000}}, timeout_s: 30}\n")


def park_then_deny(rig: Rig, data: bytes) -> tuple[bytes, list[dict[str, Any]]]:
    """Send ``data``; if it is parked for approval, an operator denies it. Returns the reply and the parked calls."""
    async def go() -> tuple[bytes, list[dict[str, Any]]]:
        task = asyncio.create_task(rig.sup.call(data))
        parked = asyncio.create_task(rig.observer.parked.wait())
        await asyncio.wait({task, parked}, return_when=asyncio.FIRST_COMPLETED)
        pending = rig.sup.approvals.list()
        for p in pending:
            rig.sup.decide_approval(p["id"], approve=False, approver="ops", reason="not this one")
        parked.cancel()
        return await task, pending
    return asyncio.run(go())


def test_nan_amount_does_not_skip_an_approval_rule(rig):
    a = rig.add_policy(approve_big_transfers())
    raw, pending = park_then_deny(rig, rig.request(a, "transfer", amount=math.nan))
    assert [p["tool"] for p in pending] == ["transfer"]
    rig.denied(raw, ApprovalDenied, ErrorCode.APPROVAL_DENIED)
    assert rig.records("approval_requested", agent=a, tool="transfer")
    assert rig.records("approval", decision="deny", approver="ops")
    assert RAN == []


def test_a_value_the_rule_judges_below_the_threshold_is_not_parked(rig):
    a = rig.add_policy(approve_big_transfers())
    raw, pending = park_then_deny(rig, rig.request(a, "transfer", amount=5.0))
    assert pending == [] and decode_reply(raw)["value"] == "sent"
    assert not rig.records("approval_requested")


def test_a_newline_does_not_make_a_when_regex_miss(rig):
    a = rig.add_policy(policy("a", "  run:\n    effect: execute\n    approval: {when: {cmd: {regex: 'rm .*'}}}\n"))
    raw, pending = park_then_deny(rig, rig.request(a, "run", cmd="rm -rf /\nexit"))
    assert [p["args"]["cmd"] for p in pending] == ["rm -rf /\nexit"]
    rig.denied(raw, ApprovalDenied, ErrorCode.APPROVAL_DENIED)
    assert RAN == []



@pytest.mark.parametrize("ts", [math.nan, math.inf, -math.inf])
def test_a_request_time_that_is_not_finite_is_refused_as_replay(rig, ts):
    a = rig.add_policy(policy("a", "  run: {effect: execute}\n"))
    nonce = os.urandom(16)
    body = {"v": REQUEST_VERSION, "op": "call", "agent": a, "token": rig.tokens[a], "tool": "run",
            "args": {"cmd": "ls"}, "nonce": nonce, "ts": ts}
    data = seal_request(body, rig.keys[a])
    rig.denied(rig.send(data), TokenRejected, ErrorCode.REPLAY)
    rig.clock.advance(rig.sup.nonces.window_s * 2)  # past the window: the nonce table is pruned
    rig.sup.nonces.check(a, os.urandom(16), rig.clock())  # a fresh request triggers the prune
    rig.denied(rig.send(data), TokenRejected, ErrorCode.REPLAY)  # the captured request still does nothing
    assert RAN == []


# ------------------------------------------------------------- 13. path and URL rules on raw parameters


def test_path_under_on_a_parameter_without_path_is_a_policy_error():
    import yaml

    p = parse_policy(yaml.safe_load(policy("a", "  read_raw:\n    effect: read\n    args:\n"
                                                 "      path: {path_under: /data}\n")))
    with pytest.raises(ConfigError) as info:
        check_policy_tools(p, SPECS, source="p.yaml")
    assert info.value.code is ErrorCode.POLICY_INVALID
    assert "at tools.read_raw.args.path: path_under needs a parameter declared PATH" in info.value.reason
    p = parse_policy(yaml.safe_load(policy("a", "  read_raw:\n    effect: read\n    args:\n"
                                                 "      path: {url_host: [example.com]}\n")))
    with pytest.raises(ConfigError, match="url_host needs a parameter declared URL"):
        check_policy_tools(p, SPECS)
    p = parse_policy(yaml.safe_load(policy("a", "  read_file:\n    effect: read\n"
                                                 "    approval: {when: {pth: {path_under: /data}}}\n")))
    with pytest.raises(ConfigError, match=re.escape("at tools.read_file.approval.when.pth: tool 'read_file' has no "
                                                    "parameter 'pth'; its parameters: path (did you mean 'path'?)")):
        check_policy_tools(p, SPECS)


def test_a_symlink_and_dotdot_on_a_raw_parameter_cannot_read_outside(rig, tmp_path):
    """A token (minted before the load check, or narrowed by its holder) with path_under on a raw parameter."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    data.mkdir()
    (outside / "secret.txt").write_text("secret")
    (data / "link").symlink_to(outside / "deep")
    a = rig.add_policy(policy("a", "  read_raw: {effect: read}\n"), Arg("read_raw", "path", "path_under", str(data)))
    sneaky = f"{data}/link/../secret.txt"  # lexically {data}/secret.txt; the kernel reads outside/secret.txt
    assert open(sneaky, encoding="utf-8").read() == "secret"
    rig.denied(rig.send(rig.request(a, "read_raw", path=sneaky)), PolicyDenied, ErrorCode.POLICY_DENIED)
    assert RAN == []
    (data / "ok.txt").write_text("fine")
    assert decode_reply(rig.send(rig.request(a, "read_raw", path=f"{data}/ok.txt")))["value"] == "fine"


def test_path_under_on_a_path_parameter_checks_what_the_tool_receives(rig):
    a = rig.add_policy(policy("a", "  read_file:\n    effect: read\n    args:\n      path: {path_under: /data}\n"))
    assert decode_reply(rig.send(rig.request(a, "read_file", path="/data/x/../y")))["value"] == "/data/y"
    rig.denied(rig.send(rig.request(a, "read_file", path="/data/../etc/passwd")), PolicyDenied,
               ErrorCode.POLICY_DENIED)
    assert RAN == [("read_file", "/data/y")]


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("rule,fragment", [
    ("channel: {path_under: /data}", "path_under needs a parameter declared PATH"),  # chat.read's channel is raw
    ("channel: {url_host: [example.com]}", "url_host needs a parameter declared URL"),
    ("chanel: {one_of: [general]}", "has no parameter 'chanel'; its parameters: channel, limit (did you mean 'channel'?)"),
    ("channel: {regex: '(gen)\\1'}", "not valid RE2 syntax"),  # a backreference: the token check refuses it
])
def test_job_start_refuses_a_policy_rule_the_tools_parameters_make_wrong(tmp_path, monkeypatch, rule, fragment):
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    (tmp_path / "p.yaml").write_text(f"agent: a\ntools:\n  chat.read:\n    effect: read\n    args:\n      {rule}\n")
    job = tmp_path / "job.yaml"
    job.write_text("name: j\ntask: t\nentry: [a]\ntools: [agents.chat]\n"
                   "agents:\n  - {name: a, class: \"agents.demo:LeadAgent\", policy: p.yaml}\n")
    with pytest.raises(ConfigError) as info:
        load_job(job)
    assert info.value.code is ErrorCode.POLICY_INVALID
    assert fragment in info.value.reason and "at tools.chat.read.args.chan" in info.value.reason


# ---------------------------------------------------------------------- 17. a rule that constrains nothing


@pytest.mark.parametrize("rule", ["{path_under: }", "{regex: }", "{one_of: }", "{max: }", "{url_host: }",
                                  "{max_bytes: }", "{min: 1, max: }", "{}", "{min: .nan}", "{max: .nan}"])
def test_a_rule_key_without_a_value_is_a_policy_error(rule):
    import yaml

    text = policy("a", f"  read_file:\n    effect: read\n    args:\n      path: {rule}\n")
    with pytest.raises(ConfigError) as info:
        parse_policy(yaml.safe_load(text), source="p.yaml")
    assert info.value.code is ErrorCode.POLICY_INVALID
    assert "at tools.read_file.args.path" in info.value.reason


def test_an_empty_rule_in_an_approval_when_is_a_policy_error_too():
    import yaml

    text = policy("a", "  transfer:\n    effect: write\n    approval: {when: {amount: {min: }}}\n")
    with pytest.raises(ConfigError, match="at tools.transfer.approval.ApprovalSpec.when.amount"):
        parse_policy(yaml.safe_load(text))


def test_exact_null_is_a_rule_not_an_empty_key(rig):
    a = rig.add_policy(policy("a", "  transfer:\n    effect: write\n    args:\n      memo: {exact: null}\n"))
    rig.denied(rig.send(rig.request(a, "transfer", amount=1.0, memo="x")), PolicyDenied, ErrorCode.POLICY_DENIED)
    assert RAN == []


# ------------------------------------------------------------------ rules that could never match


@tool(effect="delete")
def drop_db(host: Annotated[str, HOST]) -> str:
    """Drops a database on a host."""
    return host


@tool(effect="read")
def web_get(url: Annotated[str, URL]) -> str:
    """Fetches a URL."""
    return url


@pytest.mark.parametrize("tool_name,rules,why", [
    # An approval rule a canonical argument can never match lets every call through unasked.
    ("drop_db", "approval: {when: {host: {one_of: [Prod-DB.internal]}}}", "canonical form of a HOST"),
    ("drop_db", "approval: {when: {host: {url_host: ['https://prod.internal']}}}", "never match a bare HOST"),
    ("web_get", "approval: {when: {url: {regex: 'https://pay[.]example[.]com/.*'}}}", "use url_host"),
    ("read_file", "approval: {when: {path: {exact: /data/../etc/x}}}", "canonical form of a PATH"),
    # The same mistake in an allow rule denies every call: refused too, as surely not meant.
    ("read_file", "args: {path: {one_of: [/data/x, /data//y]}}", "canonical form of a PATH"),
])
def test_a_rule_that_could_never_match_what_the_tool_receives_is_refused_at_load(tool_name, rules, why):
    from runtime.registry import check_policy_against_tools

    tools = {**TOOLS, "drop_db": drop_db, "web_get": web_get}
    effect = tools[tool_name].spec.effect
    p = parse_policy(yaml.safe_load(policy("a", f"  {tool_name}:\n    effect: {effect}\n    {rules}\n")), source="p")
    with pytest.raises(ConfigError) as info:
        check_policy_against_tools("a", p, tools, offered_by="the test")
    assert info.value.code is ErrorCode.POLICY_INVALID and why in info.value.reason
    fine = {"drop_db": "approval: {when: {host: {one_of: [prod-db.internal]}}}",
            "web_get": "approval: {when: {url: {url_host: [pay.example.com]}}}",
            "read_file": "args: {path: {one_of: [/data/x, /data/y]}}"}[tool_name]
    check_policy_against_tools("a", parse_policy(yaml.safe_load(
        policy("a", f"  {tool_name}:\n    effect: {effect}\n    {fine}\n")), source="p"), tools, offered_by="the test")
