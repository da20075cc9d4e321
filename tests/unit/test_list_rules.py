"""Rules over list arguments (``each``, ``min_items``, ``max_items``) and what a policy must pass at load.

Calls go through the real supervisor (``PolicyHarness``: real key ring, token chain, audit file);
the token-level tests attenuate and verify real tokens, and hold the evaluation plan to the
reference walk in ``caveat_walk``.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgpack
import pytest

from runtime import PolicyHarness
from runtime.errors import ConfigError, ErrorCode, PolicyDenied, TokenRejected
from runtime.tool import PATH, tool
from runtime.trusted.capability import MAX_TOKEN_BYTES, Arg, KeyRing, Token, hmac_sha256
from runtime.policyfile import check_policy_tools, load_policy
from tests.unit.caveat_walk import CallContext, assert_plan_agrees

SENT: list[Any] = []


@tool(effect="write", name="mail.send")
def send(recipients: list, subject: str, attachments: list = []) -> dict[str, Any]:  # noqa: B006 - never mutated
    """Send a mail."""
    SENT.append(recipients)
    return {"sent": len(recipients)}


@tool(effect="read", name="files.open")
def open_file(path: Annotated[str, PATH], names: list = []) -> str:  # noqa: B006
    """Open a file."""
    return path


TOOLS = {t.spec.name: t for t in (send, open_file)}
FIVE = ["a@x.com", "b@x.com", "c@x.com", "d@x.com", "e@x.com"]


def mail_policy(rule: str) -> Any:
    return load_policy(f"agent: mailer\ntools:\n  mail.send:\n    effect: write\n    args:\n      recipients: {rule}\n")


def test_each_one_of_with_max_items_is_one_line_and_decides_every_item():
    with PolicyHarness(TOOLS) as h:
        h.add_agent(mail_policy(f"{{each: {{one_of: {FIVE}}}, min_items: 1, max_items: 3}}"))
        assert h.call("mailer", "mail.send", {"recipients": ["a@x.com", "e@x.com"], "subject": "hi"}).allowed
        d = h.call("mailer", "mail.send", {"recipients": ["a@x.com", "evil@y.com"], "subject": "hi"})
        assert d.code == "POLICY_DENIED" and "item 1: 'evil@y.com' is not" in d.reason
        assert d.audit["code"] == "POLICY_DENIED" and "evil@y.com" in d.audit["reason"]  # the record on disk
        d = h.call("mailer", "mail.send", {"recipients": FIVE[:4], "subject": "hi"})
        assert d.code == "POLICY_DENIED" and "4 items outside [1, 3]" in d.reason
        assert h.call("mailer", "mail.send", {"recipients": [], "subject": "hi"}).code == "POLICY_DENIED"
        d = h.call("mailer", "mail.send", {"recipients": "a@x.com", "subject": "hi"})  # not a list
        assert d.code in ("POLICY_DENIED", "MALFORMED")
    assert ["a@x.com", "evil@y.com"] not in SENT and FIVE[:4] not in SENT


def test_five_recipients_fit_a_token_that_enumerating_combinations_would_not():
    policy = mail_policy(f"{{each: {{one_of: {FIVE}}}, max_items: 5}}")
    token = KeyRing.generate().mint(holder="mailer", caveats=policy.root_caveats(job_id="j", now=0.0))
    assert len(token.encode()) < 1024


def test_each_applies_every_element_check_and_a_wrong_type_is_denied():
    ring = KeyRing.generate()
    rules = [("regex", r"[a-z]+@x\.com"), ("max_bytes", 8), ("range", (0, 10)), ("exact", "a"), ("path_under", "/d")]
    for check, param in rules:
        vt = ring.verify(ring.mint(holder="a", caveats=[Arg("t", "xs", "each", (check, param))]))
        for value in (["a@x.com"], ["a"], [3], [11], ["/d/f"], ["/e"], [None], "abc", 5, [[1]]):
            assert_plan_agrees(vt, CallContext("a", "t", "read", {"xs": value}, 0.0, "j"))
        assert vt.plan.check("t", "read", {"xs": []}, "j") is None  # no items: nothing to deny


def _blob(param: Any, check: str = "each") -> bytes:
    return msgpack.packb(["arg", "t", "xs", check, param], use_bin_type=True)


@pytest.mark.parametrize("param,check", [
    (["each", ["exact", 1]], "each"),  # nested each: refused, not guessed
    (["items", [0, 1]], "each"),
    (["frobnicate", 1], "each"),  # an unknown inner check
    (["regex", "(a)\\1"], "each"),  # a backreference: not RE2
    (["one_of"], "each"),
    ("exact", "each"),
    ([1, None, 3], "items"),
    (["a", None], "items"),
    ([float("nan"), None], "items"),
])
def test_a_holder_attenuating_with_a_malformed_list_caveat_gets_a_rejected_token(param, check):
    ring = KeyRing.generate()
    token = ring.mint(holder="a")
    blob = _blob(param, check)
    forged = Token(token.kid, token.token_id, token.caveats + (blob,), hmac_sha256(token.tag, blob))
    with pytest.raises(TokenRejected) as info:
        ring.verify(forged)
    assert info.value.code == ErrorCode.BAD_TOKEN


def test_attenuating_with_each_only_narrows():
    ring = KeyRing.generate()
    root = ring.mint(holder="a", caveats=[Arg("t", "xs", "each", ("one_of", ("p", "q")))])
    narrower = root.attenuate(Arg("t", "xs", "each", ("exact", "p")), Arg("t", "xs", "items", (None, 1)))
    vt = ring.verify(narrower)
    for value in (["p"], ["q"], ["p", "p"], ["z"], []):
        assert_plan_agrees(vt, CallContext("a", "t", "read", {"xs": value}, 0.0, "j"))
    vt.plan.check("t", "read", {"xs": ["p"]}, "j")
    with pytest.raises(PolicyDenied):
        vt.plan.check("t", "read", {"xs": ["q"]}, "j")


def test_approval_when_each_matches_a_list_with_an_outside_recipient():
    policy = load_policy("agent: mailer\ntools:\n  mail.send:\n    effect: write\n"
                         "    approval: {when: {recipients: {each: {regex: '.*@outside\\.com'}}}}\n")
    rule = policy.approval_rules()["mail.send"]
    assert rule.when == (("recipients", "each", ("regex", r".*@outside\.com")),)


@pytest.mark.parametrize("rule,fragment", [
    ("{each: {each: {exact: 1}}}", "each needs [check, param], the check not each/items"),
    ("{each: {}}", "a rule needs at least one key"),
    ("{min_items: -1}", "greater than or equal to 0"),
    ("{each: {regex: '(a)\\1'}}", "not valid RE2 syntax"),
    ("{eahc: {exact: 1}}", "did you mean 'each'?"),
])
def test_bad_list_rules_fail_at_load(rule, fragment):
    with pytest.raises(ConfigError) as info:
        mail_policy(rule)
    assert info.value.code == ErrorCode.POLICY_INVALID and fragment in info.value.reason


def test_misspelt_policy_keys_suggest_the_right_one():
    with pytest.raises(ConfigError) as info:
        load_policy("agent: a\nquota: {}\ntools:\n  t: {effect: read, arg: {}, sandbox: {cpu: 1}}\n")
    for fragment in ("at quota: Extra inputs are not permitted (did you mean 'quotas'?)",
                     "at tools.t.arg: Extra inputs are not permitted (did you mean 'args'?)",
                     "at tools.t.sandbox.cpu: Extra inputs are not permitted (did you mean 'cpu_s'?)"):
        assert fragment in info.value.reason


@pytest.mark.parametrize("args,fragment", [
    ("subject: {each: {exact: hi}}", "each/min_items/max_items need a list parameter; 'subject' is string"),
    ("recipents: {max_items: 3}", "has no parameter 'recipents'; its parameters: attachments, recipients, subject "
                                   "(did you mean 'recipients'?)"),
    ("recipients: {each: {path_under: /d}}", "path_under needs a parameter declared PATH"),
])
def test_list_rules_are_checked_against_the_tools_parameters(args, fragment):
    policy = load_policy(f"agent: a\ntools:\n  mail.send:\n    effect: write\n    args: {{{args}}}\n")
    with pytest.raises(ConfigError) as info:
        check_policy_tools(policy, {n: t.spec for n, t in TOOLS.items()})
    assert fragment in info.value.reason


def test_a_policy_whose_token_is_too_big_fails_at_load_naming_the_rule():
    big = [f"user{i:04d}@example.com" for i in range(800)]
    text = (f"agent: a\ntools:\n  mail.send:\n    effect: write\n    args:\n      recipients: {{each: {{one_of: {big}}}}}\n"
            "      subject: {max_bytes: 100}\n")
    with pytest.raises(ConfigError) as info:
        load_policy(text)
    assert f"limits {MAX_TOKEN_BYTES}" in info.value.reason
    assert "('tools.mail.send.args.recipients'," in info.value.reason


def test_a_policy_with_more_caveats_than_a_token_holds_fails_at_load():
    tools = "".join(f"  t{i}:\n    effect: read\n    args: {{x: {{exact: 1}}, y: {{exact: 2}}}}\n" for i in range(40))
    with pytest.raises(ConfigError, match="caveats \\(limits"):
        load_policy(f"agent: a\ntools:\n{tools}")
