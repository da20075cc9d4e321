"""Suite ``peers``: the same authorization decision made by Warden and by the libraries a user
would otherwise pick, side by side on one machine.

The request and the three cases (allowed; delegated-and-narrowed; denied, a ``..`` escape
from the granted directory) are in ``runtime.bench.peer_adapters``, one adapter per library.
The peers need the optional extra (``pip install -e '.[peers]'``); a peer that does not import
is skipped and said so, and the suite still times Warden.

Before anything is timed, every adapter must decide the three cases right, and a fourth that
is not timed: the narrowed token used outside its narrower directory must be denied. One that
does not is reported as a wrong decision and left out of the timing. Then three probes, on
fresh adapters, find out (rather than assume) what a decision covers:

* proof of possession: a request built without the holder's key must be denied;
* replay: the same request sent twice must be denied the second time;
* revocation: after the adapter's ``revoke()`` the allowed case must be denied.

Timing: ``runs`` rounds; each round visits every adapter in turn (the order rotates per
round) and times ``n`` decisions of each case, every request built beforehand with its own
nonce, the garbage collector off (as in ``authz``). A figure's p50 is the median of its round
p50s. Each peer is compared with the Warden figure that does at least the work it does (its
``baseline``): ``warden.authorize.cold`` (the whole decision, token chain verified on every
call) for the token libraries, ``warden.caveats`` (the checks on a verified token, no
cryptography) for a policy engine without tokens. A ratio figure is the median over rounds of
peer p50 / baseline p50 within the round, with target >= 1 (Warden the faster).
"""

from __future__ import annotations

import cProfile
import gc
import io
import os
import pstats
import time
from typing import Any, Callable

from .peer_adapters import AGENT, CASES, Adapter, peer_adapters, warden_adapters
from .stats import Figure, NoGC as _NoGC, percentile, rate_figure, summarise

SUITE = "peers"
OUTSIDE_NARROWED = {"path": "/workspace/docs/guide.md", "mode": "r"}  # inside the grant, outside the narrowing
PROFILE_LINES = 24


def _once(adapter: Adapter, req: Any) -> bool:
    try:
        return adapter.decide(req)
    finally:
        adapter.settle()


def gate(adapter: Adapter) -> list[str]:
    """What the adapter decides wrong (empty: all right)."""
    wrong = []
    for case, token, args, want in (*CASES, ("narrowed-outside", "narrowed", OUTSIDE_NARROWED, False)):
        try:
            got = _once(adapter, adapter.request(case, token == "narrowed", args))
        except Exception as exc:  # the adapter could not even build the request: that is wrong too
            wrong.append(f"{case}: {type(exc).__name__}: {exc}"[:200])
            continue
        if got is not want:
            wrong.append(f"{case}: {'allowed' if got else 'denied'}, should be {'allowed' if want else 'denied'}")
    return wrong


def probe(adapter: Adapter) -> dict[str, bool]:
    """Proof of possession, replay protection and revocation, each found out on a fresh adapter."""
    case, _, args, _ = CASES[0]
    a = adapter.fresh()
    forged = a.forge(case, False, args)
    pop = forged is not None and not _once(a, forged)
    a = adapter.fresh()
    req = a.request(case, False, args)
    replay = _once(a, req) and not _once(a, req)
    a = adapter.fresh()
    revocation = a.revoke() and not _once(a, a.request(case, False, args))
    return {"proof_of_possession": pop, "replay": replay, "revocation": revocation}


def _timed(adapter: Adapter, requests: list[Any]) -> list[float]:
    decide, settle, clock = adapter.decide, adapter.settle, time.perf_counter_ns
    samples = []
    for req in requests:
        t = clock()
        decide(req)
        samples.append((clock() - t) / 1000.0)
        settle()
    return samples


