"""Two real MCP servers as tool providers of a job on the cluster: agent actor -> supervisor actor ->
tool worker actor (sandbox node) -> the agent's own bwrap-sandboxed server, spoken to with the mcp SDK."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from runtime import auditlog
from runtime.job import load_job, run_loaded

pytestmark = pytest.mark.cluster

JOB = """
name: mcp
task: probe
entry: [dev]
tools: [runtime.toolbox]
workers: {count: 1}
mcp_servers:
  - name: git
    prefix: git
    command: [mcp-server-git]
    env_from: {GIT_TOKEN: WARDEN_MCP_TEST_TOKEN}
  - name: files
    prefix: files
    command: [mcp-server-filesystem, /workspace]
    path_args: [path, paths, source, destination]
agents:
  - {name: dev, class: "agents.mcp_dev:McpDevAgent", policy: dev.yaml}
"""

POLICY = Path(__file__).resolve().parents[2] / "jobs" / "mcp-dev-policy.yaml"  # the shipped demo's policy


SECRET = "mcp-test-credential-5f3c1e"


def test_mcp_servers_as_tools_with_the_attacks_denied_and_audited(ray_instance, runs_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WARDEN_MCP_TEST_TOKEN", SECRET)
    (tmp_path / "dev.yaml").write_text(POLICY.read_text())
    (tmp_path / "job.yaml").write_text(JOB)
    result = asyncio.run(run_loaded(load_job(tmp_path / "job.yaml"), runs_dir=runs_dir))
    assert result.ok, result.errors
    out = result.results["dev"]
    assert out["made"]["ok"] and out["made"]["value"]["exit_code"] == 0, out["made"]
    assert out["status"]["ok"] and "nothing to commit" in out["status"]["value"], out["status"]
    assert out["log"]["ok"] and "first commit" in out["log"]["value"]
    assert out["notes"] == {"ok": True, "value": {"content": "first line\n"}}
    assert out["reset"] == {"ok": False, "code": "POLICY_DENIED"}  # destructive: not in the capability
    assert out["outside"] == {"ok": False, "code": "POLICY_DENIED"}  # the path rule, on the canonical path
    assert out["readme"]["ok"]
    assert out["obeyed"] == {"ok": False, "code": "POLICY_DENIED"}  # the planted instruction: git.git_reset
    assert out["commit"] == {"ok": False, "code": "FLOW_DENIED"}  # untrusted data may not choose a commit
    assert out["later"] == {"ok": False, "code": "UNKNOWN_TOOL"}

    recs = list(auditlog.read_records(result.audit_log))
    denied = {(r["tool"], r["code"]) for r in recs if r.get("decision") == "deny"}
    assert {("git.git_reset", "POLICY_DENIED"), ("files.read_text_file", "POLICY_DENIED"),
            ("git.git_commit", "FLOW_DENIED")} <= denied
    allowed = [r for r in recs if r.get("decision") == "allow" and r["tool"] == "git.git_log"]
    assert allowed and allowed[0]["args"]["repo_path"] == "/workspace/repo"
    assert allowed[0]["args"]["max_count"] == 10  # the schema's default, filled in by the supervisor
    assert SECRET.encode() not in Path(result.audit_log).read_bytes()  # the server's credential: its env only
