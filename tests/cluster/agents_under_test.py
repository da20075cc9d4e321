"""Agents and tools for the cluster tests (imported by Ray workers from the project dir)."""

from __future__ import annotations

from functools import partial
from typing import Any

from runtime.agent import Agent, outcome
from runtime.errors import WardenError
from runtime.tool import tool


@tool(effect="read", name="echo")
def echo(text: str) -> str:
    """Return the text."""
    return text


@tool(effect="write", name="note.write")
def note_write(text: str) -> str:
    """Pretend to write a note."""
    return f"wrote {len(text)} chars"


async def _mark_loop(agent: Agent, tool: str, task: dict[str, Any], k: int, codes: Any) -> None:
    """Loop ``k`` of a load agent: ``task["calls"]`` calls of ``tool`` (path, i), each outcome counted by code."""
    import asyncio

    for j in range(task.get("calls", 0)):
        try:
            await agent.call(tool, path=task["path"], i=k * 100_000 + j)
            codes["ok"] += 1
        except WardenError as exc:
            codes[exc.code.value] += 1
            if exc.code.value == "SUPERVISOR_UNAVAILABLE":
                await asyncio.sleep(0.05)  # a client backing off while its shard restarts


_attempt = partial(outcome, detail=True)  # the public text and retry hint too


class BurstAgent(Agent):
    """Calls echo several times back to back: the rate limit must stop it."""

    async def run(self, task: Any) -> list[dict[str, Any]]:
        return [await _attempt(self.call("echo", text=f"n{i}")) for i in range(int(task))]


class ProbeAgent(Agent):
    """Tries things an agent must not be able to do, and reports what happened."""

    async def run(self, task: Any) -> dict[str, Any]:
        return {
            "allowed": await _attempt(self.call("echo", text="hi")),
            "unlisted_tool": await _attempt(self.call("note.write", text="x")),
            "unknown_tool": await _attempt(self.call("rm.rf", path="/")),
            "bad_args": await _attempt(self.call("echo", txt="typo")),
            "delegate_to_stranger": await _attempt(self.delegate("burst", "1")),
        }


class ChainAgent(Agent):
    """Delegates to its peer with a narrower token; the peer reports what it could do."""

    async def run(self, task: Any) -> Any:
        return await self.delegate(self.config.get("peer", "peer"), task, tools=["echo"], max_calls=2)


class PeerAgent(Agent):
    async def run(self, task: Any) -> dict[str, Any]:
        return {
            "first": await _attempt(self.call("echo", text="a")),
            "second": await _attempt(self.call("echo", text="b")),
            "over_budget": await _attempt(self.call("echo", text="c")),
            "narrowed_away": await _attempt(self.call("note.write", text="x")),
        }


class SleepyAgent(Agent):
    """Never finishes: the job's timeout_s must end it."""

    async def run(self, task: Any) -> None:
        import asyncio

        await asyncio.Event().wait()


class CrashyAgent(Agent):
    async def run(self, task: Any) -> None:
        await self.call("echo", text="before the crash")
        raise RuntimeError("agent bug")


@tool(effect="read", name="worker.mark")
def worker_mark() -> str | None:
    """The tool worker's WARDEN_WORKER_MARK environment variable (set through the job's runtime_env)."""
    import os

    return os.environ.get("WARDEN_WORKER_MARK")


class MarkAgent(Agent):
    async def run(self, task: Any) -> Any:
        return await self.call("worker.mark")


class CarefulAgent(Agent):
    """Makes calls its policy parks for a human; reports what became of each."""

    async def run(self, task: Any) -> dict[str, Any]:
        return {
            "first": await _attempt(self.call("note.write", text="approve me")),
            "second": await _attempt(self.call("note.write", text="deny me")),
            "unattended": await _attempt(self.call("echo", text="nobody answers")),
        }


class RevokedAgent(Agent):
    """Parks a call for approval (so it is in flight), then keeps calling after the operator revokes it."""

    async def run(self, task: Any) -> dict[str, Any]:
        return {
            "in_flight": await _attempt(self.call("note.write", text="waiting")),
            "after": await _attempt(self.call("echo", text="still here?")),
        }


class RogueAgent(Agent):
    """Keeps trying a tool its policy does not allow."""

    async def run(self, task: Any) -> list[dict[str, Any]]:
        return [await _attempt(self.call("note.write", text=f"try {i}")) for i in range(50)]


@tool(effect="read", name="node.id")
def node_id() -> str:
    """The Ray node this tool worker runs on."""
    import ray

    return ray.get_runtime_context().get_node_id()


class NodeAgent(Agent):
    """Reports the Ray node it runs on and the node of the tool worker that serves it."""

    async def run(self, task: Any) -> dict[str, Any]:
        import ray

        return {"agent": ray.get_runtime_context().get_node_id(), "worker": await self.call("node.id")}


