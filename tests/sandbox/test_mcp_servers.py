"""MCP stdio servers in both sandbox backends: the real servers work, gVisor is really gVisor, and the
mechanisms around a server (memory limit, cancellation at the deadline, progress, kill and restart, clean
teardown, one hung server holding no one else) hold under each.

The functional tests use the real third-party servers (``mcp-server-git`` from PyPI, the reference
filesystem server from npm, ``mcp-server-fetch`` from PyPI behind a network allow-list); the mechanism tests use ``tests/fixtures/mcp_probe_server.py``, a small
server written with the SDK whose tools allocate, report progress, or block.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest

from runtime.errors import ErrorCode, SandboxKilled, ToolFailed, WardenError
from runtime.mcptools import result_value
from runtime.sandbox.base import Limits
from runtime.sandbox.mcpproxy import SANDBOX_DIR
from runtime.sandbox.mcpserver import NPM_DIR, McpConnection, McpServer

from tests.unit.test_mcp import make_repo

from .conftest import require_backend

PROBE = Path(__file__).resolve().parents[1] / "fixtures" / "mcp_probe_server.py"
FS_INSTALLED = (NPM_DIR / "node_modules" / ".bin" / "mcp-server-filesystem").exists()
LIMITS = Limits(cpu_s=60, wall_s=30, memory_mb=128, max_pids=64, max_output_bytes=1 << 20, workspace_mb=64)


def _owned(path: Path, owner: Path) -> None:
    st = owner.stat()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chown(p, st.st_uid, st.st_gid)


@pytest.fixture
def session(backend_name, tmp_path):
    """An agent's session of the backend on a workspace holding a git repository and the probe server."""
    ws = tmp_path / "ws"
    ws.mkdir()
    s = require_backend(backend_name).open(ws, workspace_mb=64, key="agent")
    repo = ws / "repo"
    make_repo(repo)
    shutil.copy(PROBE, ws / "probe.py")
    _owned(repo, ws)  # as if the agent's own sandboxed calls had written them
    _owned(ws / "probe.py", ws)
    yield s
    s.close()


@pytest.fixture
def connect(session):
    opened: list[McpConnection] = []

    def open_(command: tuple[str, ...], *, on=None, limits: Limits = LIMITS, name: str = "probe",
              network: tuple[str, ...] = ()) -> McpConnection:
        if "mcp-server-filesystem" in command and not FS_INSTALLED:
            pytest.fail("the filesystem MCP server is not installed: run `make setup`")
        server = McpServer(name, name, command, backend=(on or session).backend, limits=limits, network=network,
                           allow_private_networks=bool(network))  # the test's page server is on loopback
        opened.append(McpConnection(server, on or session))
        return opened[-1]

    yield open_
    for c in opened:
        c.close()


PROBE_CMD = ("python", "/workspace/probe.py")


def call(conn: McpConnection, tool: str, args: dict | None = None, timeout_s: float = 30):
    return result_value(conn.call(tool, args or {}, timeout_s))


def who(conn: McpConnection, timeout_s: float = 30) -> dict:
    """The probe's ``whoami``: its counters of ``slow`` calls, fresh in a new server."""
    return json.loads(call(conn, "whoami", timeout_s=timeout_s))


def test_the_real_servers_work_in_the_backend(connect):
    git = connect(("mcp-server-git",), name="git")
    assert "first commit" in call(git, "git_log", {"repo_path": "/workspace/repo"})
    files = connect(("mcp-server-filesystem", "/workspace"), name="files")
    assert call(files, "read_text_file", {"path": "/workspace/repo/notes.txt"}) == {"content": "first line\n"}
    with pytest.raises(ToolFailed) as err:  # the server's own confinement, inside the sandbox's
        call(files, "read_text_file", {"path": "/etc/passwd"})
    assert err.value.code == ErrorCode.TOOL_FAILED


def _host_processes_running(word: str) -> list[int]:
    pids = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            if word.encode() in Path(f"/proc/{p}/cmdline").read_bytes():
                pids.append(int(p))
        except OSError:
            continue
    return pids


@pytest.mark.parametrize("backend_name", ["gvisor"], indirect=True)
def test_a_gvisor_server_runs_on_gvisor_s_kernel_not_the_host_s(connect, session):
    """The filesystem server, given the whole root, reads the kernel's version: gVisor's Sentry answers, not
    the host's kernel; and from outside, the server is a process of the runsc container, not of the host."""
    wide = connect(("mcp-server-filesystem", "/"), name="files")
    seen = call(wide, "read_text_file", {"path": "/proc/version"})["content"]
    assert seen != Path("/proc/version").read_text()
    assert seen.startswith("Linux version 4.4.0 #1 SMP Sun Jan 10 15:06:54 PST 2016")  # gVisor's emulated kernel
    listed = wide._launch.processes()  # runsc ps of the server's container
    assert [row.split()[-1] for row in listed] == ["node"], listed
    # Every host process of the server's sandbox (its cgroup holds them all) is runsc's binary: runsc, its gofer,
    # the Sentry and the Sentry's stubs in which the server's code runs; node is not a host process.
    programs = {_program(pid) for pid in wide._launch.cgroup.pids()} - {None}
    assert programs == {"runsc"}, programs


