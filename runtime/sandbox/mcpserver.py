"""An MCP server run as a tool provider: its process inside a sandbox, spoken to with the ``mcp`` SDK.

    job file ``mcp_servers:`` entry -> McpServer (command, limits, credentials)
        -> sandboxed_argv(server, the agent's BwrapSession): bwrap ... -> the server's command
           (as root: bwrap -> setpriv to the session's uid -> prlimit -> env -C /workspace -> server)
        -> mcp.client.stdio.stdio_client(StdioServerParameters(that argv)) -> mcp.ClientSession

The SDK starts the *sandbox* as its child and speaks JSON-RPC over its stdin/stdout, so the
server process has what every sandboxed tool has (``bwrap.py``): new namespaces with no
network, a read-only ``/usr``, the agent's workspace at ``/workspace``, an empty
environment, rlimits, and an unprivileged uid when the worker runs as root. Besides the
system binds it sees, read-only, only the directories its program lives in (the Python
prefixes for a Python server, the project's ``mcp-servers/`` for an npm one). Its
credentials (``env_from``) are set in its environment only: Warden never puts them in a
tool's arguments or errors, and the server's stderr is discarded.

The server is untrusted like any tool: what it says about its tools (names, schemas,
annotations) is turned into Warden tools by ``runtime.mcptools``, where the policy decides;
nothing here decides anything. A server that hangs past a call's deadline or dies is closed
and started again on the next call. The sandbox is not started ``--as-pid-1`` (as a call's is):
bwrap's own init is the namespace's pid 1, and killing bwrap (the SDK does, on close) ends the
namespace and every process in it, the server included, whatever it does with its input.

Two variations (``McpConnection._streams``): a server with a ``network`` allow-list reaches
those hosts, and nothing else, through an egress proxy outside its sandbox (``mcpproxy``); a
server given by ``url`` is remote, outside any Warden sandbox, and is spoken to over
streamable HTTP pinned to its checked address (``mcphttp``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

from ..errors import ErrorCode, SandboxKilled, SandboxUnavailable, ToolFailed, WardenError
from . import mcpproxy
from .base import WORKSPACE, Limits, rlimit_args
from .bwrap import BwrapSession, _scratch_mounts
from . import cgroup
from .cgroup import CallCgroup
from .mcpgvisor import MCP_CGROUP

# The project-local directory `make setup` installs npm servers into (gitignored).
NPM_DIR = Path(__file__).resolve().parents[2] / "mcp-servers"
LIST_TIMEOUT_S = 30.0
# After a call's deadline (and the SDK's notifications/cancelled), how long the server has to answer a ping.
CANCEL_GRACE_S = 2.0
# The SDK's read timeout ends a call at its deadline; this much later the worker cancels it itself.
SDK_MARGIN_S = 0.5


@dataclass(frozen=True)
class McpServer:
    """One ``mcp_servers:`` entry, resolved: what to start and how to confine it."""

    name: str
    prefix: str
    command: tuple[str, ...] = ()
    url: str = ""
    backend: str = "bwrap"
    limits: Limits = field(default_factory=Limits)
    network: tuple[str, ...] = ()  # a stdio server's allow-list (mcpproxy); a URL server's destination is its URL
    env: tuple[tuple[str, str], ...] = ()  # credentials, already read from the driver's environment
    shared: bool = False
    headers: tuple[tuple[str, str], ...] = ()  # a URL server's credential headers, already resolved
    allow_private_networks: bool = False  # the URL or the allow-list may resolve to private addresses

    def __repr__(self) -> str:  # never the credentials' values
        return (f"McpServer({self.name!r}, prefix={self.prefix!r}, env={[k for k, _ in self.env]}, "
                f"headers={[k for k, _ in self.headers]})")


def program_dirs() -> list[str]:
    """The places server programs live, bound read-only: this Python's prefixes and the npm directory
    (and where its ``node_modules`` really is, if that is a link)."""
    seen: list[str] = []
    for p in (sys.prefix, sys.base_prefix, str(NPM_DIR), str(NPM_DIR / "node_modules")):
        for q in (p, os.path.realpath(p)):
            if (os.path.isdir(q) and not q.startswith("/usr/") and q not in seen
                    and not any(q.startswith(d + "/") for d in seen)):
                seen.append(q)
    return seen


def _program_binds(dirs: list[str]) -> list[str]:
    """``--ro-bind`` each directory, its parents made searchable (bwrap creates them 0700 as root)."""
    args: list[str] = []
    made: set[str] = set()
    for d in dirs:
        for parent in reversed(Path(d).parents[:-1]):
            if str(parent) not in made:
                made.add(str(parent))
                args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", d, d]
    return args


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


def server_env(server: McpServer) -> dict[str, str]:
    return {"PATH": f"{os.path.join(sys.prefix, 'bin')}:/usr/local/bin:/usr/bin:/bin", "HOME": WORKSPACE,
            "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
            # the workspace is the sandbox's own: git must not refuse it for its owner's uid
            "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "safe.directory", "GIT_CONFIG_VALUE_0": "*",
            **dict(server.env)}


def _egress_binds(egress_dir: str | None) -> list[str]:
    """The proxy's socket directory at ``mcpproxy.SANDBOX_DIR`` (its parent searchable: bwrap makes it 0700 as root)."""
    if egress_dir is None:
        return []
    return ["--perms", "0755", "--dir", os.path.dirname(mcpproxy.SANDBOX_DIR), "--ro-bind", egress_dir,
            mcpproxy.SANDBOX_DIR]


