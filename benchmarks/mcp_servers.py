"""Start, call and stop times of the real MCP servers under each sandbox backend (the README's MCP table).

Run as root from the project directory:  .venv/bin/python benchmarks/mcp_servers.py
Per backend and server: 3 starts (the first call, which starts the server), 10 warm calls after each,
and the stop; medians printed.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.mcptools import result_value  # noqa: E402
from runtime.sandbox.pool import make_backend  # noqa: E402
from runtime.sandbox.mcpserver import McpConnection, McpServer  # noqa: E402

SERVERS = [(("mcp-server-git",), "git_status", {"repo_path": "/workspace/repo"}),
           (("mcp-server-filesystem", "/workspace"), "read_text_file", {"path": "/workspace/repo/notes.txt"})]


def workspace() -> Path:
    ws = Path(tempfile.mkdtemp(prefix="warden-bench-mcp-"))
    git = ["git", "-C", str(ws / "repo"), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", str(ws / "repo")], check=True)
    (ws / "repo" / "notes.txt").write_text("first line\n")
    subprocess.run([*git, "add", "notes.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "first commit"], check=True)
    return ws


def main() -> None:
    for backend in ("bwrap", "gvisor"):
        ws = workspace()
        session = make_backend(backend).open(ws, workspace_mb=64, key="bench")
        st = ws.stat()  # bwrap gave the workspace to the session's uid: the repository is the agent's too
        subprocess.run(["chown", "-R", f"{st.st_uid}:{st.st_gid}", str(ws)], check=True)
        for command, tool, args in SERVERS:
            first, warm, stop = [], [], []
            for _ in range(3):
                conn = McpConnection(McpServer("bench", "bench", command, backend=backend), session)
                t = time.perf_counter()
                result_value(conn.call(tool, args, 60))
                first.append(time.perf_counter() - t)
                for _ in range(10):
                    t = time.perf_counter()
                    result_value(conn.call(tool, args, 60))
                    warm.append(time.perf_counter() - t)
                t = time.perf_counter()
                conn.close()
                stop.append(time.perf_counter() - t)
            print(f"{backend:6} {command[0]:22} first call {statistics.median(first):.2f} s  "
                  f"warm call {statistics.median(warm) * 1000:.0f} ms  stop {statistics.median(stop):.2f} s")
        session.close()


if __name__ == "__main__":
    main()
