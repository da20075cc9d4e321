"""`warden mcp serve` over a real job on the shared cluster, with the `mcp` SDK's own client: over
stdio (the client starts the gateway) and over streamable HTTP (with and without the bearer
token). One call allowed, one denied (POLICY_DENIED) and on record in the run's audit log, which
is closed and verified when the gateway stops."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

mcp = pytest.importorskip("mcp")

import httpx2  # noqa: E402  (the SDK's HTTP client)
from mcp import ClientSession  # noqa: E402
from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

from runtime import auditlog  # noqa: E402
from tests.cluster.mcp_gateway_client import ROOT, GatewayProcess, env, http_session  # noqa: E402
from tests.cluster.mcp_gateway_client import command as _command  # noqa: E402

pytestmark = pytest.mark.cluster
JOB = Path(__file__).resolve().parent / "jobs" / "mcp-gateway.yaml"


def command(runs_dir: Path, *extra: str) -> list[str]:
    return _command(runs_dir, *extra, job=JOB, agent="moderator")


async def allowed_and_denied(session: ClientSession) -> tuple[list[str], object, object]:
    await session.initialize()
    names = sorted(t.name for t in (await session.list_tools()).tools)
    allowed = await session.call_tool("chat.read", {"channel": "random"})
    denied = await session.call_tool("chat.delete_message", {"channel": "general", "message_id": 3})
    return names, allowed, denied


def check_calls(names: list[str], allowed, denied) -> None:
    assert names == ["chat.delete_message", "chat.read"]  # exactly the moderator's policy
    assert not allowed.is_error and "text" in allowed.content[0].text
    assert denied.is_error and denied.content[0].text.startswith("POLICY_DENIED")
    assert denied.structured_content == {"error": {"code": "POLICY_DENIED", "tool": "chat.delete_message"}}


def check_audit(run_dir: Path, revoked: bool = False) -> None:
    log = run_dir / "audit.log"
    assert auditlog.verify(log).ok
    decisions = [r for r in auditlog.read_records(log) if r["kind"] == "decision"]
    assert [(r["tool"], r["decision"]) for r in decisions] == [("chat.read", "allow"),
                                                              ("chat.delete_message", "deny")] + (
        [("chat.read", "deny")] if revoked else [])
    assert all(r["agent"] == "moderator" for r in decisions)
    assert decisions[1]["code"] == "POLICY_DENIED" and "general" in decisions[1]["reason"]


def test_gateway_over_stdio(ray_instance, runs_dir):
    params = StdioServerParameters(command=sys.executable, args=command(runs_dir, "--transport", "stdio"),
                                   env=env(ray_instance.address), cwd=str(ROOT))

    async def main():
        with open(runs_dir / "gateway.stderr", "w") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write):
                async with ClientSession(read, write) as session:
                    return await allowed_and_denied(session)

    check_calls(*asyncio.run(main()))
    (run_dir,) = [p.parent for p in runs_dir.glob("*/audit.log")]
    check_audit(run_dir)
    stderr = (runs_dir / "gateway.stderr").read_text()
    assert "gateway stopped; audit log" in stderr and "chain verified" in stderr, stderr[-3000:]


def test_gateway_over_http_needs_the_bearer_token(ray_instance, runs_dir):
    gw = GatewayProcess(ray_instance.address, runs_dir, job=JOB, agent="moderator")
    try:
        assert gw.ready.wait(timeout=180) and gw.proc.poll() is None, "".join(gw.lines)[-3000:]
        (info_path,) = runs_dir.glob("*/mcp-gateway.json")
        assert info_path.stat().st_mode & 0o777 == 0o600
        info = json.loads(info_path.read_text())
        assert info["url"].startswith("http://127.0.0.1:") and str(info_path) in "".join(gw.lines)

        no_token = httpx2.post(info["url"], json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                               headers={"Accept": "application/json, text/event-stream"})
        assert no_token.status_code == 401
        wrong = httpx2.post(info["url"], json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                            headers={"Authorization": "Bearer " + "x" * 43})
        assert wrong.status_code == 401

        async def without_token():
            async with streamable_http_client(info["url"]) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()

        with pytest.raises(BaseException):  # the SDK's client is refused (401) before any MCP message
            asyncio.run(asyncio.wait_for(without_token(), 60))

        async def with_token():
            async with http_session(info) as session:
                return await allowed_and_denied(session)

        check_calls(*asyncio.run(with_token()))

        # The operator revokes the agent: the gateway's next call is refused, as the agent's would be.
        revoke = subprocess.run([sys.executable, "-m", "runtime.cli", "revoke", "--agent", "moderator", "--as", "ops",
                                 "--run", str(info_path.parent)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert revoke.returncode == 0, revoke.stderr

        async def after_revoke():
            async with http_session(info) as session:
                await session.initialize()
                return await session.call_tool("chat.read", {"channel": "random"})

        revoked = asyncio.run(after_revoke())
        assert revoked.is_error and revoked.content[0].text.startswith("TOKEN_REVOKED")
    finally:
        rc = gw.stop()
    out = "".join(gw.lines)
    assert rc == 0, out[-3000:]
    assert "chain verified" in out
    check_audit(info_path.parent, revoked=True)


def test_gateway_closes_when_its_agent_is_quarantined(ray_instance, runs_dir):
    """Three refused calls from the client: the agent's anomaly rule quarantines it, and the gateway,
    not a signal, ends the job (exit 1, the quarantine on record, the log verified)."""
    gw = GatewayProcess(ray_instance.address, runs_dir, job=JOB.with_name("mcp-gateway-quarantine.yaml"), agent="watcher")
    results = []
    try:
        assert gw.ready.wait(timeout=180) and gw.proc.poll() is None, "".join(gw.lines)[-3000:]
        (info_path,) = runs_dir.glob("*/mcp-gateway.json")
        info = json.loads(info_path.read_text())

        async def probe():
            async with http_session(info) as session:
                await session.initialize()
                for _ in range(3):
                    results.append(await session.call_tool("chat.read", {"channel": "general"}))

        try:
            asyncio.run(asyncio.wait_for(probe(), 60))
        except BaseException:  # the gateway may close under the client once the third refusal quarantined it
            pass
        rc = gw.proc.wait(timeout=120)  # no signal: the quarantine ends it
    finally:
        if gw.proc.poll() is None:
            gw.stop()
    gw.reader.join(timeout=10)
    out = "".join(gw.lines)
    assert len(results) >= 2 and all(r.is_error for r in results)
    assert results[0].content[0].text.startswith("POLICY_DENIED")
    assert rc == 1, out[-3000:]
    assert "QUARANTINE: agent 'watcher'" in out and "chain verified" in out, out[-3000:]
    records = auditlog.read_records(info_path.parent / "audit.log")
    assert [r for r in records if r["kind"] == "quarantine" and r["agent"] == "watcher"]
    assert auditlog.verify(info_path.parent / "audit.log").ok
