"""Policies: the real ones load and mean what they say; every broken one stops the job with a precise error."""

from pathlib import Path

import pytest

from runtime.isolation import sandbox_settings, unsandboxed_tools
from runtime.cli import main
from runtime.errors import ConfigError, ErrorCode, PolicyDenied, TokenRejected
from runtime.trusted.capability import (Arg, Audience, CallBudget, Effects, Expires, KeyRing, MaxDepth,
                                        Tools)
from tests.unit.caveat_walk import CallContext, evaluate
from runtime.trusted.ledger import AgentQuota
from runtime.trusted.policy import Policy
from runtime.policyfile import load_policy, parse_policy

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"
JOB = "job-test"
NOW = 1_800_000_000.0
EFFECT = {"chat.list_channels": "read", "chat.read": "read", "chat.post": "write",
          "chat.delete_message": "delete", "chat.delete_channel": "delete", "http.post": "write"}


def policy_path(name: str) -> Path:
    return POLICIES / f"{name}.yaml"


def verified(policy: Policy, now: float = NOW):
    keyring = KeyRing.generate()
    token = keyring.mint(holder=policy.agent, caveats=policy.root_caveats(job_id=JOB, now=now))
    return keyring.verify(token.encode())


def ctx(agent: str, tool: str, now: float = NOW, job: str = JOB, **args) -> CallContext:
    return CallContext(agent, tool, EFFECT[tool], args, now, job)


def allowed(vt, tool: str, **args) -> bool:
    try:
        evaluate(vt, ctx(vt.holder, tool, **args))
    except PolicyDenied as exc:
        assert exc.code is ErrorCode.POLICY_DENIED
        return False
    return True


# -------------------------------------------------------------- the real policies


def test_all_real_policies_load():
    names = sorted(p.stem for p in POLICIES.glob("*.yaml"))
    assert names == ["analyst", "digest", "helpdesk", "lead", "moderator", "summarizer"]
    for name in names:
        assert load_policy(policy_path(name)).agent == name


def test_lead_policy():
    p = load_policy(policy_path("lead"))
    assert set(p.tools) == {"chat.list_channels", "chat.read", "chat.post"}
    assert p.tools["chat.post"].effect == "write"
    assert p.delegation.can_delegate_to == ["summarizer"]
    assert p.delegation.max_depth == 1
    assert p.quotas.max_calls == 50
    assert p.agent_quota() == AgentQuota(rate_per_s=20, burst=20, max_concurrent=4)
    vt = verified(p)
    assert allowed(vt, "chat.list_channels")
    assert allowed(vt, "chat.read", channel="general")
    assert allowed(vt, "chat.read", channel="random")
    assert not allowed(vt, "chat.read", channel="secrets")
    assert allowed(vt, "chat.post", channel="summaries", text="daily summary", mentions=[])
    assert allowed(vt, "chat.post", channel="summaries", text="daily summary", mentions=["alice", "bob"])
    assert not allowed(vt, "chat.post", channel="summaries", text="daily summary", mentions=["mallory"])
    assert not allowed(vt, "chat.post", channel="summaries", text="daily summary", mentions=["bob"] * 4)
    assert not allowed(vt, "chat.post", channel="general", text="hi", mentions=[])
    assert not allowed(vt, "chat.post", channel="summaries", text="x" * 4097, mentions=[])
    assert not allowed(vt, "chat.delete_message", channel="random", message_id=1)
    assert not allowed(vt, "http.post", url="https://hooks.slack.example/x", body="b")


def test_moderator_policy():
    p = load_policy(policy_path("moderator"))
    assert p.delegation.can_delegate_to == []
    assert p.delegation.max_depth == 0
    assert p.agent_quota() == AgentQuota(rate_per_s=5, burst=5, max_concurrent=1)
    vt = verified(p)
    assert allowed(vt, "chat.read", channel="random")
    assert allowed(vt, "chat.delete_message", channel="random", message_id=3)
    assert not allowed(vt, "chat.delete_message", channel="general", message_id=3)
    assert not allowed(vt, "chat.delete_channel", channel="random")
    assert not allowed(vt, "chat.post", channel="random", text="hi")
    assert not allowed(vt, "chat.list_channels")


