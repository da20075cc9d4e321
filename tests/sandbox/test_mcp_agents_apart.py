"""A hung MCP server holds no other agent, through the whole pipeline without Ray: supervisor -> MAC'd
dispatch -> tool worker -> each agent's own sandboxed server (the SDK-written probe server of
``tests/fixtures``, whose ``stuck`` tool blocks it). Agent ``a``'s call hangs in its server; agent
``b``'s call to the same tool's server (its own) is answered meanwhile, and ``a``'s ends at its deadline
with a typed error, its server killed and the next call answered by a new one."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from runtime.harness import PolicyHarness
from runtime.mcpjob import Connections, McpServerSpec, job_tools, worker_tools
from runtime.sandbox.pool import SandboxPool

PROBE = Path(__file__).resolve().parents[1] / "fixtures" / "mcp_probe_server.py"
SERVERS = [McpServerSpec(name="probe", prefix="probe", command=["python", "-c", PROBE.read_text()])]


def policy(agent: str) -> str:
    return f"""agent: {agent}
tools:
  probe.whoami: {{effect: delete}}
  probe.stuck: {{effect: delete}}
sandbox: {{backend: bwrap, wall_s: 15, cpu_s: 10}}   # a start counts: room for a busy machine
"""


@pytest.fixture
def setup():
    pool = SandboxPool(spares=0)
    conns = Connections()
    _, entries, _ = job_tools(SERVERS, os.environ)
    h = PolicyHarness(worker_tools(entries, conns), sandboxes=pool)
    h.add_agent(policy("a"))
    h.add_agent(policy("b"))
    yield h, pool, conns
    conns.close()
    h.close()
    pool.close()


def test_a_hung_server_holds_no_other_agent_and_ends_at_its_deadline(setup):
    h, pool, conns = setup
    assert h.call("a", "probe.whoami").allowed  # a's server and workspace exist

    async def scenario():
        marker = pool.workspaces()["a"].root / "stuck.marker"
        hung = asyncio.ensure_future(h.acall("a", "probe.stuck", {"seconds": 600}))
        while not marker.exists() and not hung.done():  # until a's server is inside the blocking tool
            await asyncio.sleep(0.05)
        other = await h.acall("b", "probe.whoami")
        return other, hung.done(), await hung

    other, hung_done_first, hung = h._run(scenario())
    assert other.allowed and other.outcome["ok"] and not hung_done_first
    assert hung.allowed and hung.outcome_code == "SANDBOX_TIMEOUT", hung
    status = {s["agent"]: s for s in conns.status()}
    assert status["a"]["killed"] == 1 and status["b"]["killed"] == 0
    again = h.call("a", "probe.whoami")  # a new server for a
    assert again.outcome["ok"] and json.loads(again.value)["slow"]["started"] == 0, again
    assert {s["agent"]: s["starts"] for s in conns.status()} == {"a": 2, "b": 1}
