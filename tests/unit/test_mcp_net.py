"""MCP servers on the network: a streamable-HTTP server (``url:``) and a stdio server's allow-list (``network:``).

Real servers, no Ray: a streamable-HTTP MCP server built with the SDK's own ``MCPServer``
(uvicorn, 127.0.0.1), the real ``mcp-server-fetch`` from PyPI in a bwrap sandbox behind the
egress proxy, and a plain HTTP server for it to fetch from. The proxy's decisions are also
tested on their own, with a resolver that names the addresses.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
from pathlib import Path

import pytest

from runtime.egress import FetchSettings
from runtime.errors import ErrorCode, SandboxKilled, ToolFailed
from runtime.mcptools import result_value
from runtime.sandbox.bwrap import BwrapBackend, BwrapSession
from runtime.sandbox.mcphttp import checked_origin, pinned_client
from runtime.sandbox.mcpproxy import (MAX_HEAD_BYTES, SANDBOX_DIR, Allowed, EgressProxy, Refused, decide,
                                      parse_allowed, parse_head, read_head)
from runtime.sandbox.mcpserver import McpConnection, McpServer, sandboxed_argv
from tests.unit.mcp_remote import PAGE, mcp_http_server, page_server

SECRET = "remote-mcp-credential-9d41"


@pytest.fixture
def remote():
    with mcp_http_server() as r:
        yield r


@pytest.fixture
def pages():
    with page_server() as p:
        yield p


@pytest.fixture
def opened():
    conns: list[McpConnection] = []
    yield conns
    for c in conns:
        c.close()


def url_server(url: str, *, private: bool = True) -> McpServer:
    return McpServer("notes", "notes", url=url, headers=(("Authorization", f"Bearer {SECRET}"),),
                     allow_private_networks=private)


# --- streamable HTTP --------------------------------------------------------------------------------------------

def test_a_url_server_is_listed_and_called_with_its_credential_header(remote, opened):
    conn = McpConnection(url_server(remote.url))
    opened.append(conn)
    assert {t.name for t in conn.list_tools()} == {"lookup", "broken", "slow"}
    assert result_value(conn.call("lookup", {"word": "egress"}, 10)) == {"result": "egress: a word the remote glossary knows"}
    assert remote.seen[-1]["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in repr(conn.server)


def test_a_private_url_without_the_opt_in_is_refused_before_any_connection(remote, opened):
    conn = McpConnection(url_server(remote.url, private=False))
    opened.append(conn)
    with pytest.raises(ToolFailed) as err:
        conn.list_tools()
    assert err.value.code == ErrorCode.EGRESS_REFUSED
    assert "not a globally routable address" in err.value.reason and "allow_private_networks" in err.value.reason
    assert remote.seen == []


def test_url_server_errors_are_typed_and_the_next_call_reconnects(remote, opened):
    conn = McpConnection(url_server(remote.url))
    opened.append(conn)
    with pytest.raises(ToolFailed) as err:  # the server's isError
        result_value(conn.call("broken", {"word": "x"}, 10))
    assert err.value.code == ErrorCode.TOOL_FAILED and "no entry for x" in err.value.reason
    with pytest.raises(SandboxKilled) as killed:  # over the call's deadline: the session is dropped
        conn.call("slow", {"seconds": 30}, 1)
    assert killed.value.code == ErrorCode.SANDBOX_TIMEOUT
    assert "egress" in result_value(conn.call("lookup", {"word": "egress"}, 10))["result"]  # a new session


def test_an_unreachable_url_server_is_worker_unavailable(opened):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conn = McpConnection(url_server(f"http://127.0.0.1:{port}/mcp"))
    opened.append(conn)
    with pytest.raises(ToolFailed) as err:
        conn.list_tools(timeout_s=10)
    assert err.value.code == ErrorCode.WORKER_UNAVAILABLE and "ConnectError" in err.value.reason


def test_a_redirect_is_not_followed_even_within_the_origin(pages, opened):
    conn = McpConnection(url_server(f"http://127.0.0.1:{pages.port}/moved"))
    opened.append(conn)
    with pytest.raises(ToolFailed) as err:
        conn.list_tools(timeout_s=10)
    assert err.value.code == ErrorCode.WORKER_UNAVAILABLE and "not followed" in err.value.reason
    assert pages.hits and all(h.startswith("/moved") for h in pages.hits), pages.hits


def test_the_connection_goes_to_the_checked_address_with_the_name_kept(pages):
    """A name that no resolver knows reaches the checked address, and its Host header is the name;
    a request for any other origin is refused by the pinned transport."""
    import httpx2

    async def main() -> tuple[int, bytes, str]:
        async with pinned_client(("http", "mcp.test", pages.port), ["127.0.0.1"], {}, 5) as client:
            r = await client.get(f"http://mcp.test:{pages.port}/page")
            with pytest.raises(httpx2.ConnectError, match="not the MCP server's origin"):
                await client.get(f"http://elsewhere.test:{pages.port}/page")
            return r.status_code, r.content, r.request.headers["host"]

    assert asyncio.run(main()) == (200, PAGE, f"mcp.test:{pages.port}")


def test_over_tls_the_certificate_is_checked_against_the_name_not_the_pinned_address(tmp_path):
    import httpx2

    from tests.unit.mcp_remote import self_signed

    server_tls, client_tls = self_signed(tmp_path, "mcp.test")

    async def get(name: str, port: int) -> int:
        async with pinned_client(("https", name, port), ["127.0.0.1"], {}, 5, ssl_context=client_tls) as client:
            return (await client.get(f"https://{name}:{port}/page")).status_code

    with page_server(tls=server_tls) as pages:
        assert asyncio.run(get("mcp.test", pages.port)) == 200  # SNI and certificate: the name
        with pytest.raises(httpx2.ConnectError, match="CERTIFICATE_VERIFY_FAILED|certificate"):
            asyncio.run(get("impostor.test", pages.port))  # same address, another name: refused
    assert pages.hits == ["/page"]


def test_a_url_is_resolved_once_and_every_address_checked():
    def resolver(answers):
        return lambda host, port: answers

    origin, addresses = checked_origin("https://mcp.example/mcp", allow_private_networks=False,
                                       resolver=resolver(["93.184.216.34"]))
    assert origin == ("https", "mcp.example", 443) and addresses == ["93.184.216.34"]
    for answers in (["93.184.216.34", "10.0.0.7"], ["169.254.169.254"], ["::ffff:127.0.0.1"]):
        with pytest.raises(ToolFailed) as err:
            checked_origin("https://mcp.example/mcp", allow_private_networks=False, resolver=resolver(answers))
        assert err.value.code == ErrorCode.EGRESS_REFUSED and "allow_private_networks: true" in err.value.reason
    with pytest.raises(ToolFailed) as err:
        checked_origin("ftp://mcp.example/mcp", allow_private_networks=True)
    assert err.value.code == ErrorCode.EGRESS_REFUSED


# --- the egress proxy's decisions --------------------------------------------------------------------------------

def settings(*addresses: str, private: bool = False) -> FetchSettings:
    return FetchSettings(allow_private_networks=private, resolver=lambda host, port: list(addresses))


PUBLIC = settings("93.184.216.34")
ALLOW = [parse_allowed("example.com"), parse_allowed("api.example.com:8443"), parse_allowed("[2001:db8::1]:443")]


def test_allow_list_entries_parse_or_are_refused():
    assert parse_allowed("Example.COM.") == Allowed("example.com", None)
    assert parse_allowed("example.com:8443") == Allowed("example.com", 8443)
    assert parse_allowed("[2001:DB8::1]:443") == Allowed("2001:db8::1", 443)
    for bad in ("", "example.com:0", "example.com:70000", "https://example.com", "user@example.com", "a b",
                "example.com/path", "*.example.com", "[nonsense]:1"):
        with pytest.raises(ValueError):
            parse_allowed(bad)


def test_an_allowed_connect_goes_to_the_checked_addresses():
    assert decide(parse_head(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"), ALLOW,
                  PUBLIC) == ["93.184.216.34"]
    assert decide(parse_head(b"CONNECT api.example.com:8443 HTTP/1.1\r\n\r\n"), ALLOW, PUBLIC) == ["93.184.216.34"]


@pytest.mark.parametrize("head, why", [
    (b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n", "evil.example:443 is not on"),  # not on the list
    (b"CONNECT sub.example.com:443 HTTP/1.1\r\n\r\n", "sub.example.com:443 is not on"),  # exact host only
    (b"CONNECT example.com:22 HTTP/1.1\r\n\r\n", "example.com:22 is not on"),  # no port given: 443 only
    (b"CONNECT api.example.com:443 HTTP/1.1\r\n\r\n", "api.example.com:443 is not on"),  # port given: that one
    (b"GET http://example.com:8080/ HTTP/1.1\r\n\r\n", "example.com:8080 is not on"),  # plain http: 80 only
])
def test_a_destination_off_the_list_is_forbidden(head, why):
    with pytest.raises(Refused) as err:
        decide(parse_head(head), ALLOW, PUBLIC)
    assert err.value.status == 403 and why in err.value.reason


def test_a_private_address_is_forbidden_unless_the_entry_opts_in():
    request = parse_head(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    for address in ("127.0.0.1", "10.1.2.3", "169.254.169.254", "100.100.100.200", "::1"):
        with pytest.raises(Refused) as err:
            decide(request, ALLOW, settings(address))
        assert err.value.status == 403 and "allow_private_networks: true" in err.value.reason
    assert decide(request, ALLOW, settings("127.0.0.1", private=True)) == ["127.0.0.1"]
    with pytest.raises(Refused):  # a resolver answer that is no address is refused even then
        decide(request, ALLOW, settings("localhost", private=True))


@pytest.mark.parametrize("head", [
    b"CONNECT example.com HTTP/1.1\r\n\r\n",  # no port
    b"CONNECT user@example.com:443 HTTP/1.1\r\n\r\n",
    b"CONNECT example.com:443\r\n\r\n",  # no version
    b"CONNECT example.com:443 HTTP/2\r\n\r\n",
    b"connect example.com:443 HTTP/1.1\r\n\r\n",
    b"CONNECT exa mple.com:443 HTTP/1.1\r\n\r\n",
    b"CONNECT example.com:443 HTTP/1.1\r\nno-colon\r\n\r\n",
    b"CONNECT \xff:443 HTTP/1.1\r\n\r\n",
    b"GET /relative HTTP/1.1\r\nHost: example.com\r\n\r\n",  # a proxy takes absolute URIs only
    b"GET https://example.com/ HTTP/1.1\r\n\r\n",  # https is tunnelled, never forwarded in the clear
    b"GET http://user:pw@example.com/ HTTP/1.1\r\n\r\n",
    b"GET http://example.com/ HTTP/1.1\r\nX: a\nHost: other.example\r\n\r\n",  # a field smuggled after a bare LF
    b"GET http://example.com/ HTTP/1.1\r\nX: a\rHost: other.example\r\n\r\n",  # or a bare CR
])
def test_a_malformed_request_is_a_bad_request(head):
    with pytest.raises(Refused) as err:
        decide(parse_head(head), ALLOW, PUBLIC)
    assert err.value.status == 400


def test_a_plain_http_request_is_forwarded_in_origin_form_with_its_host_and_without_proxy_headers():
    head = (b"GET http://example.com/a/b?q=1 HTTP/1.1\r\nHost: internal.local\r\nProxy-Authorization: x\r\n"
            b"Connection: keep-alive\r\nAccept: */*\r\n\r\n")
    request = parse_head(head)
    assert (request.host, request.port) == ("example.com", 80) and decide(request, ALLOW, PUBLIC)
    assert request.forward == (b"GET /a/b?q=1 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\nConnection: close"
                               b"\r\n\r\n")


def test_an_oversized_head_is_refused_before_it_is_parsed():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"CONNECT example.com:443 HTTP/1.1\r\n" + b"X-Pad: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n")
        with pytest.raises(Refused) as err:
            read_head(b)
    assert err.value.status == 431


def _through(proxy_dir: str, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(f"{proxy_dir}/proxy.sock")
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: s.recv(65536), b""))


def test_the_proxy_relays_what_it_allows_and_answers_403_otherwise(pages):
    proxy = EgressProxy("fetch", [Allowed("127.0.0.1", pages.port)], allow_private_networks=True)
    try:
        d = proxy.start()
        ok = _through(d, f"GET http://127.0.0.1:{pages.port}/page HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert ok.startswith(b"HTTP/1.0 200") and ok.endswith(PAGE)
        no = _through(d, f"GET http://127.0.0.1:{pages.port + 1}/page HTTP/1.1\r\n\r\n".encode())
        assert no.startswith(b"HTTP/1.1 403 Forbidden") and b"not on the server's network allow-list" in no
        assert (proxy.allowed, proxy.refused) == (1, 1) and "not on the server's" in proxy.refusals[-1]
    finally:
        proxy.close()
    assert pages.hits == ["/page"]


# --- a real stdio server behind the proxy, in its sandbox --------------------------------------------------------

FETCH = ("mcp-server-fetch", "--ignore-robots-txt", "--allow-private-ips")  # the proxy decides, not the server


@pytest.fixture
def session(tmp_path: Path) -> BwrapSession:
    return BwrapBackend().open(tmp_path, workspace_mb=64, key="agent")


def test_the_sandbox_keeps_no_network_and_gets_the_proxy_socket_only(session):
    server = McpServer("fetch", "fetch", FETCH, network=("example.com",))
    argv = sandboxed_argv(server, session, "/tmp/warden-egress-x")
    assert ("--unshare-all" in argv or "--unshare-net" in argv) and "--share-net" not in argv
    assert argv[argv.index("/tmp/warden-egress-x") - 1:argv.index("/tmp/warden-egress-x") + 2] == [
        "--ro-bind", "/tmp/warden-egress-x", SANDBOX_DIR]  # read-only: the server cannot swap or chmod it
    assert argv[argv.index("HTTPS_PROXY") + 1] == "http://127.0.0.1:3128" and "NO_PROXY" in argv
    assert argv[-len(FETCH):] == [argv[-len(FETCH)], *FETCH[1:]] and "--" in argv[-len(FETCH) - 1:]
    with pytest.raises(Exception):  # an allow-list without its proxy is never started
        sandboxed_argv(server, session)


def test_a_sandboxed_server_reaches_its_allow_list_and_nothing_else(session, pages, opened):
    conn = McpConnection(McpServer("fetch", "fetch", FETCH, network=(f"127.0.0.1:{pages.port}",),
                                   allow_private_networks=True), session)
    opened.append(conn)
    page = result_value(conn.call("fetch", {"url": f"http://127.0.0.1:{pages.port}/page", "raw": True}, 30))
    assert PAGE.decode() in page
    with pytest.raises(ToolFailed) as err:  # another port of the same host: not on the list
        result_value(conn.call("fetch", {"url": f"http://127.0.0.1:{pages.port + 1}/page", "raw": True}, 30))
    assert err.value.code == ErrorCode.TOOL_FAILED and "403" in err.value.reason
    with pytest.raises(ToolFailed) as err:  # https is tunnelled: the CONNECT is refused
        result_value(conn.call("fetch", {"url": "https://example.com/", "raw": True}, 30))
    assert err.value.code == ErrorCode.TOOL_FAILED and "403" in err.value.reason
    assert conn.proxy is not None and (conn.proxy.allowed, conn.proxy.refused) == (1, 2)
    assert [r.split(":", 1)[0] for r in conn.proxy.refusals] == ["GET 127.0.0.1", "CONNECT example.com"]
    assert pages.hits == ["/page"]


def test_without_an_allow_list_a_sandboxed_server_has_no_route(session, pages, opened):
    conn = McpConnection(McpServer("fetch", "fetch", FETCH), session)
    opened.append(conn)
    with pytest.raises(ToolFailed) as err:
        result_value(conn.call("fetch", {"url": f"http://127.0.0.1:{pages.port}/page", "raw": True}, 30))
    assert err.value.code == ErrorCode.TOOL_FAILED and "ConnectError" in err.value.reason
    assert conn.proxy is None and pages.hits == []


def test_only_the_sandbox_uid_may_connect_and_it_cannot_change_the_proxy_directory(session):
    import os
    import stat

    proxy = EgressProxy("x", [])
    try:
        d = proxy.start(session._uid)
        st, sock = os.stat(d), os.stat(f"{d}/proxy.sock")
        assert stat.S_IMODE(sock.st_mode) == 0o600
        assert sock.st_uid == (session._uid if session._uid is not None else os.getuid())
        assert st.st_uid == os.getuid()  # the worker's: the sandbox cannot chmod it or swap the socket
        assert stat.S_IMODE(st.st_mode) == (0o711 if session._uid is not None else 0o700)
        assert d.startswith(tempfile.gettempdir())
    finally:
        proxy.close()
    assert not os.path.exists(d)


def test_a_runsc_without_host_uds_is_refused_for_an_allow_list_and_says_why(tmp_path):
    """gVisor's sandbox reaches the proxy's socket only with ``--host-uds=open``; a runsc that predates the flag
    (it had only ``--fsgofer-host-uds``, which also lets the sandbox create host sockets) is refused, by name."""
    from runtime.errors import SandboxUnavailable
    from runtime.sandbox.mcpgvisor import GVisorLaunch, host_uds_problem

    old = tmp_path / "runsc"
    old.write_text('#!/bin/sh\nif [ "$1" = flags ]; then printf "  -fsgofer-host-uds\\n  -network value\\n"\n'
                   'else echo "runsc version release-20210906.0"; fi\n')
    old.chmod(0o755)
    why = host_uds_problem(str(old))
    assert why == ("runsc version release-20210906.0 has no --host-uds flag, so its sandbox cannot connect to the "
                   "egress proxy's unix socket: a network allow-list under gVisor needs a runsc that has --host-uds "
                   "(none|open|create|all)")
    with pytest.raises(SandboxUnavailable) as err:  # before any cgroup, bundle or process
        GVisorLaunch(runsc=str(old), setpriv="setpriv", command=["true"], env={}, workspace=tmp_path,
                     program_dirs=[], limits=None, memory_overhead_mb=0, egress_dir=str(tmp_path))
    assert err.value.code == ErrorCode.SANDBOX_UNAVAILABLE and err.value.reason == why
