"""Cold start and warm call latency of the sandbox backends (gVisor, bubblewrap).

    .venv/bin/python benchmarks/sandbox_latency.py [--repeat 30] [--out benchmarks/results]

For each backend: cold start (a new agent session: workspace, sandbox start, first call),
warm ``python.exec`` of a one-liner (the interpreter was started ahead of time, as between
two model turns), and a trivial command with nothing started ahead. Medians with p99 and
min/max; the figures go to stdout and to ``sandbox_latency.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from runtime.sandbox.base import Limits
from runtime.sandbox.pool import SandboxPool

LIMITS = Limits(cpu_s=5, wall_s=10, memory_mb=256)
PY = ["python3", "-I", "-"]


def stats_ms(xs: list[float]) -> dict[str, float]:
    xs = sorted(x * 1e3 for x in xs)
    p99 = xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]
    return {"p50": round(statistics.median(xs), 2), "p99": round(p99, 2), "min": round(xs[0], 2),
            "max": round(xs[-1], 2), "n": len(xs)}


def measure(backend: str, repeat: int) -> dict[str, dict[str, float]]:
    cold, warm, trivial = [], [], []
    pool = SandboxPool()
    try:
        pool.handle("warmup", backend, LIMITS).run(PY, stdin=b"pass")  # backend probe, outside the figures
        for i in range(max(3, repeat // 5)):
            t = time.perf_counter()
            pool.handle(f"cold-{i}", backend, LIMITS).run(PY, stdin=b"print(1)")
            cold.append(time.perf_counter() - t)
        h = pool.handle("warm", backend, LIMITS)
        h.run(PY, stdin=b"pass")
        for _ in range(repeat):
            time.sleep(0.2)  # the next interpreter starts in the background, as between model turns
            t = time.perf_counter()
            assert h.run(PY, stdin=b"print(1)").stdout == b"1\n"
            warm.append(time.perf_counter() - t)
        for _ in range(repeat):
            t = time.perf_counter()
            h.run(["true"])
            trivial.append(time.perf_counter() - t)
    finally:
        pool.close()
    return {"cold_start_first_call": stats_ms(cold), "warm_python_exec": stats_ms(warm),
            "trivial_command": stats_ms(trivial)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    results = {"machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                           "kernel": platform.release()}, "backends": {}}
    for backend in ("bwrap", "gvisor"):
        print(f"measuring {backend} ...", flush=True)
        results["backends"][backend] = measure(backend, args.repeat)
    print(f"\n{'backend':8} {'measure':24} {'p50 ms':>8} {'p99 ms':>8} {'min':>7} {'max':>8}")
    for backend, figures in results["backends"].items():
        for name, s in figures.items():
            print(f"{backend:8} {name:24} {s['p50']:8.1f} {s['p99']:8.1f} {s['min']:7.1f} {s['max']:8.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sandbox_latency.json").write_text(json.dumps(results, indent=2))
    print(f"\nsaved {out / 'sandbox_latency.json'}")


if __name__ == "__main__":
    main()
