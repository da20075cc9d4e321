"""Nothing sandboxed code leaves in its workspace can hang the file tools or the worker.

Every attack goes through the whole path (agent request -> supervisor -> signed dispatch ->
tool worker -> the agent's real sandbox), on both backends: ``python.exec`` plants FIFOs and
sockets in ``/workspace``, several agents then point ``fs.read`` / ``fs.write`` / ``fs.list``
at them at once, and each call is refused at once with TOOL_FAILED (on record in the audit
log) while another agent's calls complete. A third-party tool that really blocks is
answered at its deadline with its typed error, and its thread is counted as stuck."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from runtime.errors import ErrorCode, WardenError
from runtime.protocol import decode_reply, encode_call
from runtime.sandbox.base import Limits
from runtime.sandbox.pool import SandboxPool
from runtime.sandbox.threads import ToolThreads
from runtime.sandbox.worker import SANDBOX_GRACE_S, ToolWorker
from runtime.sandbox.workspace import MAX_LIST_ENTRIES
from runtime.tool import ToolContext, load_tools, tool
from runtime import auditlog
from runtime.trusted import audit
from runtime.trusted.capability import Audience, Expires, KeyRing
from runtime.trusted.ledger import AgentQuota
from runtime.trusted.supervisor import AgentEntry, Supervisor

JOB = "job-file-tools"
LIMITS = {"cpu_s": 2, "wall_s": 4, "memory_mb": 256, "max_pids": 32, "max_output_bytes": 64 * 1024,
          "workspace_mb": 16}
ATTACKERS = [f"attacker-{i}" for i in range(6)]
BYSTANDER = "bystander"


@tool(effect="read", name="third.party.read_fifo")
def read_fifo(path: str) -> str:
    """A badly written third-party tool: open(2) on a FIFO blocks until somebody writes."""
    with open(path, "rb") as f:
        return f.read().decode()


@tool(effect="read", name="third.party.sandboxed_read", sandboxed=True)
def sandboxed_read(name: str, *, ctx: ToolContext) -> str:
    """The same mistake in a sandboxed tool that reads its agent's workspace from the worker."""
    with open(ctx.sandbox.workspace.root / name, "rb") as f:
        return f.read().decode()


class Env:
    """A supervisor writing a real audit file, dispatching to a real worker with real sandboxes."""

    def __init__(self, tmp: Path, backend: str, *, call_timeout_s: float = 60.0, limits: dict[str, Any] = LIMITS,
                 threads: ToolThreads | None = None) -> None:
        self.backend, self.limits = backend, limits
        self.audit_path = tmp / "audit.log"
        self.audit = audit.AuditLog(self.audit_path)
        keyring = KeyRing.generate()
        tools = load_tools(["runtime.toolbox"])
        tools.update({t.name: t for t in (read_fifo, sandboxed_read)})
        dispatch_key = secrets.token_bytes(32)
        self.pool = SandboxPool()
        self.worker = ToolWorker(dispatch_key=dispatch_key, tools=tools, job=JOB, sandboxes=self.pool,
                                 threads=threads)

        class Direct:
            async def dispatch(_, tool: str, message: bytes, agent: str = "") -> bytes:
                return await self.worker.execute(message)

        self.sup = Supervisor(job_id=JOB, keyring=keyring, tools={n: t.spec for n, t in tools.items()},
                              audit=self.audit, dispatcher=Direct(), dispatch_key=dispatch_key,
                              call_timeout_s=call_timeout_s)
        self.keys: dict[str, bytes] = {}
        self.tokens: dict[str, bytes] = {}
        for agent in [*ATTACKERS, BYSTANDER]:
            self.keys[agent] = secrets.token_bytes(32)
            self.sup.register_agent(AgentEntry(agent, self.keys[agent],
                                               sandbox={"*": {"backend": backend, "limits": limits}}), AgentQuota())
            self.tokens[agent] = keyring.mint(holder=agent, caveats=[Audience(JOB), Expires(time.time() + 600)]
                                              ).encode()

    async def acall(self, agent: str, tool: str, **args: Any) -> Any:
        """The value, or the typed error the agent gets (returned, so many calls can be gathered)."""
        req = encode_call(agent=agent, token=self.tokens[agent], tool=tool, args=args, request_key=self.keys[agent])
        try:
            return decode_reply(await self.sup.call(req))["value"]
        except WardenError as exc:
            return exc

    def call(self, agent: str, tool: str, **args: Any) -> Any:
        out = asyncio.run(self.acall(agent, tool, **args))
        if isinstance(out, WardenError):
            raise out
        return out

    def workspace(self, agent: str) -> Path:
        return self.pool.handle(agent, self.backend, Limits.from_dict(self.limits)).workspace.root

    def outcomes(self, agent: str) -> list[dict[str, Any]]:
        return [r for r in auditlog.read_records(self.audit_path) if r["kind"] == "outcome" and r["agent"] == agent]

    def close(self) -> None:
        self.worker.close()
        self.audit.close()


