"""The job file's ``mcp_servers:`` section: declared servers, discovered at job start, run by the tool workers.

    mcp_servers:
      - name: git                      # unique in the job
        prefix: git                    # its tools are git.git_status, git.git_log, ...
        command: [mcp-server-git]      # stdio server: started on the calling agent's workspace, sandboxed
        sandbox: {backend: bwrap, limits: {cpu_s: 60, memory_mb: 512}}   # or gvisor; the policy must agree
        network: [api.github.com]      # hosts (host or host:port) it may reach, through an egress proxy; none by default
        env_from: {GITHUB_TOKEN: GIT_TOKEN}   # server env var <- driver env var, for this server only
        shared: false                  # true: one server per worker, in a workspace of its own
        path_args: [path]              # arguments canonicalised as paths (policy path_under rules apply)
      - name: docs
        prefix: docs
        url: https://mcp.example.com/mcp   # streamable HTTP: a remote server, outside Warden's sandbox
        headers_from: {Authorization: "Bearer ${DOCS_TOKEN}"}   # header <- template of driver env vars
        allow_private_networks: false  # true: the URL (or a network: host) may resolve to a private address

At job start (``load_job`` and ``warden check``) the driver starts each server once, in an
empty sandboxed workspace, and lists its tools (``discover``); they become tools of the job
(``runtime.mcptools``), checked against the policies like any other. The listing, not the
server, is what the tool workers get: a tool the server adds later is never registered. In
a worker each call runs through the agent's connection to its own sandboxed server
(``worker_tools``), started on the first call and restarted after a failure.

Credentials (``env_from``, ``headers_from``) are read from the driver's environment and go
to the tool workers, which set them in that server's environment (or send them to that URL's
origin) only: they are never in a tool's schema, arguments, results, an error's text or the
audit log.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import zlib
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .egress import NOT_AN_ADDRESS, origin_of, refusal
from .errors import ConfigError, ErrorCode, SandboxUnavailable, ToolFailed, WardenError
from .mcptools import result_value, to_tools
from .sandbox.base import Limits
from .sandbox.bwrap import UID_BASE, UID_SPAN
from .sandbox.mcpproxy import parse_allowed
from .sandbox.mcpserver import McpConnection, McpServer
from .sandbox.workspace import Workspace
from .tool import Tool

SERVER_CPU_S = 60.0  # a server lives across calls: RLIMIT_CPU bounds its whole life (then it restarts)
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
_HEADER_NAME = r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]{0,63})\}")
# Headers the transport sets itself, or that would change what the request means: never from a job file.
_RESERVED_HEADERS = frozenset({"host", "content-length", "content-type", "transfer-encoding", "connection", "upgrade",
                               "te", "trailer", "keep-alive", "accept", "accept-encoding", "mcp-session-id",
                               "mcp-protocol-version", "last-event-id", "proxy-authorization", "proxy-connection"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class McpLimits(_Strict):
    """The server process's limits (a policy's ``sandbox`` limits bound each call)."""

    cpu_s: float = Field(default=SERVER_CPU_S, gt=0, le=86400)
    wall_s: float = Field(default=30.0, gt=0, le=3600, description="start-up and listing deadline")
    memory_mb: int = Field(default=512, ge=16, le=65536)
    max_pids: int = Field(default=64, ge=1, le=4096)
    max_output_bytes: int = Field(default=1 << 20, ge=1, le=64 << 20)
    workspace_mb: int = Field(default=64, ge=1, le=65536)


class McpSandbox(_Strict):
    backend: Literal["bwrap", "gvisor"] = "bwrap"
    limits: McpLimits = Field(default_factory=McpLimits)


class McpServerSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    prefix: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$", description="tools are named PREFIX.TOOL")
    command: list[str] | None = Field(default=None, min_length=1)
    url: str | None = None
    sandbox: McpSandbox = Field(default_factory=McpSandbox)
    network: list[str] = Field(default_factory=list, description="hosts (host or host:port) a stdio server may "
                               "reach, through an egress proxy; none by default")
    env_from: dict[str, str] = Field(default_factory=dict, description="server env var -> driver env var")
    headers_from: dict[str, str] = Field(default_factory=dict, description="a URL server's request header -> "
                                         "a template of driver env vars, e.g. 'Bearer ${TOKEN}'")
    allow_private_networks: bool = Field(default=False, description="the URL or a network: host may resolve to "
                                         "a loopback, private or link-local address")
    shared: bool = False
    path_args: list[str] = Field(default_factory=list, description="arguments canonicalised as paths, in every tool")

    @model_validator(mode="after")
    def _runnable(self) -> "McpServerSpec":
        if (self.command is None) == (self.url is None):
            raise ValueError(f"MCP server {self.name!r}: give either command: [...] (stdio) or url: (streamable "
                             "HTTP), not both or neither")
        if self.url is not None:
            self._check_url(self.url)
        elif self.headers_from:
            raise ValueError(f"MCP server {self.name!r}: headers_from is for url: servers; a stdio server's "
                             "credentials are env_from")
        for entry in self.network:
            try:
                parse_allowed(entry)
            except ValueError as exc:
                raise ValueError(f"MCP server {self.name!r}: {exc}") from None
        bad = sorted(k for k in [*self.env_from, *self.env_from.values()] if not re.fullmatch(_ENV_NAME, k))
        if bad:
            raise ValueError(f"MCP server {self.name!r}: env_from: not environment variable names: {bad}")
        for header, template in self.headers_from.items():
            problem = _header_problem(header, template)
            if problem:
                raise ValueError(f"MCP server {self.name!r}: headers_from {header!r}: {problem}")
        return self

    def _check_url(self, url: str) -> None:
        what = f"MCP server {self.name!r}"
        if self.env_from or self.network:
            raise ValueError(f"{what}: a url: server is remote: it has no environment (use headers_from for "
                             "credentials) and no network allow-list (its URL is its one destination)")
        try:
            _, host, _ = origin_of(url)
        except WardenError as exc:
            raise ValueError(f"{what}: url {url!r:.120}: {exc.reason}") from None
        if "@" in url.split("/", 3)[2]:
            raise ValueError(f"{what}: url: no credentials in the URL; use headers_from")
        why = refusal(host)
        if why is not None and why != NOT_AN_ADDRESS and not self.allow_private_networks:
            raise ValueError(f"{what}: url host {host} is {why}; set allow_private_networks: true on this "
                             "entry to allow it")
        if self.headers_from and url.lower().startswith("http://") and host not in ("localhost", "127.0.0.1", "::1"):
            raise ValueError(f"{what}: headers_from would send its credentials in clear text: use an https:// url "
                             "(plain http only to this host's loopback, which also needs allow_private_networks)")


def _header_problem(header: str, template: str) -> str | None:
    if not re.fullmatch(_HEADER_NAME, header):
        return "not an HTTP header name"
    if header.lower() in _RESERVED_HEADERS:
        return "set by the MCP transport itself"
    if not _ENV_REF.search(template):
        return "give the value as a template naming the driver's environment variables, e.g. 'Bearer ${TOKEN}'"
    if "$" in _ENV_REF.sub("", template) or any(c in template for c in "\r\n\0"):
        return "only ${NAME} references and plain text, on one line"
    return None


def _headers(spec: McpServerSpec, environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The URL server's credential headers, filled in from ``environ`` (errors name a variable, never a value)."""
    headers = []
    for header, template in sorted(spec.headers_from.items()):
        value = _ENV_REF.sub(lambda m: environ[m.group(1)], template)
        if any(c in value for c in "\r\n\0"):
            raise ConfigError(f"MCP server {spec.name!r}: headers_from {header!r}: the environment variables "
                              f"{sorted(set(_ENV_REF.findall(template)))} hold a line break or NUL",
                              code=ErrorCode.JOB_INVALID)
        headers.append((header, value))
    return tuple(headers)


