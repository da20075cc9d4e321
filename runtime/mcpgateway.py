"""Warden as a governed MCP gateway: ``warden mcp serve JOB.yaml --agent NAME``.

The job's control plane starts as ``warden run`` starts it (tool workers, readers, supervisor
shards, the audit log, the operator API), but agent NAME's class does not run: this process
holds NAME's token and request key instead and serves, over MCP (stdio or streamable HTTP),
the tools NAME's policy names, with the JSON Schemas of their specs. Every ``tools/call`` is
sealed here as NAME's request and sent to NAME's supervisor shard, so it is decided,
quota'd, flow-checked, parked for approval and audited exactly as if the agent had called. The
MCP client never sees the token or the key; it gets the value (handles stay handles: pass them
back as arguments) or a tool error that carries the Warden error code and nothing of the
policy's reasons.

``Gateway`` is the transport-free core: a tool listing and a ``call(tool, args)`` function
(the supervisor's, or ``PolicyHarness``'s in the tests) behind an ``mcp`` SDK lowlevel server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import secrets
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

import mcp_types as types
from mcp.server.lowlevel import Server

from .errors import ConfigError, ErrorCode, InternalError, WardenError
from .tool import Tool

__all__ = ["Gateway", "GATEWAY_FILE", "error_result", "mcp_tools", "serve_job", "value_result"]

Call = Callable[[str, dict[str, Any]], Awaitable[Any]]
GATEWAY_FILE = "mcp-gateway.json"  # in the run directory, 0600: the HTTP endpoint and its bearer token
SERVER_NAME = "warden"


def mcp_tools(tools: Iterable[Tool]) -> list[types.Tool]:
    """The MCP tool listing of ``tools``: name, description and input schema from each tool's spec,
    and the effect as hints (``read`` read-only, ``delete`` destructive)."""
    out = []
    for t in sorted(tools, key=lambda t: t.name):
        fn = t.schema.get("function", {})
        schema = dict(fn.get("parameters") or {"type": "object", "properties": {}})
        out.append(types.Tool(
            name=t.name, description=fn.get("description") or t.spec.description or None, input_schema=schema,
            annotations=types.ToolAnnotations(read_only_hint=t.spec.effect == "read",
                                              destructive_hint=t.spec.effect == "delete")))
    return out


def value_result(value: Any) -> types.CallToolResult:
    """A tool's value as an MCP result: its JSON as text and, for a JSON object, as structured content.
    Handles are JSON objects (``{"$handle": "h_..."}``) the client passes back as arguments."""
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    structured = value if isinstance(value, dict) else None
    return types.CallToolResult(content=[types.TextContent(text=text)], structured_content=structured)


def error_result(exc: BaseException) -> types.CallToolResult:
    """A refusal or failure as an MCP tool error: the code and the tool, as an agent is told them
    (``WardenError.to_wire``: a tool's own message only for the codes that carry one, never a
    policy's reason); anything else is INTERNAL."""
    err = exc if isinstance(exc, WardenError) else InternalError("gateway error")
    wire = err.to_wire()
    text = f"{wire['code']}" + (f" (tool {wire['tool']})" if wire.get("tool") else "")
    if wire.get("retry_after_s") is not None:
        text += f"; retry after {wire['retry_after_s']:g}s"
    if wire.get("detail") and wire["detail"] != wire["code"]:
        text += f": {wire['detail']}"
    return types.CallToolResult(content=[types.TextContent(text=text)], structured_content={"error": wire},
                                is_error=True)


class Gateway:
    """One agent's policy as an MCP server: ``tools`` listed, every call through ``call``."""

    def __init__(self, agent: str, tools: Iterable[Tool], call: Call) -> None:
        self.agent = agent
        self.tools = mcp_tools(tools)
        self._schemas = {t.name: t.input_schema for t in self.tools}
        self._call = call

    async def call_tool(self, name: str, arguments: dict[str, Any] | None) -> types.CallToolResult:
        """Every call goes to the supervisor, a tool not listed too (it refuses it, on record)."""
        try:
            return value_result(await self._call(name, dict(arguments or {})))
        except Exception as exc:
            return error_result(exc)

    def server(self) -> Server[Any]:
        async def list_tools(_ctx: Any, _params: Any) -> types.ListToolsResult:
            return types.ListToolsResult(tools=list(self.tools))

        async def call_tool(_ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
            return await self.call_tool(params.name, params.arguments)

        return Server(SERVER_NAME, instructions=(
            f"Tools of Warden agent {self.agent!r}: every call is decided and audited by Warden under that "
            "agent's policy. A refused call is a tool error whose text starts with its Warden error code. A "
            'result may hold handles ({"$handle": "h_..."}): pass them back as arguments to use the data.'),
            get_tool_input_schema=self._schemas.get, on_list_tools=list_tools, on_call_tool=call_tool)


# ------------------------------------------------------------------------------ HTTP


class BearerAuth:
    """ASGI middleware: an HTTP request without ``Authorization: Bearer <token>`` gets 401."""

    def __init__(self, app: Any, token: str) -> None:
        self.app, self._expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"text/plain"), (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": b"401: a bearer token is required (see the run "
                            b"directory's " + GATEWAY_FILE.encode() + b")\n"})
                return
        await self.app(scope, receive, send)


def write_gateway_file(run_dir: Path, **info: Any) -> Path:
    path = run_dir / GATEWAY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    return path


async def serve_http(server: Server[Any], *, token: str, host: str, port: int, stop: asyncio.Event,
                     ready: Callable[[str], None]) -> None:
    """Serve ``server`` at ``http://host:port/mcp`` behind the bearer token until ``stop`` is set."""
    import uvicorn

    app = BearerAuth(server.streamable_http_app(host=host), token)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]

    class _Server(uvicorn.Server):
        def capture_signals(self) -> Any:  # the gateway handles SIGINT/SIGTERM itself, then tears down the job
            import contextlib

            return contextlib.nullcontext()

    http = _Server(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False,
                                  timeout_graceful_shutdown=5))
    task = asyncio.ensure_future(http.serve(sockets=[sock]))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while not http.started and not task.done():
            await asyncio.sleep(0.05)  # uvicorn sets a flag, it has no event to await
        if http.started:
            ready(f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{bound}/mcp")
        await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:  # stopped, or cancelled (the agent was quarantined): close the server either way
        http.should_exit = True
        stopped.cancel()
        await asyncio.gather(task, return_exceptions=True)
        sock.close()
    task.result()  # a server that failed to start says why


# ------------------------------------------------------------------------------ the job


async def _serve_until_stopped(gateway: Gateway, *, transport: str, host: str, port: int, run_dir: Path,
                               stdio: Any, stop: asyncio.Event, progress: Callable[[str], None]) -> dict[str, Any]:
    server = gateway.server()
    if transport == "http":
        token = secrets.token_urlsafe(32)
        path = run_dir / GATEWAY_FILE

        def ready(url: str) -> None:
            write_gateway_file(run_dir, url=url, token=token, agent=gateway.agent)
            progress(f"MCP gateway for agent {gateway.agent!r}: {url} (streamable HTTP); bearer token in {path} "
                     "(send Authorization: Bearer <token>); stop with Ctrl-C or SIGTERM")

        await serve_http(server, token=token, host=host, port=port, stop=stop, ready=ready)
        return {"transport": "http", "stopped": "signal"}
    read, write = stdio
    progress(f"MCP gateway for agent {gateway.agent!r} on stdio; it stops when the client closes, or on SIGTERM")
    run = asyncio.ensure_future(server.run(read, write, server.create_initialization_options()))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([run, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:  # stopped, or cancelled (the agent was quarantined)
        for f in (run, stopped):
            f.cancel()
        await asyncio.gather(run, stopped, return_exceptions=True)
    return {"transport": "stdio", "stopped": "signal" if stop.is_set() else "client closed"}


def serve_job(path: str | Path, *, agent: str, transport: str = "stdio", host: str = "127.0.0.1", port: int = 0,
              address: str | None = None, runs_dir: str | Path | None = None,
              progress: Callable[[str], None] = lambda _m: None) -> Any:
    """Start the job's control plane and serve agent ``agent``'s tools over MCP until the client goes
    (stdio) or SIGINT/SIGTERM; then tear the job down as ``warden run`` does (audit log closed and
    verified). Returns the ``JobResult``."""
    if transport not in ("stdio", "http"):
        raise ConfigError(f"unknown transport {transport!r} (stdio or http)", code=ErrorCode.JOB_INVALID)
    if transport == "stdio":
        return asyncio.run(_stdio_main(path, agent=agent, address=address, runs_dir=runs_dir, progress=progress))
    return asyncio.run(_start_async(path, agent=agent, address=address, runs_dir=runs_dir, progress=progress,
                                    transport="http", host=host, port=port, stdio=None))


async def _stdio_main(path: str | Path, *, agent: str, address: str | None, runs_dir: str | Path | None,
                      progress: Callable[[str], None]) -> Any:
    # Claim stdin/stdout first: whatever Ray and the job print while starting goes to stderr, not the wire.
    from mcp.server.stdio import stdio_server

    async with stdio_server() as streams:
        return await _start_async(path, agent=agent, address=address, runs_dir=runs_dir, progress=progress,
                                  transport="stdio", host="", port=0, stdio=streams)


def _prepare(path: str | Path, *, agent: str, address: str | None) -> Any:
    from .jobcheck import check_job
    from .job import LOCAL_ADDRESS, load_job

    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    address = address or os.environ.get("RAY_ADDRESS")
    problems = check_job(path, local=not address or address == LOCAL_ADDRESS)
    if problems:
        raise ConfigError(f"{path}: {len(problems)} problem(s)\n" + "\n".join(problems), code=ErrorCode.JOB_INVALID)
    job = load_job(path)
    if agent not in job.policies:
        raise ConfigError(f"{path}: no agent {agent!r} (agents: {sorted(job.policies)})", code=ErrorCode.JOB_INVALID)
    return job, address


async def _start_async(path: str | Path, *, agent: str, address: str | None, runs_dir: str | Path | None,
                       progress: Callable[[str], None], transport: str, host: str, port: int, stdio: Any) -> Any:
    from .job import LOCAL_ADDRESS, ensure_ray, run_loaded

    job, address = _prepare(path, agent=agent, address=address)
    progress("connecting to Ray at " + address if address and address != LOCAL_ADDRESS
             else "starting a private local Ray (--address or RAY_ADDRESS to use a cluster)")
    ensure_ray(address, job.spec.placement)
    # SIGINT/SIGTERM stop the serving, once; the teardown that follows (the audit log closed and
    # verified) is not interrupted by a second one. Installed after Ray's driver set its own.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        tools = [job.tools[t] for t in sorted(job.policies[agent].tools)]

        async def gateway(call: Call, run_dir: Path) -> dict[str, Any]:
            return await _serve_until_stopped(Gateway(agent, tools, call), transport=transport, host=host,
                                              port=port, run_dir=run_dir, stdio=stdio, stop=stop, progress=progress)

        result = await run_loaded(job, runs_dir=runs_dir, progress=progress, gateway=(agent, gateway))
        progress(f"gateway stopped; audit log {result.audit_log}: "
                 + ("chain verified" if result.audit_ok else f"CHAIN BROKEN: {result.audit_problem}"))
        return result
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
