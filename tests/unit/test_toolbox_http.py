"""http.fetch through the real path (agent request -> supervisor -> signed dispatch -> tool worker ->
the real tool) against real local HTTP(S) servers on 127.0.0.1 and [::1]; no Ray.

What is checked: the token's url_host allow-list (with scheme and port pinning), redirects not
followed, every destination that is not globally routable refused (EGRESS_REFUSED) unless the job
opts in, the connection going to exactly the address that was checked (DNS rebinding, simulated by
the ScriptedResolver the tool is configured with: no external DNS here), and credentials sent only
to the origin they are bound to, never to the agent or the audit log."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import msgpack
import pytest

from runtime.egress import refusal
from runtime.errors import ConfigError, ErrorCode, PolicyDenied, ToolFailed
from runtime.job import CredentialRef, JobSpec, resolve_credentials
from runtime.protocol import decode_reply, encode_call
from runtime.sandbox.worker import ToolWorker
from runtime.testing import InProcessDispatcher, MemoryAudit, ScriptedResolver
from runtime.tool import load_tools
from runtime.trusted.capability import Arg, Audience, Expires, KeyRing, Tools
from runtime.trusted.ledger import AgentQuota
from runtime.trusted.supervisor import AgentEntry, Supervisor, sign_dispatch

JOB = "job-http"
SECRET = "Bearer s3cret-" + secrets.token_hex(6)
TLS_PEM = str(Path(__file__).parent / "data" / "api-test.pem")  # self-signed for api.test and other.test


class Handler(BaseHTTPRequestHandler):
    server: "Server"

    def do_GET(self) -> None:  # noqa: N802
        self.server.seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", self.server.redirect_to)
            self.end_headers()
            return
        body = b"x" * 5000 if self.path == "/big" else self.server.name.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.seen.append({"path": self.path, "data": data, **{k.lower(): v for k, v in self.headers.items()}})
        self.send_response(201)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        return None


class Server(ThreadingHTTPServer):
    """A real HTTP server on one address that says who it is and records every request (and TLS SNI)."""

    def __init__(self, host: str, port: int = 0, *, name: str, tls: bool = False) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), Handler)
        self.name, self.seen, self.sni, self.redirect_to = name, [], [], "http://evil.example/steal"
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(TLS_PEM)
            ctx.sni_callback = lambda _sock, server_name, _ctx: self.sni.append(server_name)
            self.socket = ctx.wrap_socket(self.socket, server_side=True)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture(scope="module")
def twins():
    """One server on 127.0.0.1 and one on [::1], on the same port: one name, two different hosts."""
    for _ in range(20):
        v4 = Server("127.0.0.1", name="v4")
        try:
            v6 = Server("::1", v4.port, name="v6")
        except OSError:  # that port is taken on ::1: try another
            v4.stop()
            continue
        yield v4, v6
        v4.stop()
        v6.stop()
        return
    pytest.fail("no port free on both 127.0.0.1 and ::1")


@pytest.fixture
def server(twins):
    v4, v6 = twins
    for s in twins:
        s.seen.clear()
        s.redirect_to = "http://evil.example/steal"
    yield v4


@pytest.fixture(scope="module")
def tls_server():
    srv = Server("127.0.0.1", name="tls", tls=True)
    yield srv
    srv.stop()


def credential(origin: str) -> dict[str, str]:
    """The secret as the driver hands it to the supervisor, bound to ``origin`` as the job file would bind it."""
    return {"value": SECRET, "origin": CredentialRef(env="T", origin=origin).origin}


class Rig:
    """Supervisor + tool worker with the real toolbox, a token for http.fetch limited to ``hosts``."""

    def __init__(self, hosts: tuple[str, ...], *, http: dict[str, Any] | None = None,
                 credentials: dict[str, dict[str, str]] | None = None, tool: str = "http.fetch") -> None:
        keyring, key = KeyRing.generate(), secrets.token_bytes(32)
        tools = load_tools(["runtime.toolbox", "agents.chat"])
        self.tool = tool
        self.key, self.audit = key, MemoryAudit()
        self.worker = ToolWorker(dispatch_key=key, tools=tools, job=JOB, tool_config={"http": http or {}})
        self.dispatcher = InProcessDispatcher(self.worker)
        self.sup = Supervisor(job_id=JOB, keyring=keyring, tools={n: t.spec for n, t in tools.items()},
                              audit=self.audit, dispatcher=self.dispatcher, dispatch_key=key,
                              credentials={tool: credentials} if credentials else {})
        self.request_key = secrets.token_bytes(32)
        self.sup.register_agent(AgentEntry("a", self.request_key), AgentQuota())
        self.token = keyring.mint(holder="a", caveats=[
            Audience(JOB), Expires(time.time() + 60), Tools((tool,)), Arg(tool, "url", "url_host", hosts),
        ]).encode()

    def raw(self, url: str, **args: Any) -> bytes:
        req = encode_call(agent="a", token=self.token, tool=self.tool, args={"url": url, **args},
                          request_key=self.request_key)
        return asyncio.run(self.sup.call(req))

    def fetch(self, url: str, **args: Any) -> dict[str, Any]:
        return decode_reply(self.raw(url, **args))["value"]

    def dispatched_credentials(self) -> dict[str, Any]:
        """What the supervisor put into its last signed dispatch under ``credentials``."""
        body = msgpack.unpackb(msgpack.unpackb(self.dispatcher.messages[-1], raw=False)[0], raw=False)
        return body.get("credentials", {})

    def last_outcome(self) -> dict[str, Any]:
        return self.audit.of("outcome")[-1]


def denied(call: Callable[[], Any], error: type[Exception]) -> Any:
    with pytest.raises(error) as info:
        call()
    return info.value


# ------------------------------------------------------------------ allow-list, redirects, cap


def test_host_outside_the_token_is_denied_before_any_request(server):
    rig = Rig(("127.0.0.1",), http={"allow_private_networks": True})
    exc = denied(lambda: rig.fetch("http://evil.example/x"), PolicyDenied)
    assert exc.code is ErrorCode.POLICY_DENIED
    assert server.seen == []
    assert "evil.example" in rig.audit.of("decision", decision="deny")[-1]["reason"]


def test_redirects_are_returned_not_followed(server):
    server.redirect_to = f"http://127.0.0.1:{server.port}/secret"  # a redirect into the allowed host's loopback
    rig = Rig(("127.0.0.1",), http={"allow_private_networks": True})
    reply = rig.fetch(f"http://127.0.0.1:{server.port}/redirect")
    assert reply["status"] == 302 and reply["headers"]["Location"] == server.redirect_to
    assert [r["path"] for r in server.seen] == ["/redirect"]  # /secret was never asked for


def test_response_is_capped(server):
    rig = Rig(("127.0.0.1",), http={"allow_private_networks": True})
    reply = rig.fetch(f"http://127.0.0.1:{server.port}/big", max_bytes=100)
    assert len(reply["body"]) == 100 and reply["truncated"] is True


@pytest.mark.parametrize("url, pattern", [("http://..cafe:{port}/x", "*.cafe"),
                                          ("http://.example:{port}/x", "*.example"),
                                          ("http://a..cafe:{port}/x", "*.cafe")])
def test_empty_labels_never_match_a_wildcard(server, url, pattern):
    """'..cafe' used to pass as an 'IP literal' (its letters are hex digits) and match '*.cafe'."""
    rig = Rig((pattern,), http={"allow_private_networks": True, "resolver": ScriptedResolver({})})
    exc = denied(lambda: rig.fetch(url.format(port=server.port)), PolicyDenied)
    assert exc.code is ErrorCode.POLICY_DENIED
    assert "not a plain DNS name" in rig.audit.of("decision", decision="deny")[-1]["reason"]
    assert server.seen == []


def test_url_host_pins_scheme_and_port(tls_server, server):
    """'https://api.test:PORT' allows that origin only: not plain http, not another port."""
    resolver = ScriptedResolver({"api.test": [["127.0.0.1"]]})
    rig = Rig((f"https://api.test:{tls_server.port}",),
              http={"allow_private_networks": True, "resolver": resolver, "ca_file": TLS_PEM})
    assert rig.fetch(f"https://api.test:{tls_server.port}/ok")["body"] == "tls"
    for url in (f"http://api.test:{tls_server.port}/", f"https://api.test:{server.port}/", "https://api.test/"):
        exc = denied(lambda: rig.fetch(url), PolicyDenied)
        assert exc.code is ErrorCode.POLICY_DENIED
        assert "not in" in rig.audit.of("decision", decision="deny")[-1]["reason"]
    assert resolver.lookups == [("api.test", tls_server.port)]  # the denied calls never left the supervisor
    assert server.seen == [] and [r["path"] for r in tls_server.seen[-1:]] == ["/ok"]


# ------------------------------------------------------------------ destinations that are not public


def test_private_addresses_are_refused_by_default(server):
    rig = Rig(("127.0.0.1", "0.0.0.0", "::ffff:127.0.0.1", "::ffff:7f00:1"))
    for url in (f"http://127.0.0.1:{server.port}/hello", f"http://0.0.0.0:{server.port}/hello",
                f"http://[::ffff:127.0.0.1]:{server.port}/hello"):
        exc = denied(lambda: rig.fetch(url), ToolFailed)
        assert exc.code is ErrorCode.EGRESS_REFUSED and rig.last_outcome()["code"] == "EGRESS_REFUSED"
        assert "not a globally routable address" in rig.last_outcome()["reason"]
    assert server.seen == []  # each of them would have reached this loopback server


NOT_PUBLIC = ["127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.100.100.200",
              "100.64.0.1", "0.0.0.0", "224.0.0.1", "239.255.255.250", "255.255.255.255", "198.18.0.1",
              "192.0.2.1", "240.0.0.1", "::1", "::", "fe80::1", "fe80::1%lo", "fc00::1", "fd00:ec2::254",
              "fec0::1", "ff02::1", "ff0e::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::127.0.0.1",
              "::ffff:0:7f00:1", "2002:7f00:1::1", "2002:a9fe:a9fe::", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe",
              "64:ff9b:1::808:808", "2001:0:4136:e378:8000:63bf:3fff:fdd2", "2001:db8::1", "3fff::1", "100::1",
              "not-an-address"]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "2a00:1450:4001::200e",
          "::ffff:8.8.8.8", "2002:808:808::1", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_refusal_covers_every_address_that_is_not_globally_routable(address):
    assert refusal(address) is not None


@pytest.mark.parametrize("address", PUBLIC)
def test_refusal_lets_public_addresses_through(address):
    assert refusal(address) is None


@pytest.mark.parametrize("address", [a for a in NOT_PUBLIC if a != "not-an-address"])
def test_a_name_that_resolves_to_a_private_address_is_refused(server, address):
    resolver = ScriptedResolver({"inside.example": [[address]]})
    rig = Rig(("inside.example",), http={"resolver": resolver})
    exc = denied(lambda: rig.fetch(f"http://inside.example:{server.port}/"), ToolFailed)
    assert exc.code is ErrorCode.EGRESS_REFUSED and rig.last_outcome()["code"] == "EGRESS_REFUSED"
    assert f"resolves to {address}" in rig.last_outcome()["reason"]
    assert resolver.lookups == [("inside.example", server.port)]
    assert server.seen == []


def test_one_private_address_in_an_answer_refuses_the_whole_answer(server):
    resolver = ScriptedResolver({"mixed.example": [["93.184.216.34", "127.0.0.1"]]})
    rig = Rig(("mixed.example",), http={"resolver": resolver})
    exc = denied(lambda: rig.fetch(f"http://mixed.example:{server.port}/"), ToolFailed)
    assert exc.code is ErrorCode.EGRESS_REFUSED and rig.last_outcome()["code"] == "EGRESS_REFUSED"
    assert server.seen == []


def test_a_resolver_answer_that_is_not_an_address_is_refused_even_when_private_is_allowed(server):
    resolver = ScriptedResolver({"alias.example": [["localhost"]]})
    rig = Rig(("alias.example",), http={"allow_private_networks": True, "resolver": resolver})
    exc = denied(lambda: rig.fetch(f"http://alias.example:{server.port}/"), ToolFailed)
    assert exc.code is ErrorCode.EGRESS_REFUSED and rig.last_outcome()["code"] == "EGRESS_REFUSED"
    assert server.seen == []


def test_allow_private_networks_is_an_explicit_opt_in(server):
    rig = Rig(("127.0.0.1",), http={"allow_private_networks": True})
    assert rig.fetch(f"http://127.0.0.1:{server.port}/hello")["body"] == "v4"


@pytest.mark.parametrize("http, why", [
    ({"allow_private_network": True}, "unknown keys"),  # a typo: not the opt-in
    ({"allow_private_networks": "yes"}, "malformed"),
    ({"resolver": "8.8.8.8"}, "malformed"),  # a resolver comes from Python, never from YAML
    ({"timeout_s": 0}, "malformed"),
])
def test_malformed_http_config_fails_the_call_instead_of_guessing(server, http, why):
    rig = Rig(("127.0.0.1",), http=http)
    exc = denied(lambda: rig.fetch(f"http://127.0.0.1:{server.port}/"), ToolFailed)
    assert exc.code is ErrorCode.TOOL_FAILED and why in rig.last_outcome()["reason"]
    assert server.seen == []


# ------------------------------------------------------------------ DNS rebinding: one lookup, one address


def test_the_connection_goes_to_the_checked_address_not_a_second_answer(twins):
    """The name answers 127.0.0.1 to the first lookup and ::1 to any later one (rebinding). The
    tool must look it up once and connect to what it checked: the v4 server answers, the v6 one
    never sees a request. (The private opt-in is on only because both servers are local.)"""
    v4, v6 = twins
    for s in twins:
        s.seen.clear()
    resolver = ScriptedResolver({"rebind.example": [["127.0.0.1"], ["::1"]]})
    rig = Rig(("rebind.example",), http={"allow_private_networks": True, "resolver": resolver})
    reply = rig.fetch(f"http://rebind.example:{v4.port}/who")
    assert reply["body"] == "v4" and rig.last_outcome()["ok"] is True
    assert resolver.lookups == [("rebind.example", v4.port)]
    assert v6.seen == []
    assert v4.seen[-1]["host"] == f"rebind.example:{v4.port}"  # the name, not the address, in Host


def test_a_rebinding_name_cannot_move_the_connection_to_a_private_address(twins):
    """With the guard on: the first answer (the one checked) is private, so nothing is fetched, and
    the later 'public' answer is never asked for."""
    v4, _ = twins
    v4.seen.clear()
    resolver = ScriptedResolver({"rebind.example": [["127.0.0.1"], ["93.184.216.34"]]})
    rig = Rig(("rebind.example",), http={"resolver": resolver})
    exc = denied(lambda: rig.fetch(f"http://rebind.example:{v4.port}/"), ToolFailed)
    assert exc.code is ErrorCode.EGRESS_REFUSED and rig.last_outcome()["code"] == "EGRESS_REFUSED"
    assert resolver.lookups == [("rebind.example", v4.port)]
    assert v4.seen == []


def test_a_public_first_answer_pins_the_connection_to_that_public_address(twins, monkeypatch):
    """The classic rebinding: a public address to the check, 127.0.0.1 afterwards. Every connect()
    the process makes is recorded at the socket layer; one that leaves the machine is refused there
    (this test must not reach the Internet), a loopback one goes through. The tool's only connect is
    to the checked public address; the loopback server sees nothing."""
    v4, _ = twins
    v4.seen.clear()
    connects: list[Any] = []
    real_connect = socket.socket.connect

    def recording_connect(sock: socket.socket, address: Any) -> None:
        connects.append(address[:2])
        if not ipaddress.ip_address(address[0]).is_loopback:
            raise ConnectionRefusedError(f"test: no traffic off this machine ({address[0]})")
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", recording_connect)
    resolver = ScriptedResolver({"rebind.example": [["93.184.216.34"], ["127.0.0.1"]]})
    rig = Rig(("rebind.example",), http={"resolver": resolver})
    exc = denied(lambda: rig.fetch(f"http://rebind.example:{v4.port}/"), ToolFailed)
    assert exc.code is ErrorCode.TOOL_FAILED and "ConnectionRefusedError" in rig.last_outcome()["reason"]
    assert connects == [("93.184.216.34", v4.port)]
    assert resolver.lookups == [("rebind.example", v4.port)]
    assert v4.seen == []


def test_https_keeps_the_name_for_sni_host_and_certificate(tls_server):
    resolver = ScriptedResolver({"api.test": [["127.0.0.1"]], "wrong.test": [["127.0.0.1"]]})
    rig = Rig(("api.test", "wrong.test"), http={"allow_private_networks": True, "resolver": resolver,
                                                "ca_file": TLS_PEM})
    assert rig.fetch(f"https://api.test:{tls_server.port}/x")["body"] == "tls"
    assert tls_server.sni[-1] == "api.test" and tls_server.seen[-1]["host"] == f"api.test:{tls_server.port}"
    # the same server under a name its certificate does not carry: the check is on the name
    exc = denied(lambda: rig.fetch(f"https://wrong.test:{tls_server.port}/x"), ToolFailed)
    assert exc.code is ErrorCode.TOOL_FAILED and "CERTIFICATE_VERIFY_FAILED" in rig.last_outcome()["reason"]


# ------------------------------------------------------------------ credentials bound to an origin


def test_fetch_carries_the_credential_to_its_origin_only(server):
    rig = Rig(("127.0.0.1",), http={"allow_private_networks": True},
              credentials={"Authorization": credential(f"http://127.0.0.1:{server.port}")})
    raw = rig.raw(f"http://127.0.0.1:{server.port}/hello")
    assert decode_reply(raw)["value"]["status"] == 200
    assert server.seen[-1]["authorization"] == SECRET
    assert SECRET.encode() not in raw  # the agent never sees it
    assert SECRET not in repr(rig.audit.records)  # nor does the audit log


def test_credential_over_https_with_the_default_port(tls_server):
    """'api.test:PORT' in the job file means https://api.test:PORT; the secret arrives over TLS."""
    resolver = ScriptedResolver({"api.test": [["127.0.0.1"]]})
    rig = Rig(("api.test",), http={"allow_private_networks": True, "resolver": resolver, "ca_file": TLS_PEM},
              credentials={"Authorization": credential(f"api.test:{tls_server.port}")})
    rig.fetch(f"https://api.test:{tls_server.port}/auth")
    assert tls_server.seen[-1]["authorization"] == SECRET