def _rounds(adapters: list[Adapter], runs: int, n: int, warmup: int,
            progress: Callable[[str], None]) -> dict[tuple[str, str], list[list[float]]]:
    samples: dict[tuple[str, str], list[list[float]]] = {}
    for a in adapters:  # warm-up: caches, first-call imports, branch predictors
        for case, token, args, _ in CASES:
            _timed(a, [a.request(case, token == "narrowed", args) for _ in range(warmup)])
    for r in range(runs):
        k = r % len(adapters)
        for a in adapters[k:] + adapters[:k]:
            for case, token, args, _ in CASES:
                requests = [a.request(case, token == "narrowed", args) for _ in range(n)]
                with _NoGC():
                    samples.setdefault((a.name, case), []).append(_timed(a, requests))
        progress(f"round {r + 1}/{runs} done")
    return samples


def _profile(adapter: Adapter, n: int) -> str:
    out = io.StringIO()
    case, token, args, _ = CASES[0]
    requests = [adapter.request(case, token == "narrowed", args) for _ in range(n)]
    profiler = cProfile.Profile()
    with _NoGC():
        profiler.enable()
        for req in requests:
            adapter.decide(req)
            adapter.settle()
        profiler.disable()
    out.write(f"== {adapter.name}, case {case}: {n} decisions (settle() included), sorted by own time ==\n")
    pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("tottime").print_stats(PROFILE_LINES)
    return out.getvalue()


def _covers(adapter: Adapter, probed: dict[str, bool]) -> dict[str, str]:
    return {
        "signature": adapter.signature,
        "proof_of_possession": f"yes: {adapter.binding}" if probed["proof_of_possession"]
        else f"no: {adapter.binding}",
        "replay": "yes: a request is accepted once" if probed["replay"] else "no: the same request is accepted again",
        "revocation": f"yes: {adapter.revocation}" if probed["revocation"] else "no",
        "quotas": adapter.quotas,
        "constraints": adapter.constraints,
    }


def report(rows: list[dict[str, Any]], skipped: dict[str, str]) -> str:
    """The side-by-side tables: p50 per case with the ratio to the Warden baseline, then coverage."""
    cases = [c for c, *_ in CASES]
    by_name = {row["name"]: row for row in rows}
    out = ["decider                library                                   "
           + "".join(f"{c + ' p50 us':>18}" for c in cases) + "   x Warden baseline (per case)   baseline"]
    for row in rows:
        p50 = row.get("p50") or {}
        base = by_name.get(row["baseline"], {}).get("p50") or {}
        measured = row.get("ratio") or {}  # the per-round ratios' median where there is one
        ratios = "/".join(f"{measured[c]:.2f}" if c in measured else f"{p50[c] / base[c]:.2f}"
                          if p50.get(c) and base.get(c) else "-" for c in cases)
        cells = "".join(f"{p50[c]:>18.1f}" if c in p50 else f"{'-':>18}" for c in cases)
        note = "" if p50 else f"  ({row['status']})"
        out.append(f"{row['name']:<22} {row['library'][:40]:<41} {cells}   {ratios:<29}  {row['baseline']}{note}")
    out.append("")
    out.append("what one decision covers (proof of possession, replay, revocation: probed, not declared):")
    for row in rows:
        out.append(f"  {row['name']}:")
        for k, v in row["covers"].items():
            out.append(f"    {k.replace('_', ' ')}: {v}")
    for name, why in skipped.items():
        out.append(f"skipped {name}: {why}")
    return "\n".join(out)


