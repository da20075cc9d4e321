"""Suite 4, cost: supervisor memory per active agent, audit bytes per call, and whether
latency stays flat from 10 to 10,000 calls in one job.

In process, without Ray, so the figures are the supervisor's own: a real ``Supervisor``
with a real audit file, dispatching through ``InProcessDispatcher`` to a real ``ToolWorker``.
"""

from __future__ import annotations

import asyncio
import gc
import secrets
import shutil
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

from ..protocol import decode_reply, encode_call
from ..sandbox.worker import ToolWorker
from ..testing import InProcessDispatcher
from ..tool import load_tools
from ..trusted.audit import AuditLog, segment_path
from ..trusted.capability import Audience, Expires, KeyRing, Tools
from ..trusted.ledger import AgentQuota
from ..trusted.supervisor import AgentEntry, Supervisor
from .stats import Figure

JOB = "bench-cost"
WINDOWS = ((0, 10), (10, 100), (100, 1_000), (1_000, 10_000))


class _Env:
    def __init__(self, run_dir: Path) -> None:
        tools = load_tools(["runtime.bench.tools"])
        self.keyring, key = KeyRing.generate(), secrets.token_bytes(32)
        self.audit_path = run_dir / "audit.log"
        self.audit = AuditLog(self.audit_path, fsync="rotate", rotate_bytes=64 << 20)
        worker = ToolWorker(dispatch_key=key, tools=tools, job=JOB)
        self.sup = Supervisor(job_id=JOB, keyring=self.keyring, tools={n: t.spec for n, t in tools.items()},
                              audit=self.audit, dispatcher=InProcessDispatcher(worker), dispatch_key=key)
        self.keys: dict[str, bytes] = {}
        self.tokens: dict[str, bytes] = {}

    def add(self, name: str) -> None:
        self.keys[name] = secrets.token_bytes(32)
        self.sup.register_agent(AgentEntry(name, self.keys[name]), AgentQuota())
        self.tokens[name] = self.keyring.mint(holder=name, caveats=[Audience(JOB), Expires(time.time() + 3600),
                                                                    Tools(("bench.noop",))]).encode()

    def request(self, name: str, i: int) -> bytes:
        return encode_call(agent=name, token=self.tokens[name], tool="bench.noop", args={"x": i},
                           request_key=self.keys[name])

    def audit_bytes(self) -> int:
        total, i = 0, 0
        while (p := Path(segment_path(self.audit_path, i))).exists():
            total += p.stat().st_size
            i += 1
        return total


async def _calls(env: _Env, name: str, n: int) -> list[float]:
    requests = [env.request(name, i) for i in range(n)]  # built outside the timed region
    samples = []
    for req in requests:
        t = time.perf_counter_ns()
        decode_reply(await env.sup.call(req))
        samples.append((time.perf_counter_ns() - t) / 1000.0)
    return samples


def _memory_per_agent(env: _Env, agents: int) -> float:
    async def touch() -> None:
        for i in range(agents):
            await _calls(env, f"m{i}", 3)

    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(agents):
        env.add(f"m{i}")
    asyncio.run(touch())
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / agents


def run(quick: bool = False, progress: Callable[[str], None] = print) -> dict[str, Any]:
    total = 1_000 if quick else 10_000
    agents = 20 if quick else 200
    run_dir = Path(tempfile.mkdtemp(prefix="warden-bench-cost-"))
    figures: list[Figure] = []
    try:
        env = _Env(run_dir)
        env.add("steady")
        progress(f"cost: {total} calls by one agent")
        samples = asyncio.run(_calls(env, "steady", total))
        calls = total
        per_call = env.audit_bytes() / calls
        windows = [(lo, hi) for lo, hi in WINDOWS if hi <= total]
        p50s = {}
        for lo, hi in windows:
            xs = sorted(samples[lo:hi])
            p50s[(lo, hi)] = statistics.median(xs)
            figures.append(Figure("cost", f"call latency, calls {lo + 1}-{hi}", "us", round(p50s[(lo, hi)], 2),
                                  round(xs[min(len(xs) - 1, int(0.99 * (len(xs) - 1)))], 2), None, 1, len(xs),
                                  extra={"first_call": lo + 1, "last_call": hi}))
        base, last = p50s[(10, 100)], p50s[windows[-1]]
        figures.append(Figure("cost", f"latency drift, calls {windows[-1][0] + 1}-{windows[-1][1]} vs 11-100",
                              "ratio", round(last / base, 3), target="<= 1.5 (flat)", met=last / base <= 1.5))
        figures.append(Figure("cost", "audit bytes per call (decision + outcome records)", "bytes",
                              round(per_call, 1), extra={"calls": calls, "audit_bytes": env.audit_bytes()}))
        progress(f"cost: memory of {agents} active agents")
        mem = _memory_per_agent(env, agents)
        figures.append(Figure("cost", "supervisor memory per active agent", "KiB", round(mem / 1024, 2),
                              extra={"agents": agents, "calls_each": 3}))
        env.audit.close()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    notes = ["in process (no Ray): a real Supervisor, a real audit file (fsync on rotation), a real ToolWorker",
             "memory per agent: tracemalloc growth after registering agents that made 3 calls each "
             "(ledger, nonce window, verify cache, anomaly state), divided by the number of agents"]
    return {"suite": "cost", "figures": [f.to_dict() for f in figures], "notes": notes}