def _program(pid: int) -> str | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/exe")).name
    except OSError:  # gone meanwhile
        return None


def test_a_server_over_its_memory_limit_is_killed_and_restarted(connect):
    probe = connect(PROBE_CMD)
    assert call(probe, "grow", {"mb": 16}) == {"result": "holding 16 MiB"}
    with pytest.raises(SandboxKilled) as err:
        call(probe, "grow", {"mb": 256})  # past memory_mb (128)
    assert err.value.code == ErrorCode.SANDBOX_MEMORY, err.value
    assert who(probe)["slow"]["started"] == 0  # the next call: a new server
    assert (probe.status()["starts"], probe.status()["memory"]) == (2, 1)


def test_a_call_past_its_deadline_is_cancelled_and_progress_never_extends_it(connect):
    probe = connect(PROBE_CMD)
    who(probe)  # started (a start counts against the call's deadline)
    with pytest.raises(SandboxKilled) as err:
        call(probe, "slow", {"seconds": 60}, timeout_s=3)  # progress every 0.1 s, for a minute
    assert err.value.code == ErrorCode.SANDBOX_TIMEOUT and "still answers, kept" in err.value.reason
    progress = probe.status()["last_progress"]
    assert progress["tool"] == "slow" and progress["total"] == 600 and 0 < progress["progress"] < 600
    # The server got notifications/cancelled and stopped the call; it was not restarted.
    assert who(probe)["slow"] == {"started": 1, "finished": 0, "cancelled": 1}
    assert probe.status()["starts"] == 1 and probe.status()["cancelled"] == 1


def test_a_server_that_does_not_answer_after_the_cancel_is_killed_and_restarted(connect):
    probe = connect(PROBE_CMD)
    who(probe)
    first = probe._launch
    with pytest.raises(SandboxKilled) as err:
        call(probe, "stuck", {"seconds": 600}, timeout_s=3)
    assert err.value.code == ErrorCode.SANDBOX_TIMEOUT and "server killed" in err.value.reason
    assert who(probe)["slow"]["started"] == 0
    assert probe.status()["starts"] == 2 and probe._launch is not first
    _assert_gone(first)


def _assert_gone(launch) -> None:
    """Nothing of a server's sandbox is left: no process in its cgroup, no cgroup, no container, no bundle."""
    assert not any(d.exists() for d in launch.cgroup._dirs())
    if launch.backend == "gvisor":
        assert not launch.dir.exists()
        assert _host_processes_running(launch.id) == []


def test_closing_leaves_nothing_behind(connect):
    probe = connect(PROBE_CMD)
    who(probe)
    launch = probe._launch
    probe.close()
    _assert_gone(launch)


def _in_thread(fn) -> Future:
    fut: Future = Future()

    def run() -> None:
        try:
            fut.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            fut.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return fut


def _wait_for(path: Path, fut: Future) -> None:
    """Until the probe's stuck tool has written its marker (or the call has already ended)."""
    while not path.exists() and not fut.done():
        threading.Event().wait(0.05)


def test_a_hung_server_holds_no_other_agent(connect, session, backend_name, tmp_path):
    other_ws = tmp_path / "other"
    other_ws.mkdir()
    other = require_backend(backend_name).open(other_ws, workspace_mb=64, key="other")
    try:
        shutil.copy(PROBE, other_ws / "probe.py")
        _owned(other_ws / "probe.py", other_ws)
        mine, theirs = connect(PROBE_CMD), connect(PROBE_CMD, on=other)
        hung = _in_thread(lambda: call(mine, "stuck", {"seconds": 600}, timeout_s=120))
        _wait_for(session.workspace / "stuck.marker", hung)
        assert who(theirs)["slow"]["started"] == 0  # answered while the first agent's server hangs
        assert not hung.done()
        mine.close()  # ends the hung call now rather than at its deadline
        with pytest.raises(WardenError):
            hung.result(60)
    finally:
        other.close()


