"""The supervisor, end to end in one process: every stage can only deny, and every denial is typed and audited."""

import asyncio
import secrets
import time
from typing import Annotated, Any

import msgpack
import pytest

from runtime.observe import stats_of
from runtime.agent import Agent
from runtime.errors import (AuditUnavailable, DelegationDenied, ErrorCode, MalformedRequest, PolicyDenied,
                            QuotaExceeded, TokenRejected, ToolFailed, UnknownTool, WardenError)
from runtime.protocol import decode_reply, encode_call, encode_delegate, seal_request
from runtime.sandbox.worker import ToolWorker
from runtime.testing import FakeClock, InProcessDispatcher, InProcessSupervisorClient, MemoryAudit
from runtime.tool import PATH, tool
from runtime.trusted.capability import (Arg, Audience, CallBudget, CostBudget, Expires, KeyRing, MaxDepth, Token,
                                        Tools)
from runtime.trusted.ledger import AgentQuota, QuotaLedger
from runtime.trusted.supervisor import AgentEntry, Supervisor
from runtime.trusted.wire import MAX_DEPTH, MAX_REQUEST_BYTES

JOB = "job-unit"
RAN: list[tuple[str, Any]] = []  # every tool body that actually executed


@tool(effect="read")
def read_doc(name: str, limit: int = 10) -> dict:
    """Read a document."""
    RAN.append(("read_doc", name))
    return {"name": name, "limit": limit}


@tool(effect="write")
def write_doc(name: str, text: str) -> bool:
    """Write a document."""
    RAN.append(("write_doc", name))
    return True


@tool(effect="delete")
def delete_doc(name: str) -> bool:
    """Delete a document."""
    RAN.append(("delete_doc", name))
    return True


@tool(effect="read")
def read_file(path: Annotated[str, PATH]) -> str:
    """Read a file."""
    RAN.append(("read_file", path))
    return path


@tool(effect="read")
def explode(msg: str) -> None:
    """Always fails."""
    RAN.append(("explode", msg))
    raise RuntimeError(f"boom: {msg}")


@tool(effect="read")
async def slow(seconds: float) -> str:
    """Takes a while."""
    RAN.append(("slow", seconds))
    await asyncio.sleep(seconds)
    return "done"


@tool(effect="read", cost=3.0)
def pricey() -> int:
    """Costs three units."""
    RAN.append(("pricey", None))
    return 3


TOOLS = {t.name: t for t in (read_doc, write_doc, delete_doc, read_file, explode, slow, pricey)}
ALL_TOOLS = Tools(tuple(sorted(TOOLS)))


class Env:
    """A supervisor wired to a real tool worker, with fakes for time and the audit sink."""

    def __init__(self, call_timeout_s: float = 120.0) -> None:
        self.clock = FakeClock(time.time())  # requests carry wall-clock timestamps
        self.keyring = KeyRing.generate()
        self.audit = MemoryAudit()
        dispatch_key = secrets.token_bytes(32)
        self.worker = ToolWorker(dispatch_key=dispatch_key, tools=TOOLS, job=JOB, clock=self.clock)
        self.dispatcher = InProcessDispatcher(self.worker)
        self.ledger = QuotaLedger(clock=self.clock)
        self.sup = Supervisor(job_id=JOB, keyring=self.keyring, tools={n: t.spec for n, t in TOOLS.items()},
                              audit=self.audit, dispatcher=self.dispatcher, dispatch_key=dispatch_key,
                              clock=self.clock, ledger=self.ledger, call_timeout_s=call_timeout_s)
        self.keys: dict[str, bytes] = {}
        self.tokens: dict[str, bytes] = {}

    def add(self, name: str, *extra_caveats: Any, caveats: list[Any] | None = None,
            quota: AgentQuota = AgentQuota(), can_delegate_to: tuple[str, ...] = (),
            delegate_caveats: tuple[Any, ...] = ()) -> bytes:
        key = secrets.token_bytes(32)
        self.keys[name] = key
        self.sup.register_agent(AgentEntry(name, key, frozenset(can_delegate_to), tuple(delegate_caveats)), quota)
        if caveats is None:
            caveats = [Audience(JOB), Expires(self.clock() + 3600), ALL_TOOLS]
        self.tokens[name] = self.keyring.mint(holder=name, caveats=[*caveats, *extra_caveats]).encode()
        return self.tokens[name]

    def request(self, agent: str, tool_name: str, *, token: bytes | None = None, key: bytes | None = None,
                **args: Any) -> bytes:
        return encode_call(agent=agent, token=token if token is not None else self.tokens[agent], tool=tool_name,
                           args=args, request_key=key if key is not None else self.keys[agent])

    def send(self, data: Any) -> bytes:
        raw = asyncio.run(self.sup.call(data))
        assert isinstance(raw, bytes)
        return raw

    def call(self, agent: str, tool_name: str, **kw: Any) -> bytes:
        return self.send(self.request(agent, tool_name, **kw))

    def value(self, agent: str, tool_name: str, **kw: Any) -> Any:
        return decode_reply(self.call(agent, tool_name, **kw))["value"]

    def delegate(self, agent: str, to: str, *, token: bytes | None = None) -> bytes:
        req = encode_delegate(agent=agent, token=token if token is not None else self.tokens[agent], to=to,
                              request_key=self.keys[agent])
        return asyncio.run(self.sup.delegate(req))

    def denied(self, raw: bytes, cls: type[WardenError], code: ErrorCode, *, last: bool = True) -> WardenError:
        """The reply is a typed refusal, and (the last) audit record is the matching denial."""
        with pytest.raises(cls) as info:
            decode_reply(raw)
        assert info.value.code is code
        records = self.audit.of("decision", decision="deny", code=code.value)
        assert records, f"no deny record with code {code.value}"
        if last:
            assert self.audit.records[-1] is records[-1]
        return info.value

    def budget_key(self, token: bytes) -> bytes:
        (key, _, _), = self.keyring.verify(token).budgets
        return key