@pytest.mark.parametrize("bound_to", [
    "https://127.0.0.1:{port}",  # another scheme: https only unless http is written
    "127.0.0.1:{port}",  # no scheme means https
    "http://127.0.0.1:{other}",  # another port
    "http://127.0.0.1",  # the default port (80), not this one
    "http://localhost:{port}",  # another host, even one naming the same machine
    "http://[::1]:{port}",
])
def test_a_credential_is_withheld_from_every_other_origin(twins, bound_to):
    """The token allows the URL, so the call runs, but without the credential: the supervisor does
    not put it into the dispatch, and the server never sees it."""
    v4, v6 = twins
    v4.seen.clear()
    origin = bound_to.format(port=v4.port, other=v4.port + 1 if v4.port < 65535 else v4.port - 1)
    rig = Rig(("127.0.0.1",), http={"allow_private_networks": True},
              credentials={"Authorization": credential(origin)})
    raw = rig.raw(f"http://127.0.0.1:{v4.port}/hello")
    assert decode_reply(raw)["value"]["status"] == 200
    assert "authorization" not in v4.seen[-1]
    assert rig.dispatched_credentials() == {}  # it never left the trusted side
    assert SECRET not in repr(rig.audit.records)


def test_the_tool_itself_refuses_a_credential_for_another_origin(server):
    """Even a dispatch that carries a credential (signed, as a supervisor would) gets it sent only to
    its origin: the tool checks the binding against the URL it connects to."""
    rig = Rig(("127.0.0.1",), http={"allow_private_networks": True})
    body = {"call_id": secrets.token_hex(8), "job": JOB, "agent": "a", "tool": "http.fetch",
            "args": {"url": f"http://127.0.0.1:{server.port}/x", "max_bytes": 100}, "deadline": time.time() + 30,
            "credentials": {"Authorization": credential("https://api.example.com"),
                            "X-Plain": "not bound at all", "X-Bound": {**credential(f"http://127.0.0.1:{server.port}"),
                                                                       "value": "ok"}}}
    reply = msgpack.unpackb(asyncio.run(rig.worker.execute(sign_dispatch(rig.key, body))), raw=False)
    assert reply["ok"] is True and reply["value"]["status"] == 200
    seen = server.seen[-1]
    assert "authorization" not in seen and "x-plain" not in seen and seen["x-bound"] == "ok"


