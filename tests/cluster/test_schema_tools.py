"""A tool declared from a JSON Schema, a HOST parameter and numbers, on the real cluster path.

One job: a plain agent probes the schema tool and the host tool; a ToolCallingAgent follows an
OpenAI-compatible model (a local HTTP server) that names the tools by their wire names. Every
call goes agent actor -> supervisor actor -> tool worker actor on the sandbox node.
"""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from runtime.job import load_job, run_loaded
from runtime.llm import API_TOOL_NAME
from runtime import auditlog
from tests.cluster.schema_under_test import TRANSFER_SCHEMA

pytestmark = pytest.mark.cluster
JOBS = Path(__file__).resolve().parent / "jobs"
IBAN = "DE89370400440532013000"


def _call(call_id: str, name: str, args: dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


class ModelServer:
    """An OpenAI-compatible /chat/completions on 127.0.0.1 that plays canned turns and keeps each request body."""

    def __init__(self, turns: list[dict]) -> None:
        self.turns, self.bodies = list(turns), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                server.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                message = server.turns.pop(0) if server.turns else {"role": "assistant", "content": "no more turns"}
                raw = json.dumps({"choices": [{"index": 0, "message": message}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "ModelServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


JOB = """
name: schema-tools
task: probe
entry: [schema, llm]
tools: [tests.cluster.schema_under_test]
workers: {{count: 1}}
agents:
  - name: schema
    class: tests.cluster.schema_under_test:SchemaProbeAgent
    policy: {policy}
  - name: llm
    class: runtime.agent:ToolCallingAgent
    policy: {policy}
    config:
      model: {{kind: openai, base_url: "{base_url}", model: test-model, timeout_s: 30}}
      max_turns: 3
"""


def test_schema_tool_host_and_numbers_through_the_supervisor_and_the_openai_wire(ray_instance, runs_dir, tmp_path):
    turns = [
        {"role": "assistant", "content": None, "tool_calls": [
            _call("c1", "bank_send_money", {"recipient": IBAN, "amount": 2200}),
            _call("c2", "net_ping", {"host": "www.example.com"}),
            _call("c3", "chat_write", {"text": "hi"}),  # a wire name no tool has
        ]},
        {"role": "assistant", "content": "done"},
    ]
    with ModelServer(turns) as model:
        job = tmp_path / "schema.yaml"
        job.write_text(JOB.format(policy=JOBS / "schema-policy.yaml",
                                  base_url=f"http://127.0.0.1:{model.httpd.server_address[1]}/v1"))
        result = asyncio.run(run_loaded(load_job(job), runs_dir=runs_dir))
    assert result.ok, result.errors
    probe = result.results["schema"]

    # Item 3 and 6: 2200 and 2200.0 pass `exact: 2200`; the tool gets the float the supervisor checked.
    for key in ("int_amount", "float_amount"):
        assert probe[key] == {"ok": True, "value": {"recipient": IBAN, "amount": 2200.0, "currency": "EUR",
                                                    "tags": None, "amount_type": "float"}}
    assert probe["other_amount"] == {"ok": False, "code": "POLICY_DENIED"}
    assert probe["bad_enum"] == {"ok": False, "code": "MALFORMED"}  # the schema's enum, checked by the supervisor
    assert probe["bad_item"] == {"ok": False, "code": "MALFORMED"}  # an array item of the wrong type
    # Item 2: a bare host, canonicalised, checked by url_host.
    assert probe["host"] == {"ok": True, "value": "www.example.com"}
    assert probe["other_host"] == {"ok": False, "code": "POLICY_DENIED"}
    assert probe["host_with_user"] == {"ok": False, "code": "POLICY_DENIED"}

    # Item 12: the model saw wire names only; its answers came back as Warden names.
    llm = result.results["llm"]
    assert llm["answer"] == "done"
    assert llm["calls"] == [{"tool": "bank.send_money", "ok": True, "code": None},
                            {"tool": "net.ping", "ok": True, "code": None},
                            {"tool": "chat_write", "ok": False, "code": "UNKNOWN_TOOL"}]
    first, second = model.bodies
    assert {t["function"]["name"] for t in first["tools"]} == {"bank_send_money", "net_ping"}
    assert next(t for t in first["tools"] if t["function"]["name"] == "bank_send_money")["function"]["parameters"] \
        == TRANSFER_SCHEMA
    names = [t["function"]["name"] for body in model.bodies for t in body["tools"]]
    names += [c["function"]["name"] for body in model.bodies for m in body["messages"] for c in m.get("tool_calls", [])]
    assert all(API_TOOL_NAME.fullmatch(n) for n in names), names
    asked = next(m for m in second["messages"] if m["role"] == "assistant")  # after the system prompt and task
    assert [c["function"]["name"] for c in asked["tool_calls"]] == ["bank_send_money", "net_ping", "chat_write"]

    # The audit log has what was checked: the canonical arguments, and each refusal with its code.
    recs = list(auditlog.read_records(result.audit_log))
    allowed = [r for r in recs if r.get("decision") == "allow" and r["tool"] == "bank.send_money"]
    assert len(allowed) == 3 and all(type(r["args"]["amount"]) is float for r in allowed)
    denied = {(r["agent"], r["tool"], r["code"]) for r in recs if r.get("decision") == "deny"}
    assert denied == {("schema", "bank.send_money", "POLICY_DENIED"), ("schema", "bank.send_money", "MALFORMED"),
                      ("schema", "net.ping", "POLICY_DENIED"), ("llm", "chat_write", "UNKNOWN_TOOL")}
