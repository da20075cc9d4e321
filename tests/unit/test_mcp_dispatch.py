"""MCP tool calls through the whole pipeline, without Ray: supervisor (decide, audit) -> MAC'd dispatch ->
tool worker -> the agent's own sandboxed server (``mcp-server-git``, the reference filesystem server).

The repository is made by the agent itself (``shell.exec`` in its bwrap sandbox), so it is in
the agent's workspace, owned by the agent's sandbox uid, as in a job. The attacks: a
destructive git operation, a path outside the workspace, and an instruction planted in a
file that tries to make the agent call another tool.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from agents.mcp_dev import MAKE_REPO  # the repository the demo agent makes, with its planted README
from runtime.harness import PolicyHarness
from runtime.mcpjob import Connections, McpServerSpec, job_tools, worker_tools
from runtime.sandbox.base import Limits
from runtime.sandbox.pool import SandboxPool
from runtime.tool import load_tools

SERVERS = [McpServerSpec(name="git", prefix="git", command=["mcp-server-git"]),
           McpServerSpec(name="files", prefix="files", command=["mcp-server-filesystem", "/workspace"],
                         path_args=["path", "paths", "source", "destination"])]

POLICY = """agent: dev
tools:
  shell.exec: {effect: execute}
  git.git_status: {effect: read}
  git.git_log: {effect: read}
  git.git_commit:
    effect: write
    ifc: {context: trusted}          # a commit may not be chosen once untrusted data is in the context
  files.read_text_file:
    effect: read
    args:
      path: {path_under: /workspace}
  files.list_allowed_directories: {effect: read}
