"""The whole trusted path for sandbox tests: a supervisor writing a real audit file, signing
dispatches to a real tool worker with a real sandbox pool (gVisor or bubblewrap)."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from pathlib import Path
from typing import Any, Mapping

import pytest

from runtime.errors import ErrorCode, SandboxKilled, ToolFailed
from runtime.protocol import decode_reply, encode_call
from runtime.sandbox.base import REAP_PERIOD_S, _children, _state_and_session
from runtime.sandbox.pool import SandboxPool
from runtime.sandbox.worker import ToolWorker
from runtime.tool import load_tools
from runtime import auditlog
from runtime.trusted import audit
from runtime.trusted.capability import Audience, Expires, KeyRing
from runtime.trusted.ledger import AgentQuota
from runtime.trusted.supervisor import AgentEntry, Supervisor

JOB = "job-isolation"
# The wall clock is far out of reach of the other limits' attacks, however busy the machine:
# a test of the CPU, memory or process limit must end at that limit, never at the wall clock.
LIMITS = {"cpu_s": 1, "wall_s": 60, "memory_mb": 256, "max_pids": 32, "max_output_bytes": 64 * 1024,
          "workspace_mb": 16}


class Env:
    """A supervisor writing a real audit file, dispatching to a real worker with real sandboxes."""

    def __init__(self, tmp: Path, backend: str, limits: Mapping[str, Any] = LIMITS,
                 agents: tuple[str, ...] = ("alice", "bob")) -> None:
        self.audit_path = tmp / "audit.log"
        self.audit = audit.AuditLog(self.audit_path)
        self.keyring = KeyRing.generate()
        tools = load_tools(["runtime.toolbox"])
        dispatch_key = secrets.token_bytes(32)
        self.pool = SandboxPool()
        self.worker = ToolWorker(dispatch_key=dispatch_key, tools=tools, job=JOB, sandboxes=self.pool)

        class Direct:
            async def dispatch(_, tool: str, message: bytes, agent: str = "") -> bytes:
                return await self.worker.execute(message)

        self.sup = Supervisor(job_id=JOB, keyring=self.keyring, tools={n: t.spec for n, t in tools.items()},
                              audit=self.audit, dispatcher=Direct(), dispatch_key=dispatch_key)
        self.keys: dict[str, bytes] = {}
        self.tokens: dict[str, bytes] = {}
        for agent in agents:
            self.keys[agent] = secrets.token_bytes(32)
            self.sup.register_agent(AgentEntry(agent, self.keys[agent],
                                               sandbox={"*": {"backend": backend, "limits": dict(limits)}}),
                                    AgentQuota())
            self.tokens[agent] = self.keyring.mint(holder=agent, caveats=[Audience(JOB), Expires(time.time() + 3600)]
                                                   ).encode()

    def call(self, tool: str, agent: str = "alice", **args: Any) -> Any:
        req = encode_call(agent=agent, token=self.tokens[agent], tool=tool, args=args, request_key=self.keys[agent])
        return decode_reply(asyncio.run(self.sup.call(req)))["value"]

    def py(self, code: str, agent: str = "alice") -> dict[str, Any]:
        return self.call("python.exec", agent=agent, code=code)

    def outcomes(self) -> list[dict[str, Any]]:
        return [r for r in auditlog.read_records(self.audit_path) if r["kind"] == "outcome"]

    def session(self, agent: str = "alice") -> Any:
        return next(s for (a, _), s in self.pool._sessions.items() if a == agent)

    def close(self) -> None:
        self.worker.close()
        self.audit.close()


def assert_program_failed(env: Env, status: int, code: str | None = None, *, tool: str = "python.exec",
                          **args: Any) -> str:
    """The program ran and failed on its own: TOOL_FAILED with its exit status (never a limit),
    on record as such. Returns what the agent is told of it (the stderr tail)."""
    with pytest.raises(ToolFailed) as info:
        env.call(tool, **(args or {"code": code}))
    assert info.value.code is ErrorCode.TOOL_FAILED, info.value
    detail = getattr(info.value, "detail", "")
    assert detail.startswith(f"exit status {status}:"), detail
    last = env.outcomes()[-1]
    assert (last["ok"], last["code"]) == (False, "TOOL_FAILED") and "limit breached" not in last["reason"]
    return detail


def assert_next_call_works(env: Env) -> None:
    out = env.py("print(6 * 7)")
    assert (out["exit_code"], out["stdout"]) == (0, "42\n")


def assert_killed(env: Env, code: str, expected: set[ErrorCode]) -> SandboxKilled:
    with pytest.raises(SandboxKilled) as info:
        env.py(code)
    assert info.value.code in expected, info.value
    last = env.outcomes()[-1]
    assert last["ok"] is False and last["code"] == info.value.code.value
    assert "limit breached" in last["reason"]
    assert_next_call_works(env)
    return info.value


def zombie_children() -> list[int]:
    """Children of this process (the tool worker here) that died and were not reaped."""
    return [pid for pid in _children() if (_state_and_session(pid) or ("?",))[0] == "Z"]


def zombies_of_uid(uid: int) -> list[int]:
    """Every process of ``uid`` on the host that is a zombie, whoever its parent."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("State", "").strip().startswith("Z") and int(fields["Uid"].split()[0]) == uid:
            found.append(int(entry))
    return found


def reaped_within(check, timeout_s: float) -> bool:
    """Whether ``check()`` holds within ``timeout_s``: orphans are reaped by the worker's
    reaper thread, asynchronously, within a sweep or two (no event to await: it polls)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(REAP_PERIOD_S / 5)
    return True
