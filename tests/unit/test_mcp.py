"""MCP servers as tool providers: real servers, started in a bwrap sandbox, spoken to with the ``mcp`` SDK.

``mcp-server-git`` (PyPI) runs on a real repository in a workspace, and the reference
filesystem server (npm, installed by ``make setup`` into ``mcp-servers/``) is confined to it.
No fakes: what is tested is the listing those servers really give, through the sandbox.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mcp.types import CallToolResult, ImageContent, TextContent, ToolAnnotations

from runtime.errors import ErrorCode, SandboxKilled, ToolFailed
from runtime.mcptools import effect_of, result_value, to_tools
from runtime.sandbox.bwrap import BwrapBackend, BwrapSession
from runtime.sandbox.mcpserver import NPM_DIR, McpConnection, McpServer, sandboxed_argv

GIT = McpServer("git", "git", ("mcp-server-git", "--repository", "/workspace/repo"))
FS = McpServer("files", "fs", ("mcp-server-filesystem", "/workspace"))
FS_INSTALLED = (NPM_DIR / "node_modules" / ".bin" / "mcp-server-filesystem").exists()


def make_repo(repo: Path) -> None:
    """A git repository at ``repo`` with one commit of ``notes.txt`` ("first line")."""
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "notes.txt").write_text("first line\n")
    subprocess.run([*git, "add", "notes.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "first commit"], check=True)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    make_repo(tmp_path / "repo")
    return tmp_path


@pytest.fixture
def session(workspace: Path) -> BwrapSession:
    """The agent's bwrap session on the workspace, as the tool worker's pool opens it (its own uid as root)."""
    s = BwrapBackend().open(workspace, workspace_mb=64, key="agent")
    if s._uid is not None:  # what the agent's own sandboxed calls would have written is the agent's
        subprocess.run(["chown", "-R", f"{s._uid}:{s._uid}", str(workspace)], check=True)
    return s


@pytest.fixture
def connect(session: BwrapSession):
    opened: list[McpConnection] = []

    def open_(server: McpServer) -> McpConnection:
        if server is FS and not FS_INSTALLED:
            pytest.fail("the filesystem MCP server is not installed: run `make setup`")
        opened.append(McpConnection(server, session))
        return opened[-1]

    yield open_
    for c in opened:
        c.close()


def test_annotations_map_conservatively():
    assert effect_of(None) == "delete"  # no claim: MCP's default for a tool is destructive
    assert effect_of(ToolAnnotations(read_only_hint=True)) == "read"
    assert effect_of(ToolAnnotations(read_only_hint=True, destructive_hint=True)) == "read"
    assert effect_of(ToolAnnotations(read_only_hint=False)) == "delete"
    assert effect_of(ToolAnnotations(destructive_hint=False)) == "write"
    assert effect_of(ToolAnnotations(destructive_hint=True, open_world_hint=True)) == "delete"


def test_the_server_runs_in_a_sandbox_without_network(session: BwrapSession, workspace: Path):
    argv = sandboxed_argv(GIT, session)
    assert ("--unshare-all" in argv or "--unshare-net" in argv) and "--share-net" not in argv
    assert argv[argv.index("--bind") + 1:argv.index("--bind") + 3] == [str(workspace), "/workspace"]
    if session._uid is not None:  # as root: the server runs as the agent's sandbox uid, with no capability
        assert f"--reuid={session._uid}" in argv and "--bounding-set=-all" in argv and "--no-new-privs" in argv
    assert argv[-3].endswith("/mcp-server-git") and argv[-2:] == ["--repository", "/workspace/repo"]
    assert "--clearenv" in argv


def test_git_server_tools_become_warden_tools(connect):
    conn = connect(GIT)
    tools, skipped = to_tools("git", conn.list_tools(), lambda name, args, ctx: result_value(conn.call(name, args, 20)))
    assert skipped == {}
    assert tools["git.git_status"].spec.effect == "read"
    assert tools["git.git_log"].spec.effect == "read"
    assert tools["git.git_commit"].spec.effect == "write"
    assert tools["git.git_reset"].spec.effect == "delete"
    assert all(t.spec.output.integrity == "untrusted" for t in tools.values())
    assert tools["git.git_status"].spec.params["repo_path"].required
    assert tools["git.git_status"].spec.canonical_args({"repo_path": "/workspace/repo"}) == {"repo_path": "/workspace/repo"}
    assert "nothing to commit" in tools["git.git_status"].fn(None, repo_path="/workspace/repo")
    assert "first commit" in tools["git.git_log"].fn(None, repo_path="/workspace/repo")


def test_filesystem_server_is_confined_to_the_workspace(connect, workspace: Path):
    conn = connect(FS)
    tools, skipped = to_tools("fs", conn.list_tools(), lambda name, args, ctx: result_value(conn.call(name, args, 20)))
    assert skipped == {}
    assert tools["fs.read_text_file"].spec.effect == "read"
    assert tools["fs.write_file"].spec.effect == "delete"  # destructiveHint true
    assert tools["fs.read_text_file"].fn(None, path="/workspace/repo/notes.txt") == {"content": "first line\n"}  # structured
    with pytest.raises(ToolFailed) as err:  # the server refuses a path outside its root
        tools["fs.read_text_file"].fn(None, path="/etc/passwd")
    assert err.value.code == ErrorCode.TOOL_FAILED and "outside allowed directories" in err.value.reason


def test_the_sandbox_hides_the_host_even_from_a_server_given_the_root(connect, workspace: Path):
    (workspace.parent / "host-secret.txt").write_text("not for the server\n")
    conn = connect(McpServer("wide", "wide", ("mcp-server-filesystem", "/")))
    with pytest.raises(ToolFailed) as err:
        result_value(conn.call("read_text_file", {"path": str(workspace.parent / "host-secret.txt")}, 20))
    assert "ENOENT" in err.value.reason or "no such file" in err.value.reason.lower()
    assert result_value(conn.call("read_text_file", {"path": "/workspace/repo/notes.txt"}, 20))["content"] == "first line\n"


def test_a_server_that_never_answers_is_a_timeout_and_a_dead_one_unavailable(session: BwrapSession):
    hung = McpConnection(McpServer("hung", "hung", ("sleep", "60")), session)
    try:
        with pytest.raises(SandboxKilled) as err:
            hung.list_tools(timeout_s=2)
        assert err.value.code == ErrorCode.SANDBOX_TIMEOUT
    finally:
        hung.close()
    dead = McpConnection(McpServer("dead", "dead", ("true",)), session)
    try:
        with pytest.raises(ToolFailed) as err:
            dead.list_tools(timeout_s=10)
        assert err.value.code == ErrorCode.WORKER_UNAVAILABLE
    finally:
        dead.close()


def test_a_crashed_server_is_restarted_on_the_next_call(connect):
    conn = connect(GIT)
    assert conn.list_tools()
    conn.reset()  # as after a crash or a deadline: the sandbox's process is gone
    assert "nothing to commit" in result_value(conn.call("git_status", {"repo_path": "/workspace/repo"}, 20))


def test_an_unknown_tool_is_a_tool_failure(connect):
    conn = connect(GIT)
    with pytest.raises(ToolFailed) as err:
        result_value(conn.call("git_push", {"repo_path": "/workspace/repo"}, 20))
    assert err.value.code == ErrorCode.TOOL_FAILED


def test_results_map_to_values_and_typed_errors():
    text = CallToolResult(content=[TextContent(text="a"), TextContent(text="b")])
    assert result_value(text) == "a\nb"
    assert result_value(CallToolResult(content=[TextContent(text="x")], structured_content={"n": 1})) == {"n": 1}
    image = CallToolResult(content=[TextContent(text="see"), ImageContent(data="AA==", mime_type="image/png")])
    assert result_value(image) == {"text": "see", "omitted": ["image"]}
    with pytest.raises(ToolFailed) as err:
        result_value(CallToolResult(content=[TextContent(text="bad path")], is_error=True))
    assert err.value.code == ErrorCode.TOOL_FAILED and err.value.reason == "bad path"
    with pytest.raises(SandboxKilled) as err:
        result_value(CallToolResult(content=[TextContent(text="y" * 11)]), max_text_chars=10)
    assert err.value.code == ErrorCode.SANDBOX_OUTPUT


def test_a_schema_warden_cannot_enforce_leaves_the_tool_out():
    from mcp.types import Tool as McpTool

    listed = [McpTool(name="ok", input_schema={"type": "object", "properties": {"a": {"type": "string"}}}),
              McpTool(name="odd", input_schema={"type": "object", "properties": {"a": {"not": {"type": "string"}}}})]
    tools, skipped = to_tools("p", listed, lambda name, args, ctx: None)
    assert set(tools) == {"p.ok"} and set(skipped) == {"p.odd"}
    assert tools["p.ok"].spec.effect == "delete"


def _sandboxes_of(workspace: Path) -> list[int]:
    """The bwrap processes this process started whose command line binds ``workspace`` (a test's own directory)."""
    pids = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if cmdline[0].endswith(b"bwrap") and str(workspace).encode() in cmdline and ppid == os.getpid():
            pids.append(int(p))
    return pids


def _processes_of(uid: int) -> list[int]:
    return [int(p) for p in filter(str.isdigit, os.listdir("/proc")) if _owner(p) == uid]


def _owner(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def test_a_killed_server_is_started_again_on_the_next_call(connect, workspace: Path, session: BwrapSession):
    conn = connect(FS)
    assert conn.list_tools()
    [pid] = _sandboxes_of(workspace)
    before = _processes_of(session._uid) if session._uid is not None else []
    os.kill(pid, signal.SIGKILL)  # the sandbox and, with it (--die-with-parent), the server
    if session._uid is not None:  # the server, under the agent's uid, went with its sandbox
        deadline = time.monotonic() + 5
        while set(before) & set(_processes_of(session._uid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not set(before) & set(_processes_of(session._uid))
    with pytest.raises(ToolFailed) as err:  # the call that finds it dead
        conn.call("list_allowed_directories", {}, 20)
    assert err.value.code == ErrorCode.WORKER_UNAVAILABLE
    assert result_value(conn.call("list_allowed_directories", {}, 20)) == {"content": "Allowed directories:\n/workspace"}
    assert _sandboxes_of(workspace) not in ([], [pid])  # a new sandbox


def test_a_server_program_under_tmp_is_bound_over_the_sandbox_s_own_tmp(session: BwrapSession, monkeypatch):
    """A checkout (and its venv) under /tmp: the server's program directories are bound after the
    sandbox's scratch /tmp, or the tmpfs would hide them and the server could not start."""
    from runtime.sandbox import mcpserver
    monkeypatch.setattr(mcpserver, "program_dirs", lambda: ["/tmp/checkout/.venv"])
    argv = sandboxed_argv(GIT, session)
    scratch = max(i for i, a in enumerate(argv) if a == "/tmp")
    assert scratch < argv.index("/tmp/checkout/.venv"), argv