def check_servers(specs: list[McpServerSpec]) -> str | None:
    """Why a job's servers do not fit together (a name or prefix used twice), or None."""
    for what, plural in (("name", "names"), ("prefix", "prefixes")):
        values = [getattr(s, what) for s in specs]
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            return f"mcp_servers: {plural} used twice: {twice}"
    return None


def mcp_sandbox_problem(agent: str, policy: Any, mcp_tools: Mapping[str, Tool], specs: list[McpServerSpec]
                        ) -> str | None:
    """Why ``policy`` cannot run the MCP tools it names: a per-agent server runs on the agent's workspace in
    the server's backend, so the policy must put that server's tools in the same backend."""
    from .isolation import sandbox_settings

    backend_of = {s.prefix: s.sandbox.backend for s in specs if not s.shared and s.url is None}  # the agent's sandbox
    settings = sandbox_settings(policy)
    wrong = {n: backend_of[n.split(".", 1)[0]] for n in policy.tools if n in mcp_tools
             and n.split(".", 1)[0] in backend_of
             and settings.get(n, settings["*"])["backend"] != backend_of[n.split(".", 1)[0]]}
    if wrong:
        want = sorted(set(wrong.values()))
        return (f"policy of {agent!r}: MCP tools {sorted(wrong)} run in the agent's {'/'.join(want)} sandbox "
                f"(their server's backend): give them (or the policy) sandbox: {{backend: {want[0]}}}")
    return None


