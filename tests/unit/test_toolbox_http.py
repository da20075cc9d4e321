"""http.fetch: host allow-list by token, no redirects followed, private networks refused by
default, response capped, and credentials that reach the remote server but never the agent
or the audit log. Against a real local HTTP server; no Ray."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from runtime.errors import ErrorCode, PolicyDenied, ToolFailed
from runtime.protocol import decode_reply, encode_call
from runtime.sandbox.worker import ToolWorker
from runtime.testing import MemoryAudit
from runtime.tool import load_tools
from runtime.trusted.capability import Arg, Audience, Expires, KeyRing, Tools
from runtime.trusted.ledger import AgentQuota
from runtime.trusted.supervisor import AgentEntry, Supervisor

JOB = "job-http"
SECRET = "Bearer s3cret-" + secrets.token_hex(6)


class Handler(BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802
        Handler.seen.append(dict(self.headers))
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://evil.example/steal")
            self.end_headers()
            return
        body = b"x" * 5000 if self.path == "/big" else b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def make(allow_private: bool, hosts: tuple[str, ...] = ("127.0.0.1",)):
    keyring, audit, key = KeyRing.generate(), MemoryAudit(), secrets.token_bytes(32)
    tools = load_tools(["runtime.toolbox"])
    worker = ToolWorker(dispatch_key=key, tools=tools, job=JOB,
                        tool_config={"http": {"allow_private_networks": allow_private}})

    class Direct:
        async def dispatch(self, tool: str, message: bytes, agent: str = "") -> bytes:
            return await worker.execute(message)

    sup = Supervisor(job_id=JOB, keyring=keyring, tools={n: t.spec for n, t in tools.items()}, audit=audit,
                     dispatcher=Direct(), dispatch_key=key, credentials={"http.fetch": {"Authorization": SECRET}})
    request_key = secrets.token_bytes(32)
    sup.register_agent(AgentEntry("a", request_key), AgentQuota())
    token = keyring.mint(holder="a", caveats=[Audience(JOB), Expires(time.time() + 60), Tools(("http.fetch",)),
                                              Arg("http.fetch", "url", "url_host", hosts)]).encode()

    def fetch(url: str, **args: Any) -> bytes:
        req = encode_call(agent="a", token=token, tool="http.fetch", args={"url": url, **args}, request_key=request_key)
        return asyncio.run(sup.call(req))

    return fetch, audit


def test_fetch_carries_the_credential_to_the_server_only(server):
    fetch, audit = make(allow_private=True)
    Handler.seen.clear()
    raw = fetch(server + "/hello")
    reply = decode_reply(raw)["value"]
    assert reply["status"] == 200 and reply["body"] == "hello"
    assert Handler.seen[-1]["Authorization"] == SECRET
    assert SECRET.encode() not in raw  # the agent never sees it
    assert SECRET not in repr(audit.records)  # nor does the audit log


def test_host_outside_the_token_is_denied_before_any_request(server):
    fetch, audit = make(allow_private=True)
    Handler.seen.clear()
    with pytest.raises(PolicyDenied) as info:
        decode_reply(fetch("http://evil.example/x"))
    assert info.value.code is ErrorCode.POLICY_DENIED
    assert Handler.seen == []
    assert "evil.example" in audit.of("decision", decision="deny")[-1]["reason"]


def test_redirects_are_returned_not_followed(server):
    fetch, _ = make(allow_private=True)
    reply = decode_reply(fetch(server + "/redirect"))["value"]
    assert reply["status"] == 302 and reply["headers"]["Location"] == "http://evil.example/steal"


def test_response_is_capped(server):
    fetch, _ = make(allow_private=True)
    reply = decode_reply(fetch(server + "/big", max_bytes=100))["value"]
    assert len(reply["body"]) == 100 and reply["truncated"] is True


def test_private_addresses_are_refused_by_default(server):
    fetch, audit = make(allow_private=False)
    Handler.seen.clear()
    with pytest.raises(ToolFailed) as info:
        decode_reply(fetch(server + "/hello"))
    assert info.value.code is ErrorCode.TOOL_FAILED
    assert Handler.seen == []
    assert "non-public address" in audit.of("outcome")[-1]["reason"]