def sandboxed_argv(server: McpServer, session: BwrapSession, egress_dir: str | None = None) -> list[str]:
    """The command line that starts ``server`` in the bwrap sandbox of ``session`` (an agent's workspace).

    Not as root: ``prlimit -> bwrap --unshare-all -> server``, as the worker runs a call. As
    root, the sandbox uid switch moves inside: bwrap runs privileged, without a user namespace,
    so it can bind the server's program from wherever root installed it (a venv under a 0700
    home), and the command is ``setpriv`` (to the session's uid, every capability and the
    bounding set dropped, no new privileges) -> ``prlimit`` -> ``env -C /workspace`` -> server;
    bwrap keeps only CAP_SETUID, CAP_SETGID and CAP_SETPCAP for that first ``setpriv``. The
    kernel clears the parent-death signal (``--die-with-parent``) when the uid changes, so
    ``setpriv`` sets it again: the server is killed with its sandbox, even if it ignores the
    end of its input.

    A server with a ``network`` allow-list still has no network: ``egress_dir`` (its
    ``EgressProxy``'s socket directory) is bound in, and the server runs under the forwarder
    (``mcpproxy.FORWARDER``) with the proxy variables set, its only way out.
    """
    if server.backend != "bwrap":
        raise SandboxUnavailable(f"MCP server {server.name}: a bwrap command line for a {server.backend!r} server "
                                 "(make_launch starts each backend's)", code=ErrorCode.SANDBOX_UNAVAILABLE)
    if server.url or bool(server.network) != (egress_dir is not None):
        raise SandboxUnavailable(f"MCP server {server.name}: a URL server has no sandbox, and a network allow-list "
                                 "needs its egress proxy", code=ErrorCode.SANDBOX_UNAVAILABLE)
    limits, uid = server.limits, session._uid
    # V8 and CPython reserve address space far beyond what they touch: no RLIMIT_AS for a server.
    rlimits = [a for a in rlimit_args(limits, address_space=False)]
    # The scratch /tmp first: a program installed under /tmp (a checkout there) is bound on top of it, not hidden.
    mounts = ["--perms", "0755", "--dir", "/etc", *session._system_binds, "--proc", "/proc", "--dev", "/dev",
              *_scratch_mounts(limits), *_program_binds(program_dirs()), "--bind", str(session.workspace), WORKSPACE,
              *_egress_binds(egress_dir), "--remount-ro", "/", "--clearenv"]
    env = {**server_env(server), **(mcpproxy.proxy_env() if egress_dir else {})}
    for k, v in env.items():
        mounts += ["--setenv", k, v]
    command = resolve_command(server.command)
    if egress_dir:
        command = mcpproxy.wrapped_command(sys.executable, command)
    common = ["--die-with-parent", "--new-session", "--hostname", "sandbox"]
    if uid is None:
        return [session._prlimit, *rlimits, "--", session._bwrap, "--unshare-all", *common, "--cap-drop", "ALL",
                *mounts, "--chdir", WORKSPACE, "--", *command]
    return [session._bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup-try", *common, "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add",
            "CAP_SETGID", "--cap-add", "CAP_SETPCAP", *mounts, "--chdir", "/", "--",
            session._setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs", "--pdeathsig", "SIGKILL",  # the uid switch clears bwrap's
            "--", session._prlimit, *rlimits, "--",
            "/usr/bin/env", "-C", WORKSPACE, *command]