@pytest.mark.parametrize("origin, canonical", [
    ("api.example.com", "https://api.example.com:443"), ("https://API.example.com:443/", "https://api.example.com:443"),
    ("http://api.example.com", "http://api.example.com:80"), ("https://[::1]:8443", "https://[::1]:8443"),
])
def test_credential_origin_is_canonical(origin, canonical):
    assert CredentialRef(env="T", origin=origin).origin == canonical


@pytest.mark.parametrize("origin", ["https://api.example.com/v1", "https://u@api.example.com", "ftp://api.example.com",
                                    "https://api.example.com?x", "https://..cafe", "api.example.com:99999", ""])
def test_credential_origin_must_be_one_origin(origin):
    with pytest.raises(ValueError):
        CredentialRef(env="T", origin=origin)


def test_a_job_credential_without_an_origin_does_not_load():
    spec = {"name": "j", "entry": ["a"], "tools": ["runtime.toolbox"], "task": "t",
            "agents": [{"name": "a", "class": "x:Y", "policy": "p.yaml"}]}
    with pytest.raises(ValueError, match="origin"):
        JobSpec.model_validate({**spec, "credentials": {"http.fetch": {"Authorization": {"env": "T"}}}})
    ok = JobSpec.model_validate({**spec, "credentials": {"http.fetch": {"Authorization": {
        "env": "T", "format": "Bearer {}", "origin": "api.example.com"}}}})
    assert resolve_credentials(ok, {"T": "x"}) == {
        "http.fetch": {"Authorization": {"value": "Bearer x", "origin": "https://api.example.com:443"}}}
    with pytest.raises(ConfigError):
        resolve_credentials(ok, {})
    for bad in ("ghp_TOPSECRET\n", "ghp_TOP\rSECRET", "ghp_TOP\0SECRET"):  # e.g. a secret file's trailing newline
        with pytest.raises(ConfigError) as info:
            resolve_credentials(ok, {"T": bad})
        assert info.value.code is ErrorCode.JOB_INVALID and "line break" in info.value.reason
        assert "TOPSECRET" not in info.value.reason


