"""Tools declared from JSON Schema, host parameters and numbers, through the real supervisor pipeline.

Each call goes agent request -> Supervisor (decode, token, canonicalise, caveats, quota, audit)
-> a real ToolWorker, with fakes only for the clock and the audit sink. Policies are parsed
from YAML text as a job file's would be.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Annotated, Any

import pytest
import yaml

from runtime import HOST, URL, SchemaError, tool, tool_from_schema
from runtime.errors import ErrorCode, MalformedRequest, PolicyDenied, WardenError
from runtime.protocol import decode_reply, encode_call
from runtime.sandbox.worker import ToolWorker
from runtime.testing import FakeClock, InProcessDispatcher, MemoryAudit
from runtime.trusted.capability import KeyRing
from runtime.trusted.ledger import QuotaLedger
from runtime.policyfile import parse_policy
from runtime.trusted.supervisor import AgentEntry, Supervisor

JOB = "job-schema"
RECEIVED: list[tuple[str, dict[str, Any]]] = []  # what each tool body was called with


def _record(name: str):
    def fn(**kwargs: Any) -> str:
        RECEIVED.append((name, kwargs))
        return "ok"
    return fn


# The shapes of a published banking / calendar tool suite (pydantic-generated: anyOf-null, $defs, titles).
SEND_MONEY = {
    "type": "object",
    "properties": {
        "recipient": {"type": "string", "title": "Recipient", "description": "IBAN of the recipient"},
        "amount": {"type": "number", "title": "Amount"},
        "subject": {"type": "string"},
        "date": {"type": "string", "format": "date"},
        "currency": {"type": "string", "enum": ["EUR", "USD"], "default": "EUR"},
    },
    "required": ["recipient", "amount", "subject", "date"],
}
CREATE_EVENT = {
    "type": "object",
    "$defs": {
        "Reminder": {"type": "object", "properties": {"minutes": {"type": "integer", "minimum": 0, "maximum": 10080},
                                                      "method": {"enum": ["email", "popup"]}},
                     "required": ["minutes"]},
    },
    "properties": {
        "title": {"type": "string", "minLength": 1, "maxLength": 100},
        "participants": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}],
                         "default": None},
        "reminder": {"anyOf": [{"$ref": "#/$defs/Reminder"}, {"type": "null"}], "default": None},
        "location": {"type": "string"},
        "priority": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 6},
    },
    "required": ["title"],
    "additionalProperties": False,
}

send_money = tool_from_schema("bank.send_money", SEND_MONEY, _record("bank.send_money"), effect="write")
create_event = tool_from_schema("calendar.create_event", CREATE_EVENT, _record("calendar.create_event"),
                                effect="write", description="Create an event.")


@tool(effect="read", name="net.ping")
def ping(host: Annotated[str, HOST], count: int = 1) -> str:
    """Ping a host."""
    RECEIVED.append(("net.ping", {"host": host, "count": count}))
    return host


@tool(effect="read", name="net.get")
def get(url: Annotated[str, URL]) -> str:
    """Fetch a URL."""
    RECEIVED.append(("net.get", {"url": url}))
    return url


@tool(effect="write", name="sensor.set")
def sensor_set(level: float, readings: list[float] | None = None, step: int = 1) -> float:
    """Set a level."""
    RECEIVED.append(("sensor.set", {"level": level, "readings": readings, "step": step}))
    return level


TOOLS = {t.name: t for t in (send_money, create_event, ping, get, sensor_set)}

POLICY = """
agent: a
tools:
  bank.send_money:
    effect: write
    args:
      amount: {exact: 2200}
      currency: {one_of: [EUR]}
  calendar.create_event: {effect: write}
  net.ping:
    effect: read
    args:
      host: {url_host: [www.example.com, "*.good.org", "https://pinned.example"]}
  net.get:
    effect: read
    args:
      url: {url_host: [www.example.com]}
  sensor.set:
    effect: write
    args:
      level: {one_of: [1, 2.5]}
      step: {exact: 3}
