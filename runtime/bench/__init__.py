"""``warden bench``: what the safety costs, measured on this machine.

Suites (each a module with ``run(quick, progress) -> dict``):

* ``authz``   the in-process decision (decode, verify, evaluate, reserve), 1/4/16 caveats
* ``e2e``     a trivial tool called directly on a Ray actor vs through the supervisor, 1/4/16 agents
* ``sandbox`` cold start and warm calls of gVisor and bubblewrap
* ``cost``    supervisor memory per agent, audit bytes per call, latency from 10 to 10,000 calls
* ``peers``   the same decision by Warden and by other authorization libraries (optional extra
  ``peers``; not part of ``all``, which must run without it)

Every figure is a median over repeated runs, with p99 and the spread between runs;
comparisons are ratios measured side by side in the same run. Results go to
``<out>/bench-<suite>.json`` and ``<out>/latest.json`` (all suites of the last run) and PNG
plots to ``<out>/<suite>.png``. ``<out>`` is a new ``runs/bench-<UTC time>-<id>/`` unless the
caller names one: the committed figures in ``benchmarks/results/`` change only when a run is
pointed there on purpose. A missed target is reported as missed, never hidden.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import secrets
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TextIO

SUITES = ("authz", "e2e", "sandbox", "cost")  # what `warden bench all` runs
OPTIONAL_SUITES = ("peers",)  # needs `pip install -e '.[peers]'`; run by name only


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor()
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = "not installed"
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "kernel": platform.release(), "ray": ray_version,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def run_suites(names: list[str], *, quick: bool, progress: Callable[[str], None],
               command: str = "", shards: list[int] | None = None, profile: bool = False,
               pin: bool = False) -> dict[str, Any]:
    """Run the named suites; ``shards`` turns e2e into its sweep over supervisor shard counts
    (saved as suite ``e2e-shards``; ``pin``: each shard on a core of its own); ``profile`` samples
    the e2e supervisor actor with py-spy."""
    results: dict[str, Any] = {"machine": machine(), "quick": quick, "command": command,
                               "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "suites": {}}
    for name in names:
        progress(f"suite {name} ...")
        started = time.monotonic()
        extra: dict[str, Any] = {}
        if name == "e2e":
            extra = {"shards": shards, "pin": pin} if shards else {"profile": profile}
        suite = importlib.import_module(f"runtime.bench.{name}").run(quick=quick, progress=progress, **extra)
        suite["seconds"] = round(time.monotonic() - started, 1)
        if extra.get("shards"):
            name = suite["suite"] = "e2e-shards"
        results["suites"][name] = suite
        progress(f"suite {name} done in {suite['seconds']}s")
    return results


TIMED_UNITS = frozenset({"us", "ms", "calls/s", "ratio", "%"})
NOISE_SPREAD = 0.2  # run p50s further apart than this share of the median: the machine, not Warden


def is_noise(figure: dict[str, Any], quick: bool) -> bool:
    """A --quick timing that says nothing: fewer than 3 runs, or runs that disagree by over 20 %."""
    if not quick or figure["unit"] not in TIMED_UNITS:
        return False
    spread, p50 = figure.get("spread"), abs(figure["p50"])
    return figure.get("runs", 1) < 3 or not spread or p50 == 0 or (spread[1] - spread[0]) / p50 > NOISE_SPREAD


def noise_notes(results: dict[str, Any]) -> list[str]:
    """Per suite, which of a --quick run's timed figures are noise (see ``is_noise``): not to be quoted."""
    notes = []
    for name, suite in results["suites"].items():
        timed = [f for f in suite["figures"] if f["unit"] in TIMED_UNITS]
        noise = [f["name"] for f in timed if is_noise(f, results["quick"])]
        if noise:
            some = f"{len(noise)} of {len(timed)} ({'; '.join(noise)})"
            which = f"all {len(timed)}" if len(noise) == len(timed) else some
            notes.append(f"--quick: {which} timed figures of {name} are noise (fewer than 3 runs, or run medians more "
                         f"than {NOISE_SPREAD:.0%} apart), targets included; run without --quick to quote them")
    return notes


