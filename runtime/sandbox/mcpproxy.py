"""A stdio MCP server's one way out of its sandbox: an egress proxy that lets it reach its allow-list only.

    server (in the sandbox, no network: --unshare-net, loopback only)
        -> HTTP(S)_PROXY=http://127.0.0.1:3128 -> the forwarder (FORWARDER, this Python, in the sandbox)
        -> unix socket /run/warden-egress/proxy.sock (a directory of the worker's, bound in)
        -> EgressProxy (the tool worker, outside the sandbox): decide -> connect -> relay bytes

The proxy reads one request head (at most ``MAX_HEAD_BYTES``) and lets through exactly two
forms: ``CONNECT host:port`` (a tunnel: HTTPS, TLS end to end between server and host) and an
absolute-URI ``http://`` request (forwarded with ``Connection: close``, its ``Host`` set from
the URI). The destination must be on the job's ``network:`` list (exact host, the port given
there or the scheme's default: 443 for CONNECT, 80 for http), its name is resolved once,
every address must be globally routable (``egress.checked_addresses``, unless the entry sets
``allow_private_networks``), and the connection goes to one of exactly those addresses.
Anything else is answered ``403`` (``400`` for a malformed request, ``431`` for an oversized
head), counted and logged with the reason; nothing is relayed before the decision.

Fail closed: the proxy is the sandbox's only route. A program that ignores the proxy
variables meets a network namespace with nothing but loopback, and a name lookup inside the
sandbox has no resolver to ask (the proxy resolves). The allow-list is per destination
(host and port): what the server sends over an allowed connection is between it and that
host, as with any TLS tunnel.
"""

from __future__ import annotations

import logging
import os
import re
import select
import shutil
import socket
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urlsplit

from ..egress import FetchSettings, checked_addresses, connect, origin_of, system_resolver
from ..errors import ToolFailed

log = logging.getLogger("warden.mcp.egress")

MAX_HEAD_BYTES = 16 << 10  # a request head longer than this is refused (431)
PROXY_PORT = 3128  # where the forwarder listens, on the sandbox's own loopback
SANDBOX_DIR = "/run/warden-egress"  # where the proxy's socket directory is bound in the sandbox
SOCKET_NAME = "proxy.sock"
IDLE_S = 300.0  # a relayed connection with no traffic either way for this long is closed
OPT_IN = "allow_private_networks: true on this mcp_servers entry"
_ENTRY = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s:/@\[\]]+)(?::([0-9]{1,5}))?")


@dataclass(frozen=True)
class Allowed:
    """One ``network:`` entry: a host (canonical) and a port, or None for the scheme's default."""

    host: str
    port: int | None = None


def parse_allowed(entry: str) -> Allowed:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``; ValueError for anything else."""
    m = _ENTRY.fullmatch(entry) if isinstance(entry, str) else None
    port = int(m.group(2)) if m and m.group(2) else None
    if m is None or (port is not None and not 0 < port < 65536):
        raise ValueError(f"network: {entry!r:.80} is not host, host:port or [IPv6]:port")
    try:
        host = origin_of(f"http://{m.group(1)}/")[1]
    except ToolFailed as exc:
        raise ValueError(f"network: {entry!r:.80}: {exc.reason}") from None
    return Allowed(host, port)


class Refused(Exception):
    """The proxy's answer to a request it does not relay: an HTTP status and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class Request:
    """A request head, read: where it goes and the bytes to send there first (None: a CONNECT tunnel)."""

    method: str
    host: str
    port: int
    forward: bytes | None


