"""Suite ``authz``: the cost of one in-process authorization decision, without Ray.

What is timed is ``Supervisor.authorize(request_bytes)``: bounded decode of the request,
request MAC, nonce and timestamp check, token verification, revocation check, argument
canonicalisation, caveat evaluation and the quota reservation. Each request is a real
``runtime.protocol.encode_call`` message with its own fresh nonce; requests (and, for the
uncached cases, tokens) are built before a run starts, and each reservation is released
after its sample is taken, so only the decision itself is inside the timed region.

Information flow (``runtime.bench.flow``): a decision with sink rules vs without
(``authorize.flow.added``, target <= 5 us more) and the cost of labelling a result and joining it
into the context (``label.result.*``).

Cases, for tokens with 1, 4 and 16 caveats (not counting the sealed holder caveat that
every token carries), with argument constraints (one_of, regex, path_under, url_host,
range, max_bytes) spread over the counts:

* ``uncached``: a freshly minted token for every call, so neither the verified-token cache
  nor the verified-prefix cache can help: the whole chain is verified each time.
* ``prefix+1``: every call presents a new token that extends an already verified token by
  one caveat (a delegate's attenuated token): only the suffix is verified.
* ``cached``: the same token for every call (new nonce each time): its verification is
  served from the key ring's cache; everything that must be checked per call still is.

``run`` returns ``{"suite", "figures", "profile", "notes"}``; see ``runtime.bench.stats``
for how a figure is summarised over runs.
"""

from __future__ import annotations

import cProfile
import gc
import io
import os
import pstats
import time
from typing import Any, Callable

from ..protocol import encode_call
from ..testing import MemoryAudit
from ..trusted.capability import (Arg, Audience, CallBudget, Caveat, CostBudget, Effects, Expires, KeyRing, MaxDepth,
                                  NotBefore, Token, Tools)
from ..trusted.ledger import AgentQuota
from ..trusted.supervisor import AgentEntry, Supervisor
from ..trusted.wire import ParamSpec, ToolSpec
from . import flow
from .stats import Figure, NoGC as _NoGC, rate_figure, summarise, timed_decisions

SUITE = "authz"
JOB = "bench-job"
AGENT = "bench-agent"
TOOL = "fetch"
TARGETS_P50_US = {("uncached", 4): 20.0, ("cached", 4): 5.0}  # (token cache, caveats) -> p50 target
PROFILE_LINES = 28

SPEC = ToolSpec(TOOL, "read", {
    "path": ParamSpec("string", format="path"),
    "url": ParamSpec("string", format="url"),
    "mode": ParamSpec("string"),
    "limit": ParamSpec("integer"),
    "name": ParamSpec("string"),
    "body": ParamSpec("string", required=False, default=""),
})
ONE_ARG_TOOL = "status"
ONE_ARG_SPEC = ToolSpec(ONE_ARG_TOOL, "read", {"mode": ParamSpec("string")})


def args_for(tool: str, i: int) -> dict[str, Any]:
    """The ``i``-th call's arguments: realistic values, the URL different on every call."""
    if tool == ONE_ARG_TOOL:
        return {"mode": "text"}
    return {"path": "/data/reports/2024/../2025/q3.csv", "url": f"https://api.example.org/v1/items?page={i}",
            "mode": "text", "limit": 250, "name": "q3_report.txt", "body": "status=ok; rows=250; " * 3}


def caveats_for(n: int, now: float, tool: str = TOOL) -> list[Caveat]:
    """The benchmark token's caveats (the holder caveat comes on top)."""
    far = now + 3600.0
    if n == 1:
        return [Arg(tool, "path", "path_under", "/data")]
    if n == 4:
        return [Audience(JOB), Expires(far), Tools((tool, "search")), Arg(tool, "mode", "one_of", ("text", "bytes"))]
    if n == 16:
        return [Audience(JOB), Expires(far), NotBefore(now - 60.0), Tools((tool, "search", "write_file")),
                Effects(("read", "write")), MaxDepth(4), CallBudget(10 ** 9), CostBudget(1e12),
                Arg(tool, "mode", "one_of", ("text", "bytes")),
                Arg(tool, "name", "regex", r"[a-z0-9_-]{1,64}\.(txt|csv)"),
                Arg(tool, "path", "path_under", "/data"),
                Arg(tool, "url", "url_host", ("*.example.org", "example.com")),
                Arg(tool, "limit", "range", (0, 1000)),
                Arg(tool, "body", "max_bytes", 4096),
                Arg("*", "path", "max_bytes", 1024),
                Arg(tool, "url", "regex", r"https://[a-z.]+/v1/[a-z/]+\?page=[0-9]+")]
    raise ValueError(f"no benchmark token with {n} caveats")