@pytest.fixture
def env() -> Env:
    RAN.clear()
    e = Env()
    e.add("a")
    return e


def kinds(env: Env) -> list[tuple[str, Any]]:
    return [(r["kind"], r.get("decision", r.get("ok"))) for r in env.audit.records]


# -------------------------------------------------------------------- allowed calls


def test_allowed_call_returns_value_and_audits_write_ahead(env):
    reply = decode_reply(env.call("a", "read_doc", name="report"))
    assert reply["value"] == {"name": "report", "limit": 10}
    assert RAN == [("read_doc", "report")]
    assert kinds(env) == [("decision", "allow"), ("outcome", True)]
    decision, outcome = env.audit.records
    assert decision["seq"] < outcome["seq"]
    assert decision["call_id"] == outcome["call_id"] == reply["call_id"]
    assert decision["agent"] == "a" and decision["tool"] == "read_doc"
    assert decision["args"] == {"name": "report", "limit": 10}  # canonical, defaults filled in
    assert decision["token_id"] == env.keyring.verify(env.tokens["a"]).token_id.hex()
    assert decision["depth"] == 0
    assert env.ledger.inflight("a") == 0


def test_decision_is_recorded_before_the_tool_runs(env):
    seen_at_dispatch: list[list[tuple[str, Any]]] = []
    inner = env.dispatcher.dispatch

    async def spy(tool_name: str, message: bytes, agent: str = "") -> bytes:
        seen_at_dispatch.append(kinds(env))
        return await inner(tool_name, message, agent)

    env.dispatcher.dispatch = spy  # type: ignore[method-assign]
    env.value("a", "read_doc", name="x")
    assert seen_at_dispatch == [[("decision", "allow")]]


def test_tokens_never_reach_the_audit_log(env):
    env.value("a", "read_doc", name="x")
    env.call("a", "nope")
    token = env.tokens["a"]
    for rec in env.audit.records:
        for value in rec.values():
            assert value != token
            assert token.hex() not in str(value)


# ------------------------------------------------------------------ argument checks


def test_unknown_tool(env):
    exc = env.denied(env.call("a", "rm_rf", name="x"), UnknownTool, ErrorCode.UNKNOWN_TOOL)
    assert exc.tool == "rm_rf"
    assert env.audit.records[-1]["tool"] == "rm_rf"
    assert RAN == []


@pytest.mark.parametrize("args, why", [
    ({"name": "x", "owner": "me"}, "unknown arguments ['owner']"),
    ({}, "missing argument 'name'"),
    ({"name": 7}, "argument 'name' must be string, got int"),
    ({"name": ["x"]}, "argument 'name' must be string, got list"),
    ({"name": "x", "limit": True}, "argument 'limit' must be integer, got bool"),
    ({"name": "x", "limit": 2.5}, "argument 'limit' must be integer, got float"),
    ({"name": "x", "limit": "5"}, "argument 'limit' must be integer, got str"),
])
def test_bad_arguments_are_malformed(env, args, why):
    exc = env.denied(env.call("a", "read_doc", **args), MalformedRequest, ErrorCode.MALFORMED)
    assert exc.tool == "read_doc"
    assert env.audit.records[-1]["reason"] == why
    assert RAN == []
    assert env.ledger.inflight("a") == 0


def test_path_argument_is_canonicalised_before_the_tool_sees_it(env):
    env.add("b", Arg("read_file", "path", "path_under", "/data"))
    assert env.value("b", "read_file", path="//data/./x//y/../z") == "/data/x/z"
    assert RAN == [("read_file", "/data/x/z")]
    assert env.audit.of("decision", decision="allow")[-1]["args"] == {"path": "/data/x/z"}


@pytest.mark.parametrize("path", ["/data/../etc/passwd", "/database/x", "/etc", "/data/../../data2"])
def test_path_escaping_its_root_is_denied(env, path):
    env.add("b", Arg("read_file", "path", "path_under", "/data"))
    env.denied(env.call("b", "read_file", path=path), PolicyDenied, ErrorCode.POLICY_DENIED)
    assert RAN == []


@pytest.mark.parametrize("path", ["data/x", "", "/da\x00ta"])
def test_unusable_path_is_denied(env, path):
    env.denied(env.call("a", "read_file", path=path), PolicyDenied, ErrorCode.POLICY_DENIED)
    assert RAN == []


# ------------------------------------------------------------------- malformed bytes


def good_body(env: Env, **changes: Any) -> dict[str, Any]:
    body = {"v": 1, "op": "call", "agent": "a", "token": env.tokens["a"], "tool": "read_doc",
            "args": {"name": "x"}, "nonce": secrets.token_bytes(16), "ts": time.time()}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not DROP}


DROP = object()


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


MALFORMED_INPUTS = {
    "garbage": lambda env: b"\xc1\xff\x00garbage",
    "empty": lambda env: b"",
    "str": lambda env: "not bytes",
    "none": lambda env: None,
    "dict": lambda env: {"op": "call"},
    "outer_not_pair": lambda env: pack([b"a", b"b", b"c"]),
    "outer_not_bytes": lambda env: pack(["body", "mac"]),
    "body_not_msgpack": lambda env: pack([b"\xc1", b"m" * 32]),
    "body_not_map": lambda env: seal_request([1, 2, 3], env.keys["a"]),  # type: ignore[arg-type]
    "deep_args": lambda env: seal_request(good_body(env, args={"name": nested(MAX_DEPTH + 1)}), env.keys["a"]),
    "unknown_field": lambda env: seal_request(good_body(env, admin=True), env.keys["a"]),
    "unknown_op": lambda env: seal_request(good_body(env, op="exec"), env.keys["a"]),
    "missing_field": lambda env: seal_request(good_body(env, nonce=DROP), env.keys["a"]),
    "token_is_str": lambda env: seal_request(good_body(env, token="abc"), env.keys["a"]),
    "ts_is_bool": lambda env: seal_request(good_body(env, ts=True), env.keys["a"]),
    "args_is_list": lambda env: seal_request(good_body(env, args=["x"]), env.keys["a"]),
    "version": lambda env: seal_request(good_body(env, v=2), env.keys["a"]),
    "int_map_key": lambda env: seal_request(good_body(env, args={1: "x"}), env.keys["a"]),
    "extra_data_outer": lambda env: seal_request(good_body(env), env.keys["a"]) + b"\x00",
    "extra_data_body": lambda env: pack([pack(good_body(env)) + b"\x01", b"m" * 32]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_INPUTS))
