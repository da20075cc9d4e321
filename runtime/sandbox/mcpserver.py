"""An MCP server run as a tool provider: its process inside a sandbox, spoken to with the ``mcp`` SDK.

    job file ``mcp_servers:`` entry -> McpServer (command, limits, binds, credentials)
        -> sandboxed_argv(): setpriv -> prlimit -> bwrap --unshare-all ... -> the server's command
        -> mcp.client.stdio.stdio_client(StdioServerParameters(that argv)) -> mcp.ClientSession

The SDK starts the *sandbox* as its child and speaks JSON-RPC over its stdin/stdout, so the
server process has what every sandboxed tool has (``bwrap.py``): new namespaces with no
network, a read-only ``/usr``, the agent's workspace at ``/workspace``, an empty
environment, rlimits, and an unprivileged uid when the worker runs as root. Besides the
system binds it sees, read-only, only the directories its program lives in (the Python
prefixes for a Python server, the project's ``mcp-servers/`` for an npm one). Its
credentials (``env_from``) are set in its environment only: they are never part of a tool's
arguments, results or errors.

The server is untrusted like any tool: what it says about its tools (names, schemas,
annotations) is turned into Warden tools by ``runtime.mcptools``, where the policy decides;
nothing here decides anything. A server that hangs past a call's deadline or dies is closed
(the SDK kills the sandbox's process group; bwrap's ``--die-with-parent`` takes the rest)
and started again on the next call.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import ErrorCode, SandboxKilled, SandboxUnavailable, ToolFailed
from .base import Limits, require_binary
from .bwrap import UID_BASE, UID_SPAN, BwrapSession, _ro_system_binds

# The project-local directory `make setup` installs npm servers into (gitignored).
NPM_DIR = Path(__file__).resolve().parents[2] / "mcp-servers"
LIST_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class McpServer:
    """One ``mcp_servers:`` entry, resolved: what to start and how to confine it."""

    name: str
    prefix: str
    command: tuple[str, ...] = ()
    url: str = ""
    backend: str = "bwrap"
    limits: Limits = field(default_factory=Limits)
    network: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # credentials, already read from the driver's environment
    shared: bool = False

    def __repr__(self) -> str:  # never the credentials' values
        return f"McpServer({self.name!r}, prefix={self.prefix!r}, env={[k for k, _ in self.env]})"


def program_binds() -> list[str]:
    """Read-only binds of the places server programs live: this Python's prefixes and the npm directory."""
    seen: list[str] = []
    for p in (sys.prefix, sys.base_prefix, str(NPM_DIR)):
        real = os.path.realpath(p)
        if os.path.isdir(real) and not real.startswith("/usr/") and real not in seen:
            seen.append(real)
        if p != real and os.path.isdir(p) and p not in seen:
            seen.append(p)
    args: list[str] = []
    for p in seen:
        args += ["--ro-bind", p, p]
    return args


def _traversable(path: str) -> bool:
    """Whether a uid other than the owner's can reach ``path`` (every parent searchable by others)."""
    p = Path(path)
    return all(os.stat(d).st_mode & 0o001 for d in [p, *p.parents])


def resolve_command(command: tuple[str, ...]) -> list[str]:
    """The command with its program found on the host: this Python's ``bin`` first (a pip-installed
    server), then the npm directory's ``.bin``, then ``PATH``."""
    from shutil import which

    prog = command[0]
    if "/" not in prog:
        path = os.pathsep.join([os.path.join(sys.prefix, "bin"), str(NPM_DIR / "node_modules" / ".bin"),
                                os.environ.get("PATH", "")])
        found = which(prog, path=path)
        if found is None:
            raise SandboxUnavailable(f"MCP server program {prog!r} not found (is `make setup` done?)",
                                     code=ErrorCode.SANDBOX_UNAVAILABLE)
        prog = found
    return [prog, *command[1:]]


def sandboxed_argv(server: McpServer, workspace: Path) -> list[str]:
    """The command line that starts ``server`` inside a bwrap sandbox on ``workspace``."""
    if server.backend != "bwrap":
        raise SandboxUnavailable(f"MCP server {server.name}: backend {server.backend!r} is not supported for "
                                 "stdio servers yet (bwrap only)", code=ErrorCode.SANDBOX_UNAVAILABLE)
    if server.network:
        raise SandboxUnavailable(f"MCP server {server.name}: a network allow-list is not supported yet",
                                 code=ErrorCode.SANDBOX_UNAVAILABLE)
    bwrap = require_binary("bwrap", "bubblewrap", "bwrap")
    prlimit = require_binary("prlimit", "util-linux", "bwrap")
    uid = None
    binds = program_binds()
    # As the worker does: an unprivileged uid of the workspace's own, if it can reach the program.
    if os.geteuid() == 0 and all(_traversable(p) for p in binds[1::3]):
        import zlib

        uid = UID_BASE + zlib.crc32(f"{workspace}|mcp:{server.name}".encode()) % UID_SPAN
        for root, dirs, files in os.walk(workspace):
            for n in [root, *(os.path.join(root, d) for d in dirs), *(os.path.join(root, f) for f in files)]:
                os.lchown(n, uid, uid)
    setpriv = require_binary("setpriv", "util-linux", "bwrap") if uid is not None else "setpriv"
    session = BwrapSession(workspace, uid=uid, bwrap=bwrap, prlimit=prlimit, setpriv=setpriv,
                           system_binds=[*_ro_system_binds(), *binds])
    # V8 and CPython reserve address space far beyond what they touch: no RLIMIT_AS for a server.
    limits = server.limits
    env = {"PATH": f"{os.path.join(sys.prefix, 'bin')}:/usr/local/bin:/usr/bin:/bin", "HOME": "/workspace",
           "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
           # the workspace is the sandbox's own: git must not refuse it for its owner's uid
           "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "safe.directory", "GIT_CONFIG_VALUE_0": "*",
           **dict(server.env)}
    argv = session._argv(resolve_command(server.command), limits, env, None)
    return [a for a in argv if not a.startswith("--as=")]


