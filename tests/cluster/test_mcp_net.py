"""MCP servers on the network, in a real job: agent actor -> supervisor actor -> tool worker actor ->
a remote streamable-HTTP server (``url:``), and ``mcp-server-fetch`` in the agent's bwrap sandbox
reaching its ``network:`` allow-list, and nothing else, through the worker's egress proxy; then
the same under gVisor, next to a server without an allow-list, which reaches nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from runtime import auditlog
from runtime.job import load_job, run_loaded
from tests.unit.mcp_remote import PAGE, mcp_http_server, page_server

pytestmark = pytest.mark.cluster

SECRET = "mcp-remote-credential-77a0c2"

POLICY = """agent: web
tools:
  notes.lookup: {effect: read}
  notes.broken: {effect: read}
  fetch.fetch: {effect: read}
sandbox: {backend: bwrap, cpu_s: 10, wall_s: 30}
"""


def job(remote_url: str, port: int) -> dict:
    page = f"http://127.0.0.1:{port}/page"
    return {
        "name": "mcp-net", "entry": ["web"], "tools": ["runtime.toolbox"], "workers": {"count": 1},
        "task": [["lookup", "notes.lookup", {"word": "egress"}],
                 ["broken", "notes.broken", {"word": "egress"}],
                 ["page", "fetch.fetch", {"url": page, "raw": True}],
                 ["other_port", "fetch.fetch", {"url": f"http://127.0.0.1:{port + 1}/page", "raw": True}],
                 ["elsewhere", "fetch.fetch", {"url": "https://example.com/", "raw": True}]],
        "mcp_servers": [
            {"name": "notes", "prefix": "notes", "url": remote_url, "allow_private_networks": True,
             "headers_from": {"Authorization": "Bearer ${WARDEN_MCP_NET_TOKEN}"}},
            {"name": "fetch", "prefix": "fetch", "command": ["mcp-server-fetch", "--ignore-robots-txt",
                                                             "--allow-private-ips"],
             "network": [f"127.0.0.1:{port}"], "allow_private_networks": True}],
        "agents": [{"name": "web", "class": "tests.cluster.mcpnet_agents:CallsAgent", "policy": "web.yaml"}],
    }


def test_a_remote_server_and_an_allow_listed_sandboxed_server_in_a_job(ray_instance, runs_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WARDEN_MCP_NET_TOKEN", SECRET)
    with mcp_http_server() as remote, page_server() as pages:
        (tmp_path / "web.yaml").write_text(POLICY)
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(job(remote.url, pages.port)))
        result = asyncio.run(run_loaded(load_job(tmp_path / "job.yaml"), runs_dir=runs_dir))
    assert result.ok, result.errors
    out = result.results["web"]
    assert out["lookup"] == {"ok": True, "value": {"result": "egress: a word the remote glossary knows"}}
    assert out["broken"]["code"] == "TOOL_FAILED" and "no entry for egress" in out["broken"]["reason"]
    assert out["page"]["ok"] and PAGE.decode() in out["page"]["value"], out["page"]
    for refused in ("other_port", "elsewhere"):  # the proxy's 403, as the server reports it
        assert out[refused]["code"] == "TOOL_FAILED" and "403" in out[refused]["reason"], out[refused]
    assert pages.hits == ["/page"]
    assert remote.seen and all(h["authorization"] == f"Bearer {SECRET}" for h in remote.seen)

    audit = Path(result.audit_log).read_bytes()
    assert SECRET.encode() not in audit  # the credential went to the remote server, never to the record
    allowed = {r["tool"] for r in auditlog.read_records(result.audit_log) if r.get("decision") == "allow"}
    assert allowed == {"notes.lookup", "notes.broken", "fetch.fetch"}


GVISOR_POLICY = """agent: web
tools:
  fetch.fetch: {effect: read}
  blind.fetch: {effect: read}
sandbox: {backend: gvisor, cpu_s: 10, wall_s: 60}   # a gVisor server's start counts against the first call
"""


def test_an_allow_listed_server_under_gvisor_reaches_its_list_only(ray_instance, runs_dir, tmp_path):
    fetch = {"command": ["mcp-server-fetch", "--ignore-robots-txt", "--allow-private-ips"],
             "sandbox": {"backend": "gvisor", "limits": {"memory_mb": 256}}}
    with page_server() as pages:
        page = f"http://127.0.0.1:{pages.port}/page"
        spec = {
            "name": "mcp-net-gvisor", "entry": ["web"], "tools": ["runtime.toolbox"], "workers": {"count": 1},
            "task": [["page", "fetch.fetch", {"url": page, "raw": True}],
                     ["other_port", "fetch.fetch", {"url": f"http://127.0.0.1:{pages.port + 1}/page", "raw": True}],
                     ["elsewhere", "fetch.fetch", {"url": "https://example.com/", "raw": True}],
                     ["blind", "blind.fetch", {"url": page, "raw": True}]],
            "mcp_servers": [{"name": "fetch", "prefix": "fetch", **fetch, "network": [f"127.0.0.1:{pages.port}"],
                             "allow_private_networks": True},
                            {"name": "blind", "prefix": "blind", **fetch}],  # no allow-list: no route
            "agents": [{"name": "web", "class": "tests.cluster.mcpnet_agents:CallsAgent", "policy": "web.yaml"}],
        }
        (tmp_path / "web.yaml").write_text(GVISOR_POLICY)
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
        result = asyncio.run(run_loaded(load_job(tmp_path / "job.yaml"), runs_dir=runs_dir))
    assert result.ok, result.errors
    out = result.results["web"]
    assert out["page"]["ok"] and PAGE.decode() in out["page"]["value"], out["page"]
    for refused in ("other_port", "elsewhere"):  # the proxy's 403, as the server reports it
        assert out[refused]["code"] == "TOOL_FAILED" and "403" in out[refused]["reason"], out[refused]
    assert out["blind"]["code"] == "TOOL_FAILED" and "ConnectError" in out["blind"]["reason"], out["blind"]
    assert pages.hits == ["/page"]
