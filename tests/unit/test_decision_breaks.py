"""Breaks of the trusted core's decision code that the other tests let through (issue 10, item 18).

Each test here fails for a single deliberate mutation of ``runtime/trusted/`` (a changed
comparison, a dropped check, a swapped branch) that the rest of the unit suite did not notice,
or noticed only when a random property-test run happened to draw the right example.
``make mutate`` re-runs that search.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import msgpack
import pytest
import yaml

from runtime.isolation import sandbox_settings, unsandboxed_tools
from runtime.errors import ConfigError, ErrorCode, PolicyDenied, TokenRejected
from runtime.testing import FakeClock
from runtime.trusted.approvals import ApprovalRule
from runtime.trusted.capability import Arg, KeyRing, Token, hmac_sha256
from runtime.trusted.ledger import AgentQuota, NonceWindow, QuotaLedger
from runtime.trusted.policy import Policy
from runtime.policyfile import parse_policy
from tests.unit.caveat_walk import CallContext, evaluate

NOW = 1_000.0


def load(tools: str, **top: Any) -> Policy:
    data = yaml.safe_load(f"agent: a\ntools:\n{tools}")
    data.update(top)
    return parse_policy(data)


def verified(caveats: list[Any]) -> Any:
    kr = KeyRing.generate()
    return kr.verify(kr.mint(holder="a", caveats=caveats))


def allows(vt: Any, value: Any, tool: str = "t", arg: str = "x") -> bool:
    try:
        evaluate(vt, CallContext("a", tool, "read", {arg: value}, NOW, "job"))
    except PolicyDenied as exc:
        assert exc.code is ErrorCode.POLICY_DENIED
        return False
    return True


# ------------------------------------------------------------------ range rules with one bound


@pytest.mark.parametrize("rule,inside,outside", [("{min: 10}", [10, 11, 1e9], [9, 9.99, -1]),
                                                 ("{max: 10}", [10, -1e9, 0], [10.01, 11])])
def test_a_rule_with_only_min_or_only_max_produces_its_range_caveat(rule, inside, outside):
    p = load(f"  t:\n    effect: read\n    args:\n      x: {rule}\n")
    ranges = [c for c in p.root_caveats(job_id="job", now=NOW) if isinstance(c, Arg)]
    bound = yaml.safe_load(rule)
    assert ranges == [Arg("t", "x", "range", (bound.get("min"), bound.get("max")))]
    vt = verified(ranges)
    assert all(allows(vt, v) for v in inside) and not any(allows(vt, v) for v in outside)


# ------------------------------------------------------------- exact / one_of on lists and maps


LIST, MAP = [1, "a", [2, 3]], {"k": 1, "n": {"m": [1]}}
# (1.0 for 1 is the same list: numbers compare by value, never a bool as a number.)
NOT_THE_LIST = [[1, "a"], [1, "a", [2, 3], 4], [1, "b", [2, 3]], [1, "a", [2, 4]], [1, "a", [2]], [True, "a", [2, 3]],
                [1.5, "a", [2, 3]], ["a", 1, [2, 3]], {"0": 1}, (1, "a")]
NOT_THE_MAP = [{"k": 1}, {"k": 1, "n": {"m": [1]}, "x": 0}, {"k": 2, "n": {"m": [1]}}, {"k": 1, "n": {"m": [1, 2]}},
               {"k": 1, "n": {}}, {"k": True, "n": {"m": [1]}}, {"K": 1, "n": {"m": [1]}}, [["k", 1], ["n", {"m": [1]}]]]


@pytest.mark.parametrize("check", ["exact", "one_of"])
@pytest.mark.parametrize("param,other", [(LIST, v) for v in NOT_THE_LIST] + [(MAP, v) for v in NOT_THE_MAP])
def test_exact_and_one_of_refuse_extra_missing_and_changed_elements_and_keys(check, param, other):
    vt = verified([Arg("t", "x", check, param if check == "exact" else (param,))])
    assert allows(vt, param)
    assert not allows(vt, other)


# ------------------------------------------------------------------------------ sandbox choice


def test_a_tools_own_backend_wins_over_a_policy_wide_unsandboxed():
    p = load("  t:\n    effect: read\n    sandbox: {backend: bwrap}\n  u: {effect: read}\n",
             sandbox={"unsandboxed": True})
    settings = sandbox_settings(p)
    assert settings["t"]["backend"] == "bwrap" and settings["*"]["backend"] == "none"
    assert unsandboxed_tools(p) == ["*"]


# ------------------------------------------------------------------------------- the key ring


GOOD_KEY = b"k" * 32


@pytest.mark.parametrize("key", [b"", b"k" * 31, "k" * 32, None])
def test_the_key_ring_refuses_short_empty_and_non_byte_keys(key):
    with pytest.raises(ValueError):
        KeyRing({"kid": key}, "kid", GOOD_KEY)
    with pytest.raises(ValueError):
        KeyRing({"kid": GOOD_KEY}, "kid", key)
    ring = KeyRing({"kid": GOOD_KEY}, "kid", GOOD_KEY)
    with pytest.raises(ValueError):
        ring.add_key("other", key)
    with pytest.raises(ValueError):
        ring.add_key("", GOOD_KEY)
    assert ring.kids == ["kid"] and ring.current_kid == "kid"


def test_the_key_ring_refuses_to_rebind_an_existing_key_id():
    ring = KeyRing.generate()
    kid = ring.current_kid
    token = ring.mint(holder="a")
    with pytest.raises(ValueError):
        ring.add_key(kid, b"x" * 32)
    assert ring.verify(token).holder == "a"  # the old key still verifies its tokens
    ring.add_key(kid, ring.to_secret_dict()["root"][kid], current=False)  # the same key again is a no-op
    ring.add_key("k2", b"y" * 32)
    assert ring.current_kid == "k2"


def test_a_key_ring_without_a_cache_verifies_every_time():
    ring = KeyRing.generate()
    bare = KeyRing(ring.to_secret_dict()["root"], ring.current_kid, ring.to_secret_dict()["holder"], cache_size=0)
    token = ring.mint(holder="a")
    for _ in range(3):
        assert bare.verify(token).holder == "a"
        assert bare.verify(ring.bind(token, "b")).holder == "b"
    with pytest.raises(ValueError):
        KeyRing(ring.to_secret_dict()["root"], ring.current_kid, ring.to_secret_dict()["holder"], cache_size=-1)


# ------------------------------------------------------------------------ malformed caveats


MALFORMED = {
    "one_of not a list": ["arg", "t", "x", "one_of", "abc"],
    "one_of a map": ["arg", "t", "x", "one_of", {"a": 1}],
    "url_host not a list": ["arg", "t", "x", "url_host", "example.com"],
    "negative call budget": ["calls", -1],
    "float call budget": ["calls", 1.5],
    "bool call budget": ["calls", True],
    "string cost": ["cost", "5"],
    "bool cost": ["cost", True],
    "negative cost": ["cost", -0.5],
    "NaN cost": ["cost", math.nan],
    "tool names not strings": ["tools", ["a", 1]],
    "tool names a string": ["tools", "fs.read"],
    "effects not strings": ["effects", [None]],
    "unknown effect": ["effects", ["fly"]],
    "arg tool not a string": ["arg", 5, "x", "exact", 1],
    "arg name not a string": ["arg", "t", None, "exact", 1],
    "unknown check": ["arg", "t", "x", "like", "%"],
    "range of three": ["arg", "t", "x", "range", [1, 2, 3]],
    "range with a string": ["arg", "t", "x", "range", ["1", None]],
    "range with NaN": ["arg", "t", "x", "range", [math.nan, None]],
    "negative max_bytes": ["arg", "t", "x", "max_bytes", -1],
    "regex not a string": ["arg", "t", "x", "regex", 5],
    "path_under not a string": ["arg", "t", "x", "path_under", ["/"]],
    "negative depth": ["depth", -1],
    "audience not a string": ["aud", 1],
    "expiry a string": ["exp", "tomorrow"],
    "extra field": ["calls", 1, 2],
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_caveat_makes_the_token_invalid(name):
    kr = KeyRing.generate()
    token = kr.mint(holder="a")
    blob = msgpack.packb(MALFORMED[name], use_bin_type=True)
    forged = Token(token.kid, token.token_id, token.caveats + (blob,), hmac_sha256(token.tag, blob), token.version)
    with pytest.raises(TokenRejected) as info:
        kr.verify(forged)
    assert info.value.code is ErrorCode.BAD_TOKEN


def test_policy_numbers_a_token_would_refuse_are_load_errors():
    with pytest.raises(ConfigError):
        load("  t:\n    effect: read\n    args:\n      x: {exact: 100000000000000000000000}\n")
    with pytest.raises(ConfigError):
        load("  t: {effect: read}\n", quotas={"max_cost": float("nan")})


# ---------------------------------------------------------------------------- approval rules


def approval(spec: str) -> ApprovalRule | None:
    return load(f"  t:\n    effect: read\n    approval: {spec}\n").tools["t"].approval_rule("t")


def test_approval_true_asks_for_every_call():
    rule = approval("true")
    assert rule is not None and rule.when == () and rule.timeout_s == 300.0
    assert rule.matches({}) and rule.matches({"x": 1})


def test_approval_false_asks_for_none():
    assert approval("false") is None
    assert load("  t: {effect: read}\n").approval_rules() == {}


@pytest.mark.parametrize("args,asks", [
    ({"amount": 1000}, True), ({"amount": 5000.5}, True), ({"amount": 999.99}, False), ({"amount": -1}, False),
    ({"amount": math.nan}, True), ({"amount": "1000"}, True), ({"amount": None}, True), ({}, True),
    ({"amount": 2000, "to": "me"}, False), ({"amount": 2000, "to": "them"}, True), ({"amount": 5, "to": "them"}, False),
    ({"amount": math.nan, "to": "me"}, False),  # one rule judged and said no: no approval
])
def test_approval_when_asks_exactly_for_calls_every_rule_matches_or_cannot_judge(args, asks):
    rule = approval("{when: {amount: {min: 1000}, to: {one_of: [them]}}, timeout_s: 5}")
    assert rule is not None and rule.timeout_s == 5
    assert rule.matches(args) is asks


@pytest.mark.parametrize("args,asks", [({"to": "them"}, True), ({"to": "me"}, False), ({"to": 5}, True),
                                       ({"to": ["them"]}, True), ({"to": None}, True), ({"n": 1000}, True),
                                       ({"n": 999}, False), ({"n": 1000.0}, True), ({"n": "1000"}, True)])
def test_approval_when_exact_and_one_of_ask_for_a_value_of_another_type(args, asks):
    rule = approval("{when: {to: {one_of: [them, us]}, n: {exact: 1000}}}")
    assert rule.matches(args) is asks


def test_approval_when_regex_matches_over_newlines_and_asks_for_what_it_cannot_read():
    rule = approval("{when: {cmd: {regex: 'rm .*'}}}")
    assert rule.matches({"cmd": "rm -rf /"}) and rule.matches({"cmd": "rm x\ny"})
    assert not rule.matches({"cmd": "ls"}) and not rule.matches({"cmd": "xrm -rf"})
    assert rule.matches({"cmd": 5}) and rule.matches({"cmd": "rm " + "x" * 70_000})


# ------------------------------------------------------------------------ ledger and nonces


def test_releasing_a_reservation_twice_refunds_once():
    clock = FakeClock()
    ledger = QuotaLedger(clock=clock)
    ledger.configure("a", AgentQuota(max_concurrent=4))
    key = b"budget"
    first = ledger.reserve("a", ((key, "calls", 5.0),), 1.0)
    second = ledger.reserve("a", ((key, "calls", 5.0),), 1.0)
    ledger.release(first)
    ledger.release(first)
    assert ledger.used(key) == 1.0 and ledger.inflight("a") == 1
    ledger.settle(second)
    ledger.release(second)  # settled: nothing to refund
    assert ledger.used(key) == 1.0 and ledger.inflight("a") == 0


def test_the_nonce_window_prunes_what_has_left_it():
    clock = FakeClock()
    window = NonceWindow(window_s=120, clock=clock)
    for i in range(5):
        window.check("a", bytes([i]) * 16, clock())
    assert len(window.snapshot()["seen"]) == 5
    clock.advance(121)
    window.check("a", b"z" * 16, clock())  # the next check prunes
    assert [n for _, n, _ in window.snapshot()["seen"]] == [b"z" * 16]
    with pytest.raises(TokenRejected) as info:
        window.check("a", b"\x00" * 16, clock() - 121)  # a pruned nonce is still refused: its time is too old
    assert info.value.code is ErrorCode.REPLAY


# ----------------------------------------------------------------------- parked calls


def test_parked_calls_are_listed_oldest_first_with_their_window_and_decided_one_by_one():
    from runtime.trusted.approvals import Approvals

    async def go() -> None:
        clock = FakeClock(100.0)
        approvals = Approvals(clock)
        first = approvals.park("a", "t", {"x": 1}, 30.0)
        clock.advance(5)
        second = approvals.park("b", "u", {}, 10.0)
        assert len(first.id) == 12 and first.id != second.id
        listed = approvals.list()
        assert listed == [{"id": first.id, "agent": "a", "tool": "t", "args": {"x": 1}, "created": 100.0,
                           "expires": 130.0, "flow": None},
                          {"id": second.id, "agent": "b", "tool": "u", "args": {}, "created": 105.0, "expires": 115.0,
                           "flow": None}]
        clock.now = 50.0  # a third call parked "earlier" (a clock step back) is listed first
        third = approvals.park("a", "t", {}, 1.0)
        assert [p["id"] for p in approvals.list()] == [third.id, first.id, second.id]
        approvals.resolve(first.id, approve=True, approver="ops", reason="ok")
        assert first.future.result() == (True, "ops", "ok")
        with pytest.raises(KeyError) as info:
            approvals.resolve(first.id, approve=False, approver="ops")  # decided: never twice
        assert info.value.args == (first.id,)
        approvals.done(first)
        approvals.done(first)  # idempotent
        assert len(approvals) == 2

    asyncio.run(go())


def test_denying_an_agent_denies_only_its_own_undecided_calls():
    from runtime.trusted.approvals import Approvals

    async def go() -> None:
        approvals = Approvals(FakeClock())
        mine, decided, other = (approvals.park(a, "t", {}, 30.0) for a in ("a", "a", "b"))
        approvals.resolve(decided.id, approve=True, approver="ops")
        hit = approvals.deny_agent("a", approver="kill-switch", reason="revoked")
        assert hit == [mine]
        assert mine.future.result() == (False, "kill-switch", "revoked")
        assert decided.future.result() == (True, "ops", "") and not other.future.done()

    asyncio.run(go())