def test_summarizer_policy():
    p = load_policy(policy_path("summarizer"))
    vt = verified(p)
    assert allowed(vt, "chat.read", channel="general", limit=100)
    assert not allowed(vt, "chat.read", channel="general", limit=0)
    assert not allowed(vt, "chat.read", channel="general", limit=101)
    assert not allowed(vt, "chat.read", channel="general")  # a constrained argument is required
    assert allowed(vt, "http.post", url="https://hooks.slack.example/T/B", body="summary")
    assert not allowed(vt, "http.post", url="https://evil.example/T/B", body="summary")
    assert not allowed(vt, "http.post", url="https://hooks.slack.example@evil.example/", body="x")
    assert not allowed(vt, "http.post", url="https://hooks.slack.example/", body="x" * 8193)
    assert not allowed(vt, "chat.post", channel="general", text="hi")
    assert not allowed(vt, "chat.delete_message", channel="random", message_id=1)


# ------------------------------------------------------------------- root caveats


def test_root_caveats_carry_audience_expiry_budget_and_depth():
    p = load_policy(policy_path("lead"))
    vt = verified(p)
    assert vt.holder == "lead"
    by_type = {type(c): c for c in vt.caveats}
    assert by_type[Audience] == Audience(JOB)
    assert by_type[Expires] == Expires(NOW + 900)
    assert by_type[CallBudget] == CallBudget(50)
    assert by_type[MaxDepth] == MaxDepth(1)
    assert by_type[Tools] == Tools(("chat.list_channels", "chat.post", "chat.read"))
    assert by_type[Effects] == Effects(("read", "write"))
    assert Arg("chat.read", "channel", "one_of", ("general", "random")) in vt.caveats
    assert [(kind, limit) for _, kind, limit in vt.budgets] == [("calls", 50.0)]
    assert vt.max_depth == 1


def test_root_token_is_bound_to_the_job_and_expires():
    vt = verified(load_policy(policy_path("lead")))
    with pytest.raises(TokenRejected) as info:
        evaluate(vt, ctx("lead", "chat.list_channels", job="another-job"))
    assert info.value.code is ErrorCode.WRONG_AUDIENCE
    with pytest.raises(TokenRejected) as info:
        evaluate(vt, ctx("lead", "chat.list_channels", now=NOW + 901))
    assert info.value.code is ErrorCode.TOKEN_EXPIRED
    evaluate(vt, ctx("lead", "chat.list_channels", now=NOW + 899))


def test_cost_budget_only_when_declared():
    p = parse_policy({"agent": "a", "tools": {"t": {"effect": "read"}}, "quotas": {"max_cost": 2.5}})
    caveats = p.root_caveats(job_id=JOB, now=NOW)
    assert not any(isinstance(c, CallBudget) for c in caveats)
    assert [(kind, limit) for _, kind, limit in verified(p).budgets] == [("cost", 2.5)]


def test_delegate_caveats_never_exceed_the_policy():
    p = load_policy(policy_path("summarizer"))
    caveats = p.delegate_caveats(job_id=JOB)
    assert Tools(("chat.list_channels", "chat.read", "http.post")) in caveats
    assert Effects(("read", "write")) in caveats
    assert Arg("http.post", "url", "url_host", ("hooks.slack.example",)) in caveats


def test_path_under_is_canonicalised():
    p = parse_policy({"agent": "a", "tools": {"fs.read": {"effect": "read",
                                                         "args": {"path": {"path_under": "/data//x/../y/"}}}}})
    assert p.tools["fs.read"].args["path"].path_under == "/data/y"


# --------------------------------------------------------------- broken policies

GOOD_TOOL = {"effect": "read"}


