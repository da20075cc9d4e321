"""The authorization benchmark suite, and the fast paths it measures.

The suite itself is only checked for shape (never for speed). Each fast path in the decision
is checked against the plain implementation it stands in for: the evaluation plan against
the caveat walk, the verified-prefix cache against a key ring with nothing cached, the URL
and request-body fast paths against the urlsplit and field-by-field checks they skip.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Any
from urllib.parse import urlsplit

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.bench import authz
from runtime.errors import ErrorCode, MalformedRequest, PolicyDenied, TokenRejected
from runtime.trusted import capability as cap
from runtime.trusted import wire
from runtime.trusted.capability import (Arg, Audience, CallBudget, CostBudget, Effects, Expires, KeyRing,
                                        MaxDepth, NotBefore, Token, Tools, VerifiedToken, encode_caveat, hmac_sha256)
from tests.unit.caveat_walk import CallContext, assert_plan_agrees, decision, evaluate

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# ------------------------------------------------------------------------ the suite


@pytest.fixture(scope="module")
def quick() -> dict[str, Any]:
    return authz.run(quick=True, progress=lambda _line: None)


def test_quick_run_has_the_suite_shape(quick):
    assert quick["suite"] == "authz"
    assert isinstance(quick["profile"], str) and "ncalls" in quick["profile"]
    assert quick["notes"] and all(isinstance(n, str) for n in quick["notes"])
    assert any("garbage collector" in n for n in quick["notes"])


@pytest.mark.parametrize("mode", ["uncached", "prefix+1", "cached"])
@pytest.mark.parametrize("caveats", [1, 4, 16])
def test_quick_run_has_a_latency_figure_per_case(quick, mode, caveats):
    by_name = {f["name"]: f for f in quick["figures"]}
    fig = by_name[f"authorize.{caveats}cav.{mode}"]
    assert fig["suite"] == "authz" and fig["unit"] == "us"
    assert fig["runs"] == 3 and fig["n"] == 3 * 200
    assert fig["p50"] > 0 and fig["p99"] >= fig["p50"]
    assert fig["spread"][0] <= fig["p50"] <= fig["spread"][1]
    assert fig["extra"]["caveats"] == caveats and fig["extra"]["token_cache"] == mode
    if (mode, caveats) == ("uncached", 4):
        assert fig["target"] == "p50 <= 20 us" and isinstance(fig["met"], bool)
    elif (mode, caveats) == ("cached", 4):
        assert fig["target"] == "p50 <= 5 us" and isinstance(fig["met"], bool)
    else:
        assert fig["target"] is None and fig["met"] is None


def test_quick_run_has_the_one_argument_figures(quick):
    names = {f["name"] for f in quick["figures"]}
    assert {"authorize.4cav.uncached.one_arg", "authorize.4cav.cached.one_arg"} <= names


def test_quick_run_reports_decisions_per_second(quick):
    (rate,) = [f for f in quick["figures"] if f["unit"] == "decisions/s"]
    assert rate["name"] == "authorize.4cav.cached.rate" and rate["p50"] > 0 and rate["p99"] is None


def test_benchmark_tokens_carry_every_argument_check_and_the_calls_are_allowed():
    checks = {c.check for n in (1, 4, 16) for c in authz.caveats_for(n, 0.0) if isinstance(c, Arg)}
    assert {"one_of", "regex", "path_under", "url_host", "range", "max_bytes"} <= checks
    assert [len(authz.caveats_for(n, 0.0)) for n in (1, 4, 16)] == [1, 4, 16]


def test_benchmark_requests_are_distinct_and_decided_allow():
    bench = authz._Bench()
    for mode in ("uncached", "prefix+1", "cached"):
        requests = bench.requests(mode, 16, 5)
        assert len(set(requests)) == 5
        for req in requests:
            ok = bench.supervisor.authorize(req)
            bench.supervisor.ledger.release(ok.reservation)
    assert bench.supervisor.ledger.inflight(authz.AGENT) == 0


# ------------------------------------------------------------------------ one MAC


@SETTINGS
@given(key=st.binary(max_size=200), msg=st.binary(max_size=300))
def test_hmac_sha256_is_hmac_sha256(key, msg):
    assert hmac_sha256(key, msg) == hmac.new(key, msg, hashlib.sha256).digest()


# ------------------------------------------------------------ evaluation plan vs caveat walk

TOOLS = ("fs.read", "fs.write", "http.get")
ARGS = ("path", "url", "n", "text")
TIMES = (0.0, 50.0, 100.0)
VALUES = ["/data/x", "/data/../etc", "/database", "data", "https://a.good.org/x", "https://evil.com/",
          "http://[::1", -1, 0, 5, 10.5, math.nan, True, None, "", "abc", b"xy", [1, 2], {"k": 1}]

values = st.sampled_from(VALUES)
arg_params = st.one_of(
    st.tuples(st.just("exact"), values),
    st.tuples(st.just("one_of"), st.lists(values, max_size=3).map(tuple)),
    st.tuples(st.just("range"), st.tuples(st.none() | st.sampled_from([0, 5, 10.5]),
                                          st.none() | st.sampled_from([1, 5, 10]))),
    st.tuples(st.just("regex"), st.sampled_from(["[a-z]+", "/data/.*", ".*"])),
    st.tuples(st.just("path_under"), st.sampled_from(["/", "/data"])),
    st.tuples(st.just("url_host"), st.lists(st.sampled_from(["*.good.org", "evil.com"]), max_size=2).map(tuple)),
    st.tuples(st.just("max_bytes"), st.integers(0, 8)),
)
arg_caveat = st.builds(lambda t, a, cp: Arg(t, a, *cp), st.sampled_from(TOOLS + ("*", "*")), st.sampled_from(ARGS),
                       arg_params)
caveat = st.one_of(
    st.lists(st.sampled_from(TOOLS), unique=True).map(lambda t: Tools(tuple(t))),
    st.lists(st.sampled_from(cap.EFFECTS), unique=True).map(lambda e: Effects(tuple(e))),
    arg_caveat, arg_caveat, arg_caveat,
    st.sampled_from(TIMES).map(Expires),
    st.sampled_from(TIMES).map(NotBefore),
    st.sampled_from(["job-1", "job-2"]).map(Audience),
    st.integers(0, 3).map(CallBudget),
    st.just(CostBudget(2.0)),
    st.integers(0, 3).map(MaxDepth),
)
calls = st.builds(
    CallContext,
    agent=st.sampled_from(["a", "b"]),
    tool=st.sampled_from(TOOLS),
    effect=st.sampled_from(cap.EFFECTS),
    args=st.dictionaries(st.sampled_from(ARGS), values, max_size=len(ARGS)),
    now=st.sampled_from((0.0, 49.0, 50.0, 100.0, 101.0)),
    job=st.sampled_from(["job-1", "job-2"]),
)
KR = KeyRing.generate()


def outcome(fn: Any, *args: Any) -> tuple[Any, ...] | None:
    """None when ``fn`` returns, else what it raised: type, code and reason."""
    try:
        fn(*args)
    except (TokenRejected, PolicyDenied) as exc:
        return type(exc), exc.code, exc.reason
    return None


@SETTINGS
@given(first=st.lists(caveat, max_size=6), later=st.lists(caveat, max_size=4), ctx=calls)
def test_plan_allows_exactly_what_the_caveat_walk_allows(first, later, ctx):
    vt = KR.verify(KR.mint(holder="a", caveats=first).attenuate(*later))  # the plan of 'later' extends 'first'
    assert_plan_agrees(vt, ctx)


FIXED = [  # (caveats, call, allowed): cases a random draw may miss
    ([Tools(("fs.read", "fs.write")), Tools(("fs.write", "http.get"))], ("fs.read", "read", {}), False),
    ([Tools(("fs.read", "fs.write")), Tools(("fs.write", "http.get"))], ("fs.write", "write", {}), True),
    ([Effects(("read", "write")), Effects(("read",))], ("fs.write", "write", {}), False),
    ([Audience("job-1"), Audience("job-1")], ("fs.read", "read", {}), True),
    ([Audience("job-1"), Audience("job-2")], ("fs.read", "read", {}), False),
    ([Arg("*", "n", "range", (0, 5))], ("fs.read", "read", {}), True),  # '*' constraints bind only if present
    ([Arg("fs.read", "n", "range", (0, 5))], ("fs.read", "read", {}), False),  # a tool's own are required
    ([Arg("fs.read", "n", "range", (0, 5))], ("fs.write", "write", {}), True),
    ([Arg("fs.write", "n", "exact", 1), Arg("*", "n", "range", (0, 5))], ("fs.read", "read", {"n": 9}), False),
    ([Arg("fs.read", "n", "range", (0, 5)), Arg("fs.read", "n", "range", (3, 9))], ("fs.read", "read", {"n": 2}), False),
    ([Arg("fs.read", "n", "range", (None, 5))], ("fs.read", "read", {"n": math.nan}), False),
    ([Expires(50.0)], ("fs.read", "read", {}), True),  # the call is at 50.0: inclusive
    ([NotBefore(50.0), Expires(49.0)], ("fs.read", "read", {}), False),
]


@pytest.mark.parametrize("caveats,call,allowed", FIXED)
def test_plan_decides_fixed_cases_like_the_walk(caveats, call, allowed):
    vt = KR.verify(KR.mint(holder="a", caveats=caveats))
    ctx = CallContext("a", *call, 50.0, "job-1")
    assert_plan_agrees(vt, ctx)
    assert (decision(vt, ctx) is None) is allowed


@SETTINGS
@given(caveats=st.lists(caveat, max_size=6), ctx=calls)
def test_a_directly_built_verified_token_gets_the_same_plan(caveats, ctx):
    vt = KR.verify(KR.mint(holder="a", caveats=caveats))
    rebuilt = VerifiedToken(vt.token, vt.caveats, vt.tags, vt.holder, vt.depth, vt.max_depth, vt.budgets)
    assert repr(rebuilt.plan) == repr(vt.plan) and rebuilt.chain_ids() == vt.chain_ids()
    assert outcome(evaluate, rebuilt, ctx) == outcome(evaluate, vt, ctx)


@pytest.mark.parametrize("caveats, now, code", [
    ([Expires(10.0)], 11.0, ErrorCode.TOKEN_EXPIRED),
    ([Expires(10.0), Expires(20.0)], 15.0, ErrorCode.TOKEN_EXPIRED),  # the tightest bound wins, in any order
    ([Expires(20.0), Expires(10.0)], 15.0, ErrorCode.TOKEN_EXPIRED),
    ([NotBefore(10.0)], 9.0, ErrorCode.TOKEN_NOT_YET_VALID),
    ([NotBefore(20.0), NotBefore(10.0)], 15.0, ErrorCode.TOKEN_NOT_YET_VALID),
    ([Expires(10.0)], math.nan, ErrorCode.TOKEN_EXPIRED),  # a broken clock is no way past an expiry
    ([Expires(10.0)], 10.0, None), ([NotBefore(10.0)], 10.0, None),  # both bounds are inclusive
])
def test_check_time_applies_the_tightest_bounds(caveats, now, code):
    vt = KR.verify(KR.mint(holder="a", caveats=caveats))
    got = outcome(vt.check_time, now)
    assert (got and got[1]) == code


@pytest.mark.parametrize("bad", [["exp", math.nan], ["nbf", math.inf], ["exp", -math.inf], ["cost", math.nan],
                                 ["cost", -1.0], ["cost", "1"]])
def test_a_time_or_cost_caveat_that_is_not_a_finite_number_makes_the_token_invalid(bad):
    token = KR.mint(holder="a")
    blob = pack(bad)
    forged = Token(token.kid, token.token_id, token.caveats + (blob,), hmac_sha256(token.tag, blob), token.version)
    with pytest.raises(TokenRejected) as info:
        KR.verify(forged)
    assert info.value.code is ErrorCode.BAD_TOKEN


def test_constraints_on_every_tool_apply_to_tools_with_constraints_of_their_own():
    vt = KR.verify(KR.mint(holder="a", caveats=[Arg("*", "n", "range", (0, 5)), Arg("fs.read", "path", "exact", "/x"),
                                                 Arg("*", "text", "max_bytes", 2)]))
    for args in ({"n": 9, "path": "/x"}, {"path": "/x", "text": "abc"}, {"n": 1}):
        ctx = CallContext("a", "fs.read", "read", args, 0.0, "job-1")
        assert decision(vt, ctx) == (PolicyDenied, ErrorCode.POLICY_DENIED)
    assert decision(vt, CallContext("a", "fs.read", "read", {"n": 1, "path": "/x"}, 0.0, "job-1")) is None
    assert decision(vt, CallContext("a", "fs.write", "write", {"n": 9}, 0.0, "job-1")) \
        == (PolicyDenied, ErrorCode.POLICY_DENIED)


def test_arguments_the_plan_cannot_judge_are_denied_as_the_walk_denies_them():
    vt = KR.verify(KR.mint(holder="a", caveats=[Arg("*", "url", "url_host", ("good.org",)),
                                                 Arg("fs.read", "n", "range", (0, 5))]))
    for args in ({"url": "http://[::1"}, {"url": 5}, {"n": "5"}, {"n": math.nan}, {}):
        ctx = CallContext("a", "fs.read", "read", args, 0.0, "job-1")
        assert decision(vt, ctx) == (PolicyDenied, ErrorCode.POLICY_DENIED)
        assert_plan_agrees(vt, ctx)


# ------------------------------------------------------------- the verified-prefix cache


def fresh_ring(kr: KeyRing) -> KeyRing:
    """The same keys with nothing cached."""
    return KeyRing.from_secret_dict(kr.to_secret_dict())


def verdict(kr: KeyRing, data: Any) -> Any:
    """What verifying ``data`` gives, as text (a NaN caveat equals itself there)."""
    try:
        vt = kr.verify(data)
    except TokenRejected as exc:
        return repr((exc.code, exc.reason))
    return repr((vt.token, vt.caveats, vt.tags, vt.holder, vt.depth, vt.max_depth, vt.budgets, vt.plan))


def append_raw(token: Token, blob: bytes) -> Token:
    return Token(token.kid, token.token_id, token.caveats + (blob,), hmac_sha256(token.tag, blob), token.version)


blobs = st.one_of(caveat.map(encode_caveat), st.binary(max_size=20),
                  st.tuples(st.just("holder"), st.sampled_from(["a", "b"]), st.binary(min_size=32, max_size=32))
                  .map(lambda h: pack(list(h))))


@SETTINGS
@given(first=st.lists(caveat, max_size=4), suffix=st.lists(blobs, max_size=3), delegate=st.booleans(),
       forge=st.sampled_from(["none", "tag", "drop", "swap"]))
def test_a_ring_with_prefixes_cached_decides_like_a_ring_with_nothing_cached(first, suffix, delegate, forge):
    kr = KeyRing.generate()
    parent = kr.mint(holder="a", caveats=first)
    if delegate:
        parent = kr.bind(parent, "b")
    verdict(kr, parent.encode())  # a parent that verifies is now a cached prefix
    child = parent
    for blob in suffix:
        child = append_raw(child, blob)
    if forge == "tag":
        child = Token(child.kid, child.token_id, child.caveats, bytes(32), child.version)
    elif forge == "drop" and child.caveats:
        child = Token(child.kid, child.token_id, child.caveats[:-1], child.tag, child.version)
    elif forge == "swap" and len(child.caveats) > len(parent.caveats):
        child = Token(child.kid, child.token_id, child.caveats[:-1] + (encode_caveat(Tools(())),), child.tag,
                      child.version)
    assert verdict(kr, child.encode()) == verdict(fresh_ring(kr), child.encode())


def test_a_forged_suffix_on_a_cached_prefix_is_rejected():
    kr = KeyRing.generate()
    parent = kr.mint(holder="a", caveats=[Tools(("fs.read",))])
    kr.verify(parent)
    widened = Token(parent.kid, parent.token_id, parent.caveats + (encode_caveat(Tools(("fs.read", "x"))),),
                    hmac_sha256(b"guess" * 7, b"x"), parent.version)
    with pytest.raises(TokenRejected) as info:
        kr.verify(widened)
    assert info.value.code is ErrorCode.BAD_TOKEN
    sealed_by_nobody = append_raw(parent, pack(["holder", "b", bytes(32)]))
    with pytest.raises(TokenRejected) as info:
        kr.verify(sealed_by_nobody)
    assert info.value.code is ErrorCode.WRONG_HOLDER


def test_an_extension_is_verified_from_its_cached_prefix_and_narrows_it():
    kr = KeyRing.generate()
    parent = kr.mint(holder="a", caveats=[Tools(("fs.read", "fs.write"))])
    parent_vt = kr.verify(parent)
    child_vt = kr.verify(kr.bind(parent.attenuate(Tools(("fs.read",))), "b"))
    assert kr._verified_prefix(child_vt.token) is child_vt
    assert child_vt.tags[:len(parent_vt.tags)] == parent_vt.tags
    assert (child_vt.holder, child_vt.depth) == ("b", 1)
    ctx = CallContext("b", "fs.write", "write", {}, 0.0, "job-1")
    assert decision(child_vt, ctx) == (PolicyDenied, ErrorCode.POLICY_DENIED)


def test_the_same_token_id_under_another_key_id_is_not_a_prefix():
    kr = KeyRing.generate()
    parent = kr.mint(holder="a")
    kr.verify(parent)
    other_kid = kr.rotate()
    moved = Token(other_kid, parent.token_id, parent.caveats, parent.tag, parent.version)
    assert kr._verified_prefix(moved) is None
    with pytest.raises(TokenRejected):
        kr.verify(moved)


def test_a_parent_stays_a_prefix_while_many_children_are_verified():
    kr = KeyRing.generate()
    parent = kr.mint(holder="a", caveats=[Tools(("fs.read",))])
    parent_vt = kr.verify(parent)
    for i in range(3 * KeyRing.PREFIXES_PER_TOKEN_ID):
        child = parent.attenuate(Expires(1000.0 + i))
        assert kr._verified_prefix(child) is parent_vt
        kr.verify(child)
    family = kr._prefixes[(parent.kid, parent.token_id)]
    assert len(family) <= KeyRing.PREFIXES_PER_TOKEN_ID and parent_vt in family


def test_retiring_a_key_forgets_its_prefixes():
    kr = KeyRing.generate()
    old_kid = kr.current_kid
    parent = kr.mint(holder="a")
    kr.verify(parent)
    kr.rotate()
    kr.retire(old_kid)
    assert not kr._prefixes and not kr._cache
    with pytest.raises(TokenRejected):
        kr.verify(parent.attenuate(Tools(("x",))))


def test_both_caches_stay_bounded():
    kr = KeyRing(*(lambda d: (d["root"], d["kid"], d["holder"]))(KeyRing.generate().to_secret_dict()),
                 cache_size=4)
    tokens = [kr.mint(holder="a") for _ in range(10)]
    for t in tokens:
        for i in range(6):
            kr.verify(t.attenuate(*[Tools(("x",))] * i))
    assert len(kr._cache) == 4
    assert sum(len(family) for family in kr._prefixes.values()) <= 4
    assert [kr.verify(t.encode()).holder for t in tokens] == ["a"] * 10


# ------------------------------------------------------------------ URL host fast path


def url_origin_by_urlsplit(value: Any) -> tuple[str, str, int]:
    """``url_origin`` as it reads every URL without the fast path."""
    if not isinstance(value, str) or len(value) > 4096 or cap._URL_BAD.search(value):
        raise PolicyDenied(f"not a usable URL: {value!r:.80}")
    try:
        parts = urlsplit(value)
        scheme, host, port = parts.scheme, parts.hostname or "", parts.port
    except ValueError as exc:
        raise PolicyDenied(f"malformed URL: {exc}") from None
    if scheme not in ("http", "https"):
        raise PolicyDenied(f"URL scheme {scheme!r} not allowed")
    return scheme, cap.canonical_host(host), port if port is not None else {"http": 80, "https": 443}[scheme]


def host_outcome(fn: Any, value: Any) -> Any:
    try:
        return fn(value)
    except PolicyDenied as exc:
        return "denied", exc.reason


URL_PIECES = ["http", "https", "HTTPS", "ftp", ":", "//", "/", "?", "#", "@", "[", "]", "::1", "%25", ".", "..",
              "-", "_", "a", "Z", "0", "good.org", "xn--d1a", "8080", "99999", " ", "\t", "\\", "é", "\x00"]
urls = st.one_of(
    st.lists(st.sampled_from(URL_PIECES), max_size=12).map("".join),
    st.tuples(st.sampled_from(["http://", "https://", "HTTP://", "https:/", "https:///"]),
              st.lists(st.sampled_from(URL_PIECES), max_size=8).map("".join)).map("".join),
    st.text(max_size=40),
)


@SETTINGS
@given(value=urls)
def test_url_host_reads_every_url_as_urlsplit_does(value):
    assert host_outcome(cap.url_origin, value) == host_outcome(url_origin_by_urlsplit, value)


@pytest.mark.parametrize("value", [
    "https://example.com/x", "https://EXAMPLE.com./x", "https://example.com@evil.com/", "https://a.b.:8080/",
    "http://a.b.c./?q", "http://-bad-/", "http://.../", "https://good.org#@evil.com", "https://good.org;x/",
    "https://good.org\\@evil.com", "http://a_b.org", "http://" + "a" * 4090, "http://" + "a." * 2000 + ":",
    "http://..cafe/x", "http://.cafe/", "http://127.1/", "http://0x7f.1/", "http://2130706433/", "http://a.b../",
    "http://[::ffff:127.0.0.1]:8080/", "http://[fe80::1%25eth0]/", "https://h:443/", "http://[0:0::1]/",
])
def test_url_host_known_shapes(value):
    assert host_outcome(cap.url_origin, value) == host_outcome(url_origin_by_urlsplit, value)


# ------------------------------------------------------------------ request body checks


def check_depth_reference(value: Any, depth: int = 0) -> None:
    if depth > wire.MAX_DEPTH:
        raise MalformedRequest(f"nested deeper than {wire.MAX_DEPTH}")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise MalformedRequest("map keys must be strings")
            check_depth_reference(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            check_depth_reference(v, depth + 1)
    elif not isinstance(value, (str, bytes, int, float, bool)) and value is not None:
        raise MalformedRequest(f"unsupported value type {type(value).__name__}")


def body_checks_reference(body: dict[str, Any]) -> None:
    """The body checks of ``decode_envelope``, one after the other."""
    check_depth_reference(body)
    op = body.get("op")
    required = wire._REQUIRED.get(op) if isinstance(op, str) else None
    if required is None:
        raise MalformedRequest(f"unknown op {op!r:.40}")
    for name, value in body.items():
        types = wire._BODY_FIELDS.get(name)
        if types is None:
            raise MalformedRequest(f"unknown field {name!r:.40}")
        if isinstance(value, bool) or not isinstance(value, types):
            raise MalformedRequest(f"field {name!r} has type {type(value).__name__}")
    missing = [f for f in required if f not in body]
    if missing:
        raise MalformedRequest(f"missing fields {missing}")
    if body["v"] != wire.REQUEST_VERSION:
        raise MalformedRequest(f"unsupported request version {body['v']}")


def nested(depth: int, leaf: Any) -> Any:
    for i in range(depth):
        leaf = [leaf] if i % 2 else {"k": leaf}
    return leaf


scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False), st.text(max_size=3),
                    st.binary(max_size=3))
json_like = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(st.text(max_size=3) | st.binary(max_size=2), inner, max_size=3),
                         max_leaves=8)
field_values = st.one_of(scalars, json_like, st.integers(wire.MAX_DEPTH - 2, wire.MAX_DEPTH + 1).flatmap(
    lambda d: st.just(nested(d, 1))))
good_call = {"v": 1, "op": "call", "agent": "a", "token": b"t", "tool": "x", "args": {"p": 1}, "nonce": b"n" * 16,
             "ts": 1.0}


VALID_FIELD_VALUES = {"v": [1, 2], "op": ["call", "delegate", "batch"], "agent": ["a"], "token": [b"t"],
                      "tool": ["x"], "args": [{}, {"p": [1, {"q": None}]}], "nonce": [b"n" * 16], "ts": [1.0, 2],
                      "to": ["b"], "batch": [[], [{"tool": "x", "args": {}}]]}


@st.composite
def bodies(draw) -> dict[str, Any]:
    """A well-formed call with up to two edits: a field set (often to a value of its type), added or dropped."""
    body = dict(good_call)
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(sorted(wire._BODY_FIELDS) + ["extra", b"v"]))
        edit = draw(st.sampled_from(["typed", "any", "drop"]))
        if edit == "drop":
            body.pop(name, None)
        elif edit == "typed" and name in VALID_FIELD_VALUES:
            body[name] = draw(st.sampled_from(VALID_FIELD_VALUES[name]))
        else:
            body[name] = draw(field_values | st.sampled_from(["call", "nope", 1, True, 1.5, []]))
    return body


def envelope(body: dict[str, Any]) -> bytes:
    return pack([pack(body), b"m" * 32])


def malformed(fn: Any, arg: Any) -> str | None:
    try:
        fn(arg)
    except MalformedRequest as exc:
        return exc.reason
    return None


@SETTINGS
@given(body=bodies())
def test_decode_envelope_reports_what_the_field_by_field_checks_report(body):
    decoded = msgpack.unpackb(pack(body), raw=False, strict_map_key=True)
    want = malformed(body_checks_reference, decoded)
    assert malformed(wire.decode_envelope, envelope(body)) == want


@SETTINGS
@given(value=field_values, depth=st.integers(0, wire.MAX_DEPTH + 1))
def test_check_depth_agrees_with_the_plain_walk(value, depth):
    assert malformed(lambda v: wire.check_depth(v, depth), value) == \
        malformed(lambda v: check_depth_reference(v, depth), value)


@pytest.mark.parametrize("depth", [wire.MAX_DEPTH - 1, wire.MAX_DEPTH, wire.MAX_DEPTH + 1])
def test_nesting_limit_of_arguments_is_unchanged(depth):
    body = dict(good_call, args={"deep": nested(depth, "leaf")})
    assert malformed(wire.decode_envelope, envelope(body)) == malformed(body_checks_reference, body)


def test_the_call_shape_checked_in_one_comparison_is_a_call_with_every_field_of_its_type():
    assert wire._CALL_FIELDS == wire._REQUIRED["call"]
    assert all(t in wire._BODY_FIELDS[f] for f, t in zip(wire._CALL_FIELDS, wire._CALL_TYPES, strict=True))
    assert tuple(good_call) == wire._CALL_FIELDS and tuple(map(type, good_call.values())) == wire._CALL_TYPES
    sent = authz._Bench().requests("cached", 1, 1)[0]  # what encode_call writes has that shape
    body = msgpack.unpackb(msgpack.unpackb(sent)[0])
    assert tuple(body) == wire._CALL_FIELDS and tuple(map(type, body.values())) == wire._CALL_TYPES


class _LooseArg(Arg):
    """Not a caveat the plan knows: a subclass is refused like any other type."""

    __slots__ = ()


@pytest.mark.parametrize("thing", [object(), "tools", _LooseArg("x", "path", "exact", "/etc")])
def test_the_plan_refuses_what_is_not_exactly_a_caveat(thing):
    with pytest.raises(TypeError):
        cap.EvaluationPlan().extended([Tools(("x",)), thing])


@SETTINGS
@given(first=st.lists(caveat, max_size=4), suffix=st.lists(blobs, max_size=3), forge=st.sampled_from(
    ["none", "tag", "drop", "swap"]))
def test_a_ring_with_caveats_decoded_before_decides_a_new_token_like_a_ring_with_nothing_cached(first, suffix, forge):
    kr = KeyRing.generate()
    for _ in range(2):  # other tokens with the same caveats: their caveats are kept decoded
        verdict(kr, kr.mint(holder="a", caveats=first).encode())
    token = kr.mint(holder="a", caveats=first)
    for blob in suffix:
        token = append_raw(token, blob)
    if forge == "tag":
        token = Token(token.kid, token.token_id, token.caveats, bytes(32), token.version)
    elif forge == "drop" and token.caveats:
        token = Token(token.kid, token.token_id, token.caveats[:-1], token.tag, token.version)
    elif forge == "swap" and len(token.caveats) > 1:  # a caveat the ring knows decoded, on a chain it does not fit
        token = Token(token.kid, token.token_id, token.caveats[:1] + token.caveats[2:] + token.caveats[1:2],
                      token.tag, token.version)
    assert verdict(kr, token.encode()) == verdict(fresh_ring(kr), token.encode())


def test_the_decoded_caveats_stay_bounded_and_hold_no_holder_seal():
    kr = KeyRing.generate()
    for i in range(KeyRing.DECODED_CAVEATS + 10):
        kr.verify(kr.mint(holder="a", caveats=[Expires(1e12 + i), Tools(("x",))]))
    assert 0 < len(kr._decoded) <= KeyRing.DECODED_CAVEATS
    assert not any(isinstance(c, cap.Holder) for c in kr._decoded.values())