def server_of(spec: McpServerSpec, environ: Mapping[str, str]) -> McpServer:
    """The resolved server; its credentials read from ``environ`` (ConfigError naming the variable, never its value)."""
    needed = [*spec.env_from.values(), *(n for t in spec.headers_from.values() for n in _ENV_REF.findall(t))]
    missing = sorted({v for v in needed if v not in environ})
    if missing:
        what = "env_from" if spec.env_from else "headers_from"
        raise ConfigError(f"MCP server {spec.name!r}: {what} needs environment variables {missing}, which are "
                          "not set", code=ErrorCode.JOB_INVALID)
    limits = Limits(**spec.sandbox.limits.model_dump())
    return McpServer(spec.name, spec.prefix, tuple(spec.command or ()), url=spec.url or "", backend=spec.sandbox.backend,
                     limits=limits, network=tuple(spec.network),
                     env=tuple(sorted((k, environ[v]) for k, v in spec.env_from.items())), shared=spec.shared,
                     headers=_headers(spec, environ), allow_private_networks=spec.allow_private_networks)


_LISTINGS: dict[McpServer, list[dict[str, Any]]] = {}  # one discovery per server per process (check, then load)
_LISTING_LOCK = threading.Lock()


def discover(server: McpServer) -> list[dict[str, Any]]:
    """The server's ``tools/list``, as plain data: started once, in an empty sandboxed workspace (a URL
    server: connected to once, its address checked as for every call)."""
    with _LISTING_LOCK:
        if server in _LISTINGS:
            return _LISTINGS[server]
        with tempfile.TemporaryDirectory(prefix="warden-mcp-") as d:
            session = None if server.url else own_session(server, Path(d))
            conn = McpConnection(server, session)
            try:
                listed = conn.list_tools(timeout_s=server.limits.wall_s)
            except WardenError as exc:
                raise ConfigError(f"MCP server {server.name!r}: cannot list its tools: {exc.code.value}: "
                                  f"{exc.reason}", code=ErrorCode.JOB_INVALID) from None
            finally:
                conn.close()
                if session is not None:
                    session.close()
        _LISTINGS[server] = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in listed]
        return _LISTINGS[server]


def _listed(listing: list[dict[str, Any]]) -> list[Any]:
    from mcp.types import Tool as McpTool

    return [McpTool.model_validate(t) for t in listing]


def _driver_side(name: str, args: dict[str, Any], ctx: Any) -> Any:
    raise ToolFailed("an MCP tool runs in a tool worker, never in the driver", code=ErrorCode.INTERNAL)


def job_tools(specs: list[McpServerSpec], environ: Mapping[str, str]
              ) -> tuple[dict[str, Tool], list[dict[str, Any]], dict[str, str]]:
    """The servers' tools for the supervisor and the policies, what the workers need to run them
    (``worker_tools``), and the tools left out with why (a schema Warden cannot enforce)."""
    problem = check_servers(specs)
    if problem:
        raise ConfigError(problem, code=ErrorCode.JOB_INVALID)
    tools: dict[str, Tool] = {}
    entries: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for spec in specs:
        server = server_of(spec, environ)
        listing = discover(server)
        found, left_out = to_tools(server.prefix, _listed(listing), _driver_side, path_args=spec.path_args)
        tools.update(found)
        skipped.update(left_out)
        entries.append({"server": _server_data(server), "tools": listing, "path_args": list(spec.path_args)})
    return tools, entries, skipped


def _server_data(server: McpServer) -> dict[str, Any]:
    return {"name": server.name, "prefix": server.prefix, "command": list(server.command), "url": server.url,
            "backend": server.backend, "limits": vars(server.limits), "network": list(server.network),
            "env": dict(server.env), "shared": server.shared, "headers": dict(server.headers),
            "allow_private_networks": server.allow_private_networks}


def _server_of_data(d: dict[str, Any]) -> McpServer:
    return McpServer(d["name"], d["prefix"], tuple(d["command"]), url=d["url"], backend=d["backend"],
                     limits=Limits(**d["limits"]), network=tuple(d["network"]), env=tuple(sorted(d["env"].items())),
                     shared=d["shared"], headers=tuple(sorted(d["headers"].items())),
                     allow_private_networks=d["allow_private_networks"])