@pytest.fixture
def env(tmp_path, backend_name):
    e = Env(tmp_path, backend_name)
    yield e
    e.close()
    assert auditlog.verify(e.audit_path).ok


PLANT = """
import os, socket, stat
os.mkfifo('/workspace/p')
s = socket.socket(socket.AF_UNIX)
s.bind('/workspace/s')
try:
    os.mknod('/workspace/dev', 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    print('device made')
except OSError as e:
    print('no device:', e.errno)
print(sorted(os.listdir('/workspace')))
"""


def plant_on_host(root: Path) -> None:
    os.mkfifo(root / "p")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "s"))


def test_fifos_sockets_and_devices_are_refused_at_once_and_others_keep_running(env):
    for agent in ATTACKERS:
        out = env.call(agent, "python.exec", code=PLANT)
        assert out["exit_code"] == 0, out
        assert "no device" in out["stdout"]  # the sandbox cannot make device nodes ...
        root = env.workspace(agent)
        if env.backend == "bwrap":  # ... but its FIFO and socket are real nodes on the host
            assert stat.S_ISFIFO(os.lstat(root / "p").st_mode) and stat.S_ISSOCK(os.lstat(root / "s").st_mode)
        elif not os.path.lexists(root / "p"):  # gVisor keeps them in its own kernel; plant what a
            plant_on_host(root)                # backend that passed them through would leave
        os.mknod(root / "dev", 0o666 | stat.S_IFCHR, os.makedev(5, 0))  # /dev/tty's numbers, put there by the host

    attacks = [("fs.read", {"path": "/workspace/p"}), ("fs.write", {"path": "/workspace/p", "content": "x"}),
               ("fs.read", {"path": "/workspace/s"}), ("fs.write", {"path": "/workspace/s", "content": "x"}),
               ("fs.read", {"path": "/workspace/dev"}), ("fs.write", {"path": "/workspace/dev", "content": "x"})]

    async def everyone_at_once() -> tuple[list[Any], list[Any], Any]:
        hits = [env.acall(agent, tool, **args) for agent in ATTACKERS for tool, args in attacks]
        lists = [env.acall(agent, "fs.list") for agent in ATTACKERS]
        return await asyncio.gather(asyncio.gather(*hits), asyncio.gather(*lists), bystander())

    async def bystander() -> Any:
        wrote = await env.acall(BYSTANDER, "fs.write", path="/workspace/notes.txt", content="still here")
        return wrote, await env.acall(BYSTANDER, "fs.read", path="/workspace/notes.txt")

    hits, lists, (wrote, read) = asyncio.run(everyone_at_once())
    assert wrote == {"path": "/workspace/notes.txt", "bytes": 10} and read == "still here"
    for (tool, args), err in zip(attacks * len(ATTACKERS), hits):
        assert isinstance(err, WardenError) and err.code is ErrorCode.TOOL_FAILED, (tool, args, err)
    for listing in lists:
        kinds = {e["name"]: e["type"] for e in listing}
        assert kinds == {"p": "fifo", "s": "socket", "dev": "device"}
    for agent in ATTACKERS:
        refused = [r for r in env.outcomes(agent) if not r["ok"]]
        assert len(refused) == len(attacks)
        assert {r["code"] for r in refused} == {ErrorCode.TOOL_FAILED.value}
        assert all("not a regular file: refused" in r["reason"] for r in refused)
        assert stat.S_ISFIFO(os.lstat(env.workspace(agent) / "p").st_mode)  # nothing was replaced or truncated
    assert env.worker.threads()["stuck"] == 0
    # The sandbox still works, and still sees what the tools wrote.
    assert env.call(BYSTANDER, "python.exec", code="print(open('/workspace/notes.txt').read())")["stdout"] == \
        "still here\n"