def test_a_hung_shared_server_holds_only_its_own_users_until_their_deadline(connect, session):
    shared = connect(PROBE_CMD)  # one connection, as every agent of a shared server has
    hung = _in_thread(lambda: call(shared, "stuck", {"seconds": 600}, timeout_s=60))
    _wait_for(session.workspace / "stuck.marker", hung)
    with pytest.raises(SandboxKilled) as err:  # another user of the same server: held until its own deadline
        call(shared, "whoami", timeout_s=2)
    assert err.value.code == ErrorCode.SANDBOX_TIMEOUT and "server killed" in err.value.reason
    with pytest.raises(WardenError) as err:  # the server was killed at that deadline: the hung call ends too
        hung.result(60)
    assert err.value.code == ErrorCode.WORKER_UNAVAILABLE
    assert who(shared)["slow"]["started"] == 0  # and the next call starts it again


def test_a_killed_worker_s_server_cgroups_are_removed_by_the_next_start(connect):
    """A worker killed with live servers cannot remove their (then empty) cgroups; the next server start in
    any worker removes those whose owner is gone, never a live worker's."""
    from runtime.sandbox import cgroup
    from runtime.sandbox.mcpgvisor import MCP_CGROUP

    gone = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=True).stdout.strip()
    left = cgroup.CallCgroup.create(memory_limit_bytes=64 << 20, pids_max=8, prefix=f"{MCP_CGROUP}-{gone}")
    mine = cgroup.CallCgroup.create(memory_limit_bytes=64 << 20, pids_max=8, prefix=cgroup.owned_prefix(MCP_CGROUP))
    assert left is not None and mine is not None
    try:
        who(connect(PROBE_CMD))
        assert not any(d.exists() for d in left._dirs())
        assert all(d.exists() for d in mine._dirs())
    finally:
        left.remove()
        mine.remove()


# --- a network allow-list: the real mcp-server-fetch behind the worker's egress proxy ---------------------------

FETCH = ("mcp-server-fetch", "--ignore-robots-txt", "--allow-private-ips")  # the proxy decides, not the server
FETCH_LIMITS = Limits(cpu_s=60, wall_s=60, memory_mb=256, max_pids=64, max_output_bytes=1 << 20, workspace_mb=64)


@pytest.fixture
def pages():
    from tests.unit.mcp_remote import page_server

    with page_server() as p:
        yield p


def _fetch(conn: McpConnection, url: str):
    return call(conn, "fetch", {"url": url, "raw": True}, timeout_s=60)


def test_a_server_reaches_its_allow_list_through_the_proxy_and_nothing_else(connect, session, pages):
    """Under gVisor as under bwrap: the allowed host:port is fetched through the forwarder and the worker's proxy;
    another port and a host not on the list are the proxy's 403, counted, and reach nothing."""
    from tests.unit.mcp_remote import PAGE

    fetch = connect(FETCH, name="fetch", limits=FETCH_LIMITS, network=(f"127.0.0.1:{pages.port}",))
    assert PAGE.decode() in _fetch(fetch, f"http://127.0.0.1:{pages.port}/page")
    for url, target in ((f"http://127.0.0.1:{pages.port + 1}/page", f"GET 127.0.0.1:{pages.port + 1}"),
                        ("https://example.com/", "CONNECT example.com:443")):
        with pytest.raises(ToolFailed) as err:
            _fetch(fetch, url)
        assert err.value.code == ErrorCode.TOOL_FAILED and "403" in err.value.reason, err.value.reason
        assert fetch.proxy is not None and fetch.proxy.refusals[-1] == (
            f"{target}: {target.split()[1]} is not on the server's network allow-list")
    assert (fetch.proxy.allowed, fetch.proxy.refused) == (1, 2) and pages.hits == ["/page"]
    # the socket is the server's uid's alone (the workspace owner's under gVisor); its directory stays the worker's
    assert os.stat(f"{fetch.proxy.directory}/proxy.sock").st_uid == (
        session._uid if session.backend == "bwrap" and session._uid is not None else session.workspace.stat().st_uid)
    assert os.stat(fetch.proxy.directory).st_uid == os.getuid()
    if session.backend == "gvisor":  # still no network of its own; the one host socket it may open is bound in
        argv = fetch._launch.argv
        assert "--network=none" in argv and "--host-uds=open" in argv
        spec = json.loads((fetch._launch.dir / "bundle" / "config.json").read_text())
        [egress] = [m for m in spec["mounts"] if m["source"] == fetch.proxy.directory]
        assert egress["destination"] == SANDBOX_DIR and "ro" in egress["options"]


def test_without_an_allow_list_a_server_has_no_route(connect, session, pages):
    fetch = connect(FETCH, name="fetch", limits=FETCH_LIMITS)
    with pytest.raises(ToolFailed) as err:
        _fetch(fetch, f"http://127.0.0.1:{pages.port}/page")
    assert err.value.code == ErrorCode.TOOL_FAILED and "ConnectError" in err.value.reason, err.value.reason
    assert fetch.proxy is None and pages.hits == []
    if session.backend == "gvisor":
        assert "--host-uds=open" not in fetch._launch.argv