def headline(results: dict[str, Any]) -> list[str]:
    """What a person asks first: how many milliseconds does Warden add to each call, and how sure is that."""
    lines = []
    for f in (f for s in results["suites"].values() for f in s["figures"] if f.get("extra", {}).get("added_per_call")):
        noise = " (--quick: noise, do not quote; run without --quick)" if is_noise(f, results["quick"]) else ""
        lines.append(f"Warden adds {f['p50']:.3f} ms per call with {f['extra']['concurrency']} agent(s) "
                     f"(supervised vs direct Ray call, p50){noise}")
    return lines


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def table(results: dict[str, Any]) -> str:
    rows = []
    for suite in results["suites"].values():
        for f in suite["figures"]:
            spread = f.get("spread")
            met = {True: "met", False: "MISSED", None: ""}[f.get("met")]
            met += " (noise)" if is_noise(f, results.get("quick", False)) else ""
            rows.append([f["suite"], f["name"], f["unit"], _fmt(f["p50"]), _fmt(f.get("p99")),
                         f"{_fmt(spread[0])}..{_fmt(spread[1])}" if spread else "-", f.get("target") or "", met])
    header = ["suite", "measure", "unit", "p50/value", "p99", "spread (run p50s)", "target", ""]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format(*header).rstrip(), line.format(*["-" * w for w in widths]).rstrip()]
    out += [line.format(*r).rstrip() for r in rows]
    return "\n".join(out)


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per suite: latency figures as bars with p99 whiskers, ratios/rates alongside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, suite in results["suites"].items():
        groups: dict[str, list[dict[str, Any]]] = {}
        for f in suite["figures"]:
            groups.setdefault(f["unit"], []).append(f)
        cols = min(2, len(groups))
        rows = (len(groups) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(8 * cols, 0.5 + max(2.5, 0.32 * max(map(len, groups.values())))
                                                      * rows), squeeze=False)
        for ax in axes.flat[len(groups):]:
            ax.set_visible(False)
        for ax, (unit, figs) in zip(axes.flat, groups.items()):
            labels = [f["name"] for f in figs]
            values = [f["p50"] for f in figs]
            errs = [max(0.0, (f.get("p99") or f["p50"]) - f["p50"]) for f in figs]
            colors = ["tab:red" if f.get("met") is False else "tab:green" if f.get("met") else "tab:blue"
                      for f in figs]
            ax.barh(range(len(figs)), values, xerr=[[0.0] * len(errs), errs], color=colors, alpha=0.8,
                    error_kw={"elinewidth": 1, "capsize": 2})
            ax.set_yticks(range(len(figs)), labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(f"{unit} (bar: p50 or value; whisker: p99)", fontsize=8)
            ax.grid(axis="x", alpha=0.3)
        m = results["machine"]
        fig.suptitle(f"warden bench {name} - {m['cpus']} CPU {m['cpu_model'][:40]}; "
                     f"green met, red missed", fontsize=9)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def default_out_dir(runs_dir: str | Path = "runs") -> Path:
    """A new directory for one run's results, named like a job's run directory."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(runs_dir) / f"bench-{stamp}-{secrets.token_hex(3)}"


def main(suite: str, *, quick: bool, as_json: bool, out: str | None = None, command: str = "",
         shards: list[int] | None = None, json_out: TextIO | None = None, profile: bool = False,
         pin: bool = False) -> int:
    names = list(SUITES) if suite == "all" else [suite]
    out_dir = Path(out) if out else default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)

    def progress(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    progress(f"results go to {out_dir}/")

    results = run_suites(names, quick=quick, progress=progress, command=command, shards=shards, profile=profile,
                         pin=pin)
    for name, suite_result in results["suites"].items():
        for file, text in suite_result.pop("attachments", {}).items():  # e.g. raw stacks, for a flame graph
            (out_dir / file).write_text(text)
        (out_dir / f"bench-{name}.json").write_text(json.dumps(
            {"machine": results["machine"], "quick": quick, "started": results["started"], **suite_result}, indent=2))
        if suite_result.get("profile"):  # where the time goes, for whoever chases a missed target
            (out_dir / f"{name}-profile.txt").write_text(suite_result["profile"])
    (out_dir / "latest.json").write_text(json.dumps(results, indent=2))
    pngs = plot(results, out_dir)
    if as_json:
        print(json.dumps(results, indent=2), file=json_out or sys.stdout)  # JSON alone; the rest to stderr
        progress(f"saved {out_dir / 'latest.json'}")
    else:
        m = results["machine"]
        print(f"machine: {m['cpus']} CPU ({m['cpu_model']}), {m['memory_gib']} GiB, Python {m['python']}, "
              f"Ray {m['ray']}, kernel {m['kernel']}{' (quick run)' if quick else ''}\n")
        print(table(results))
        for s in results["suites"].values():
            if s.get("report"):
                print(f"\n{s['suite']}, side by side:\n{s['report']}\n")
        for s in results["suites"].values():
            for note in s.get("notes", []):
                print(f"note ({s['suite']}): {note}")
        for line in noise_notes(results):
            print(f"\n{line}")
        if headline(results):
            print("\n" + "\n".join(headline(results)))
        missed = [f for s in results["suites"].values() for f in s["figures"] if f.get("met") is False]
        if missed:
            print(f"\n{len(missed)} target(s) MISSED; profiles of where the time goes: "
                  + ", ".join(str(out_dir / f"{n}-profile.txt") for n, s in results["suites"].items()
                              if s.get("profile")))
        print(f"\nsaved {out_dir / 'latest.json'} and " + ", ".join(str(p) for p in pngs))
    return 0
