"""Outbound HTTP for tools (``http.fetch``): where a request may go, and that it goes exactly there.

Invariants:

* A name is resolved once, through the job's resolver. Every address of the answer must be
  globally routable (``refusal``) unless the job sets ``tool_config.http.allow_private_networks``;
  the connection then goes to one of exactly those addresses, never to a second lookup's answer,
  with the name kept for the ``Host`` header, TLS SNI and the certificate check.
* A credential is sent only to the origin (scheme, host, port) it is bound to. The supervisor
  already withholds credentials bound elsewhere; this side checks again against the URL it
  actually connects to, so the binding holds whatever the dispatch carried.
* Redirects are returned to the caller, never followed.

Threats: requests into loopback, private, carrier-grade NAT (100.64.0.0/10: cloud metadata at
100.100.100.200), link-local (169.254.169.254) or site-local networks, directly, through a name
that resolves there, through an IPv6 form that embeds such an IPv4 address (``::ffff:127.0.0.1``,
6to4, NAT64), or through DNS rebinding (a name that answers a public address to the check and a
private one to the connect); a credential leaking to another host, another port or plain http.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from .errors import ErrorCode, PolicyDenied, ToolFailed
from .trusted.capability import url_origin

Resolver = Callable[[str, int], list[str]]  # (host, port) -> IP addresses as text
NOT_AN_ADDRESS = "not an IP address"  # a resolver answer that names no address: refused even when private is allowed
USER_AGENT = "warden-http-fetch/1"


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses the operating system's resolver gives for ``host``, in its order, without repeats."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# Not globally routable although ``ipaddress`` (Python 3.11) calls them global.
_ALSO_NOT_GLOBAL = tuple(ipaddress.ip_network(n) for n in (
    "::/8",  # reserved by the IETF: IPv4-compatible '::127.0.0.1', SIIT '::ffff:0:a.b.c.d', local NAT64
    "fec0::/10",  # site-local (RFC 3879): deprecated, still routed inside some networks
    "3fff::/20",  # documentation (RFC 9637)
    "5f00::/16",  # SRv6 segment identifiers (RFC 9602)
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: the low 32 bits are an IPv4 address


def refusal(address: str) -> str | None:
    """Why ``address`` may not be connected to, or None when it is globally routable.

    An IPv6 address that carries an IPv4 address (mapped, 6to4, well-known NAT64) is judged by
    that IPv4 address, since that is where the packets end up. Teredo (2001::/32) is refused whole.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return NOT_AN_ADDRESS
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour
        if inner is None and ip in _NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            why = refusal(str(inner))
            return f"carries {inner}, {why}" if why else None
    if ip.is_multicast:
        return "a multicast address"
    if not ip.is_global or any(ip in net for net in _ALSO_NOT_GLOBAL if net.version == ip.version):
        return "not a globally routable address"
    return None


@dataclass(frozen=True)
class FetchSettings:
    """``tool_config.http`` of the job file, checked."""

    allow_private_networks: bool = False  # opt-in for tests and operators; the address is still pinned
    timeout_s: float = 15.0
    ca_file: str | None = None  # trust this CA bundle instead of the system's (an internal CA)
    resolver: Resolver = system_resolver  # a callable, from Python only (tests, a custom resolver)

    @staticmethod
    def from_config(config: Any) -> "FetchSettings":
        config = {} if config is None else config
        if not isinstance(config, dict):
            raise ToolFailed(f"tool_config.http must be a mapping, not {config!r:.80}")
        unknown = sorted(set(config) - set(FetchSettings.__dataclass_fields__))
        if unknown:
            raise ToolFailed(f"tool_config.http has unknown keys {unknown}")
        settings = FetchSettings(**config)
        if not (isinstance(settings.allow_private_networks, bool) and callable(settings.resolver)
                and type(settings.timeout_s) in (int, float) and settings.timeout_s > 0
                and (settings.ca_file is None or isinstance(settings.ca_file, str))):
            raise ToolFailed(f"tool_config.http is malformed: {config!r:.200}")
        return settings