def test_symlinks_and_dotdot_are_still_refused(env):
    env.call(BYSTANDER, "python.exec", code="import os; os.symlink('/etc/passwd', '/workspace/pw'); "
                                            "os.mkdir('/workspace/d'); os.symlink('/etc', '/workspace/d/etc')")
    for path in ("/workspace/pw", "/workspace/d/etc/passwd", "/workspace/d/../../etc/passwd"):
        for tool, args in (("fs.read", {}), ("fs.write", {"content": "x"})):
            with pytest.raises(WardenError) as info:
                env.call(BYSTANDER, tool, path=path, **args)
            assert info.value.code is ErrorCode.TOOL_FAILED, (tool, path)
    assert os.path.islink(env.workspace(BYSTANDER) / "pw")
    assert {e["name"]: e["type"] for e in env.call(BYSTANDER, "fs.list", path="/workspace/d")} == {"etc": "link"}


def fifo_in(root: Path, name: str) -> Path:
    os.mkfifo(root / name)
    return root / name


def release(fifos: list[Path]) -> None:
    """Open each FIFO read-write (never blocks): every reader still blocked in open(2) returns."""
    for path in fifos:
        os.close(os.open(path, os.O_RDWR))


def test_a_blocking_third_party_tool_is_answered_at_the_deadline_and_counted(tmp_path):
    """More agents stuck at once than the worker has threads; the bystander's sandboxed call still runs."""
    e = Env(tmp_path, "bwrap", call_timeout_s=5.0, threads=ToolThreads(size=3, max_stuck=16, per_agent=2))
    fifos = {a: fifo_in(tmp_path, f"fifo-{a}") for a in ATTACKERS}
    try:
        async def at_once(agents: list[str]) -> list[Any]:
            return await asyncio.gather(*[e.acall(a, "third.party.read_fifo", path=str(fifos[a])) for a in agents])

        for wave in (ATTACKERS[:3], ATTACKERS[3:]):  # each wave takes every live thread, and is written off
            for err in asyncio.run(at_once(wave)):
                assert isinstance(err, WardenError) and err.code is ErrorCode.WORKER_UNAVAILABLE, err
        counts = e.worker.threads()
        assert counts["stuck"] == len(ATTACKERS) > counts["size"]
        assert e.call(BYSTANDER, "python.exec", code="print(6 * 7)")["stdout"] == "42\n"
        for agent in ATTACKERS:
            last = e.outcomes(agent)[-1]
            assert last["ok"] is False and last["code"] == ErrorCode.WORKER_UNAVAILABLE.value
            assert "still running at its dispatch deadline" in last["reason"]
        release(list(fifos.values()))
        assert e.worker._threads.wait_unstuck(30.0)
        assert e.worker.threads()["stuck"] == 0
    finally:
        e.close()


def test_a_blocking_sandboxed_tool_is_answered_at_its_wall_limit(tmp_path):
    limits = {**LIMITS, "wall_s": 1}
    e = Env(tmp_path, "bwrap", call_timeout_s=SANDBOX_GRACE_S + 30, limits=limits)
    try:
        fifo = fifo_in(e.workspace(ATTACKERS[0]), "p")
        with pytest.raises(WardenError) as info:
            e.call(ATTACKERS[0], "third.party.sandboxed_read", name="p")
        assert info.value.code is ErrorCode.SANDBOX_TIMEOUT
        last = e.outcomes(ATTACKERS[0])[-1]
        assert last["code"] == ErrorCode.SANDBOX_TIMEOUT.value and "wall limit 1s" in last["reason"]
        assert e.worker.threads()["stuck_by_agent"] == {ATTACKERS[0]: 1}
        release([fifo])
        assert e.worker._threads.wait_unstuck(30.0)
    finally:
        e.close()


def test_listing_a_huge_directory_is_refused_at_the_cap(tmp_path, backend_name):
    # A workspace has one inode per 4 KiB: 10,001 entries need more than the usual 16 MiB.
    env = Env(tmp_path, backend_name, limits={**LIMITS, "workspace_mb": 64})
    try:
        _list_past_the_cap(env)
    finally:
        env.close()


def _list_past_the_cap(env: Env) -> None:
    # Made on the host: gVisor's file system is too slow to make 10,001 files within a 4 s wall limit.
    many = env.workspace(BYSTANDER) / "many"
    many.mkdir()
    for i in range(MAX_LIST_ENTRIES + 1):
        (many / str(i)).touch()
    with pytest.raises(WardenError) as info:
        env.call(BYSTANDER, "fs.list", path="/workspace/many")
    assert info.value.code is ErrorCode.SANDBOX_OUTPUT
    assert f"more than {MAX_LIST_ENTRIES} entries" in env.outcomes(BYSTANDER)[-1]["reason"]
    assert [e["name"] for e in env.call(BYSTANDER, "fs.list")] == ["many"]