class _Bench:
    """A supervisor with one agent and its tools, and the means to build requests for it."""

    def __init__(self, tool: str = TOOL) -> None:
        self.tool = tool
        self.keyring = KeyRing.generate()
        self.request_key = os.urandom(32)
        self.audit = MemoryAudit()
        self.supervisor = Supervisor(job_id=JOB, keyring=self.keyring, tools={TOOL: SPEC, ONE_ARG_TOOL: ONE_ARG_SPEC},
                                     audit=self.audit, dispatcher=_NoDispatch(), dispatch_key=os.urandom(32))
        self.supervisor.register_agent(AgentEntry(AGENT, self.request_key), AgentQuota())
        self.now = time.time()
        self.calls = 0

    def mint(self, n_caveats: int) -> Token:
        return self.keyring.mint(holder=AGENT, caveats=caveats_for(n_caveats, self.now, self.tool))

    def request(self, token: bytes) -> bytes:
        self.calls += 1
        return encode_call(agent=AGENT, token=token, tool=self.tool, args=args_for(self.tool, self.calls),
                           request_key=self.request_key)

    def requests(self, mode: str, n_caveats: int, count: int) -> list[bytes]:
        """``count`` requests, each with its own nonce, for one case."""
        if mode == "uncached":
            return [self.request(self.mint(n_caveats).encode()) for _ in range(count)]
        parent = self.mint(n_caveats)
        if mode == "prefix+1":
            self.keyring.verify(parent)  # the parent chain is verified once, ahead of the run
            # Distinct expiries make every token's bytes (and last tag) distinct.
            return [self.request(parent.attenuate(Expires(self.now + 3000.0 + i * 1e-3)).encode())
                    for i in range(count)]
        if mode == "cached":
            token = parent.encode()
            self.keyring.verify(token)
            return [self.request(token) for _ in range(count)]
        raise ValueError(mode)


class _NoDispatch:
    """``authorize`` never dispatches; a dispatch reaching here is a bug in the benchmark."""

    async def dispatch(self, tool: str, message: bytes, agent: str = "") -> bytes:
        raise AssertionError("authorize() must not dispatch")


def _rate(bench: _Bench, requests: list[bytes]) -> float:
    """One run: decisions per second back to back (reservations released after the run)."""
    authorize = bench.supervisor.authorize
    t = time.perf_counter_ns()
    allowed = [authorize(req) for req in requests]
    elapsed_ns = time.perf_counter_ns() - t
    for ok in allowed:
        bench.supervisor.ledger.release(ok.reservation)
    return len(requests) / (elapsed_ns / 1e9)


def _latency_figure(mode: str, n_caveats: int, runs: int, n: int, warmup: int, tool: str = TOOL) -> Figure:
    bench = _Bench(tool)
    timed_decisions(bench.supervisor, bench.requests(mode, n_caveats, warmup))
    per_run = [bench.requests(mode, n_caveats, n) for _ in range(runs)]
    with _NoGC():
        samples = [timed_decisions(bench.supervisor, requests) for requests in per_run]
    target = TARGETS_P50_US.get((mode, n_caveats)) if tool == TOOL else None
    name = f"authorize.{n_caveats}cav.{mode}" + ("" if tool == TOOL else ".one_arg")
    return summarise(SUITE, name, "us", samples, target_max_p50=target, caveats=n_caveats, token_cache=mode,
                     tool=tool, args=len(args_for(tool, 0)))


def _rate_figure(runs: int, n: int) -> Figure:
    bench = _Bench()
    _rate(bench, bench.requests("cached", 4, n))
    per_run = [bench.requests("cached", 4, n) for _ in range(runs)]
    with _NoGC():
        rates = [_rate(bench, requests) for requests in per_run]
    return rate_figure(SUITE, "authorize.4cav.cached.rate", "decisions/s", [round(r, 1) for r in rates],
                       caveats=4, token_cache="cached", threads=1)


