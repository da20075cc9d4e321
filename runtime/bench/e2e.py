"""Suite 2, e2e: the same trivial tool called directly on a Ray actor and through the supervisor.

Both paths start in an agent actor and end in a worker actor on the same node:

* direct: agent actor -> plain Ray actor running ``bench.noop`` (the plain-Ray baseline);
* supervised: agent actor -> supervisor actor (decode, verify, evaluate, reserve, audit)
  -> tool-worker actor (MAC check) -> back, with the audit log written to a real file;
* batched: as supervised, ``batch`` calls per message, each still checked and audited.

With 1, 4 and 16 concurrent agents the suite reports per-call latency (p50/p99 as seen by
the agent), calls per second (all agents' calls / wall time) and the ratios, measured side by
side in the same run; and the share of supervised latency spent in the authorization
decision (the supervisor's own histogram).
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import shutil
import statistics
import tempfile
import time
from hashlib import sha256
from pathlib import Path
from typing import Any, Callable

from .. import auditlog
from .stats import Figure, rate_figure, summarise

CONCURRENCY = (1, 4, 16)
BATCH = 16


def _ray() -> Any:
    import ray

    from ..job import ensure_ray

    ensure_ray(None)  # a private local Ray: never another one that runs on this machine
    return ray


async def _setup(agents: int, shards: int = 1) -> dict[str, Any]:
    ray = _ray()
    from ..actors import AgentActor, SupervisorActor, ToolWorkerActor
    from ..tool import load_tools
    from ..trusted.capability import Audience, Expires, KeyRing, Tools
    from ..trusted.ledger import AgentQuota
    from ..trusted.supervisor import AgentEntry

    @ray.remote
    class PlainWorker:
        async def execute(self, x: int) -> int:
            return tools["bench.noop"].fn(x)

    @ray.remote
    class PlainRelay:
        """An async actor that forwards to the plain worker and checks nothing."""

        def __init__(self, worker: Any) -> None:
            self.worker = worker

        async def call(self, x: int) -> int:
            return await self.worker.execute.remote(x)

    job = f"bench-{secrets.token_hex(3)}"
    tools = load_tools(["runtime.bench.tools"])
    keyring, dispatch_key, master = KeyRing.generate(), secrets.token_bytes(32), secrets.token_bytes(32)
    names = [f"agent{i}" for i in range(agents)]
    entries, tokens = [], {}
    for name in names:
        key = hmac.new(master, name.encode(), sha256).digest()
        entries.append((AgentEntry(name, key), AgentQuota()))
        tokens[name] = keyring.mint(holder=name, caveats=[Audience(job), Expires(time.time() + 3600),
                                                          Tools(("bench.noop",))]).encode()
    run_dir = Path(tempfile.mkdtemp(prefix="warden-bench-"))
    worker = ToolWorkerActor.options(num_cpus=0).remote(dispatch_key=dispatch_key,
                                                        tool_modules=["runtime.bench.tools"], job_id=job,
                                                        tool_config={"run_dir": str(run_dir)})
    plain = PlainWorker.options(num_cpus=0).remote()
    relay = PlainRelay.options(num_cpus=0).remote(plain)
    peer_key = secrets.token_bytes(32) if shards > 1 else None
    host = secrets.token_bytes(32)
    supervisors = [SupervisorActor.options(num_cpus=0, max_concurrency=1000).remote(
        job_id=job, keys=keyring.to_secret_dict(), dispatch_key=dispatch_key,
        tools=[t.spec for t in tools.values()], audit_path=str(run_dir / f"audit-{i}.log"), workers=[worker],
        agents=entries, call_timeout_s=60, credentials={}, audit_options={"fsync": "rotate"},
        shard=(i, shards), state_path=str(run_dir / f"state-{i}.journal"), peer_key=peer_key, host_secret=host)
        for i in range(shards)]
    await asyncio.gather(*[s.connect.remote(host, [p for p in supervisors if p is not s]) for s in supervisors])
    actors = [AgentActor.options(num_cpus=0, max_concurrency=100).remote(
        cls_path="runtime.bench.tools:BenchAgent", name=name, token=tokens[name], request_key=e.request_key,
        supervisors=supervisors, tool_schemas=[], config={}) for name, (e, _) in zip(names, entries)]
    await asyncio.gather(*[a.connect.remote({}) for a in actors])
    await plain.execute.remote(0)
    return {"ray": ray, "plain": plain, "relay": relay, "supervisors": supervisors, "worker": worker, "host": host,
            "agents": actors, "run_dir": run_dir}


async def _teardown(env: dict[str, Any]) -> list[float]:
    """Stop everything; the supervisors' own authorization times (us) of every allowed call."""
    try:
        await asyncio.gather(*[s.close.remote(env["host"], "ok") for s in env["supervisors"]])
    finally:
        for h in [*env["supervisors"], env["worker"], env["plain"], env["relay"], *env["agents"]]:
            env["ray"].kill(h)
    authz = sorted(r["authz_us"] for i in range(len(env["supervisors"]))
                   for r in auditlog.read_records(env["run_dir"] / f"audit-{i}.log") if r.get("decision") == "allow")
    shutil.rmtree(env["run_dir"], ignore_errors=True)
    return authz