def test_malformed_requests_are_denied_and_audited(env, case):
    data = MALFORMED_INPUTS[case](env)
    env.denied(env.send(data), MalformedRequest, ErrorCode.MALFORMED)
    assert kinds(env) == [("decision", "deny")]
    assert RAN == []
    assert env.ledger.inflight("a") == 0


def test_nesting_limit_is_exact(env):
    # body (0) -> args (1) -> name (2) -> lists ...: nested(n) puts the leaf at depth n + 2
    raw = env.send(seal_request(good_body(env, args={"name": nested(MAX_DEPTH - 2)}), env.keys["a"]))
    env.denied(raw, MalformedRequest, ErrorCode.MALFORMED)
    assert "must be string" in env.audit.records[-1]["reason"]  # refused for its type, not its depth
    raw = env.send(seal_request(good_body(env, args={"name": nested(MAX_DEPTH - 1)}), env.keys["a"]))
    env.denied(raw, MalformedRequest, ErrorCode.MALFORMED)
    assert env.audit.records[-1]["reason"] == f"nested deeper than {MAX_DEPTH}"


def test_oversized_request_is_too_large(env):
    data = env.request("a", "write_doc", name="x", text="y" * MAX_REQUEST_BYTES)
    assert len(data) > MAX_REQUEST_BYTES
    env.denied(env.send(data), MalformedRequest, ErrorCode.TOO_LARGE)
    assert RAN == []


def test_malformed_delegation_request_is_denied(env):
    raw = asyncio.run(env.sup.delegate(b"\x93garbage"))
    env.denied(raw, MalformedRequest, ErrorCode.MALFORMED)


# ---------------------------------------------------------- request authentication


def test_forged_request_mac(env):
    raw = env.call("a", "read_doc", name="x", key=secrets.token_bytes(32))
    env.denied(raw, TokenRejected, ErrorCode.BAD_REQUEST_MAC)
    assert RAN == []


def test_edited_request_body(env):
    body_bytes, mac = msgpack.unpackb(env.request("a", "read_doc", name="x"))
    edited = body_bytes.replace(b"read_doc", b"delete_d")
    env.denied(env.send(pack([edited, mac])), TokenRejected, ErrorCode.BAD_REQUEST_MAC)
    assert RAN == []


def test_unknown_agent(env):
    raw = env.call("ghost", "read_doc", name="x", token=env.tokens["a"], key=secrets.token_bytes(32))
    env.denied(raw, TokenRejected, ErrorCode.BAD_REQUEST_MAC)


def test_token_copied_to_another_agent(env):
    env.add("b")
    stolen = env.tokens["a"]
    # B presents A's token openly, as itself: the token is bound to A.
    raw = env.call("b", "read_doc", name="x", token=stolen)
    env.denied(raw, TokenRejected, ErrorCode.WRONG_HOLDER)
    # B pretends to be A, but cannot produce A's request MAC.
    raw = env.call("a", "read_doc", name="x", token=stolen, key=env.keys["b"])
    env.denied(raw, TokenRejected, ErrorCode.BAD_REQUEST_MAC)
    assert RAN == []


def test_replayed_request_bytes(env):
    data = env.request("a", "write_doc", name="x", text="t")
    assert decode_reply(env.send(data))["value"] is True
    env.denied(env.send(data), TokenRejected, ErrorCode.REPLAY)
    assert RAN == [("write_doc", "x")]


def test_stale_request_timestamp(env):
    env.clock.advance(121)
    env.denied(env.call("a", "read_doc", name="x"), TokenRejected, ErrorCode.REPLAY)


def test_tampered_token(env):
    token = bytearray(env.tokens["a"])
    token[-1] ^= 0x01  # the tag
    env.denied(env.call("a", "read_doc", name="x", token=bytes(token)), TokenRejected, ErrorCode.BAD_TOKEN)
    assert RAN == []


def test_token_with_a_caveat_stripped(env):
    env.add("b", Arg("read_doc", "name", "exact", "public"))
    tok = Token.decode(env.tokens["b"])
    widened = Token(tok.kid, tok.token_id, tok.caveats[:-1], tok.tag).encode()
    env.denied(env.call("b", "read_doc", name="secret", token=widened), TokenRejected, ErrorCode.BAD_TOKEN)
    assert RAN == []


def test_token_from_another_key_ring(env):
    foreign = KeyRing.generate().mint(holder="a", caveats=[ALL_TOOLS]).encode()
    env.denied(env.call("a", "read_doc", name="x", token=foreign), TokenRejected, ErrorCode.BAD_TOKEN)


def test_garbage_token(env):
    env.denied(env.call("a", "read_doc", name="x", token=b"\x00" * 40), TokenRejected, ErrorCode.BAD_TOKEN)


def test_expired_token(env):
    env.add("b", caveats=[Audience(JOB), Expires(env.clock() + 60), ALL_TOOLS])
    assert env.value("b", "read_doc", name="x")["name"] == "x"
    env.clock.advance(61)
    env.denied(env.call("b", "read_doc", name="x"), TokenRejected, ErrorCode.TOKEN_EXPIRED)
    assert len(RAN) == 1


def test_token_for_another_job(env):
    env.add("b", caveats=[Audience("other-job"), ALL_TOOLS])
    env.denied(env.call("b", "read_doc", name="x"), TokenRejected, ErrorCode.WRONG_AUDIENCE)


