"""MCP servers under gVisor in a real job: agent actor -> supervisor actor -> tool worker actor -> the agent's
own servers, each a runsc container on the agent's workspace; the filesystem server reads the kernel's
version from gVisor's Sentry, not from the host."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from runtime.job import load_job, run_loaded

pytestmark = pytest.mark.cluster

JOB = """
name: mcp-gvisor
task: probe
entry: [gv]
tools: [runtime.toolbox]
workers: {count: 1}
mcp_servers:
  - name: git
    prefix: git
    command: [mcp-server-git]
    sandbox: {backend: gvisor, limits: {memory_mb: 256}}
  - name: files
    prefix: files
    command: [mcp-server-filesystem, /proc]
    sandbox: {backend: gvisor}
    path_args: [path]
agents:
  - {name: gv, class: "tests.cluster.mcp_agents:GVisorMcpAgent", policy: gv.yaml}
"""

POLICY = """agent: gv
tools:
  shell.exec: {effect: execute}
  git.git_log: {effect: read}
  files.read_text_file:
    effect: read
    args:
      path: {path_under: /proc}
sandbox: {backend: gvisor, cpu_s: 10, wall_s: 30}   # the MCP tools run in the agent's gVisor sandbox
"""


def test_an_agent_s_mcp_servers_run_under_gvisor(ray_instance, runs_dir, tmp_path):
    (tmp_path / "gv.yaml").write_text(POLICY)
    (tmp_path / "job.yaml").write_text(JOB)
    result = asyncio.run(run_loaded(load_job(tmp_path / "job.yaml"), runs_dir=runs_dir))
    assert result.ok, result.errors
    out = result.results["gv"]
    assert out["made"]["ok"] and out["made"]["value"]["exit_code"] == 0, out["made"]
    assert out["log"]["ok"] and "first commit" in out["log"]["value"], out["log"]
    kernel = out["kernel"]["value"]["content"]
    assert kernel != Path("/proc/version").read_text()  # not the host's kernel
    assert kernel.startswith("Linux version 4.4.0 #1 SMP Sun Jan 10 15:06:54 PST 2016")  # gVisor's Sentry
    assert out["outside"] == {"ok": False, "code": "POLICY_DENIED"}
