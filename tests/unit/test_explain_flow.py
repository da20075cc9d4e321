"""`warden policy explain`: output labels, sink rules and handle limits, as text and JSON (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

from runtime.cli import _table, explain, main
from runtime.explain import DEFAULT_HANDLES, flow_lines, flow_view, output_labels, sink_rules
from runtime.policyfile import load_policy
from runtime.trusted.flow import Label
from runtime.trusted.policy import OutputRule

ROOT = Path(__file__).resolve().parents[2]

# The declarations in their plain form (the keys of a policy file), as runtime.explain reads them.
MAIL = {
    "agent": "mailer",
    "tools": {
        "email.read": {"effect": "read", "output": {
            "integrity": "untrusted", "readers": ["*@corp.example"], "hide": True,
            "trusted_items": {"path": "messages", "when": {"sender": {"one_of": ["alice@corp.example"]}}}}},
        "email.send": {"effect": "write", "ifc": {"context": "trusted", "args": {"to": "trusted"},
                                                   "destination": "to", "on_violation": "deny"}},
        "calendar.read": {"effect": "read"},
        "files.delete": {"effect": "delete"},
        "http.post": {"effect": "write", "ifc": {"destination": "public"}},
    },
    "ifc": [{"effects": ["write", "delete"], "context": "trusted", "on_violation": "approve"},
            {"effects": ["execute"], "args": "trusted"}],
    "handles": {"max_count": 16, "max_bytes": 1048576},
}


def test_output_labels_merge_field_by_field_policy_then_job_then_tool_then_untrusted():
    labels = output_labels(MAIL, job_outputs={"email.read": {"integrity": "trusted"},
                                              "calendar.read": {"integrity": "trusted", "readers": ["*@corp.example"]}},
                           tool_outputs={"calendar.read": {"integrity": "endorsed", "hide": True},
                                         "files.delete": {"hide": True}})
    assert labels["email.read"] == {"integrity": "untrusted", "readers": ["*@corp.example"], "hide": True,
                                    "carries_inputs": True,
                                    "trusted_items": MAIL["tools"]["email.read"]["output"]["trusted_items"],
                                    "source": {"integrity": "policy", "readers": "policy", "hide": "policy",
                                               "carries_inputs": "default", "trusted_items": "policy"}}
    calendar = labels["calendar.read"]
    assert (calendar["integrity"], calendar["readers"], calendar["hide"]) == ("trusted", ["*@corp.example"], True)
    assert calendar["source"] == {"integrity": "job", "readers": "job", "hide": "tool", "carries_inputs": "default",
                                  "trusted_items": "default"}
    # a field nobody sets gets the fail-closed default
    assert labels["files.delete"] == {"integrity": "untrusted", "readers": "public", "hide": True,
                                      "carries_inputs": True, "trusted_items": None,
                                      "source": {"integrity": "default", "readers": "default", "hide": "tool",
                                                 "carries_inputs": "default", "trusted_items": "default"}}
    assert set(labels["email.send"]["source"].values()) == {"default"}
    text = "\n".join(flow_lines({"outputs": labels, "sinks": {}, "handles": DEFAULT_HANDLES}, _table))
    assert next(line for line in text.splitlines() if "calendar.read" in line).rstrip().endswith(
        "job (integrity, readers), tool (hide)")


def test_output_labels_agree_with_what_the_supervisor_applies():
    policy = load_policy(MAIL)
    job = {"calendar.read": {"integrity": "trusted", "readers": ["*@corp.example"]}}
    tool = {"calendar.read": {"hide": True}, "files.delete": {"integrity": "endorsed", "carries_inputs": False}}
    shown = output_labels(policy, job_outputs=job, tool_outputs=tool)
    declared = {t: OutputRule.model_validate(job.get(t, {})).over(OutputRule.model_validate(tool[t]) if t in tool
                                                                  else None) for t in set(job) | set(tool)}
    for name, out in policy.outputs(declared).items():
        label = Label.parse({"integrity": shown[name]["integrity"], "readers": shown[name]["readers"]})
        assert (out.label, out.hide, out.carries_inputs) == (label, shown[name]["hide"],
                                                             shown[name]["carries_inputs"]), name
        assert (out.items is not None) == (shown[name]["trusted_items"] is not None), name


def test_sink_rules_list_the_tools_own_and_the_policy_wide_rules_that_select_it():
    for form in (MAIL, load_policy(MAIL)):
        sinks = sink_rules(form)
        assert [r["rule"] for r in sinks["email.send"]] == ["tools.email.send.ifc", "ifc[0]"]
        own = {k: v for k, v in sinks["email.send"][0].items() if k not in ("checks", "effects")}
        assert own == {"rule": "tools.email.send.ifc", "context": "trusted", "args": {"to": "trusted"},
                       "destination": "to", "on_violation": "deny"}
        assert [r["rule"] for r in sinks["files.delete"]] == ["ifc[0]"]
        assert [r["rule"] for r in sinks["http.post"]] == ["tools.http.post.ifc", "ifc[0]"]
        assert "email.read" not in sinks and "calendar.read" not in sinks  # read tools: no rule selects them
    checks = sink_rules(load_policy(MAIL))["email.send"][0]["checks"]
    assert checks == ["email.send: context must be trusted", "email.send: argument 'to' must be trusted",
                      "email.send: readers must admit argument 'to'"]
    everything = sink_rules(load_policy({**MAIL, "ifc": [{"args": "trusted"}]}))  # no effects: every tool
    assert all(any(r["rule"] == "ifc[0]" for r in rules) for rules in everything.values())
    assert set(everything) == set(MAIL["tools"])


def test_handle_limits_fill_in_defaults():
    assert flow_view(MAIL)["handles"] == {"max_count": 16, "max_bytes": 1048576, "ttl_s": 3600}
    assert flow_view({"tools": {}})["handles"] == DEFAULT_HANDLES


def test_flow_text_names_labels_sources_sinks_and_limits():
    text = "\n".join(flow_lines(flow_view(MAIL), _table))
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and line.split()[0] in
            MAIL["tools"]}
    assert "HANDLE" in rows["email.read"] and "[*@corp.example]" in rows["email.read"]
    assert "items of 'messages' with sender: one_of=['alice@corp.example']: trusted" in rows["email.read"]
    assert rows["calendar.read"].split()[1:3] == ["untrusted", "public"]
    assert "default: nothing declared" in rows["calendar.read"]
    send = [line for line in text.splitlines() if line.strip().startswith("email.send")]
    assert len(send) == 3  # one label row, two sink rows
    assert "tools.email.send.ifc" in send[1] and "to: trusted" in send[1] and \
        "readers must admit every value of 'to'" in send[1] and send[1].rstrip().endswith("deny")
    assert "ifc[0] (effects: write, delete)" in send[2] and send[2].rstrip().endswith("approve")
    assert any("public data only" in line for line in text.splitlines() if "http.post" in line)
    assert "handles: at most 16 per agent, 1048576 bytes in all, each for 3600s" in text


def test_explain_of_a_real_policy_shows_the_flow_section_and_its_json(capsys):
    policy = load_policy(ROOT / "policies" / "summarizer.yaml")
    text = explain(policy, tool_outputs={"chat.read": {"integrity": "untrusted", "hide": True}})
    assert "information flow:" in text and "sink rules: none" in text
    row = next(line for line in text.splitlines() if line.startswith("  chat.read"))
    assert "HANDLE" in row and row.rstrip().endswith("tool")
    doc = json.loads(explain(policy, job_outputs={"chat.read": {"integrity": "trusted"}}, as_json=True))
    assert doc["agent"] == "summarizer"
    assert doc["tools"]["chat.read"]["output"] == {
        "integrity": "trusted", "readers": "public", "hide": False, "carries_inputs": True, "trusted_items": None,
        "source": {"integrity": "job", "readers": "default", "hide": "default", "carries_inputs": "default",
                   "trusted_items": "default"}}
    assert doc["tools"]["chat.read"]["sinks"] == [] and doc["handles"] == DEFAULT_HANDLES
    assert doc["tools"]["chat.read"]["args"]["channel"] == {"one_of": ["general", "random"]}


def test_policy_explain_json_on_the_command_line(capsys):
    assert main(["policy", "explain", str(ROOT / "policies" / "lead.yaml"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["tools"]) >= {"chat.post", "chat.read"}
    assert all({"output", "sinks", "effect", "approval", "sandbox"} <= set(t) for t in doc["tools"].values())
    assert doc["delegation"]["can_delegate_to"] == ["summarizer"]
    assert main(["policy", "explain", str(ROOT / "policies" / "lead.yaml")]) == 0
    assert "information flow:" in capsys.readouterr().out


def test_the_reader_s_results_are_explained_as_checked_answers_not_as_a_declaration():
    view = flow_view({"tools": {"reader.ask": {"effect": "read"}, "calendar.read": {"effect": "read"}}})
    line = next(x for x in flow_lines(view, _table) if x.strip().startswith("reader.ask"))
    assert "endorsed" in line and "the supervisor: a checked answer" in line and "nothing declared" not in line