class McpConnection:
    """A live session with one sandboxed server, on an event loop of its own thread.

    ``list_tools`` and ``call`` are synchronous (the tool worker's threads call them); each
    waits at most its deadline, and a session that failed or overran is closed, so the next
    call starts the server again.
    """

    def __init__(self, server: McpServer, workspace: Path) -> None:
        self.server = server
        self.workspace = workspace
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"mcp-{server.name}", daemon=True)
        self._thread.start()
        self._session: Any = None
        self._stop: asyncio.Event | None = None
        self._done: Any = None
        self._lock = threading.Lock()

    async def _serve(self, ready: "asyncio.Future[Any]") -> None:
        from mcp import ClientSession, StdioServerParameters
        from mcp.client.stdio import stdio_client

        argv = sandboxed_argv(self.server, self.workspace)
        params = StdioServerParameters(command=argv[0], args=argv[1:], env={})
        self._stop = asyncio.Event()
        with open(os.devnull, "w") as errlog:
            try:
                async with stdio_client(params, errlog=errlog) as (read, write):
                    async with ClientSession(read, write) as session:
                        await session.initialize()
                        ready.set_result(session)
                        await self._stop.wait()
            except BaseException as exc:  # noqa: BLE001 - reported to the caller waiting on ready
                if not ready.done():
                    ready.set_exception(exc)
                elif not isinstance(exc, asyncio.CancelledError):
                    raise

    def _ensure(self, timeout_s: float) -> Any:
        if self._session is not None and not self._done.done():
            return self._session
        self._session = None

        async def start() -> Any:
            ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._done = asyncio.ensure_future(self._serve(ready))
            return await asyncio.wait_for(ready, timeout_s)

        try:
            self._session = asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout_s + 1)
        except (TimeoutError, asyncio.TimeoutError):
            self.reset()
            raise SandboxKilled(f"MCP server {self.server.name} did not start within {timeout_s:.0f} s",
                                code=ErrorCode.SANDBOX_TIMEOUT) from None
        except (SandboxUnavailable, SandboxKilled):
            self.reset()
            raise
        except Exception as exc:
            self.reset()
            raise ToolFailed(f"MCP server {self.server.name} failed to start: {type(exc).__name__}: {exc}"[:500],
                             code=ErrorCode.WORKER_UNAVAILABLE) from None
        return self._session

    def _run(self, what: str, make: Any, timeout_s: float) -> Any:
        with self._lock:
            session = self._ensure(timeout_s)
            fut = asyncio.run_coroutine_threadsafe(asyncio.wait_for(make(session), timeout_s), self._loop)
            try:
                return fut.result(timeout_s + 1)
            except (TimeoutError, asyncio.TimeoutError):
                fut.cancel()
                self.reset()
                raise SandboxKilled(f"MCP server {self.server.name}: {what} took over {timeout_s:g} s; server "
                                    "stopped, restarted on the next call", code=ErrorCode.SANDBOX_TIMEOUT) from None
            except Exception as exc:
                from mcp import MCPError

                if isinstance(exc, MCPError):  # the server answered with a protocol error: it is alive
                    raise ToolFailed(f"{what}: {exc}"[:500], code=ErrorCode.TOOL_FAILED) from None
                self.reset()
                raise ToolFailed(f"MCP server {self.server.name}: {what} failed ({type(exc).__name__}); "
                                 "restarted on the next call", code=ErrorCode.WORKER_UNAVAILABLE) from None

    def list_tools(self, timeout_s: float = LIST_TIMEOUT_S) -> list[Any]:
        async def listing(session: Any) -> list[Any]:
            tools, cursor = [], None
            while True:
                from mcp.types import PaginatedRequestParams

                page = await session.list_tools(params=PaginatedRequestParams(cursor=cursor) if cursor else None)
                tools += page.tools
                cursor = page.next_cursor
                if not cursor:
                    return tools

        return self._run("tools/list", listing, timeout_s)

    def call(self, tool: str, arguments: Mapping[str, Any], timeout_s: float) -> Any:
        return self._run(f"tools/call {tool}",
                         lambda s: s.call_tool(tool, dict(arguments), read_timeout_seconds=timeout_s), timeout_s)

    def reset(self) -> None:
        """Close the session (the SDK ends the sandbox's process); the next call starts a new one."""
        self._session = None
        stop, done = self._stop, self._done
        if stop is not None:
            self._loop.call_soon_threadsafe(stop.set)
        if done is not None:
            async def wait() -> None:
                try:
                    await asyncio.wait_for(asyncio.shield(done), 5)
                except BaseException:  # noqa: BLE001 - closing: cancel what did not end
                    done.cancel()
            try:
                asyncio.run_coroutine_threadsafe(wait(), self._loop).result(10)
            except Exception:  # noqa: BLE001 - the loop keeps running; the process dies with bwrap's parent
                pass
        self._stop = self._done = None

    def close(self) -> None:
        self.reset()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
