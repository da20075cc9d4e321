"""`warden mcp serve` driven from a test with the `mcp` SDK's own clients: the command line, the
gateway as a process of its own (HTTP), and an HTTP session with the bearer token of its run directory."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

import httpx2  # the SDK's HTTP client
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

ROOT = Path(__file__).resolve().parents[2]


def command(runs_dir: Path, *extra: str, job: Path, agent: str) -> list[str]:
    """The arguments after ``python``: ``-m runtime.cli mcp serve JOB --agent AGENT ...``."""
    return ["-m", "runtime.cli", "mcp", "serve", str(job), "--agent", agent, "--runs-dir", str(runs_dir), *extra]


def env(address: str) -> dict[str, str]:
    return {"RAY_ADDRESS": address, "PYTHONPATH": str(ROOT)}


@contextlib.asynccontextmanager
async def http_session(info: dict[str, Any]) -> AsyncIterator[ClientSession]:
    """An MCP session with the gateway over streamable HTTP, with the bearer token from its run directory."""
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {info['token']}"}, timeout=120) as http:
        async with streamable_http_client(info["url"], http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                yield session


class GatewayProcess:
    """`warden mcp serve --transport http` in its own process; its stderr read as it comes."""

    def __init__(self, address: str, runs_dir: Path, *, job: Path, agent: str) -> None:
        self.runs_dir = runs_dir
        self.proc = subprocess.Popen([sys.executable, *command(runs_dir, "--transport", "http", job=job, agent=agent)],
                                     cwd=ROOT, env={**os.environ, **env(address)}, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if "MCP gateway for agent" in line:
                self.ready.set()
        self.ready.set()  # the process ended: whoever waits sees it

    def info(self, timeout_s: float = 180) -> tuple[Path, dict[str, Any]]:
        """Once it serves: the path of its ``mcp-gateway.json`` and what is in it (URL, bearer token)."""
        assert self.ready.wait(timeout=timeout_s) and self.proc.poll() is None, "".join(self.lines)[-3000:]
        (path,) = self.runs_dir.glob("*/mcp-gateway.json")
        return path, json.loads(path.read_text())

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=120)
        self.reader.join(timeout=10)
        return rc


def wait_until(what: str, ready: Any, deadline_s: float = 60) -> Any:
    """``ready()``'s first true value: for another process's state, which has no event to await."""
    end = time.monotonic() + deadline_s
    while not (value := ready()):
        assert time.monotonic() < end, f"never: {what}"
        time.sleep(0.05)
    return value