def own_session(server: McpServer, workspace: Path) -> Any:
    """A session of the server's backend on a workspace of its own (discovery, a shared server), owned by a
    sandbox uid derived from the server's name when the worker is root (bwrap's, which gVisor reuses)."""
    from .sandbox.pool import make_backend

    key = f"mcp:{server.name}"
    session = make_backend(server.backend).open(workspace, workspace_mb=server.limits.workspace_mb, key=key)
    if server.backend == "gvisor" and os.geteuid() == 0:  # bwrap's open() did this; gVisor's runs as the owner
        uid = UID_BASE + zlib.crc32(f"{workspace}|{key}".encode()) % UID_SPAN
        os.chown(workspace, uid, uid)
        os.chmod(workspace, 0o700)
    return session


class Connections:
    """A worker's live servers: one per (server, agent session), or one per server if ``shared``. A URL
    server has no sandbox: its connection (and so its MCP session) is per agent session all the same.

    A per-agent server runs on the agent's workspace, in the session of the server's backend that
    the agent's policy gives its tools (``mcp_sandbox_problem`` checks this at load); a shared
    server on a workspace of its own. Each connection has its own thread and event loop, so a
    hung server holds only the calls made to it.

    A shared server's workspace is made under ``root`` (the worker's workspace directory, which
    a restarted worker's successor removes) and removed by ``close``, with every server stopped.
    """

    def __init__(self, root: Path | None = None) -> None:
        self._root = root
        self._lock = threading.Lock()
        self._conns: dict[tuple[str, int], McpConnection] = {}
        self._owners: dict[tuple[str, int], str] = {}
        self._shared_sessions: dict[str, Any] = {}
        self._shared_workspaces: list[Workspace] = []

    def get(self, server: McpServer, handle: Any, agent: str = "") -> McpConnection:
        with self._lock:
            if server.url:
                key = (server.name, 0 if server.shared else id(getattr(handle, "session", None)))
                if key not in self._conns:
                    self._conns[key] = McpConnection(server)
                    self._owners[key] = "(shared)" if server.shared else agent
                return self._conns[key]
            if server.shared:
                session = self._shared_sessions.get(server.name)
                if session is None:
                    if self._root is not None:
                        self._root.mkdir(parents=True, exist_ok=True)
                    ws = Workspace(Path(tempfile.mkdtemp(prefix="mcp-shared-", dir=self._root)),
                                   size_mb=server.limits.workspace_mb)
                    self._shared_workspaces.append(ws)
                    session = self._shared_sessions[server.name] = own_session(server, ws.root)
            else:
                session = getattr(handle, "session", None)
                if getattr(session, "backend", None) != server.backend:
                    raise SandboxUnavailable(f"MCP server {server.name!r} runs in the agent's {server.backend} "
                                             f"sandbox: give its tools sandbox: {{backend: {server.backend}}} in the "
                                             "policy", code=ErrorCode.SANDBOX_UNAVAILABLE)
            key = (server.name, id(session))
            conn = self._conns.get(key)
            if conn is None:
                conn = self._conns[key] = McpConnection(server, session)
                self._owners[key] = "(shared)" if server.shared else agent
            return conn

    def status(self) -> list[dict[str, Any]]:
        """Every connection's ``McpConnection.status()``, with the agent it serves."""
        with self._lock:
            conns = [(self._owners[k], c) for k, c in self._conns.items()]
        return [{"agent": agent, **conn.status()} for agent, conn in conns]

    def close(self) -> None:
        """Stop every server; close the shared servers' sessions and remove their workspaces."""
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
            sessions, self._shared_sessions = list(self._shared_sessions.values()), {}
            workspaces, self._shared_workspaces = self._shared_workspaces, []
        for conn in conns:
            conn.close()
        for session in sessions:
            session.close()
        for ws in workspaces:
            ws.remove()


def worker_tools(entries: list[dict[str, Any]], conns: Connections) -> dict[str, Tool]:
    """The MCP tools a tool worker runs, from ``job_tools``' entries (the listing made at job start),
    their servers kept in ``conns`` (the worker's: its ``status()``; closed when it shuts down)."""
    tools: dict[str, Tool] = {}
    for entry in entries:
        server = _server_of_data(entry["server"])

        def call(name: str, args: dict[str, Any], ctx: Any, _server: McpServer = server) -> Any:
            handle = ctx.sandbox
            conn = conns.get(_server, handle, getattr(ctx, "agent", ""))
            result = conn.call(name, args, handle.limits.wall_s)
            return result_value(result, max_text_chars=handle.limits.max_output_bytes)

        found, _ = to_tools(server.prefix, _listed(entry["tools"]), call, path_args=entry["path_args"])
        tools.update(found)
    return tools