def test_revoked_agent(env):
    env.add("b")
    env.sup.revoke_agent("a", by="test")
    assert env.audit.records[-1] == {"seq": 0, "kind": "revoke", "agent": "a", "by": "test", "cascade": False}
    env.denied(env.call("a", "read_doc", name="x"), TokenRejected, ErrorCode.TOKEN_REVOKED)
    assert env.value("b", "read_doc", name="y")["name"] == "y"
    assert RAN == [("read_doc", "y")]


def test_revoked_token(env):
    env.sup.revoke_token(env.keyring.verify(env.tokens["a"]).token_id)
    env.denied(env.call("a", "read_doc", name="x"), TokenRejected, ErrorCode.TOKEN_REVOKED)


# -------------------------------------------------------------------------- policy


def test_caveats_are_enforced(env):
    env.add("b", Tools(("read_doc", "write_doc")), Arg("write_doc", "name", "one_of", ("notes", "todo")))
    assert env.value("b", "write_doc", name="notes", text="t") is True
    env.denied(env.call("b", "write_doc", name="passwd", text="t"), PolicyDenied, ErrorCode.POLICY_DENIED)
    env.denied(env.call("b", "delete_doc", name="notes"), PolicyDenied, ErrorCode.POLICY_DENIED)
    assert RAN == [("write_doc", "notes")]


def test_public_error_never_contains_the_values(env):
    env.add("b", Arg("read_doc", "name", "exact", "public-doc"))
    raw = env.call("b", "read_doc", name="top-secret-plan")
    exc = env.denied(raw, PolicyDenied, ErrorCode.POLICY_DENIED)
    assert exc.public() == "POLICY_DENIED on tool 'read_doc'"
    assert "top-secret-plan" not in str(exc)
    assert b"top-secret-plan" not in raw and b"public-doc" not in raw
    reason = env.audit.records[-1]["reason"]
    assert "top-secret-plan" in reason and "public-doc" in reason


def test_public_budget_error_has_no_numbers(env):
    env.add("b", CallBudget(1))
    env.value("b", "read_doc", name="x")
    exc = env.denied(env.call("b", "read_doc", name="x"), QuotaExceeded, ErrorCode.BUDGET_EXHAUSTED)
    assert exc.public() == "BUDGET_EXHAUSTED on tool 'read_doc'"
    assert env.audit.records[-1]["reason"] == "calls=1+1, limit=1"


# -------------------------------------------------------------------------- quotas


def test_rate_limit_carries_retry_after(env):
    env.add("b", quota=AgentQuota(rate_per_s=2.0, burst=2))
    env.value("b", "read_doc", name="1")
    env.value("b", "read_doc", name="2")
    raw = env.call("b", "read_doc", name="3")
    assert msgpack.unpackb(raw)["error"]["retry_after_s"] == pytest.approx(0.5)
    exc = env.denied(raw, QuotaExceeded, ErrorCode.RATE_LIMITED)
    assert exc.retry_after_s == pytest.approx(0.5)
    assert exc.retryable
    assert exc.public() == "RATE_LIMITED on tool 'read_doc'; retry after 0.500s"
    env.clock.advance(0.5)
    assert env.value("b", "read_doc", name="4")["name"] == "4"
    assert [n for _, n in RAN] == ["1", "2", "4"]


def test_call_budget_exhausted(env):
    env.add("b", CallBudget(2))
    env.value("b", "read_doc", name="1")
    env.value("b", "write_doc", name="2", text="t")
    env.denied(env.call("b", "read_doc", name="3"), QuotaExceeded, ErrorCode.BUDGET_EXHAUSTED)
    assert len(RAN) == 2
    assert env.ledger.used(env.budget_key(env.tokens["b"])) == 2.0


def test_cost_budget_exhausted(env):
    env.add("b", CostBudget(5.0))
    assert env.value("b", "pricey") == 3
    env.denied(env.call("b", "pricey"), QuotaExceeded, ErrorCode.BUDGET_EXHAUSTED)
    assert env.value("b", "read_doc", name="x")["name"] == "x"  # cost 1 still fits
    assert env.ledger.used(env.budget_key(env.tokens["b"])) == 4.0


def test_concurrency_limit(env):
    env.add("b", quota=AgentQuota(max_concurrent=1))

    async def scenario() -> tuple[bytes, bytes]:
        first = asyncio.create_task(env.sup.call(env.request("b", "slow", seconds=0.01)))
        await asyncio.sleep(0)  # the first call is authorised and in flight
        assert env.ledger.inflight("b") == 1
        second = await env.sup.call(env.request("b", "read_doc", name="x"))
        return await first, second

    first, second = asyncio.run(scenario())
    env.denied(second, QuotaExceeded, ErrorCode.CONCURRENCY_LIMIT, last=False)  # the first call's outcome follows
    assert decode_reply(first)["value"] == "done"
    assert env.ledger.inflight("b") == 0
    assert env.value("b", "read_doc", name="y")["name"] == "y"


# --------------------------------------------------------------------------- audit


def test_audit_down_denies_and_does_not_run_the_tool(env):
    env.add("b", CallBudget(5))
    key = env.budget_key(env.tokens["b"])
    env.audit.fail = True
    raw = env.call("b", "write_doc", name="x", text="t")
    with pytest.raises(AuditUnavailable) as info:
        decode_reply(raw)
    assert info.value.code is ErrorCode.AUDIT_UNAVAILABLE
    assert info.value.tool == "write_doc"
    assert env.audit.records == []  # nothing could be written, so nothing ran
    assert RAN == []
    assert env.dispatcher.messages == []
    assert env.ledger.inflight("b") == 0  # the reservation was released
    assert env.ledger.used(key) == 0.0
    env.audit.fail = False
    assert env.value("b", "write_doc", name="x", text="t") is True
    assert env.ledger.used(key) == 1.0
    assert ("b", "write_doc", "AUDIT_UNAVAILABLE") in {(s["agent"], s["tool"], s["result"]) for s in stats_of(env.sup)}


def test_audit_down_turns_any_denial_into_audit_unavailable(env):
    env.audit.fail = True
    with pytest.raises(AuditUnavailable) as info:
        decode_reply(env.call("a", "no_such_tool"))
    assert info.value.code is ErrorCode.AUDIT_UNAVAILABLE
    assert env.audit.records == []