def _profile(n: int) -> str:
    """cProfile of the 4-caveat case, uncached and cached, top functions by own time."""
    out = io.StringIO()
    for mode in ("uncached", "cached"):
        bench = _Bench()
        requests = bench.requests(mode, 4, n)
        authorize, release = bench.supervisor.authorize, bench.supervisor.ledger.release
        profiler = cProfile.Profile()
        with _NoGC():
            profiler.enable()
            for req in requests:
                release(authorize(req).reservation)
            profiler.disable()
        out.write(f"== 4 caveats, {mode}: {n} calls (release() included), sorted by own time ==\n")
        stats = pstats.Stats(profiler, stream=out)
        stats.strip_dirs().sort_stats("tottime").print_stats(PROFILE_LINES)
    return out.getvalue()


def run(quick: bool = False, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the suite; ``quick`` takes about a second (for tests), the full run about a minute."""
    runs, n, warmup = (3, 200, 50) if quick else (7, 2000, 500)
    gc.collect()
    figures = []
    for mode in ("uncached", "prefix+1", "cached"):
        for n_caveats in (1, 4, 16):
            fig = _latency_figure(mode, n_caveats, runs, n, warmup)
            progress(f"{fig.name}: p50 {fig.p50} us, p99 {fig.p99} us"
                     + (f" (target {fig.target}: {'met' if fig.met else 'MISSED'})" if fig.target else ""))
            figures.append(fig)
    for mode in ("uncached", "cached"):
        fig = _latency_figure(mode, 4, runs, n, warmup, ONE_ARG_TOOL)
        progress(f"{fig.name}: p50 {fig.p50} us, p99 {fig.p99} us")
        figures.append(fig)
    rate = _rate_figure(runs, n)
    progress(f"{rate.name}: {rate.p50:.0f} {rate.unit} on one thread")
    figures.append(rate)
    for fig in flow.decision_figures(runs, n, warmup, _NoGC) + flow.labelling_figures(runs, n, warmup, _NoGC):
        progress(f"{fig.name}: p50 {fig.p50} us, p99 {fig.p99} us"
                 + (f" (target {fig.target}: {'met' if fig.met else 'MISSED'})" if fig.target else ""))
        figures.append(fig)
    profile = _profile(300 if quick else 5000)
    notes = [
        "Timed: Supervisor.authorize(request bytes), in process, no Ray: decode, request MAC, nonce, token "
        "verification, revocation, argument canonicalisation, caveat evaluation, quota reservation.",
        "uncached = a freshly minted token for every call (so neither the verified-token cache nor the "
        "verified-prefix cache applies); prefix+1 = a new token per call extending an already verified token by "
        "one caveat; cached = the same token every call (a fresh nonce per request in every case).",
        "Caveat counts exclude the sealed holder caveat every token carries.",
        f"Each call is '{TOOL}' with 6 arguments (a path and a URL, both canonicalised; the URL differs on "
        f"every call); '.one_arg' figures call '{ONE_ARG_TOOL}' with one string argument, the fixed cost of "
        "the pipeline.",
        "Requests and tokens are built outside the timed region; each reservation is released outside it.",
        f"Each latency figure: {runs} runs x {n} calls after {warmup} warm-up calls; p50/p99 are medians over "
        "runs, spread is the min..max run p50. Clock: time.perf_counter_ns.",
        "The garbage collector is disabled during each figure's timed runs (one gc.collect() before the suite, "
        "gc.enable() after each figure).",
        "decisions/s: back-to-back authorize() calls on one thread, so at most one core busy (the process is "
        "not pinned: pinning to a core another process is using would measure that process).",
        *flow.NOTES,
    ]
    for fig in figures:
        if fig.met is False:
            notes.append(f"MISSED: {fig.name} p50 {fig.p50} {fig.unit}, target {fig.target}; see profile.")
    return {"suite": SUITE, "figures": [f.to_dict() for f in figures], "profile": profile, "notes": notes}


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys

    result = run(quick="--quick" in sys.argv)
    print(result["profile"])
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}, indent=1))