def test_a_header_the_http_client_refuses_is_not_echoed_to_the_agent(server):
    """A credential that reached the tool with a line break in it (bypassing the job loader)
    fails the call without its value in the reason the agent and the audit log get."""
    rig = Rig(("127.0.0.1",), http={"allow_private_networks": True})
    body = {"call_id": secrets.token_hex(8), "job": JOB, "agent": "a", "tool": "http.fetch",
            "args": {"url": f"http://127.0.0.1:{server.port}/x", "max_bytes": 100}, "deadline": time.time() + 30,
            "credentials": {"Authorization": {**credential(f"http://127.0.0.1:{server.port}"),
                                              "value": "Bearer ghp_TOPSECRET\n"}}}
    reply = msgpack.unpackb(asyncio.run(rig.worker.execute(sign_dispatch(rig.key, body))), raw=False)
    assert reply["ok"] is False and reply["error"]["code"] == "TOOL_FAILED"
    assert "TOPSECRET" not in reply["error"]["reason"] and "header" in reply["error"]["reason"]



# ------------------------------------------------------------------ the demo's http.post shares the same egress


def test_http_post_is_held_to_the_same_destination_checks(server):
    resolver = ScriptedResolver({"hooks.example": [["127.0.0.1"], ["::1"]]})
    rig = Rig(("hooks.example",), http={"resolver": resolver}, tool="http.post")
    exc = denied(lambda: rig.fetch(f"http://hooks.example:{server.port}/hook", body="dump"), ToolFailed)
    assert exc.code is ErrorCode.EGRESS_REFUSED and rig.last_outcome()["code"] == "EGRESS_REFUSED"
    assert server.seen == []


def test_http_post_sends_its_body_and_bound_credential_when_allowed(server):
    rig = Rig(("127.0.0.1",), http={"allow_private_networks": True}, tool="http.post",
              credentials={"Authorization": credential(f"http://127.0.0.1:{server.port}")})
    assert rig.fetch(f"http://127.0.0.1:{server.port}/hook", body="summary") == {"status": 201, "body": "ok"}
    assert server.seen[-1]["data"] == b"summary" and server.seen[-1]["authorization"] == SECRET