def run(quick: bool = False, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Gate, probe and time every adapter; ``quick`` takes a few seconds (for tests)."""
    runs, n, warmup = (3, 100, 20) if quick else (7, 1000, 200)
    load_before = os.getloadavg()
    gc.collect()
    peers, skipped = peer_adapters()
    for name, why in skipped.items():
        progress(f"skipping {name}: {why}")
    adapters, rows, notes = [], [], []
    for a in warden_adapters() + peers:
        probed = probe(a)
        wrong = gate(a)
        row = {"name": a.name, "library": a.library, "baseline": a.baseline, "covers": _covers(a, probed),
               "status": "ok" if not wrong else "wrong decision: " + "; ".join(wrong), "p50": {}}
        rows.append(row)
        if wrong:
            progress(f"{a.name}: WRONG DECISION, not timed: {'; '.join(wrong)}")
            notes.append(f"{a.name} ({a.library}) decided wrong and was not timed: {'; '.join(wrong)}")
        else:
            adapters.append(a)
    samples = _rounds(adapters, runs, n, warmup, progress)
    figures: list[Figure] = []
    for a in adapters:
        for case, *_ in CASES:
            fig = summarise(SUITE, f"{a.name}.{case}", "us", samples[(a.name, case)], library=a.library, case=case,
                            baseline=a.baseline)
            figures.append(fig)
            next(r for r in rows if r["name"] == a.name)["p50"][case] = fig.p50
            progress(f"{fig.name}: p50 {fig.p50} us, p99 {fig.p99} us")
    timed = {a.name for a in adapters}
    for a in adapters:
        if a.name.startswith("warden") or a.baseline not in timed:
            continue
        for case, *_ in CASES:
            per_round = [percentile(sorted(p), 0.5) / percentile(sorted(w), 0.5)
                         for p, w in zip(samples[(a.name, case)], samples[(a.baseline, case)])]
            fig = rate_figure(SUITE, f"{a.name}.{case}.vs.{a.baseline}", "ratio", [round(x, 3) for x in per_round],
                              target_min=1.0, target=">= 1 (Warden faster)", case=case, baseline=a.baseline)
            figures.append(fig)
            next(r for r in rows if r["name"] == a.name).setdefault("ratio", {})[case] = fig.p50
            progress(f"{fig.name}: {fig.p50:.2f}x" + ("" if fig.met else " (the peer is FASTER)"))
    by_name = {a.name: a for a in adapters}
    profile = "".join(_profile(by_name[w], 300 if quick else 3000)
                      for w in ("warden.authorize.cold", "warden.caveats") if w in by_name)
    notes += [
        f"Request: agent {AGENT!r} calls fs.read(path, mode); grant: that tool, path under /workspace/docs, mode "
        "in {r}, expiry in an hour, bound to the agent. Cases: allowed (/workspace/docs/guide.md); delegated = the "
        "grant attenuated by its holder to /workspace/docs/public, used inside it; denied = "
        "/workspace/docs/../private/key.pem. Every adapter also had to deny the narrowed grant used outside "
        "/workspace/docs/public (not timed).",
        "Timed per call: from what arrives on the wire (token bytes, request, proof) to the decision, with each "
        "library's public API; building and signing the request is the client's and is not timed.",
        "warden.authorize: Supervisor.authorize(request bytes), as deployed (verified-token cache warm); "
        ".cold: the same with the key ring's token caches off, so the HMAC chain is verified on every call "
        "as the peers verify theirs; warden.check: KeyRing.verify (no cache) + caveats, no request MAC, "
        "replay, revocation or quota; warden.caveats: the caveats on an already verified token.",
        "Ratios: peer p50 / baseline p50 in the same round, median over rounds; the baseline is the Warden "
        "figure doing at least the peer's work (warden.authorize.cold for token libraries, warden.caveats "
        "for a policy engine without tokens).",
        f"{runs} rounds x {n} decisions per case after {warmup} warm-up ones; adapters interleaved "
        "round-robin, order rotating per round; garbage collector off while timing. Clock: "
        "time.perf_counter_ns.",
        "Load average (1 min) before / after: {:.2f} / {:.2f} on {} CPUs (above 1 per CPU, other work shared the "
        "machine: compare the figures of one run with each other).".format(load_before[0], os.getloadavg()[0],
                                                                          os.cpu_count()),
    ]
    for fig in figures:
        if fig.met is False:
            notes.append(f"MISSED: {fig.name}: the peer took {fig.p50:.2f}x Warden's time (faster); see the profile.")
    rows_text = report(rows, skipped)
    return {"suite": SUITE, "figures": [f.to_dict() for f in figures], "profile": profile, "notes": notes,
            "report": rows_text, "deciders": rows, "skipped": skipped}