class OutcomeFails(MemoryAudit):
    def record(self, kind: str, **fields: Any) -> int:
        if kind == "outcome":
            raise AuditUnavailable("disk full")
        return super().record(kind, **fields)


def test_unrecorded_outcome_is_not_handed_back(env):
    env.audit = env.sup.audit = OutcomeFails()
    raw = env.call("a", "read_doc", name="secret")
    with pytest.raises(AuditUnavailable) as info:
        decode_reply(raw)
    assert info.value.code is ErrorCode.AUDIT_UNAVAILABLE
    assert b"secret" not in raw
    assert kinds(env) == [("decision", "allow")]
    assert env.ledger.inflight("a") == 0


# --------------------------------------------------------------------- tool failure


def test_tool_failure_is_reported_with_detail(env):
    raw = env.call("a", "explode", msg="disk on fire")
    with pytest.raises(ToolFailed) as info:
        decode_reply(raw)
    exc = info.value
    assert exc.code is ErrorCode.TOOL_FAILED
    assert exc.tool == "explode"
    assert "RuntimeError: boom: disk on fire" in exc.detail  # type: ignore[attr-defined]
    assert kinds(env) == [("decision", "allow"), ("outcome", False)]
    outcome = env.audit.of("outcome", ok=False, code="TOOL_FAILED")[0]
    assert "boom: disk on fire" in outcome["reason"]
    assert env.ledger.inflight("a") == 0
    stats = {(s["tool"], s["result"]): s["count"] for s in stats_of(env.sup)}
    assert stats == {("explode", "allow"): 1, ("explode", "TOOL_FAILED"): 1}


def test_tool_timeout_is_worker_unavailable():
    RAN.clear()
    env = Env(call_timeout_s=0.02)
    env.add("a")
    raw = env.call("a", "slow", seconds=5.0)
    with pytest.raises(ToolFailed) as info:
        decode_reply(raw)
    assert info.value.code is ErrorCode.WORKER_UNAVAILABLE
    assert env.audit.of("outcome", ok=False, code="WORKER_UNAVAILABLE")
    assert env.ledger.inflight("a") == 0


def test_dispatch_carries_a_valid_supervisor_mac(env):
    env.value("a", "read_doc", name="x")
    (message,) = env.dispatcher.messages
    # The same bytes delivered again are refused by the worker: a dispatch cannot be replayed.
    reply = msgpack.unpackb(asyncio.run(env.worker.execute(message)))
    assert reply["error"]["code"] == "DISPATCH_REFUSED"
    assert len(RAN) == 1


# ---------------------------------------------------------------------- delegation


@pytest.fixture
def team() -> Env:
    """A may delegate to B; B's policy only has read_doc and write_doc; B may delegate to C."""
    RAN.clear()
    env = Env()
    env.add("a", CallBudget(4), MaxDepth(1), can_delegate_to=("b",))
    env.add("b", Tools(("read_doc", "write_doc")), can_delegate_to=("c",),
            delegate_caveats=(Audience(JOB), Tools(("read_doc", "write_doc"))))
    env.add("c")
    return env


def delegated(env: Env, frm: str, to: str, token: bytes | None = None) -> bytes:
    reply = decode_reply(env.delegate(frm, to, token=token))
    return reply["token"]


def test_delegated_token_works_for_the_delegate(team):
    child = delegated(team, "a", "b")
    vt = team.keyring.verify(child)
    assert vt.holder == "b" and vt.depth == 1
    assert vt.token_id == team.keyring.verify(team.tokens["a"]).token_id
    rec = team.audit.of("delegate")[-1]
    assert (rec["agent"], rec["to"], rec["depth"]) == ("a", "b", 1)
    assert team.value("b", "read_doc", name="x", token=child)["name"] == "x"
    allow = team.audit.of("decision", decision="allow")[-1]
    assert (allow["agent"], allow["depth"]) == ("b", 1)


def test_delegated_token_is_useless_to_anyone_else(team):
    child = delegated(team, "a", "b")
    team.denied(team.call("a", "read_doc", name="x", token=child), TokenRejected, ErrorCode.WRONG_HOLDER)
    team.denied(team.call("c", "read_doc", name="x", token=child), TokenRejected, ErrorCode.WRONG_HOLDER)


def test_delegated_token_is_narrowed_by_the_delegates_policy(team):
    child = delegated(team, "a", "b")
    assert team.value("a", "delete_doc", name="x") is True  # A may delete ...
    raw = team.call("b", "delete_doc", name="x", token=child)  # ... B's policy may not
    team.denied(raw, PolicyDenied, ErrorCode.POLICY_DENIED)
    assert RAN == [("delete_doc", "x")]


def test_delegator_can_narrow_before_delegating(team):
    narrowed = Token.decode(team.tokens["a"]).attenuate(Arg("read_doc", "name", "exact", "only-this")).encode()
    child = delegated(team, "a", "b", token=narrowed)
    assert team.value("b", "read_doc", name="only-this", token=child)["name"] == "only-this"
    team.denied(team.call("b", "read_doc", name="other", token=child), PolicyDenied, ErrorCode.POLICY_DENIED)


def test_delegation_to_an_agent_not_allowed(team):
    team.denied(team.delegate("a", "c"), DelegationDenied, ErrorCode.DELEGATION_DENIED)
    team.denied(team.delegate("a", "nobody"), DelegationDenied, ErrorCode.DELEGATION_DENIED)
    assert "may not delegate to 'c'" in team.audit.of("decision", decision="deny", code="DELEGATION_DENIED")[0]["reason"]
    assert team.audit.of("delegate") == []


def test_delegation_of_someone_elses_token(team):
    team.denied(team.delegate("b", "c", token=team.tokens["a"]), TokenRejected, ErrorCode.WRONG_HOLDER)


