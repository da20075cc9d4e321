"""A streamable-HTTP MCP server's connection: the SDK's client, pinned to the address Warden checked.

    url: https://host/mcp -> url_origin -> resolve host once (egress.checked_addresses: every
        address globally routable unless the entry sets allow_private_networks)
        -> httpx2.AsyncClient(transport whose connections go to exactly those addresses,
           headers = the entry's credentials, no proxy from the environment, no redirects)
        -> mcp.client.streamable_http.streamable_http_client -> the two streams McpConnection speaks over

The remote server is outside Warden's sandbox: it runs where it runs, with whatever it can
reach, and all Warden controls is which address the tool worker connects to and what it sends
there (the agent's call, after the policy allowed it, and the entry's headers). Its answers are
untrusted like any tool's output.

Invariants: the name is resolved once per connection and the TCP connection goes to one of
exactly the checked addresses (a second lookup's answer is never used, so DNS rebinding cannot
move the connection), with the name kept for ``Host``, TLS SNI and the certificate check; a
connection to any other origin is refused; no redirect is followed (``max_redirects=0``: the
SDK follows one only within the origin and budget, and the budget is nil), so the credential
headers go to that origin only. Their values never appear in an error or a ``repr``.
"""

from __future__ import annotations

import ssl
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Iterable

from ..egress import FetchSettings, checked_addresses, origin_of

OPT_IN = "allow_private_networks: true on this mcp_servers entry"


def checked_origin(url: str, *, allow_private_networks: bool, resolver: Any = None
                   ) -> tuple[tuple[str, str, int], list[str]]:
    """``url``'s origin and the addresses its host resolves to, each allowed (ToolFailed(EGRESS_REFUSED) otherwise)."""
    origin = origin_of(url)
    settings = FetchSettings(allow_private_networks=allow_private_networks,
                             **({"resolver": resolver} if resolver is not None else {}))
    return origin, checked_addresses(origin[1], origin[2], settings, opt_in=OPT_IN)


class PinnedBackend:
    """An httpcore2 network backend that connects ``host:port`` to the checked addresses, and nothing else."""

    def __init__(self, host: str, port: int, addresses: list[str]) -> None:
        from httpcore2._backends.auto import AutoBackend

        self.host, self.port, self.addresses = host, port, list(addresses)
        self._backend = AutoBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> Any:
        import httpcore2

        if (host.lower(), port) != (self.host, self.port):
            raise httpcore2.ConnectError(f"{host}:{port} is not the MCP server's origin")
        error: Exception = httpcore2.ConnectError("no address")
        for address in self.addresses:
            try:
                return await self._backend.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                       socket_options=socket_options)
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as exc:
                error = exc
        raise error

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> Any:
        import httpcore2

        raise httpcore2.ConnectError("an MCP server URL never names a unix socket")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


def pinned_client(origin: tuple[str, str, int], addresses: list[str], headers: dict[str, str],
                  timeout_s: float, ssl_context: ssl.SSLContext | None = None) -> Any:
    """An ``httpx2.AsyncClient`` whose every connection goes to ``addresses``, with ``headers`` on each request
    (``ssl_context``: the CAs to trust instead of httpx2's default)."""
    import httpcore2
    import httpx2

    transport = httpx2.AsyncHTTPTransport(trust_env=False)
    # The transport's pool is where httpx2 connects; a pool with our backend pins it (TLS still
    # verifies the certificate against the URL's host, which is also the SNI).
    transport._pool = httpcore2.AsyncConnectionPool(ssl_context=ssl_context or transport._pool._ssl_context,
                                                     network_backend=PinnedBackend(origin[1], origin[2], addresses))
    return httpx2.AsyncClient(transport=transport, headers=headers, trust_env=False, follow_redirects=False,
                              max_redirects=0, timeout=httpx2.Timeout(timeout_s, read=None))


@asynccontextmanager
async def http_streams(url: str, headers: dict[str, str], *, allow_private_networks: bool, timeout_s: float,
                       max_event_bytes: int) -> AsyncIterator[Any]:
    """The SDK's streams to the server at ``url``, over a connection pinned to its checked addresses."""
    from mcp.client.streamable_http import streamable_http_client

    origin, addresses = checked_origin(url, allow_private_networks=allow_private_networks)
    async with pinned_client(origin, addresses, headers, timeout_s) as client:
        async with streamable_http_client(url, http_client=client, max_sse_event_size=max_event_bytes) as streams:
            yield streams