def parse_head(head: bytes) -> Request:
    """The request in ``head`` (up to and including the blank line); Refused(400) if it is not one we relay."""
    try:
        lines = head.decode("ascii").split("\r\n")
        method, target, version = lines[0].split(" ")
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "malformed request line") from None
    if not (re.fullmatch(r"[A-Z]{1,16}", method) and re.fullmatch(r"HTTP/1\.[01]", version)):
        raise Refused(400, f"malformed request line {lines[0][:80]!r}")
    fields = [ln for ln in lines[1:] if ln]
    if any(":" not in f or f[0] in " \t" or "\r" in f or "\n" in f for f in fields):  # a bare CR or LF: a smuggled field
        raise Refused(400, "malformed header field")
    if method == "CONNECT":
        m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\s:/@\[\]]+):([0-9]{1,5})", target)
        if m is None:
            raise Refused(400, f"CONNECT needs host:port, not {target[:80]!r}")
        return Request(method, _host(m.group(1)), int(m.group(2)), None)
    if not target.startswith("http://"):
        raise Refused(400, f"{method} needs an absolute http:// URI (https goes through CONNECT), not {target[:80]!r}")
    try:
        _, host, port = origin_of(target)
    except ToolFailed as exc:
        raise Refused(400, exc.reason) from None
    parts = urlsplit(target)
    if "@" in parts.netloc:
        raise Refused(400, "no credentials in a proxied URI")
    keep = [f for f in fields if f.split(":", 1)[0].strip().lower() not in ("host", "connection", "proxy-connection",
                                                                            "proxy-authorization", "keep-alive")]
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    forward = "\r\n".join([f"{method} {path} {version}", f"Host: {parts.netloc}", *keep,
                           "Connection: close", "", ""]).encode("ascii")
    return Request(method, host, port, forward)


def _host(text: str) -> str:
    try:
        return origin_of(f"http://{text}/")[1]
    except ToolFailed as exc:
        raise Refused(400, exc.reason) from None