class BwrapLaunch:
    """One start of a server in bwrap: ``sandboxed_argv`` inside a memory, pids and CPU cgroup of its own.

    The cgroup bounds what RLIMIT_AS cannot for a server (V8 and CPython reserve far more address
    space than they touch): the resident memory of every process of the sandbox, its ``/tmp``
    included, at ``memory_mb``; an OOM kill is counted where the server cannot reach, so the worker
    names it (``SANDBOX_MEMORY``). The pids cgroup counts threads too: ``max_pids`` plus bwrap's two.
    """

    backend = "bwrap"

    def __init__(self, server: McpServer, session: BwrapSession, egress_dir: str | None = None) -> None:
        argv = sandboxed_argv(server, session, egress_dir)
        self.cgroup = CallCgroup.create(memory_limit_bytes=server.limits.memory_mb << 20,
                                        pids_max=server.limits.max_pids + 2, prefix=cgroup.owned_prefix(MCP_CGROUP))
        if self.cgroup is None:
            raise SandboxUnavailable(NO_CGROUP, code=ErrorCode.SANDBOX_UNAVAILABLE)
        self.argv = self.cgroup.join_argv(argv)
        self.oom = False  # set when the server has ended: its cgroup counted an OOM kill

    def oom_killed(self) -> bool:
        return self.cgroup.oom_kills() > 0

    def kill(self) -> None:
        self.cgroup.kill()

    def cleanup(self) -> None:
        self.cgroup.kill()
        self.cgroup.remove()


NO_CGROUP = ("no memory cgroup can be made here (the worker is not root, or cgroup v2 without memory and pids "
             "delegated): an MCP server's memory_mb could not be enforced, so it is not started")


def make_launch(server: McpServer, session: Any, egress_dir: str | None = None) -> Any:
    """How to start ``server`` on ``session``'s workspace, in the server's backend (``BwrapLaunch`` or
    ``mcpgvisor.GVisorLaunch``); SandboxUnavailable where that backend or its memory limit cannot be had."""
    cgroup.remove_orphans(MCP_CGROUP)  # what a killed worker's servers left behind
    if server.backend == "gvisor":
        from .base import require_binary
        from .gvisor import SANDBOX_OVERHEAD_MB
        from .mcpgvisor import GVisorLaunch

        if server.url or bool(server.network) != (egress_dir is not None):
            raise SandboxUnavailable(f"MCP server {server.name}: a URL server has no sandbox, and a network allow-list "
                                     "needs its egress proxy", code=ErrorCode.SANDBOX_UNAVAILABLE)
        runsc = getattr(session, "_runsc", None) or require_binary("runsc", "runsc", "gvisor")
        command, env = resolve_command(server.command), server_env(server)
        if egress_dir is not None:  # the same forwarder as under bwrap, on the Sentry's own loopback
            command, env = mcpproxy.wrapped_command(sys.executable, command), {**env, **mcpproxy.proxy_env()}
        return GVisorLaunch(runsc=runsc, setpriv=require_binary("setpriv", "util-linux", "gvisor"),
                            command=command, env=env, workspace=session.workspace, program_dirs=program_dirs(),
                            limits=server.limits, memory_overhead_mb=SANDBOX_OVERHEAD_MB, egress_dir=egress_dir)
    if not isinstance(session, BwrapSession):
        raise SandboxUnavailable(f"MCP server {server.name} runs under bwrap: it needs the agent's bwrap session",
                                 code=ErrorCode.SANDBOX_UNAVAILABLE)
    return BwrapLaunch(server, session, egress_dir)