def test_delegates_calls_count_against_the_delegators_budget(team):
    child = delegated(team, "a", "b")
    key = team.budget_key(team.tokens["a"])
    assert team.budget_key(child) == key  # same chain prefix, same budget
    team.value("a", "read_doc", name="1")
    team.value("b", "read_doc", name="2", token=child)
    team.value("b", "read_doc", name="3", token=child)
    team.value("b", "read_doc", name="4", token=child)
    assert team.ledger.used(key) == 4.0
    team.denied(team.call("b", "read_doc", name="5", token=child), QuotaExceeded, ErrorCode.BUDGET_EXHAUSTED)
    team.denied(team.call("a", "read_doc", name="6"), QuotaExceeded, ErrorCode.BUDGET_EXHAUSTED)
    assert len(RAN) == 4


def test_revoking_the_parent_revokes_the_delegate(team):
    child = delegated(team, "a", "b")
    team.value("b", "read_doc", name="x", token=child)
    team.sup.revoke_token(team.keyring.verify(team.tokens["a"]).token_id)
    team.denied(team.call("b", "read_doc", name="x", token=child), TokenRejected, ErrorCode.TOKEN_REVOKED)
    team.denied(team.call("a", "read_doc", name="x"), TokenRejected, ErrorCode.TOKEN_REVOKED)
    team.denied(team.delegate("a", "b"), TokenRejected, ErrorCode.TOKEN_REVOKED)


def test_revoking_the_child_tag_spares_the_parent(team):
    child = delegated(team, "a", "b")
    team.sup.revoke_token(team.keyring.verify(child).tags[-1])
    team.denied(team.call("b", "read_doc", name="x", token=child), TokenRejected, ErrorCode.TOKEN_REVOKED)
    assert team.value("a", "read_doc", name="x")["name"] == "x"


def test_redelegation_beyond_max_depth(team):
    child = delegated(team, "a", "b")
    team.denied(team.delegate("b", "c", token=child), TokenRejected, ErrorCode.DEPTH_EXCEEDED)
    assert team.audit.of("delegate", agent="b") == []


def test_redelegation_within_max_depth():
    RAN.clear()
    env = Env()
    env.add("a", MaxDepth(2), can_delegate_to=("b",))
    env.add("b", can_delegate_to=("c",))
    env.add("c")
    grandchild = delegated(env, "b", "c", token=delegated(env, "a", "b"))
    assert env.keyring.verify(grandchild).depth == 2
    assert env.value("c", "read_doc", name="x", token=grandchild)["name"] == "x"


def test_delegation_with_an_expired_token(team):
    team.add("a", Expires(team.clock() + 10), can_delegate_to=("b",))
    team.clock.advance(11)
    team.denied(team.delegate("a", "b"), TokenRejected, ErrorCode.TOKEN_EXPIRED)


# -------------------------------------------------------------------------- stats


def test_stats_count_decisions(env):
    env.add("b")
    env.value("a", "read_doc", name="x")
    env.value("a", "read_doc", name="y")
    env.call("a", "nope")
    env.call("b", "read_doc")
    env.call("a", "explode", msg="m")
    assert stats_of(env.sup) == [
        {"agent": "a", "tool": "(other)", "result": "UNKNOWN_TOOL", "count": 1},  # one bucket for invented names
        {"agent": "a", "tool": "explode", "result": "TOOL_FAILED", "count": 1},
        {"agent": "a", "tool": "explode", "result": "allow", "count": 1},
        {"agent": "a", "tool": "read_doc", "result": "allow", "count": 2},
        {"agent": "b", "tool": "read_doc", "result": "MALFORMED", "count": 1},
    ]


def test_stats_count_delegations(team):
    delegated(team, "a", "b")
    team.delegate("a", "c")
    results = {(s["agent"], s["tool"], s["result"]): s["count"] for s in stats_of(team.sup)}
    assert results == {("a", "delegate:b", "allow"): 1, ("a", "delegate:c", "DELEGATION_DENIED"): 1}


# ------------------------------------------------------------------ Agent in-process


class Reader(Agent):
    async def run(self, task: Any) -> Any:
        return await self.call("read_doc", name=task)


class ReadTwice(Agent):
    async def run(self, task: Any) -> Any:
        first = await self.call("read_doc", name=task)
        second = await self.call("read_doc", name=task)
        return [first, second]


class Lead(Agent):
    async def run(self, task: Any) -> Any:
        return await self.delegate("b", task, tools=["read_doc"], max_calls=1)


