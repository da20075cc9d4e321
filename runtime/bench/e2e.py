"""Suite 2, e2e: the same trivial tool called directly on a Ray actor and through the supervisor.

Both paths start in an agent actor and end in a worker actor on the same node:

* direct: agent actor -> plain Ray actor running ``bench.noop`` (the plain-Ray baseline);
* supervised: agent actor -> supervisor actor (decode, verify, evaluate, reserve, audit)
  -> tool-worker actor (MAC check) -> back, with the audit log written to a real file;
* batched: as supervised, ``batch`` calls per message, each still checked and audited.

With 1, 4 and 16 concurrent agents the suite reports per-call latency (p50/p99 as seen by
the agent), calls per second (all agents' calls / wall time) and the ratios, measured side by
side in the same run; Warden's own cost (supervised against a plain relay actor that checks
nothing: the same extra hop); and the authorization decision as the supervisor actor timed it
(its audit records' ``authz_us``) next to the same decision, same code, in a quiet process.

With ``profile`` the supervisor actor and the tool worker are sampled with py-spy during an
extra supervised run, and the relay and plain worker during an extra relay run; the profile
(CPU per call of each process, the hottest functions, and the raw collapsed stacks for a
flame graph) goes next to the results.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from hashlib import sha256
from pathlib import Path
from typing import Any, Callable

import msgpack

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


def _pin_self(_actor: Any, cpus: list[int]) -> int:
    """Run inside an actor (``__ray_call__``): every thread of its process onto ``cpus``; its pid."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # a thread that ended since the listing: nothing to pin
            continue
    return os.getpid()


def _pid_of(_actor: Any) -> int:
    return os.getpid()


async def _pids(env: dict[str, Any]) -> dict[str, int]:
    """The process of each actor of the benchmark (they all run on this node)."""
    named = {"supervisor": env["supervisors"][0], "tool worker": env["worker"], "plain relay": env["relay"],
             "plain worker": env["plain"], "agent 0": env["agents"][0]}
    pids = await asyncio.gather(*[h.__ray_call__.remote(_pid_of) for h in named.values()])
    return dict(zip(named, pids))


async def _pin(env: dict[str, Any]) -> str:
    """Each supervisor shard on a core of its own, everything else of the benchmark on the cores left.
    Returns what was done (there may be fewer cores than shards + 1: then they share, and it says so)."""
    cpus, shards = sorted(os.sched_getaffinity(0)), env["supervisors"]
    if len(cpus) > len(shards):
        own, rest = [[c] for c in cpus[:len(shards)]], cpus[len(shards):]
        how = f"{len(shards)} shard(s) on cores {cpus[:len(shards)]}, agents and workers on cores {rest}"
    else:
        own, rest = [[cpus[i % len(cpus)]] for i in range(len(shards))], cpus
        how = (f"only {len(cpus)} core(s) for {len(shards)} shard(s) + agents: shard i on core i mod {len(cpus)}, "
               f"agents and workers on all of {cpus} (shared: this measures sharing, not scaling)")
    others = [env["worker"], env["plain"], env["relay"], *env["agents"]]
    await asyncio.gather(*[h.__ray_call__.remote(_pin_self, c) for h, c in zip(shards, own)],
                         *[h.__ray_call__.remote(_pin_self, rest) for h in others])
    return how