@tool(effect="write", name="load.mark")
def load_mark(path: str, i: int) -> int:
    """Append ``i`` to the file at ``path``: one line per time the tool really ran."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{i}\n")
    return i


class LoadAgent(Agent):
    """``parallel`` loops of ``calls`` calls each; counts every outcome by code and never stops on one."""

    async def run(self, task: Any) -> dict[str, int]:
        import asyncio
        from collections import Counter

        codes: Counter[str] = Counter()
        await asyncio.gather(*[_mark_loop(self, "load.mark", task, k, codes) for k in range(task["parallel"])])
        return dict(codes)


class SneakyAgent(Agent):
    """Agent code that reaches for its supervisor shards' handles and calls what is not for it."""

    async def run(self, task: Any) -> dict[str, str]:
        shard = self._supervisor._hs[0]  # the handle the runtime gave it to send calls
        tried = {"status": lambda: shard.status.remote(b"guess" * 8),
                 "serve": lambda: shard.serve.remote(b"guess" * 8, "127.0.0.1", 0, "mine"),
                 "sync_message": lambda: shard.sync_message.remote(b"guess" * 8),
                 "next_event": lambda: shard.next_event.remote(b"guess" * 8),
                 "close": lambda: shard.close.remote(b"guess" * 8, "ok"),
                 "apply_peer": lambda: shard.apply_peer.remote(b"\x92\xc4\x01x\xc4\x01y"),
                 "_event": lambda: shard._event.remote({"event": "quarantine", "agent": "chain", "reason": "x"})}
        out = {}
        for name, attempt in tried.items():
            try:
                await attempt()
                out[name] = "ALLOWED"
            except Exception as exc:
                cause = getattr(exc, "cause", exc)
                out[name] = type(cause).__name__
        return out


@tool(effect="read", name="worker.pid")
def worker_pid() -> int:
    """The process id of the tool worker that ran this call."""
    import os

    return os.getpid()


@tool(effect="write", name="crash.mark")
def crash_mark(path: str, i: int) -> int:
    """Append ``i`` and this worker's pid to the file at ``path``: one line per time the tool really ran."""
    import os

    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{i} {os.getpid()}\n")
    return i


@tool(effect="write", name="crash.hold")
async def crash_hold(path: str) -> None:
    """Write this worker's pid to ``path``, then hold the call until the worker is killed (or the deadline)."""
    import asyncio
    import os

    with open(path, "w", encoding="utf-8") as f:
        f.write(str(os.getpid()))
    await asyncio.Event().wait()


class CrashLoadAgent(Agent):
    """Load for the crash tests: ``parallel`` loops of ``calls`` calls of crash.mark, counted by outcome.
    With ``hold``: one call that stays in flight on the agent's worker (the test kills that worker).
    With ``workspace``: a file written to the agent's workspace first and read back at the end.
    With ``pid_file``: the agent actor's own pid, written at start (the test may kill it)."""

    async def run(self, task: Any) -> dict[str, Any]:
        import asyncio
        import os
        from collections import Counter

        if task.get("pid_file"):
            with open(task["pid_file"], "w", encoding="utf-8") as f:
                f.write(str(os.getpid()))
        out: dict[str, Any] = {}
        if task.get("workspace"):
            out["wrote"] = await _attempt(self.call("fs.write", path="/workspace/keep.txt", content="kept"))
        codes: Counter[str] = Counter()
        held = [_attempt(self.call("crash.hold", path=task["hold"]))] if task.get("hold") else []
        done = await asyncio.gather(*held, *[_mark_loop(self, "crash.mark", task, k, codes)
                                             for k in range(task.get("parallel", 0))])
        if held:
            out["hold"] = done[0]
        if task.get("workspace"):
            out["read"] = await _attempt(self.call("fs.read", path="/workspace/keep.txt"))
        return {**out, "codes": dict(codes)}


class PidAgent(Agent):
    """The pid of the tool worker behind each of ``task`` calls."""

    async def run(self, task: Any) -> list[int]:
        return [await self.call("worker.pid") for _ in range(int(task))]


class NoisyAgent(Agent):
    """Makes Ray print into the driver's stdout: its own prints (forwarded by log_to_driver) and a
    task whose worker process dies ("(raylet) A worker died or was killed ...")."""

    async def run(self, task: Any) -> dict[str, Any]:
        import os
        import sys

        import ray

        print("NOISE-STDOUT from the agent actor", flush=True)
        print("NOISE-STDERR from the agent actor", file=sys.stderr, flush=True)

        @ray.remote(num_cpus=0, max_retries=0)
        def die() -> None:
            print("NOISE-TASK about to die", flush=True)
            os._exit(1)

        try:
            await die.remote()
            died = False
        except ray.exceptions.WorkerCrashedError:
            died = True
        return {"echo": await self.call("echo", text="still here"), "task_worker_died": died}