def origin_of(url: str) -> tuple[str, str, int]:
    """(scheme, canonical host, port) of an http(s) URL; ToolFailed(EGRESS_REFUSED) for anything else or ambiguous."""
    try:
        return url_origin(url)
    except PolicyDenied as exc:
        raise ToolFailed(exc.reason, code=ErrorCode.EGRESS_REFUSED) from None


def checked_addresses(host: str, port: int, settings: FetchSettings,
                      opt_in: str = "tool_config.http.allow_private_networks") -> list[str]:
    """The addresses ``host`` resolves to, each of them allowed; ToolFailed(EGRESS_REFUSED) if one is not
    (its reason names ``opt_in``, the setting that would allow a private destination)."""
    try:
        addresses = [str(a) for a in settings.resolver(host, port)]
    except (OSError, UnicodeError) as exc:
        raise ToolFailed(f"cannot resolve {host!r}: {exc}") from None
    if not addresses:
        raise ToolFailed(f"{host!r} has no address")
    for address in addresses:
        why = refusal(address)
        if why is not None and (why == NOT_AN_ADDRESS or not settings.allow_private_networks):
            raise ToolFailed(f"{host!r} resolves to {address}, {why}; set {opt_in} to allow private "
                             "destinations", code=ErrorCode.EGRESS_REFUSED)
    return addresses


def connect(addresses: list[str], port: int, timeout_s: float) -> socket.socket:
    """A TCP connection to the first of ``addresses`` that answers; never a name lookup (AI_NUMERICHOST)."""
    error: OSError = OSError("no address")
    for address in addresses:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_NUMERICHOST)[0]
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout_s)
        try:
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


def _bound_to(credential: Any, origin: tuple[str, str, int]) -> bool:
    if not (isinstance(credential, dict) and isinstance(credential.get("value"), str)):
        return False
    try:
        return url_origin(credential.get("origin")) == origin
    except PolicyDenied:  # an unusable binding binds to nothing
        return False


def _connection(origin: tuple[str, str, int], addresses: list[str], settings: FetchSettings
                ) -> http.client.HTTPConnection:
    scheme, host, port = origin
    if scheme == "https":
        tls = ssl.create_default_context(cafile=settings.ca_file)  # SNI and certificate check on ``host``
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(host, port, timeout=settings.timeout_s,
                                                                       context=tls)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=settings.timeout_s)
    # http.client connects through this attribute (HTTPS wraps the socket afterwards, with ``host``
    # as server name): replacing it pins the connection to the checked addresses.
    conn._create_connection = lambda *_args, **_kwargs: connect(addresses, port, settings.timeout_s)  # type: ignore
    return conn


def fetch(url: str, *, max_bytes: int, settings: FetchSettings, credentials: dict[str, Any], method: str = "GET",
          body: bytes | None = None, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """One request to ``url``: status, headers (no Set-Cookie), the body's first ``max_bytes`` and whether
    there was more."""
    try:
        origin = url_origin(url)
    except PolicyDenied as exc:
        raise ToolFailed(exc.reason) from None
    addresses = checked_addresses(origin[1], origin[2], settings)
    headers = {"User-Agent": USER_AGENT, **(headers or {})}
    headers.update({name: c["value"] for name, c in credentials.items() if _bound_to(c, origin)})
    parts = urlsplit(url)
    conn = None
    try:
        conn = _connection(origin, addresses, settings)
        conn.request(method, (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), body, headers)
        resp = conn.getresponse()
        status, resp_headers, data = resp.status, resp.getheaders(), resp.read(max_bytes + 1)
    except (OSError, http.client.HTTPException) as exc:  # ssl.SSLError is an OSError (and a ValueError)
        raise ToolFailed(f"fetch failed: {type(exc).__name__}: {exc}") from None
    except ValueError as exc:  # http.client quotes a header it refuses: it may be a credential's
        raise ToolFailed(f"fetch failed: {type(exc).__name__} (a header or the request line was refused)") from None
    finally:
        if conn is not None:
            conn.close()
    return {"status": status, "headers": {k: v for k, v in resp_headers if k.lower() != "set-cookie"},
            "body": data[:max_bytes], "truncated": len(data) > max_bytes}