def decide(request: Request, allowed: Iterable[Allowed], settings: FetchSettings) -> list[str]:
    """The addresses to connect ``request`` to, or Refused(403) with why."""
    default = 443 if request.forward is None else 80
    if not any(a.host == request.host and (a.port or default) == request.port for a in allowed):
        raise Refused(403, f"{request.host}:{request.port} is not on the server's network allow-list")
    try:
        return checked_addresses(request.host, request.port, settings, opt_in=OPT_IN)
    except ToolFailed as exc:
        raise Refused(403, exc.reason) from None


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """The request head (through the blank line) and what came after it, or nothing if the client sent nothing;
    Refused(431) past ``MAX_HEAD_BYTES``."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEAD_BYTES:
            raise Refused(431, f"request head over {MAX_HEAD_BYTES} bytes")
        data = sock.recv(4096)
        if not data and not buf:
            return b"", b""  # connected and left: no request to answer
        if not data:
            raise Refused(400, "connection closed before the request head ended")
        buf += data
    end = buf.index(b"\r\n\r\n") + 4
    if end > MAX_HEAD_BYTES:
        raise Refused(431, f"request head over {MAX_HEAD_BYTES} bytes")
    return buf[:end], buf[end:]


def relay(a: socket.socket, b: socket.socket, idle_s: float = IDLE_S) -> None:
    """Copy bytes both ways until both sides are done (each end's EOF passed on) or nothing moves for ``idle_s``."""
    peer = {a: b, b: a}
    open_ = [a, b]
    while open_:
        ready, _, _ = select.select(open_, [], [], idle_s)
        if not ready:
            return
        for s in ready:
            if s not in open_:
                continue
            data = s.recv(65536)
            if data:
                peer[s].sendall(data)
                continue
            open_.remove(s)
            try:
                peer[s].shutdown(socket.SHUT_WR)
            except OSError:  # the other side is gone already: nothing left to tell it
                open_.clear()


class EgressProxy:
    """The proxy for one server's sandbox: a unix socket in a directory of its own, a thread per connection.

    ``start(uid)`` makes the directory (mode 0700, owned by the sandbox's uid when the worker
    runs as root, so only that uid and root can reach the socket) and returns its path, to be
    bound at ``SANDBOX_DIR``. ``allowed`` and ``refused`` count decisions; ``refusals`` keeps the
    latest reasons.
    """

    def __init__(self, name: str, allowed: Iterable[Allowed], *, allow_private_networks: bool = False,
                 resolver: object = system_resolver, timeout_s: float = 30.0, max_connections: int = 64) -> None:
        self.name = name
        self.allowed_hosts = tuple(allowed)
        self.settings = FetchSettings(allow_private_networks=allow_private_networks, resolver=resolver)  # type: ignore[arg-type]
        self.timeout_s = timeout_s
        self.allowed = self.refused = 0
        self.refusals: deque[str] = deque(maxlen=32)
        self.directory: str | None = None
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None

    def start(self, uid: int | None = None) -> str:
        if self.directory is not None:
            return self.directory
        directory = tempfile.mkdtemp(prefix="warden-egress-")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = os.path.join(directory, SOCKET_NAME)
        listener.bind(path)
        listener.listen(64)
        os.chmod(path, 0o600)
        if uid is not None:  # the server's uid may connect; the directory stays ours (it may not swap the socket)
            os.chmod(directory, 0o711)
            os.chown(path, uid, uid)
        self._listener, self.directory = listener, directory
        threading.Thread(target=self._accept, args=(listener,), name=f"mcp-egress-{self.name}", daemon=True).start()
        return directory

    def close(self) -> None:
        listener, directory = self._listener, self.directory
        self._listener = self.directory = None
        if listener is not None:
            listener.close()  # a blocked accept() fails: the accept thread ends
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed
                return
            if not self._slots.acquire(blocking=False):
                self._refuse(client, Refused(503, "too many connections"), "-")
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        try:
            client.settimeout(self.timeout_s)
            target = "-"
            try:
                head, rest = read_head(client)
                if not head:
                    return
                request = parse_head(head)
                target = f"{request.method} {request.host}:{request.port}"
                addresses = decide(request, self.allowed_hosts, self.settings)
            except Refused as refused:
                self._refuse(client, refused, target)
                return
            try:
                upstream = connect(addresses, request.port, self.timeout_s)
            except OSError as exc:
                self._refuse(client, Refused(502, f"cannot connect: {type(exc).__name__}"), target)
                return
            with self._lock:
                self.allowed += 1
            log.info("MCP server %s: egress %s allowed", self.name, target)
            if request.forward is None:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                upstream.sendall(request.forward)
            if rest:
                upstream.sendall(rest)
            client.settimeout(None)
            upstream.settimeout(None)
            relay(client, upstream)
        except OSError:  # either side went away mid-relay: the connection ends, nothing else to do
            return
        finally:
            for s in (client, upstream):
                if s is not None:
                    s.close()
            self._slots.release()

    def _refuse(self, client: socket.socket, refused: Refused, target: str) -> None:
        with self._lock:
            self.refused += 1
            self.refusals.append(f"{target}: {refused.reason}")
        log.warning("MCP server %s: egress %s refused: %s", self.name, target, refused.reason)
        body = f"warden egress proxy: {refused.reason}\n".encode()
        phrase = {400: "Bad Request", 403: "Forbidden", 431: "Request Header Fields Too Large",
                  502: "Bad Gateway", 503: "Service Unavailable"}[refused.status]
        try:
            client.sendall(f"HTTP/1.1 {refused.status} {phrase}\r\nContent-Type: text/plain\r\nContent-Length: "
                           f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        except OSError:  # the client left first
            pass


# Run inside the sandbox with its Python, as ``python -c FORWARDER PORT SOCKET -- server argv``: it listens
# on the sandbox's loopback, relays each connection to the proxy's unix socket, and runs the server as its
# child (the server's stdin and stdout are the sandbox's: the MCP session), exiting with it.
FORWARDER = r"""
import socket, subprocess, sys, threading
port, path, argv = int(sys.argv[1]), sys.argv[2], sys.argv[4:]
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(64)
def pipe(a, b):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    try:
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass
def serve(client):
    up = socket.socket(socket.AF_UNIX)
    try:
        up.connect(path)
    except OSError:
        client.close()
        return
    back = threading.Thread(target=pipe, args=(up, client), daemon=True)
    back.start()
    pipe(client, up)
    back.join()
    client.close()
    up.close()
def accept():
    while True:
        client, _ = listener.accept()
        threading.Thread(target=serve, args=(client,), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
sys.exit(subprocess.Popen(argv).wait())
"""


def proxy_env() -> dict[str, str]:
    """The server's proxy variables: every HTTP client library's spelling, and no exceptions."""
    url = f"http://127.0.0.1:{PROXY_PORT}"
    return {"HTTP_PROXY": url, "HTTPS_PROXY": url, "http_proxy": url, "https_proxy": url, "NO_PROXY": "",
            "no_proxy": ""}


def wrapped_command(python: str, command: list[str]) -> list[str]:
    """``command`` run under the forwarder, in the sandbox."""
    return [python, "-I", "-c", FORWARDER, str(PROXY_PORT), f"{SANDBOX_DIR}/{SOCKET_NAME}", "--", *command]