def _cpu_s(pid: int) -> float:
    """CPU time (user + system) of a process so far, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


IDLE_FRAMES = ("select", "main_loop", "Condition.wait", "Event.wait", "_wait_for_tstate_lock", "Queue.get")


def _profiled(pids: dict[str, int], seconds_hint: float = 600.0) -> Any:
    """py-spy sampling every process in ``pids`` until the returned stop() is called; stop() gives
    {name: raw collapsed stacks}. None when py-spy is not installed (pip install py-spy)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.access(spy, os.X_OK):
        return None
    out = Path(tempfile.mkdtemp(prefix="warden-spy-"))
    procs = {name: subprocess.Popen([spy, "record", "-p", str(pid), "-r", str(SPY_RATE), "-f", "raw", "--nonblocking",
                                     "-d", str(int(seconds_hint)), "-o", str(out / f"{pid}.txt")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for name, pid in pids.items()}
    time.sleep(0.5)  # py-spy attaches (it signals nothing when it has: nothing to await but time)

    def stop() -> dict[str, str]:
        for p in procs.values():
            p.send_signal(signal.SIGINT)  # py-spy writes what it has on ^C
        raw = {}
        for name, p in procs.items():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:  # a py-spy that does not stop: its profile is lost, not the run
                p.kill()
            f = out / f"{pids[name]}.txt"
            raw[name] = f.read_text() if f.exists() else ""
        shutil.rmtree(out, ignore_errors=True)
        return raw
    return stop


SPY_RATE = 100  # samples per second; py-spy costs the sampled process little at this rate (--nonblocking)


def _hot(raw: str, calls: int, top: int = 40) -> tuple[float, list[str]]:
    """From py-spy's collapsed stacks: busy microseconds per call, and the functions that take them
    (inclusive time; the event loop's idle wait and Ray's idle threads left out)."""
    incl: collections.Counter[str] = collections.Counter()
    busy = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack.strip() or not count.isdigit():
            continue
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        if any(w in frames[-1] for w in IDLE_FRAMES):
            continue
        busy += int(count)
        for f in dict.fromkeys(frames):  # once per stack (recursion), outermost first on ties
            incl[f] += int(count)
    per_call = 1e6 / SPY_RATE / max(calls, 1)
    return busy * per_call, [f"{c * per_call:8.1f}  {f}" for f, c in incl.most_common(top)]


async def _profile(env: dict[str, Any], c: int, n: int) -> tuple[str, dict[str, str]]:
    """CPU per call of each process (from /proc) for a relay run and a supervised run, then the same
    runs sampled by py-spy: the text profile, and the raw stacks per process for a flame graph."""
    pids = await _pids(env)
    lines = [f"== {c} agent(s), {n} calls per agent per run", "CPU per call (us, /proc utime+stime; 10 ms ticks):",
             "  run         " + "".join(f"{k:>14}" for k in pids)]
    for mode in ("relay", "supervised"):
        before = {k: _cpu_s(p) for k, p in pids.items()}
        samples, _ = await _measure(env, mode, n)
        calls = {k: n if k == "agent 0" else len(samples) for k in pids}  # agent 0 made n of them
        lines.append(f"  {mode:<12}" + "".join(f"{1e6 * (_cpu_s(p) - before[k]) / calls[k]:14.0f}"
                                               for k, p in pids.items()))
    raw: dict[str, str] = {}
    for mode, who in (("relay", ("plain relay", "plain worker")), ("supervised", ("supervisor", "tool worker"))):
        stop = _profiled({k: pids[k] for k in who})
        if stop is None:
            lines.append("py-spy is not installed (pip install py-spy, or the bench extra): no sampled profile")
            break
        samples, _ = await _measure(env, mode, n)
        for name, stacks in stop().items():
            busy, hot = _hot(stacks, len(samples))
            lines += [f"-- {name}, {mode} run: {busy:.0f} us busy per call (py-spy {SPY_RATE} Hz, inclusive us "
                      "per call; the sampler slows the process, compare processes with each other)", *hot]
            raw[f"e2e-profile-{c}-{name.replace(' ', '-')}.txt"] = stacks
    return "\n".join(lines), raw


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


class _Instant:
    """A dispatcher whose worker answers at once: the supervisor's own work, and nothing else."""

    reply = msgpack.packb({"ok": True, "value": 0, "cost": None}, use_bin_type=True)

    async def dispatch(self, tool: str, message: bytes, agent: str = "") -> bytes:
        return self.reply


async def quiet_decisions_us(calls: int, pause_s: float = 0.0) -> list[float]:
    """The decision of the supervised path, the same code as in the actor (``Shard.handle``: audit log
    and state journal on, ``fsync: rotate``, the same token and request), in this process with no Ray
    call in flight; ``authz_us`` of every allowed call's record, as the actor's figure is read.
    ``pause_s``: idle time between calls, as between an agent's calls (the CPU's caches go cold)."""
    from ..actors import Shard
    from ..protocol import encode_call
    from ..tool import load_tools
    from ..trusted.capability import Audience, Expires, KeyRing, Tools
    from ..trusted.ledger import AgentQuota
    from ..trusted.supervisor import AgentEntry

    tools, keyring, run_dir = load_tools(["runtime.bench.tools"]), KeyRing.generate(), Path(tempfile.mkdtemp())
    key, job = secrets.token_bytes(32), "bench-quiet"
    token = keyring.mint(holder="agent0", caveats=[Audience(job), Expires(time.time() + 3600),
                                                   Tools(("bench.noop",))]).encode()
    try:
        shard = Shard(job_id=job, keys=keyring.to_secret_dict(), dispatch_key=secrets.token_bytes(32),
                      tools=[t.spec for t in tools.values()], audit_path=str(run_dir / "audit.log"), workers=[object()],
                      agents=[(AgentEntry("agent0", key), AgentQuota())], call_timeout_s=60, credentials={},
                      audit_options={"fsync": "rotate"}, state_path=str(run_dir / "state.journal"),
                      host_secret=secrets.token_bytes(32))
        shard.sup.dispatcher = _Instant()

        for i in range(calls):
            await shard.handle("call", encode_call(agent="agent0", token=token, tool="bench.noop", args={"x": i},
                                                   request_key=key))
            if pause_s:
                await asyncio.sleep(pause_s)  # nothing to await but time: the gap between two calls
        await shard.close("ok")
        return sorted(r["authz_us"] for r in auditlog.read_records(run_dir / "audit.log")
                      if r.get("decision") == "allow")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


async def _measure(env: dict[str, Any], mode: str, n: int) -> tuple[list[float], float]:
    task = {"mode": mode, "n": n, "batch": BATCH, "plain": env["plain"], "relay": env["relay"]}
    started = time.perf_counter()
    outs = await asyncio.gather(*[a.run.remote(task) for a in env["agents"]])
    wall = time.perf_counter() - started
    samples = [x for o in outs for x in o["samples_us"]]
    return samples, len(samples) / wall


OWN_COST_MAX = 1.05  # supervised over the plain relay: Warden's own cost on top of the hop
IN_ACTOR_MAX = 1.5  # the decision in the actor over the same decision in a quiet process


async def _suite(quick: bool, progress: Callable[[str], None], profile: bool = False) -> dict[str, Any]:
    runs, n = (1, 30) if quick else (5, 200)
    figures: list[Figure] = []
    profiles: list[str] = []
    attachments: dict[str, str] = {}
    notes = [f"{runs} run(s) per figure; each agent makes {n} calls per run after a warm-up; batches of {BATCH}",
             "plain relay: an async Ray actor that forwards to the plain worker and checks nothing - the cost of "
             "one more actor hop on this machine, which any mediating design pays; supervised/plain relay is "
             "what Warden's checks, audit and MAC'd dispatch add on top of that hop",
             "latency is per call as the agent sees it (a batched call's latency is the message's / batch size)",
             "decision in the actor: the authz_us of the supervisor's audit records (decode to reservation, "
             "journal included); in a quiet process: the same code (Shard.handle, audit log and state journal "
             "on, fsync rotate, same token and request) driven in the benchmark's own process with an instant "
             "worker"]
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
                for mode in lat:  # interleaved, so the machine's noise hits all of them alike
                    samples, rate = await _measure(env, mode, n)
                    lat[mode].append(samples)
                    tput[mode].append(rate)
            if profile and c in (1, max(CONCURRENCY)):
                progress(f"e2e: profiling the supervisor actor, {c} agent(s)")
                text, raw = await _profile(env, c, max(n, 2000 // c))  # enough calls for /proc's 10 ms ticks
                profiles.append(text)
                attachments.update(raw)
        finally:
            # The supervisor's own measurement of each decision, from its audit log.
            authz = await _teardown(env)
        authz_p50_us = statistics.median(authz)
        direct = summarise("e2e", f"direct, {c} agent(s)", "us", lat["direct"], concurrency=c)
        sup = summarise("e2e", f"supervised, {c} agent(s)", "us", lat["supervised"], concurrency=c)
        bat = summarise("e2e", f"batched x{BATCH}, {c} agent(s)", "us", lat["batch"], concurrency=c)
        rel = summarise("e2e", f"plain relay (no checks), {c} agent(s)", "us", lat["relay"], concurrency=c)
        ratio, own = sup.p50 / direct.p50, sup.p50 / rel.p50
        figures += [direct, rel, sup, bat,
                    Figure("e2e", f"added per call by Warden (supervised - direct p50), {c} agent(s)", "ms",
                           round((sup.p50 - direct.p50) / 1000, 3), runs=runs, n=sup.n,
                           extra={"concurrency": c, "added_per_call": True}),
                    Figure("e2e", f"supervised/direct p50, {c} agent(s)", "ratio", round(ratio, 3),
                           target="<= 2.0", met=ratio <= 2.0, extra={"concurrency": c}),
                    Figure("e2e", f"plain relay/direct p50 (the floor of one more hop), {c} agent(s)", "ratio",
                           round(rel.p50 / direct.p50, 3), extra={"concurrency": c}),
                    Figure("e2e", f"supervised/plain relay p50 (Warden's own cost), {c} agent(s)", "ratio",
                           round(own, 3), target=f"<= {OWN_COST_MAX}", met=own <= OWN_COST_MAX,
                           extra={"concurrency": c}),
                    Figure("e2e", f"decision in the supervisor actor, {c} agent(s)", "us", round(authz_p50_us, 1),
                           round(authz[min(len(authz) - 1, int(0.99 * len(authz)))], 1), n=len(authz),
                           extra={"concurrency": c}),
                    Figure("e2e", f"authorization share of supervised p50, {c} agent(s)", "%",
                           round(100 * authz_p50_us / sup.p50, 3), target="<= 2 %",
                           met=100 * authz_p50_us / sup.p50 <= 2.0,
                           extra={"concurrency": c, "authz_p50_us": round(authz_p50_us, 2)})]
        d_rate = rate_figure("e2e", f"direct throughput, {c} agent(s)", "calls/s", tput["direct"], concurrency=c)
        r_rate = rate_figure("e2e", f"plain relay throughput, {c} agent(s)", "calls/s", tput["relay"], concurrency=c)
        s_rate = rate_figure("e2e", f"supervised throughput, {c} agent(s)", "calls/s", tput["supervised"],
                             concurrency=c)
        b_rate = rate_figure("e2e", f"batched throughput, {c} agent(s)", "calls/s", tput["batch"], concurrency=c)
        s_ratio, b_ratio, own_t = s_rate.p50 / d_rate.p50, b_rate.p50 / d_rate.p50, r_rate.p50 / s_rate.p50
        figures += [d_rate, r_rate, s_rate, b_rate,
                    Figure("e2e", f"supervised/direct throughput, {c} agent(s)", "ratio", round(s_ratio, 3),
                           target=">= 0.5", met=s_ratio >= 0.5, extra={"concurrency": c}),
                    Figure("e2e", f"plain relay/supervised throughput (Warden's own cost), {c} agent(s)", "ratio",
                           round(own_t, 3), target=f"<= {OWN_COST_MAX}", met=own_t <= OWN_COST_MAX,
                           extra={"concurrency": c}),
                    Figure("e2e", f"batched/direct throughput, {c} agent(s)", "ratio", round(b_ratio, 3),
                           target=">= 1.0", met=b_ratio >= 1.0, extra={"concurrency": c})]
        if c == 1:  # the in-actor decision against the same decision in a quiet process, one agent each
            quiet = await quiet_decisions_us(max(n, 200) * runs)
            q50, gap_s = statistics.median(quiet), 1e-6 * sup.p50
            spaced = await quiet_decisions_us(max(n, 200) * runs // 2, gap_s)
            figures += [Figure("e2e", "the same decision in a quiet process (no Ray call in flight)", "us",
                               round(q50, 1), round(quiet[int(0.99 * (len(quiet) - 1))], 1), n=len(quiet)),
                        Figure("e2e", "the same, one call every supervised p50 (idle between: caches go cold)", "us",
                               round(statistics.median(spaced), 1), round(spaced[int(0.99 * (len(spaced) - 1))], 1),
                               n=len(spaced), extra={"pause_us": round(sup.p50, 1)}),
                        Figure("e2e", "decision in the actor / in a quiet process, 1 agent", "ratio",
                               round(authz_p50_us / q50, 3), target=f"<= {IN_ACTOR_MAX}",
                               met=authz_p50_us / q50 <= IN_ACTOR_MAX)]
    out: dict[str, Any] = {"suite": "e2e", "figures": [f.to_dict() for f in figures], "notes": notes}
    if profiles:
        out["profile"] = "\n\n".join(profiles) + "\n"
        out["attachments"] = attachments
    return out


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


async def _shard_suite(counts: list[int], quick: bool, progress: Callable[[str], None],
                       pin: bool = False) -> dict[str, Any]:
    runs, n = (1, 30) if quick else (3, 200)
    c = max(CONCURRENCY)
    figures: list[Figure] = []
    notes = [f"{c} concurrent agents, {runs} run(s) per figure, {n} calls per agent per run",
             "routing: the agent side decodes each request and hashes its token's root agent to pick the shard; "
             "the shard checks it (WRONG_SHARD)",
             "scaling efficiency: supervised calls/s at N shards / (N x calls/s at 1 shard); 1.0 is linear"]
    if not pin:
        notes.append("unpinned: every shard and every agent share this machine's cores as the OS schedules them")
    one_shard: float | None = None
    for s in counts:
        progress(f"e2e: {s} supervisor shard(s), {c} agents" + (", pinned" if pin else ""))
        env = await _setup(c, s)
        try:
            if pin:
                notes.append(f"pinned, {s} shard(s): {await _pin(env)}")
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
        how = {"concurrency": c, "shards": s, "pinned": pin}
        sup = summarise("e2e", f"supervised, {c} agents, {s} shard(s)", "us", lat["supervised"], **how)
        d_rate = rate_figure("e2e", f"direct throughput, {c} agents, {s} shard(s)", "calls/s", tput["direct"], **how)
        s_rate = rate_figure("e2e", f"supervised throughput, {c} agents, {s} shard(s)", "calls/s",
                             tput["supervised"], **how)
        one_shard = s_rate.p50 if s == 1 else one_shard
        figures += [sup, d_rate, s_rate,
                    Figure("e2e", f"supervised throughput per shard, {c} agents, {s} shard(s)", "calls/s",
                           round(s_rate.p50 / s, 1), extra=how),
                    Figure("e2e", f"supervised/direct throughput, {c} agents, {s} shard(s)", "ratio",
                           round(s_rate.p50 / d_rate.p50, 3), extra=how),
                    Figure("e2e", f"shard routing on the agent side, {s} shard(s)", "us",
                           round(routing_cost_us(s, 2000 if quick else 20000), 2), extra={"shards": s})]
        if one_shard and s > 1:
            eff = s_rate.p50 / (s * one_shard)
            figures.append(Figure("e2e", f"scaling efficiency, {s} shard(s)", "ratio", round(eff, 3),
                                  extra={**how, "cores": len(os.sched_getaffinity(0))}))
    return {"suite": "e2e", "figures": [f.to_dict() for f in figures], "notes": notes}


def run(quick: bool = False, progress: Callable[[str], None] = print,
        shards: list[int] | None = None, profile: bool = False, pin: bool = False) -> dict[str, Any]:
    """The concurrency sweep (``profile``: with py-spy profiles of the supervisor actor), or with
    ``shards`` the sweep over supervisor shard counts (``pin``: each shard on a core of its own)."""
    if shards:
        return asyncio.run(_shard_suite(shards, quick, progress, pin))
    return asyncio.run(_suite(quick, progress, profile))