def sandbox_uid(server: McpServer, session: Any) -> int | None:
    """The uid the server runs as, when the worker (root) picks it; None when the worker's own uid is the server's.

    Under bwrap it is the session's sandbox uid; under gVisor the workspace's owner (``mcpgvisor``)."""
    if server.backend == "gvisor":
        return os.stat(session.workspace).st_uid if os.geteuid() == 0 else None
    return getattr(session, "_uid", None)


class _TimedOut(Exception):
    def __init__(self, answered: bool) -> None:
        self.answered = answered


class McpConnection:
    """A live session with one server, sandboxed (stdio) or remote (``url``), on an event loop of its own thread.

    ``list_tools`` and ``call`` are synchronous (the tool worker's threads call them) and may run
    concurrently: each is one JSON-RPC request on the shared session, so a slow call holds only
    its caller. Only starting and stopping the server is serialised. A call's deadline
    (``timeout_s``, the server's start-up included) is absolute:

    - at the deadline the SDK sends ``notifications/cancelled`` for the request and the caller
      gets ``SANDBOX_TIMEOUT``; the server then has ``CANCEL_GRACE_S`` to answer a ``ping``. One
      that answers keeps running (it stopped, or at least still serves); one that does not is
      killed and started again on the next call. The caller's answer comes at most
      ``CANCEL_GRACE_S`` after its deadline.
    - progress notifications the server sends for a call are recorded (``last_progress``,
      ``status()``), never acted on: they do not extend the deadline.
    - a server that dies is ``WORKER_UNAVAILABLE``, or ``SANDBOX_MEMORY`` when its memory cgroup
      counted an OOM kill; either way the next call starts a new one.

    The two transports differ only in ``_streams``. A stdio server with a ``network`` allow-list
    gets its ``proxy`` on its first start, kept across restarts and closed with the connection.
    """

    def __init__(self, server: McpServer, session: Any = None) -> None:
        self.server = server
        self.session = session
        self.proxy: mcpproxy.EgressProxy | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"mcp-{server.name}", daemon=True)
        self._thread.start()
        self._session: Any = None
        self._launch: Any = None
        self._stop: asyncio.Event | None = None
        self._done: Any = None
        self._lock = threading.RLock()  # starting and stopping the server; calls run concurrently
        self.counts = {"starts": 0, "calls": 0, "timeouts": 0, "cancelled": 0, "killed": 0, "memory": 0,
                       "progress": 0}
        self.last_progress: dict[str, Any] | None = None

    @asynccontextmanager
    async def _streams(self) -> AsyncIterator[Any]:
        """The server's two message streams: its sandbox's stdio, or HTTP to its URL's checked address."""
        if self.server.url:
            from .mcphttp import http_streams

            async with http_streams(self.server.url, dict(self.server.headers),
                                    allow_private_networks=self.server.allow_private_networks,
                                    timeout_s=self.server.limits.wall_s,
                                    max_event_bytes=self.server.limits.max_output_bytes) as streams:
                yield streams
            return
        from mcp import StdioServerParameters
        from mcp.client.stdio import stdio_client

        if self.session is None:
            raise SandboxUnavailable(f"MCP server {self.server.name} runs in a sandbox session; none was given",
                                     code=ErrorCode.SANDBOX_UNAVAILABLE)
        launch = self._launch = make_launch(self.server, self.session, self._egress_dir())
        try:
            params = StdioServerParameters(command=launch.argv[0], args=launch.argv[1:], env={})
            with open(os.devnull, "w") as errlog:
                async with stdio_client(params, errlog=errlog) as streams:
                    yield streams
        finally:
            launch.oom = launch.oom or launch.oom_killed()  # read before the cgroup goes
            launch.cleanup()

    def _egress_dir(self) -> str | None:
        if not self.server.network:
            return None
        if self.proxy is None:
            allowed = [mcpproxy.parse_allowed(h) for h in self.server.network]
            self.proxy = mcpproxy.EgressProxy(self.server.name, allowed,
                                              allow_private_networks=self.server.allow_private_networks)
        return self.proxy.start(sandbox_uid(self.server, self.session))

    async def _serve(self, ready: "asyncio.Future[Any]") -> None:
        from mcp import ClientSession

        self._stop = asyncio.Event()
        try:
            async with self._streams() as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    ready.set_result(session)
                    await self._stop.wait()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller waiting on ready
            if not ready.done():
                ready.set_exception(exc)
            elif not isinstance(exc, asyncio.CancelledError):
                raise

    def _ensure(self, timeout_s: float) -> tuple[Any, Any]:
        with self._lock:
            if self._session is not None and not self._done.done():
                return self._session, self._launch
            self.reset()

            async def start() -> Any:
                ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                self._done = asyncio.ensure_future(self._serve(ready))
                return await asyncio.wait_for(ready, timeout_s)

            self.counts["starts"] += 1
            try:
                self._session = asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout_s + 1)
            except (TimeoutError, asyncio.TimeoutError):
                self.reset(kill=True)
                raise SandboxKilled(f"MCP server {self.server.name} did not start within {timeout_s:.0f} s",
                                    code=ErrorCode.SANDBOX_TIMEOUT) from None
            except WardenError:  # no sandbox or no memory cgroup for it, or a URL Warden refuses to connect to
                self.reset()
                raise
            except Exception as exc:
                self.reset()
                while isinstance(getattr(exc, "exceptions", None), tuple) and exc.exceptions:  # an ExceptionGroup of
                    exc = exc.exceptions[0]  # the SDK's task groups: its first cause says what went wrong
                raise ToolFailed(f"MCP server {self.server.name} failed to start: {type(exc).__name__}: {exc}"[:500],
                                 code=ErrorCode.WORKER_UNAVAILABLE) from None
            return self._session, self._launch

    async def _bounded(self, make: Any, session: Any, timeout_s: float) -> Any:
        """``make(session, timeout_s)`` (which gives the SDK the read timeout), ended at the deadline:
        the SDK then sends ``notifications/cancelled``, and the server gets ``CANCEL_GRACE_S`` to answer a ping."""
        from mcp import MCPError
        from mcp.types import REQUEST_TIMEOUT

        try:
            return await asyncio.wait_for(make(session, timeout_s), timeout_s + SDK_MARGIN_S)
        except MCPError as exc:
            if exc.code != REQUEST_TIMEOUT:
                raise
        except asyncio.TimeoutError:  # the backstop: cancelling the request also sends notifications/cancelled
            pass
        try:
            await asyncio.wait_for(session.send_ping(), CANCEL_GRACE_S)
        except Exception:  # noqa: BLE001 - no answer, an error or a closed connection: not served any more
            raise _TimedOut(answered=False) from None
        raise _TimedOut(answered=True)

    def _run(self, what: str, make: Any, timeout_s: float) -> Any:
        from mcp import MCPError
        from mcp.types import CONNECTION_CLOSED

        deadline = time.monotonic() + timeout_s
        session, launch = self._ensure(timeout_s)
        left = max(deadline - time.monotonic(), 0.001)
        self.counts["calls"] += 1
        fut = asyncio.run_coroutine_threadsafe(self._bounded(make, session, left), self._loop)
        try:
            return fut.result(left + SDK_MARGIN_S + CANCEL_GRACE_S + 1)
        except _TimedOut as late:
            self.counts["timeouts"] += 1
            if late.answered:
                self.counts["cancelled"] += 1
                then = "cancelled; the server still answers, kept"
            else:
                self.counts["killed"] += 1
                self.reset(launch, kill=True)
                then = (f"cancelled; no answer within {CANCEL_GRACE_S:g} s: server killed, restarted on the next "
                        "call")
            raise SandboxKilled(f"MCP server {self.server.name}: {what} took over {timeout_s:g} s; {then}",
                                code=ErrorCode.SANDBOX_TIMEOUT) from None
        except (TimeoutError, concurrent.futures.TimeoutError):  # the loop itself did not answer
            fut.cancel()
            self.counts["killed"] += 1
            self.reset(launch, kill=True)
            raise SandboxKilled(f"MCP server {self.server.name}: {what} took over {timeout_s:g} s; server killed, "
                                "restarted on the next call", code=ErrorCode.SANDBOX_TIMEOUT) from None
        except Exception as exc:
            if isinstance(exc, MCPError) and exc.code != CONNECTION_CLOSED:  # the server answered: it is alive
                raise ToolFailed(f"{what}: {exc}"[:500], code=ErrorCode.TOOL_FAILED) from None
            self.reset(launch, kill=True)
            if launch is not None and (launch.oom or launch.oom_killed()):
                self.counts["memory"] += 1
                raise SandboxKilled(f"MCP server {self.server.name}: {what}: memory limit {self.server.limits.memory_mb}"
                                    " MiB breached, server killed; restarted on the next call",
                                    code=ErrorCode.SANDBOX_MEMORY) from None
            raise ToolFailed(f"MCP server {self.server.name}: {what} failed ({type(exc).__name__}); "
                             "restarted on the next call", code=ErrorCode.WORKER_UNAVAILABLE) from None

    def list_tools(self, timeout_s: float = LIST_TIMEOUT_S) -> list[Any]:
        async def listing(session: Any, timeout_s: float) -> list[Any]:
            from mcp.types import PaginatedRequestParams

            tools, cursor = [], None
            while True:
                page = await session.list_tools(params=PaginatedRequestParams(cursor=cursor) if cursor else None)
                tools += page.tools
                cursor = page.next_cursor
                if not cursor:
                    return tools

        return self._run("tools/list", listing, timeout_s)

    def call(self, tool: str, arguments: Mapping[str, Any], timeout_s: float) -> Any:
        async def progress(done: float, total: float | None, message: str | None) -> None:
            self.counts["progress"] += 1
            self.last_progress = {"tool": tool, "progress": done, "total": total, "message": (message or "")[:200],
                                  "at": time.time()}

        return self._run(f"tools/call {tool}", lambda s, t: s.call_tool(tool, dict(arguments), read_timeout_seconds=t,
                                                                         progress_callback=progress), timeout_s)

    def status(self) -> dict[str, Any]:
        """For operators: whether the server runs, how often it started, timed out, was killed, and its last progress."""
        running = self._session is not None and self._done is not None and not self._done.done()
        return {"server": self.server.name, "backend": self.server.backend, "running": running, **self.counts,
                "last_progress": self.last_progress}

    def reset(self, launch: Any = None, *, kill: bool = False) -> None:
        """Close the session (the SDK ends the sandbox's process; ``kill``: its processes are killed first);
        the next call starts a new one. With ``launch``, only if that start is still the current one."""
        with self._lock:
            if launch is not None and launch is not self._launch:
                return  # another caller already restarted it
            if kill and self._launch is not None:
                self._launch.kill()
            self._session = None
            stop, done = self._stop, self._done
            if stop is not None:
                self._loop.call_soon_threadsafe(stop.set)
            if done is not None:
                async def wait() -> None:
                    try:
                        await asyncio.wait_for(asyncio.shield(done), 10)
                    except BaseException:  # noqa: BLE001 - closing: cancel what did not end
                        done.cancel()
                try:
                    asyncio.run_coroutine_threadsafe(wait(), self._loop).result(15)
                except Exception:  # noqa: BLE001 - the loop keeps running; the process dies with its parent thread
                    pass
            self._stop = self._done = None

    def close(self) -> None:
        """Kill the server (it is disposable: its state is its workspace's) and end the connection's thread."""
        self.reset(kill=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if self.proxy is not None:
            self.proxy.close()
