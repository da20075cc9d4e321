"""Real network servers for the MCP network tests, on 127.0.0.1 in a thread of the test process.

``mcp_http_server`` is a streamable-HTTP MCP server built with the ``mcp`` SDK's own
``MCPServer`` and run by uvicorn, as a remote server would be; it records the headers each
call brought. ``page_server`` is a plain HTTP server with one page (what a fetching MCP
server is allowed, or not, to reach).
"""

from __future__ import annotations

import http.server
import socket
import ssl
import subprocess
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations

PAGE = b"<html><body><h1>Allowed</h1><p>the page behind the allow-list</p></body></html>"


@dataclass
class Remote:
    url: str
    seen: list[dict[str, str]] = field(default_factory=list)  # each call's request headers


def _app(remote: Remote) -> Any:
    server = MCPServer("remote-notes")

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    def lookup(word: str, ctx: Context) -> str:
        """Look a word up in the remote glossary."""
        remote.seen.append({k.lower(): v for k, v in (ctx.headers or {}).items()})
        return f"{word}: a word the remote glossary knows"

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    def broken(word: str) -> str:
        """Always fails."""
        raise ToolError(f"no entry for {word}")

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    async def slow(seconds: float) -> str:
        """Answers after ``seconds``."""
        await anyio.sleep(seconds)
        return "late"

    return server.streamable_http_app(host="127.0.0.1")


@contextmanager
def mcp_http_server() -> Iterator[Remote]:
    import uvicorn

    started = threading.Event()

    class Started(uvicorn.Server):  # uvicorn has a flag, not an event: tell the test when it is set
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            started.set()

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    remote = Remote(f"http://127.0.0.1:{sock.getsockname()[1]}/mcp")
    server = Started(uvicorn.Config(_app(remote), log_level="warning", lifespan="on", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert started.wait(30), "the MCP server did not start"
    try:
        yield remote
    finally:
        server.should_exit = True
        thread.join(10)


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        status, body, extra = 200, PAGE, {}
        if self.path.startswith("/moved"):
            status, body, extra = 307, b"", {"Location": self.path.replace("/moved", "/mcp", 1)}
        self.send_response(status)
        for k, v in {"Content-Type": "text/html", "Content-Length": str(len(body)), **extra}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET  # noqa: N815 - a redirecting "MCP endpoint" answers the SDK's POST alike

    def log_message(self, *args: Any) -> None:
        self.server.hits.append(self.path)  # type: ignore[attr-defined]


def self_signed(directory: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a fresh self-signed certificate for ``name``, and a client context that trusts it."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName=DNS:{name}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(cert))


@contextmanager
def page_server(tls: ssl.SSLContext | None = None) -> Iterator[Any]:
    """A plain HTTP server on 127.0.0.1 (``.port``, ``.hits``): one page, and ``/moved...`` redirects (307);
    HTTPS with ``tls`` (a server context)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    server.hits = []  # type: ignore[attr-defined]
    server.port = server.server_address[1]  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