def write(tmp_path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BROKEN = {
    "typo_tool_key": ("agent: a\ntool:\n  t: {effect: read}\n", ["at tool: Extra inputs are not permitted"]),
    "unknown_key_in_tool_rule": ("agent: a\ntools:\n  t: {effect: read, arg: {}}\n",
                                 ["at tools.t.arg: Extra inputs are not permitted"]),
    "bad_effect": ("agent: a\ntools:\n  t: {effect: erase}\n", ["at tools.t.effect:", "'read'"]),
    "regex_does_not_compile": ("agent: a\ntools:\n  t:\n    effect: read\n    args:\n      q: {regex: '([a-'}\n",
                               ["at tools.t.args.q:", "not valid RE2 syntax"]),
    "relative_path_under": ("agent: a\ntools:\n  t:\n    effect: read\n    args:\n      p: {path_under: data}\n",
                            ["at tools.t.args.p.path_under:", "path must be absolute"]),
    "unusable_path_under": ('agent: a\ntools:\n  t:\n    effect: read\n    args:\n      p: {path_under: "/da\\0ta"}\n',
                            ["at tools.t.args.p.path_under:", "not a usable path"]),
    "empty_arg_rule": ("agent: a\ntools:\n  t:\n    effect: read\n    args:\n      p: {}\n",
                       ["at tools.t.args.p:", "at least one key"]),
    "negative_max_bytes": ("agent: a\ntools:\n  t:\n    effect: read\n    args:\n      p: {max_bytes: -1}\n",
                           ["at tools.t.args.p.max_bytes:", "greater than or equal to 0"]),
    "url_host_empty_label": ("agent: a\ntools:\n  t:\n    effect: read\n    args:\n      u: {url_host: ['..cafe']}\n",
                             ["at tools.t.args.u.url_host.0:", "not a plain DNS name"]),
    "url_host_port_without_scheme": ("agent: a\ntools:\n  t:\n    effect: read\n    args:\n"
                                     "      u: {url_host: ['ok.example', 'api.example:8443']}\n",
                                     ["at tools.t.args.u.url_host.1:"]),
    "url_host_with_path": ("agent: a\ntools:\n  t:\n    effect: read\n    args:\n"
                           "      u: {url_host: ['https://api.example/v1']}\n",
                           ["at tools.t.args.u.url_host.0:", "http(s)://host[:port]"]),
    "unknown_top_level_key": ("agent: a\ntools: {t: {effect: read}}\nquota: {max_calls: 1}\n",
                              ["at quota: Extra inputs are not permitted"]),
    "non_mapping": ("- agent: a\n- tools: {}\n", ["a policy must be a YAML mapping, got list"]),
    "empty_file": ("", ["a policy must be a YAML mapping, got NoneType"]),
    "invalid_yaml": ("agent: [a\ntools: {}\n", ["not valid YAML"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_policy_is_config_error_naming_the_place(tmp_path, case):
    text, fragments = BROKEN[case]
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    assert info.value.code is ErrorCode.POLICY_INVALID
    assert str(path) in info.value.reason
    for fragment in fragments:
        assert fragment in info.value.reason


def test_missing_policy_file(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    assert info.value.code is ErrorCode.POLICY_INVALID
    assert f"{path}: cannot read policy" in info.value.reason


def test_typo_does_not_silently_drop_the_tools():
    with pytest.raises(ConfigError) as info:
        parse_policy({"agent": "a", "tool": {"t": GOOD_TOOL}}, source="p.yaml")
    assert info.value.code is ErrorCode.POLICY_INVALID
    assert info.value.reason.startswith("p.yaml: 2 error(s)")
    assert "at tools: Field required" in info.value.reason


@pytest.mark.parametrize("agent", ["", "has space", "x" * 65, "slash/name"])
def test_bad_agent_name(agent):
    with pytest.raises(ConfigError) as info:
        parse_policy({"agent": agent, "tools": {"t": GOOD_TOOL}})
    assert info.value.code is ErrorCode.POLICY_INVALID
    assert "at agent:" in info.value.reason


# --------------------------------------------------------------------------- CLI


def test_cli_check_good_policies(capsys):
    paths = [str(policy_path(n)) for n in ("lead", "moderator", "summarizer")]
    assert main(["policy", "check", *paths]) == 0
    out = capsys.readouterr().out
    assert f"{paths[0]}: ok (agent lead, 3 tools)" in out
    assert f"{paths[1]}: ok (agent moderator, 2 tools)" in out
    assert f"{paths[2]}: ok (agent summarizer, 3 tools)" in out


def test_cli_check_broken_policy(tmp_path, capsys):
    bad = write(tmp_path, BROKEN["typo_tool_key"][0])
    good = str(policy_path("lead"))
    assert main(["policy", "check", good, str(bad)]) == 1
    captured = capsys.readouterr()
    assert f"{good}: ok" in captured.out
    assert f"{bad}: 2 error(s)" in captured.err
    assert "at tool: Extra inputs are not permitted" in captured.err
    assert "at tools: Field required" in captured.err


def test_cli_check_missing_file(tmp_path, capsys):
    assert main(["policy", "check", str(tmp_path / "absent.yaml")]) == 1
    assert "absent.yaml: cannot read policy: No such file or directory" in capsys.readouterr().err


def test_cli_explain_names_every_tool_and_constraint(capsys):
    assert main(["policy", "explain", str(policy_path("summarizer"))]) == 0
    out = capsys.readouterr().out
    assert "agent: summarizer" in out
    table = {line.split()[0]: line for line in out.splitlines() if line.startswith(("chat.", "http."))}
    assert set(table) == {"chat.list_channels", "chat.read", "http.post"}
    assert "read" in table["chat.list_channels"] and "any arguments" in table["chat.list_channels"]
    assert "channel: one_of=['general', 'random']" in table["chat.read"]
    assert "limit: max=100.0, min=1.0" in table["chat.read"]
    assert "write" in table["http.post"]
    assert "url: url_host=['hooks.slack.example']" in table["http.post"]
    assert "body: max_bytes=8192" in table["http.post"]
    assert "calls: 20" in out
    assert "may delegate to: nobody" in out


def test_cli_explain_lead(capsys):
    assert main(["policy", "explain", str(policy_path("lead"))]) == 0
    out = capsys.readouterr().out
    for name in ("chat.list_channels", "chat.read", "chat.post"):
        assert name in out
    assert ("channel: exact='summaries'; mentions: each(one_of=['alice', 'bob', 'carol']), max_items=3; "
            "text: max_bytes=4096") in out
    assert "may delegate to: summarizer; max depth: 1" in out


def test_cli_explain_broken_policy(tmp_path, capsys):
    bad = write(tmp_path, BROKEN["bad_effect"][0])
    assert main(["policy", "explain", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("warden: POLICY_INVALID:")
    assert "at tools.t.effect:" in err


# ------------------------------------------------------------------ sandbox settings


def sandbox_policy(**extra: object) -> Policy:
    return parse_policy({"agent": "s", "tools": {"python.exec": {"effect": "execute"},
                                                 "shell.exec": {"effect": "execute"}}, **extra})


def test_sandbox_defaults_to_gvisor_with_default_limits():
    assert sandbox_settings(sandbox_policy()) == {"*": {"backend": "gvisor", "limits": {}}}


def test_tool_sandbox_overrides_policy_sandbox_field_by_field():
    p = parse_policy({"agent": "s", "sandbox": {"cpu_s": 2, "wall_s": 9},
                      "tools": {"python.exec": {"effect": "execute", "sandbox": {"backend": "bwrap", "wall_s": 5}},
                                "shell.exec": {"effect": "execute"}}})
    settings = sandbox_settings(p)
    assert settings["*"] == {"backend": "gvisor", "limits": {"cpu_s": 2.0, "wall_s": 9.0}}
    assert settings["python.exec"] == {"backend": "bwrap", "limits": {"cpu_s": 2.0, "wall_s": 5.0}}
    assert "shell.exec" not in settings  # inherits "*"


def test_unsandboxed_is_explicit_and_reported():
    from runtime.cli import explain

    p = sandbox_policy(sandbox={"unsandboxed": True})
    assert sandbox_settings(p)["*"]["backend"] == "none"
    assert unsandboxed_tools(p) == ["*"]
    assert "UNSANDBOXED" in explain(p)
    assert unsandboxed_tools(sandbox_policy()) == []


def test_unsandboxed_with_a_backend_is_ambiguous():
    with pytest.raises(ConfigError, match="either 'backend' or 'unsandboxed"):
        sandbox_policy(sandbox={"unsandboxed": True, "backend": "bwrap"})


@pytest.mark.parametrize("bad", [{"backend": "docker"}, {"cpu_s": 0}, {"memory_mb": 1}, {"walltime": 3}])
def test_bad_sandbox_settings_are_policy_errors(bad):
    with pytest.raises(ConfigError) as info:
        sandbox_policy(sandbox=bad)
    assert info.value.code is ErrorCode.POLICY_INVALID
