"""The agent of the gVisor MCP cluster test: makes a repository in its workspace, then reads its log and
the kernel's version through two real MCP servers that run under gVisor."""

from __future__ import annotations

from typing import Any

from agents.mcp_dev import MAKE_REPO
from runtime.agent import Agent, outcome


class GVisorMcpAgent(Agent):
    async def run(self, task: Any) -> dict[str, Any]:
        return {"made": await outcome(self.call("shell.exec", command=MAKE_REPO)),
                "log": await outcome(self.call("git.git_log", repo_path="/workspace/repo")),
                "kernel": await outcome(self.call("files.read_text_file", path="/proc/version")),
                "outside": await outcome(self.call("files.read_text_file", path="/etc/passwd"))}