async def _measure(env: dict[str, Any], mode: str, n: int) -> tuple[list[float], float]:
    task = {"mode": mode, "n": n, "batch": BATCH, "plain": env["plain"], "relay": env["relay"]}
    started = time.perf_counter()
    outs = await asyncio.gather(*[a.run.remote(task) for a in env["agents"]])
    wall = time.perf_counter() - started
    samples = [x for o in outs for x in o["samples_us"]]
    return samples, len(samples) / wall


async def _suite(quick: bool, progress: Callable[[str], None]) -> dict[str, Any]:
    runs, n = (1, 30) if quick else (5, 200)
    figures: list[Figure] = []
    notes = [f"{runs} run(s) per figure; each agent makes {n} calls per run after a warm-up; batches of {BATCH}",
             "plain relay: an async Ray actor that forwards to the plain worker and checks nothing - the cost of "
             "one more actor hop on this machine, which any mediating design pays; supervised/plain relay is "
             "what Warden's checks, audit and MAC'd dispatch add on top of that hop",
             "latency is per call as the agent sees it (a batched call's latency is the message's / batch size)"]
    for c in CONCURRENCY:
        progress(f"e2e: {c} concurrent agent(s)")
        env = await _setup(c)
        try:
            modes = ("direct", "relay", "supervised", "batch")
            for mode in modes:
                await _measure(env, mode, max(5, n // 10))  # warm-up: imports, connections, caches
            lat: dict[str, list[list[float]]] = {m: [] for m in modes}
            tput: dict[str, list[float]] = {m: [] for m in lat}
            for r in range(runs):
                for mode in lat:  # interleaved, so the machine's noise hits all three alike
                    samples, rate = await _measure(env, mode, n)
                    lat[mode].append(samples)
                    tput[mode].append(rate)
        finally:
            # The supervisor's own measurement of each decision, from its audit log.
            authz = await _teardown(env)
        authz_p50_us = statistics.median(authz)
        direct = summarise("e2e", f"direct, {c} agent(s)", "us", lat["direct"], concurrency=c)
        sup = summarise("e2e", f"supervised, {c} agent(s)", "us", lat["supervised"], concurrency=c)
        bat = summarise("e2e", f"batched x{BATCH}, {c} agent(s)", "us", lat["batch"], concurrency=c)
        rel = summarise("e2e", f"plain relay (no checks), {c} agent(s)", "us", lat["relay"], concurrency=c)
        ratio = sup.p50 / direct.p50
        figures += [direct, rel, sup, bat,
                    Figure("e2e", f"added per call by Warden (supervised - direct p50), {c} agent(s)", "ms",
                           round((sup.p50 - direct.p50) / 1000, 3), runs=runs, n=sup.n,
                           extra={"concurrency": c, "added_per_call": True}),
                    Figure("e2e", f"supervised/direct p50, {c} agent(s)", "ratio", round(ratio, 3),
                           target="<= 2.0", met=ratio <= 2.0, extra={"concurrency": c}),
                    Figure("e2e", f"plain relay/direct p50 (the floor of one more hop), {c} agent(s)", "ratio",
                           round(rel.p50 / direct.p50, 3), extra={"concurrency": c}),
                    Figure("e2e", f"supervised/plain relay p50 (Warden's own cost), {c} agent(s)", "ratio",
                           round(sup.p50 / rel.p50, 3), extra={"concurrency": c}),
                    Figure("e2e", f"authorization share of supervised p50, {c} agent(s)", "%",
                           round(100 * authz_p50_us / sup.p50, 3), target="<= 2 %",
                           met=100 * authz_p50_us / sup.p50 <= 2.0,
                           extra={"concurrency": c, "authz_p50_us": round(authz_p50_us, 2)})]
        d_rate = rate_figure("e2e", f"direct throughput, {c} agent(s)", "calls/s", tput["direct"], concurrency=c)
        s_rate = rate_figure("e2e", f"supervised throughput, {c} agent(s)", "calls/s", tput["supervised"],
                             concurrency=c)
        b_rate = rate_figure("e2e", f"batched throughput, {c} agent(s)", "calls/s", tput["batch"], concurrency=c)
        s_ratio = s_rate.p50 / d_rate.p50
        b_ratio = b_rate.p50 / d_rate.p50
        figures += [d_rate, s_rate, b_rate,
                    Figure("e2e", f"supervised/direct throughput, {c} agent(s)", "ratio", round(s_ratio, 3),
                           target=">= 0.5", met=s_ratio >= 0.5, extra={"concurrency": c}),
                    Figure("e2e", f"batched/direct throughput, {c} agent(s)", "ratio", round(b_ratio, 3),
                           target=">= 1.0", met=b_ratio >= 1.0, extra={"concurrency": c})]
    return {"suite": "e2e", "figures": [f.to_dict() for f in figures], "notes": notes}


def routing_cost_us(shards: int, calls: int = 20000) -> float:
    """What an agent pays to pick its shard (decode the request, hash the root agent), per call."""
    from ..actors import _SupervisorClient
    from ..protocol import encode_call
    from ..trusted.capability import KeyRing

    client = _SupervisorClient([object()] * shards)
    token = KeyRing.generate().mint(holder="agent0").encode()
    requests = [encode_call(agent="agent0", token=token, tool="bench.noop", args={"x": i}, request_key=b"k" * 32)
                for i in range(calls)]
    started = time.perf_counter()
    for r in requests:
        client._shard(r)
    return (time.perf_counter() - started) / calls * 1e6


async def _shard_suite(counts: list[int], quick: bool, progress: Callable[[str], None]) -> dict[str, Any]:
    runs, n = (1, 30) if quick else (3, 200)
    c = max(CONCURRENCY)
    figures: list[Figure] = []
    notes = [f"{c} concurrent agents, {runs} run(s) per figure, {n} calls per agent per run; every shard and "
             "every agent on this machine, so more shards add processes, not cores",
             "routing: the agent side decodes each request and hashes its token's root agent to pick the shard; "
             "the shard checks it (WRONG_SHARD)"]
    for s in counts:
        progress(f"e2e: {s} supervisor shard(s), {c} agents")
        env = await _setup(c, s)
        try:
            for mode in ("direct", "supervised"):
                await _measure(env, mode, max(5, n // 10))
            lat: dict[str, list[list[float]]] = {"direct": [], "supervised": []}
            tput: dict[str, list[float]] = {"direct": [], "supervised": []}
            for _ in range(runs):
                for mode in lat:
                    samples, rate = await _measure(env, mode, n)
                    lat[mode].append(samples)
                    tput[mode].append(rate)
        finally:
            await _teardown(env)
        sup = summarise("e2e", f"supervised, {c} agents, {s} shard(s)", "us", lat["supervised"], concurrency=c,
                        shards=s)
        d_rate = rate_figure("e2e", f"direct throughput, {c} agents, {s} shard(s)", "calls/s", tput["direct"],
                             concurrency=c, shards=s)
        s_rate = rate_figure("e2e", f"supervised throughput, {c} agents, {s} shard(s)", "calls/s",
                             tput["supervised"], concurrency=c, shards=s)
        figures += [sup, d_rate, s_rate,
                    Figure("e2e", f"supervised/direct throughput, {c} agents, {s} shard(s)", "ratio",
                           round(s_rate.p50 / d_rate.p50, 3), extra={"concurrency": c, "shards": s}),
                    Figure("e2e", f"shard routing on the agent side, {s} shard(s)", "us",
                           round(routing_cost_us(s, 2000 if quick else 20000), 2), extra={"shards": s})]
    return {"suite": "e2e", "figures": [f.to_dict() for f in figures], "notes": notes}


def run(quick: bool = False, progress: Callable[[str], None] = print,
        shards: list[int] | None = None) -> dict[str, Any]:
    """The concurrency sweep, or with ``shards`` the sweep over supervisor shard counts."""
    if shards:
        return asyncio.run(_shard_suite(shards, quick, progress))
    return asyncio.run(_suite(quick, progress))