"""


class Env:
    def __init__(self) -> None:
        self.clock = FakeClock(time.time())
        self.keyring = KeyRing.generate()
        self.audit = MemoryAudit()
        dispatch_key = secrets.token_bytes(32)
        worker = ToolWorker(dispatch_key=dispatch_key, tools=TOOLS, job=JOB, clock=self.clock)
        self.sup = Supervisor(job_id=JOB, keyring=self.keyring, tools={n: t.spec for n, t in TOOLS.items()},
                              audit=self.audit, dispatcher=InProcessDispatcher(worker), dispatch_key=dispatch_key,
                              clock=self.clock, ledger=QuotaLedger(clock=self.clock), call_timeout_s=30)
        self.key = secrets.token_bytes(32)
        policy = parse_policy(yaml.safe_load(POLICY))
        self.sup.register_agent(AgentEntry("a", self.key, frozenset(), ()), policy.agent_quota())
        self.token = self.keyring.mint(holder="a", caveats=policy.root_caveats(job_id=JOB, now=self.clock())).encode()

    def call(self, tool_name: str, **args: Any) -> Any:
        request = encode_call(agent="a", token=self.token, tool=tool_name, args=args, request_key=self.key)
        return decode_reply(asyncio.run(self.sup.call(request)))["value"]

    def denied(self, code: ErrorCode, tool_name: str, **args: Any) -> WardenError:
        """The call is refused with ``code``, audited as a denial, and no tool body ran."""
        before = len(RECEIVED)
        with pytest.raises(WardenError) as info:
            self.call(tool_name, **args)
        assert info.value.code is code, info.value
        last = [r for r in self.audit.records if r["kind"] == "decision"][-1]  # anomaly flags may follow
        assert (last["kind"], last["decision"], last["code"], last["tool"]) == ("decision", "deny", code.value,
                                                                              tool_name)
        assert len(RECEIVED) == before
        return info.value


@pytest.fixture
def env() -> Env:
    RECEIVED.clear()
    return Env()


MONEY = {"recipient": "DE89370400440532013000", "subject": "rent", "date": "2026-12-01"}


# ----------------------------------------------------------------- item 3: numbers


def test_exact_2200_allows_2200_and_2200_0_and_the_tool_gets_the_declared_type(env):
    assert env.call("bank.send_money", amount=2200, **MONEY) == "ok"
    assert env.call("bank.send_money", amount=2200.0, **MONEY) == "ok"
    for _, got in RECEIVED:
        assert got["amount"] == 2200.0 and type(got["amount"]) is float
        assert got["currency"] == "EUR"  # the schema's default, filled in and checked by one_of
    decision = [r for r in env.audit.records if r["kind"] == "decision"][0]
    assert type(decision["args"]["amount"]) is float  # audited as checked, as the tool got it


@pytest.mark.parametrize("amount,code", [(2200.5, ErrorCode.POLICY_DENIED), (2201, ErrorCode.POLICY_DENIED),
                                         (True, ErrorCode.MALFORMED), ("2200", ErrorCode.MALFORMED),
                                         (None, ErrorCode.MALFORMED)])
def test_other_amounts_are_refused(env, amount, code):
    env.denied(code, "bank.send_money", amount=amount, **MONEY)


def test_python_numbers_canonicalise_too(env):
    assert env.call("sensor.set", level=1, step=3.0) == 1.0
    assert RECEIVED[-1][1] == {"level": 1.0, "readings": None, "step": 3}
    assert type(RECEIVED[-1][1]["step"]) is int and type(RECEIVED[-1][1]["level"]) is float
    assert env.call("sensor.set", level=2.5, step=3, readings=[1, 2.5]) == 2.5
    assert RECEIVED[-1][1]["readings"] == [1.0, 2.5] and type(RECEIVED[-1][1]["readings"][0]) is float
    env.denied(ErrorCode.MALFORMED, "sensor.set", level=1, step=3.5)  # not an integer
    env.denied(ErrorCode.MALFORMED, "sensor.set", level=True, step=3)  # a bool is never a number
    env.denied(ErrorCode.MALFORMED, "sensor.set", level=1, step=True)
    env.denied(ErrorCode.MALFORMED, "sensor.set", level=1, step=3, readings=[1, "2"])  # list[float] items
    env.denied(ErrorCode.MALFORMED, "sensor.set", level=1, step=3, readings=[False])
    env.denied(ErrorCode.MALFORMED, "sensor.set", level=1, step=float(2 ** 60))  # beyond exact floats
    env.denied(ErrorCode.POLICY_DENIED, "sensor.set", level=2, step=3)
    env.denied(ErrorCode.POLICY_DENIED, "sensor.set", level=float("nan"), step=3)


# ----------------------------------------------------------------- item 2: hosts


@pytest.mark.parametrize("host,canonical", [("www.example.com", "www.example.com"),
                                            ("WWW.Example.COM.", "www.example.com"),
                                            ("a.good.org", "a.good.org"), ("A.B.Good.Org", "a.b.good.org")])
def test_a_host_parameter_is_canonicalised_and_checked_by_url_host(env, host, canonical):
    assert env.call("net.ping", host=host) == canonical
    assert RECEIVED[-1] == ("net.ping", {"host": canonical, "count": 1})


@pytest.mark.parametrize("host", ["evil.com", "good.org", "www.example.com.evil.com", "pinned.example",
                                  "evilgood.org", "127.0.0.1"])
def test_a_host_not_allowed_is_denied(env, host):
    """'https://pinned.example' pins a scheme and port, which a bare host does not name: no match."""
    env.denied(ErrorCode.POLICY_DENIED, "net.ping", host=host)


@pytest.mark.parametrize("host", [
    "www.example.com@evil.com", "evil.com#www.example.com", "www.example.com:8080", "https://www.example.com",
    "//www.example.com", "www.example.com/x", "www.example.com evil.com", "www.exa\u200bmple.com",
    "\u212a.good.org", "..cafe", "a..good.org", "127.1", "0x7f.1", "[::1]", "fe80::1%eth0", "", " www.example.com",
    "www.example.com\n", "a" * 300,
])
def test_a_malformed_host_is_refused_before_any_caveat(env, host):
    env.denied(ErrorCode.POLICY_DENIED, "net.ping", host=host)


def test_a_host_value_is_typed(env):
    env.denied(ErrorCode.MALFORMED, "net.ping", host=7)
    env.denied(ErrorCode.MALFORMED, "net.ping", host=["www.example.com"])


def test_a_url_parameter_still_needs_a_scheme(env):
    assert env.call("net.get", url="https://www.example.com/x") == "https://www.example.com/x"
    env.denied(ErrorCode.POLICY_DENIED, "net.get", url="www.example.com")


def test_host_schema_says_hostname():
    assert ping.schema["function"]["parameters"]["properties"]["host"] == {"type": "string", "format": "hostname"}
    assert ping.spec.params["host"].format == "host"


# ----------------------------------------------------------------- item 6: JSON Schema tools


def test_a_schema_tool_gets_canonical_arguments_with_defaults(env):
    assert env.call("calendar.create_event", title="standup", priority=5.0,
                    reminder={"minutes": 15, "method": "popup"}) == "ok"
    assert RECEIVED[-1] == ("calendar.create_event", {"title": "standup", "participants": None,
                                                      "reminder": {"minutes": 15, "method": "popup"}, "priority": 5})
    assert "location" not in RECEIVED[-1][1]  # optional, no default, not given: left out, not None
    assert env.call("calendar.create_event", title="x", participants=["a@b.c"], reminder=None) == "ok"


@pytest.mark.parametrize("args", [
    {"title": ""},                                                  # minLength
    {"title": "x" * 101},                                           # maxLength
    {"title": 5},
    {"title": "x", "participants": "a@b.c"},                        # not an array
    {"title": "x", "participants": ["a", 7]},                       # an item of the wrong type
    {"title": "x", "participants": [None]},
    {"title": "x", "reminder": {"minutes": 15, "method": "sms"}},   # enum, nested
    {"title": "x", "reminder": {"minutes": -1}},                    # minimum, nested
    {"title": "x", "reminder": {"minutes": 20000}},                 # maximum, nested
    {"title": "x", "reminder": {"minutes": 1.5}},
    {"title": "x", "reminder": {"method": "email"}},                # missing required, nested
    {"title": "x", "reminder": {"minutes": 1, "extra": 1}},         # undeclared key, nested
    {"title": "x", "reminder": [1]},
    {"title": "x", "priority": 0},                                  # exclusiveMinimum
    {"title": "x", "priority": 6},                                  # exclusiveMaximum
    {"title": "x", "priority": True},
    {"title": "x", "location": None},                               # not nullable
    {"title": "x", "color": "red"},                                 # undeclared argument
    {},                                                             # missing required
])
def test_a_schema_tool_refuses_what_its_schema_forbids(env, args):
    env.denied(ErrorCode.MALFORMED, "calendar.create_event", **args)


def test_enum_and_policy_on_a_schema_tool(env):
    env.denied(ErrorCode.MALFORMED, "bank.send_money", amount=2200, currency="GBP", **MONEY)  # schema enum
    env.denied(ErrorCode.POLICY_DENIED, "bank.send_money", amount=2200, currency="USD", **MONEY)  # policy one_of


def test_the_model_sees_the_schema_as_given():
    fn = create_event.schema["function"]
    assert fn == {"name": "calendar.create_event", "description": "Create an event.", "parameters": CREATE_EVENT}
    assert fn["parameters"] is not CREATE_EVENT  # a copy
    assert send_money.spec.params["currency"].enum == ("EUR", "USD")


def test_the_callable_may_take_ctx_and_named_parameters():
    def lookup(city: str, days: int = 1, *, ctx: Any = None) -> str:
        return city

    t = tool_from_schema("weather.lookup", {"type": "object", "properties": {"city": {"type": "string"},
                                                                            "days": {"type": "integer"}},
                                            "required": ["city"]}, lookup, effect="read")
    assert t.wants_ctx and t.spec.params["days"].required is False


BAD_SCHEMAS = [
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^[a-z]+$"}}}, "pattern"),
    ({"type": "object", "properties": {"a": {"type": "array", "minItems": 1}}}, "minItems"),
    ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}, "uniqueItems"),
    ({"type": "object", "properties": {"a": {"allOf": [{"type": "string"}]}}}, "allOf"),
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}}, "oneOf"),
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "null"}, {"type": "integer"}]}}},
     "anyOf"),
    ({"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}, "$ref"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}}, "$ref"),
    ({"type": "object", "$defs": {"N": {"type": "object", "properties": {"n": {"$ref": "#/$defs/N"}}}},
      "properties": {"a": {"$ref": "#/$defs/N"}}}, "recursive"),
    ({"type": "object", "properties": {"a": {"type": ["string", "integer"]}}}, "type"),
    ({"type": "object", "properties": {"a": {"type": "date"}}}, "type"),
    ({"type": "object", "properties": {"a": {"type": "object", "properties": {}, "additionalProperties": True}}},
     "additionalProperties"),
    ({"type": "object", "properties": {"a": {"type": "object", "additionalProperties": {"type": "string"}}}},
     "additionalProperties"),
    ({"type": "object", "properties": {"a": {"type": "number", "exclusiveMinimum": 0}}}, "exclusiveMinimum"),
    ({"type": "object", "properties": {"a": {"type": "string", "minimum": 1}}}, "minimum"),
    ({"type": "object", "properties": {"a": {"type": "integer", "default": "10"}}}, "default"),
    ({"type": "object", "properties": {"a": {"type": "string", "enum": ["x", 1]}}}, "enum"),
    ({"type": "object", "properties": {"a": {"type": "string", "enum": []}}}, "enum"),
    ({"type": "object", "properties": {"a": {"type": "string", "items": {"type": "string"}}}}, "items"),
    ({"type": "object", "properties": {"a": {"type": "array", "items": [{"type": "string"}]}}}, "schema"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "required"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": [["a"]]}, "required"),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
    ({"type": "array", "items": {"type": "string"}}, "object"),
    ({"type": ["object", "null"], "properties": {}}, "object"),
    ("not a schema", "object"),
]


@pytest.mark.parametrize("schema,word", BAD_SCHEMAS, ids=[w for _, w in BAD_SCHEMAS])
def test_what_warden_would_not_enforce_is_an_error_at_declaration(schema, word):
    with pytest.raises(SchemaError) as info:
        tool_from_schema("t", schema, lambda **kw: None, effect="read")
    assert word in str(info.value)


def test_the_callable_must_accept_what_the_schema_allows():
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}, "required": ["a"]}
    with pytest.raises(TypeError, match="takes no argument"):
        tool_from_schema("t", schema, lambda a: None, effect="read")
    with pytest.raises(TypeError, match="needs"):
        tool_from_schema("t", schema, lambda a, b: None, effect="read")
    with pytest.raises(SchemaError, match="ctx"):
        tool_from_schema("t", {"type": "object", "properties": {"ctx": {}}}, lambda **kw: None, effect="read")
    with pytest.raises(ValueError, match="effect"):
        tool_from_schema("t", schema, lambda **kw: None, effect="admin")


def test_a_nullable_type_with_an_enum_takes_null_only_if_the_enum_lists_it():
    schema = {"type": "object", "properties": {"a": {"type": ["string", "null"], "enum": ["x"]},
                                               "b": {"type": ["string", "null"], "enum": ["x", None]}}}
    spec = tool_from_schema("t", schema, lambda **kw: None, effect="read").spec
    assert spec.canonical_args({"b": None}) == {"b": None}
    with pytest.raises(MalformedRequest):
        spec.canonical_args({"a": None})


def test_annotations_pass_and_unknown_formats_are_not_enforced():
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "T", "type": "object",
              "properties": {"when": {"type": "string", "format": "date-time", "examples": ["2026-01-01T00:00Z"]},
                             "site": {"type": "string", "format": "uri"},
                             "host": {"type": "string", "format": "hostname"}}}
    spec = tool_from_schema("t", schema, lambda **kw: None, effect="read").spec
    assert spec.canonical_args({"when": "whenever"}) == {"when": "whenever"}
    assert spec.canonical_args({"host": "API.Example.com"}) == {"host": "api.example.com"}
    with pytest.raises(PolicyDenied):
        spec.canonical_args({"site": "ftp://x.example/"})  # uri: http(s) only, as URL parameters


def test_a_top_level_object_without_properties_takes_no_arguments_and_a_nested_one_any_keys():
    t = tool_from_schema("t", {"type": "object", "properties": {"meta": {"type": "object"}}}, lambda **kw: None,
                         effect="read")
    assert t.spec.canonical_args({"meta": {"any": [1], "keys": None}}) == {"meta": {"any": [1], "keys": None}}
    bare = tool_from_schema("u", {"type": "object"}, lambda: None, effect="read")
    assert bare.spec.canonical_args({}) == {}
    with pytest.raises(MalformedRequest):
        bare.spec.canonical_args({"x": 1})


def test_unenforced_keywords_are_named_by_the_caller_and_only_validation_ones():
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                               "stops": {"type": "array", "items": {"type": "string"},
                                                         "maxItems": 3}}}
    t = tool_from_schema("t", schema, lambda **kw: None, effect="read", unenforced=["pattern", "maxItems"])
    assert t.spec.canonical_args({"code": "xyz1", "stops": ["a"] * 5}) == {"code": "xyz1", "stops": ["a"] * 5}
    with pytest.raises(MalformedRequest):  # the rest is still enforced
        t.spec.canonical_args({"stops": [1]})
    with pytest.raises(SchemaError, match="maxItems"):
        tool_from_schema("t", schema, lambda **kw: None, effect="read", unenforced=["pattern"])
    with pytest.raises(SchemaError, match="unenforced"):
        tool_from_schema("t", {"type": "object", "properties": {"a": {"allOf": []}}}, lambda **kw: None,
                         effect="read", unenforced=["allOf"])


def test_a_float_parameter_default_is_a_float_too():
    @tool(effect="read")
    def scale(factor: float = 1) -> float:
        """Scale."""
        return factor

    assert scale.spec.canonical_args({}) == {"factor": 1.0} and type(scale.spec.canonical_args({})["factor"]) is float
    assert scale.schema["function"]["parameters"]["properties"]["factor"]["default"] == 1.0


@pytest.mark.parametrize("value,ok", [
    ("example.com", True), ("EXAMPLE.com", False), ("example.com.", False),  # only the canonical spelling
    ("a.good.org", True), ("https://example.com/x", True),
    ("pinned.example", False), ("https://pinned.example/", True), ("example.com:443", False),
    ("user@example.com", False), ("example.com/x", False), ("evil.com", False), ("a" * 300 + ".example.com", False),
    (7, False), (None, False), (["example.com"], False),
])
def test_url_host_reads_a_bare_host_in_canonical_form_as_a_host(value, ok):
    from runtime.trusted.capability import check_arg

    entries = ("example.com", "*.good.org", "https://pinned.example")
    try:
        why = check_arg("url_host", entries, value)
    except PolicyDenied as exc:
        why = exc.reason
    assert (why is None) is ok, why


def test_string_lengths_count_code_points_and_any_length_bound_loads():
    schema = {"type": "object", "properties": {"t": {"type": "string", "minLength": 2, "maxLength": 100000}}}
    spec = tool_from_schema("t", schema, lambda **kw: None, effect="read").spec
    assert spec.canonical_args({"t": "\u00e9\u00e9"}) == {"t": "\u00e9\u00e9"}  # 2 code points, 4 bytes
    assert spec.canonical_args({"t": "x" * 100000})["t"] == "x" * 100000
    for bad in ("\u00e9", "x" * 100001):
        with pytest.raises(MalformedRequest):
            spec.canonical_args({"t": bad})