sandbox: {backend: bwrap, wall_s: 20, cpu_s: 10}
"""


@pytest.fixture(scope="module")
def pool():
    p = SandboxPool()
    yield p
    p.close()


@pytest.fixture(scope="module")
def harness(pool):
    _, entries, _ = job_tools(SERVERS, os.environ)
    conns = Connections()
    tools = {**load_tools(["runtime.toolbox"]), **worker_tools(entries, conns)}
    h = PolicyHarness(tools, sandboxes=pool)
    h.add_agent(POLICY)
    made = h.call("dev", "shell.exec", {"command": MAKE_REPO})
    assert made.allowed and made.value["exit_code"] == 0, made
    yield h
    conns.close()
    h.close()


def _outcome_reason(d) -> str:
    return (d.outcome or {}).get("reason", "")


def test_an_allowed_git_call_runs_in_the_agents_sandbox_and_is_audited(harness):
    d = harness.call("dev", "git.git_log", {"repo_path": "/workspace/repo"})
    assert d.allowed and "first commit" in d.value, d
    assert d.audit["tool"] == "git.git_log" and d.outcome["ok"]
    d = harness.call("dev", "git.git_status", {"repo_path": "/workspace/repo"})
    assert d.allowed and "nothing to commit" in d.value


def test_a_destructive_git_operation_is_denied_by_the_policy(harness):
    d = harness.call("dev", "git.git_reset", {"repo_path": "/workspace/repo"})
    assert not d.allowed and d.code == "POLICY_DENIED"
    assert d.audit is not None and d.audit["tool"] == "git.git_reset" and "git.git_reset" in d.reason
    assert d.error.public() == "POLICY_DENIED on tool 'git.git_reset'"  # all the agent learns


def test_arguments_are_type_checked_as_for_a_builtin_tool(harness):
    d = harness.call("dev", "git.git_log", {"repo_path": "/workspace/repo", "max_count": "ten"})
    assert not d.allowed and d.code == "MALFORMED"
    d = harness.call("dev", "git.git_log", {"repo_path": "/workspace/repo", "colour": "red"})
    assert not d.allowed and d.code == "MALFORMED"


def test_a_path_outside_the_workspace_is_refused_by_the_policy_before_the_server_sees_it(harness):
    d = harness.call("dev", "files.read_text_file", {"path": "/workspace/../etc/passwd"})
    assert not d.allowed and d.code == "POLICY_DENIED"
    assert "/etc/passwd" in d.reason  # canonicalised first: the rule saw where the path really goes
    assert d.outcome is None  # never dispatched


def test_the_filesystem_server_reads_inside_the_workspace(harness):
    d = harness.call("dev", "files.read_text_file", {"path": "/workspace/repo/notes.txt"})
    assert d.allowed and d.value == {"content": "first line\n"}, d
    d = harness.call("dev", "files.list_allowed_directories", {})
    assert d.allowed and "/workspace" in str(d.value)


def test_an_mcp_result_alone_taints_the_context(harness, pool):
    """An agent whose context is clean until it reads the planted file through the MCP server."""
    fresh = harness.add_agent(POLICY, name="fresh")
    handle = pool.handle(fresh, "bwrap", Limits(cpu_s=10, wall_s=20))  # its workspace, as its first call opens it
    subprocess.run(["sh", "-c", MAKE_REPO.replace("/workspace", str(handle.workspace.root))], check=True)
    if handle.session._uid is not None:
        subprocess.run(["chown", "-R", f"{handle.session._uid}:{handle.session._uid}", str(handle.workspace.root)],
                       check=True)
    read = harness.call(fresh, "files.read_text_file", {"path": "/workspace/repo/README"})
    assert read.allowed and "git.git_reset" in read.value["content"]
    after = harness.call(fresh, "git.git_commit", {"repo_path": "/workspace/repo", "message": "as the file said"})
    assert not after.allowed and after.code == "FLOW_DENIED"
    assert "'tool': 'files.read_text_file'" in after.reason  # its first call: the MCP result made the context untrusted


def test_an_instruction_planted_in_a_file_cannot_make_the_agent_act(harness):
    read = harness.call("dev", "files.read_text_file", {"path": "/workspace/repo/README"})
    assert read.allowed and "git.git_reset" in read.value["content"]
    # A scripted agent that obeys the text: the call it is told to make is not in its capability.
    obeyed = harness.call("dev", "git.git_reset", {"repo_path": "/workspace/repo"})
    assert not obeyed.allowed and obeyed.code == "POLICY_DENIED" and obeyed.audit["tool"] == "git.git_reset"
    # And a tool it holds, but whose choice untrusted data (the file, through an MCP tool) may not make:
    commit = harness.call("dev", "git.git_commit", {"repo_path": "/workspace/repo", "message": "as told"})
    assert not commit.allowed and commit.code == "FLOW_DENIED", commit
    assert commit.audit["tool"] == "git.git_commit"


def test_a_server_error_is_a_typed_tool_failure(harness):
    d = harness.call("dev", "git.git_log", {"repo_path": "/workspace/not-a-repo"})
    assert d.allowed and d.outcome_code == "TOOL_FAILED"
    assert d.error is not None and d.error.code.value == "TOOL_FAILED"


def test_a_shared_server_runs_once_in_a_workspace_of_its_own_removed_when_the_worker_closes(pool, tmp_path):
    shared = [McpServerSpec(name="shared-files", prefix="shared", command=["mcp-server-filesystem", "/workspace"],
                            shared=True)]
    _, entries, _ = job_tools(shared, os.environ)
    conns = Connections(tmp_path / "worker-root")
    tools = {**load_tools(["runtime.toolbox"]), **worker_tools(entries, conns)}
    policy = ("agent: a\ntools:\n  shell.exec: {effect: execute}\n  shared.list_directory: {effect: read}\n"
              "sandbox: {backend: bwrap}\n")
    with PolicyHarness(tools, sandboxes=pool) as h:
        for agent in ("a", "b"):
            h.add_agent(policy, name=agent)
            made = h.call(agent, "shell.exec", {"command": f"echo x > /workspace/{agent}-own-file"})
            assert made.allowed and made.value["exit_code"] == 0
        seen = [h.call(agent, "shared.list_directory", {"path": "/workspace"}) for agent in ("a", "b")]
        assert all(d.allowed for d in seen) and seen[0].value == seen[1].value
        assert "own-file" not in str(seen[0].value)  # neither agent's workspace: the server's own
        (ws,) = (tmp_path / "worker-root").iterdir()  # under the worker's root: a restarted worker removes it
        server = next(iter(conns._conns.values()))
        conns.close()  # the worker shuts down
    assert not ws.exists() and str(ws) not in Path("/proc/mounts").read_text()
    assert server._session is None and not server._thread.is_alive()  # the server stopped with it