class LocalPeer:
    """Stands in for the Ray handle of another agent."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def run_delegated(self, task: Any, token: bytes) -> Any:
        return await self.agent.run_delegated(task, token)


def attach(env: Env, agent: Agent, name: str, peers: dict[str, tuple[str, Any]] | None = None) -> Agent:
    agent._attach(name=name, token=env.tokens[name], request_key=env.keys[name],
                  supervisor=InProcessSupervisorClient(env.sup), peers=peers or {},
                  tool_schemas=[t.schema for t in TOOLS.values()], config={}, clock=env.clock)
    return agent


def test_agent_call_goes_through_the_supervisor(env):
    reader = attach(env, Reader(), "a")
    assert asyncio.run(reader.run("doc")) == {"name": "doc", "limit": 10}
    assert kinds(env) == [("decision", "allow"), ("outcome", True)]
    assert reader.token == env.tokens["a"]
    assert [s["function"]["name"] for s in reader.tool_schemas] == list(TOOLS)


def test_agent_call_raises_typed_errors(env):
    env.add("b", Tools(("read_doc",)))
    agent = attach(env, Reader(), "b")
    with pytest.raises(UnknownTool) as info:
        asyncio.run(agent.call("nope"))
    assert info.value.code is ErrorCode.UNKNOWN_TOOL
    assert env.audit.of("decision", decision="deny", code="UNKNOWN_TOOL")
    with pytest.raises(PolicyDenied) as info2:
        asyncio.run(agent.call("write_doc", name="x", text="t"))
    assert info2.value.code is ErrorCode.POLICY_DENIED
    assert env.audit.of("decision", decision="deny", code="POLICY_DENIED")
    with pytest.raises(MalformedRequest) as info3:
        asyncio.run(agent.call("read_doc", name=3))
    assert info3.value.code is ErrorCode.MALFORMED
    assert env.audit.of("decision", decision="deny", code="MALFORMED")
    assert RAN == []


def test_agent_delegate_end_to_end(team):
    b = attach(team, Reader(), "b")
    lead = attach(team, Lead(), "a", peers={"b": ("Reader", LocalPeer(b))})
    assert asyncio.run(lead.run("doc")) == {"name": "doc", "limit": 10}
    assert team.audit.of("delegate", agent="a", to="b")
    allow = team.audit.of("decision", decision="allow")[-1]
    assert (allow["agent"], allow["depth"]) == ("b", 1)
    assert b.token == team.tokens["b"]  # back on its own token outside run_delegated


def test_agent_delegate_narrowing_is_enforced(team):
    b = attach(team, ReadTwice(), "b")
    lead = attach(team, Lead(), "a", peers={"b": ("ReadTwice", LocalPeer(b))})
    with pytest.raises(QuotaExceeded) as info:
        asyncio.run(lead.run("doc"))  # max_calls=1, the delegate tries twice
    assert info.value.code is ErrorCode.BUDGET_EXHAUSTED
    assert team.audit.of("decision", decision="deny", code="BUDGET_EXHAUSTED", agent="b")
    assert RAN == [("read_doc", "doc")]


def test_agent_delegate_by_class(team):
    b = attach(team, Reader(), "b")

    class ByClass(Agent):
        async def run(self, task: Any) -> Any:
            return await self.delegate(Reader, task, tools=["read_doc"])

    lead = attach(team, ByClass(), "a", peers={"b": ("Reader", LocalPeer(b))})
    assert asyncio.run(lead.run("doc"))["name"] == "doc"


def test_agent_delegate_to_unknown_peer(team):
    lead = attach(team, Lead(), "a", peers={})
    with pytest.raises(DelegationDenied) as info:
        asyncio.run(lead.run("doc"))
    assert info.value.code is ErrorCode.DELEGATION_DENIED
    assert team.audit.records == []  # refused before anything reached the supervisor


def test_agent_delegate_refused_by_supervisor(team):
    c = attach(team, Reader(), "c")

    class ToC(Agent):
        async def run(self, task: Any) -> Any:
            return await self.delegate("c", task)

    lead = attach(team, ToC(), "a", peers={"c": ("Reader", LocalPeer(c))})
    with pytest.raises(DelegationDenied) as info:
        asyncio.run(lead.run("doc"))
    assert info.value.code is ErrorCode.DELEGATION_DENIED
    assert team.audit.of("decision", decision="deny", code="DELEGATION_DENIED")
    assert RAN == []


@tool(effect="read")
def impersonate() -> None:
    """A hostile tool that dresses its failure up as a decision of the trusted core."""
    raise PolicyDenied("worker says: denied by policy")


def test_worker_cannot_report_a_trusted_core_code():
    env = Env()
    env.worker._tools["impersonate"] = impersonate
    env.sup.tools["impersonate"] = impersonate.spec
    env.add("alice", caveats=[Audience(JOB), Expires(env.clock() + 3600)])
    with pytest.raises(ToolFailed) as info:
        decode_reply(env.call("alice", "impersonate"))
    assert info.value.code is ErrorCode.TOOL_FAILED
    outcome = env.audit.of("outcome", tool="impersonate")[-1]
    assert outcome["ok"] is False and outcome["code"] == "TOOL_FAILED"


# ------------------------------------------------------------------------- batches


def test_batch_checks_audits_and_settles_each_call_on_its_own():
    from runtime.protocol import encode_batch

    env = Env()
    env.add("a", CallBudget(3))
    RAN.clear()
    req = encode_batch(agent="a", token=env.tokens["a"], request_key=env.keys["a"], calls=[
        ("read_doc", {"name": "x"}), ("nope", {}), ("read_doc", {"nam": "typo"}), ("explode", {"msg": "m"}),
        ("read_doc", {"name": "y"}), ("read_doc", {"name": "over budget"})])
    replies = decode_reply(asyncio.run(env.sup.call_batch(req)))["batch"]
    assert [r["ok"] for r in replies] == [True, False, False, False, True, False]
    assert replies[0]["value"] == {"name": "x", "limit": 10}
    assert [r["error"]["code"] for r in replies if not r["ok"]] == ["UNKNOWN_TOOL", "MALFORMED", "TOOL_FAILED",
                                                                     "BUDGET_EXHAUSTED"]
    assert RAN == [("read_doc", "x"), ("explode", "m"), ("read_doc", "y")]
    assert len(env.audit.of("decision", decision="allow")) == 3
    assert len(env.audit.of("decision", decision="deny")) == 3
    assert len(env.audit.of("outcome")) == 3
    assert all(r["dispatch_ms"] > 0 for r in env.audit.of("outcome"))  # timed from the batched hop
    assert len(env.dispatcher.messages) == 3  # one hop, three individually signed dispatches


def test_batch_replay_and_forgery_are_refused_whole():
    from runtime.protocol import encode_batch

    env = Env()
    env.add("a")
    req = encode_batch(agent="a", token=env.tokens["a"], request_key=env.keys["a"], calls=[("read_doc", {"name": "x"})])
    decode_reply(asyncio.run(env.sup.call_batch(req)))
    with pytest.raises(TokenRejected) as info:
        decode_reply(asyncio.run(env.sup.call_batch(req)))
    assert info.value.code is ErrorCode.REPLAY
    forged = encode_batch(agent="a", token=env.tokens["a"], request_key=secrets.token_bytes(32),
                          calls=[("read_doc", {"name": "x"})])
    with pytest.raises(TokenRejected) as info:
        decode_reply(asyncio.run(env.sup.call_batch(forged)))
    assert info.value.code is ErrorCode.BAD_REQUEST_MAC


@pytest.mark.parametrize("batch", [[], [{"tool": "read_doc"}], [{"tool": 1, "args": {}}], ["x"],
                                   [{"tool": "read_doc", "args": {}, "extra": 1}]])
def test_malformed_batches_are_denied(batch):
    env = Env()
    env.add("a")
    body = {"v": 1, "op": "batch", "agent": "a", "token": env.tokens["a"], "batch": batch,
            "nonce": secrets.token_bytes(16), "ts": time.time()}
    with pytest.raises(MalformedRequest):
        decode_reply(asyncio.run(env.sup.call_batch(seal_request(body, env.keys["a"]))))


@pytest.mark.parametrize("entry_point, op", [("call", "batch"), ("call", "delegate"), ("call_batch", "call"),
                                             ("delegate", "call")])
def test_a_request_sent_to_the_wrong_entry_point_is_denied_not_crashed(entry_point, op):
    env = Env()
    env.add("a")
    RAN.clear()
    body = {"v": 1, "op": op, "agent": "a", "token": env.tokens["a"], "nonce": secrets.token_bytes(16),
            "ts": time.time(), **{"call": {"tool": "read_doc", "args": {"name": "x"}},
                                  "batch": {"batch": [{"tool": "read_doc", "args": {"name": "x"}}]},
                                  "delegate": {"to": "b"}}[op]}
    raw = asyncio.run(getattr(env.sup, entry_point)(seal_request(body, env.keys["a"])))
    with pytest.raises(MalformedRequest):
        decode_reply(raw)
    assert RAN == []


def test_agent_call_many_returns_values_and_typed_errors():
    env = Env()
    env.add("a")

    class Batcher(Agent):
        async def run(self, task):
            return await self.call_many([("read_doc", {"name": "x"}), ("delete_doc", {"nam": "typo"})])

    agent = Batcher()
    agent._attach(name="a", token=env.tokens["a"], request_key=env.keys["a"],
                  supervisor=InProcessSupervisorClient(env.sup), peers={}, tool_schemas=[], config={},
                  clock=env.clock)
    value, error = asyncio.run(agent.run(None))
    assert value == {"name": "x", "limit": 10}
    assert isinstance(error, MalformedRequest) and error.code is ErrorCode.MALFORMED


# ------------------------------------------------------- what the agent is told (issue 11, item 14)


def test_malformed_call_tells_the_agent_its_mistake(env):
    agent = attach(env, Reader(), "a")
    with pytest.raises(MalformedRequest) as info:
        asyncio.run(agent.call("read_doc", name="x", colour="red"))
    exc = info.value
    assert exc.code is ErrorCode.MALFORMED and exc.tool == "read_doc"
    assert "unknown arguments ['colour']" in exc.detail
    assert "colour" in exc.public()  # what the model reads (llm.run_tool_loop sends public())
    rec = env.audit.of("decision", decision="deny", code="MALFORMED")[-1]
    assert "colour" in rec["reason"]
    assert RAN == []


def test_policy_denial_tells_the_agent_no_values(env):
    narrowed = Token.decode(env.tokens["a"]).attenuate(Arg("read_doc", "name", "exact", "only-this")).encode()
    raw = env.call("a", "read_doc", name="other", token=narrowed)
    exc = env.denied(raw, PolicyDenied, ErrorCode.POLICY_DENIED)
    assert exc.detail is None and "only-this" not in exc.public()
    assert b"only-this" not in raw and b"detail" not in raw
    assert "only-this" in env.audit.of("decision", decision="deny")[-1]["reason"]  # the operator sees it


def test_tool_failure_detail_is_capped(env):
    raw = env.call("a", "explode", msg="x" * 5000)
    with pytest.raises(ToolFailed) as info:
        decode_reply(raw)
    assert info.value.detail.startswith("RuntimeError: boom: xxx")
    assert len(info.value.detail) == 500 and len(raw) < 1000


def test_delegating_a_tool_the_delegator_does_not_hold_fails_at_once(team):
    team.add("d", Tools(("read_doc",)), can_delegate_to=("b",))
    wider = Token.decode(team.tokens["d"]).attenuate(Tools(("read_doc", "write_doc"))).encode()
    exc = team.denied(team.delegate("d", "b", token=wider), DelegationDenied, ErrorCode.DELEGATION_DENIED)
    assert exc.detail is None
    rec = team.audit.of("decision", decision="deny", code="DELEGATION_DENIED")[-1]
    assert (rec["agent"], rec["tool"], rec["authenticated"]) == ("d", "delegate:b", True)
    assert "names ['write_doc'], not held" in rec["reason"]
    assert team.audit.of("delegate") == []
    stats = {(s["agent"], s["tool"], s["result"]): s["count"] for s in stats_of(team.sup)}
    assert stats == {("d", "delegate:b", "DELEGATION_DENIED"): 1}  # blamed on the delegator


def test_delegation_that_leaves_the_delegate_no_tool_is_denied(team):
    b = attach(team, Reader(), "b")

    class DeleteVia(Agent):
        async def run(self, task: Any) -> Any:
            return await self.delegate("b", task, tools=["delete_doc"])  # A holds it, B's policy has not

    lead = attach(team, DeleteVia(), "a", peers={"b": ("Reader", LocalPeer(b))})
    with pytest.raises(DelegationDenied):
        asyncio.run(lead.run("doc"))
    rec = team.audit.of("decision", decision="deny", code="DELEGATION_DENIED")[-1]
    assert rec["agent"] == "a" and "it hands on []" in rec["reason"]
    assert team.audit.of("decision", agent="b") == [] and RAN == []  # the delegate never ran


def test_delegation_record_shows_what_was_granted(team):
    child = Token.decode(team.tokens["a"]).attenuate(Tools(("read_doc", "delete_doc"))).encode()
    delegated(team, "a", "b", token=child)
    rec = team.audit.of("delegate")[-1]
    assert (rec["agent"], rec["to"], rec["tool"], rec["tools"]) == ("a", "b", "delegate:b", ["read_doc"])
