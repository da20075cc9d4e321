"""Running a catalogue: its jobs one after another on one Ray, the scripted operator beside each."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ..job import load_job
from .catalogue import Scenario
from .jobs import group_scenarios, load_shipped_job, write_job
from .judge import Report, ScenarioResult, judge_scenario
from .operator import operate

async def run_catalogue(scenarios: list[Scenario], *, catalogue: Path, out: Path, without_flow: bool = False,
                        without_reader: bool = False, compare: bool | None = None,
                        progress: Callable[[str], None] = lambda _m: None) -> Report:
    """Run the scenarios as jobs, one after another, on the Ray this process is connected to.

    ``without_reader``: each question to the reader replaced by its ``without_reader`` steps (the
    data revealed to the agent); ``without_flow`` implies it (without ``hide`` there is no handle to
    ask about). ``compare`` (default: a normal run): then play the scenarios that ask the reader
    again without it, for the approvals per benign task with and without the reader."""
    started = time.monotonic()
    old_way = without_flow or without_reader
    played = [s.without_reader() for s in scenarios] if old_way else list(scenarios)
    results, jobs, answered, problems = await _run_pass(played, catalogue=catalogue, out=out,
                                                        without_flow=without_flow, progress=progress)
    alt: list[ScenarioResult] = []
    variants = [s.without_reader() for s in scenarios if s.uses_reader]
    if (compare if compare is not None else not old_way) and variants:
        progress(f"the {len(variants)} scenario(s) that ask the reader, again without it (the data revealed)")
        alt, more, answered_alt, problems_alt = await _run_pass(variants, catalogue=catalogue,
                                                                out=out / "without-reader", without_flow=False,
                                                                progress=progress)
        jobs += [{**j, "mode": "without-reader"} for j in more]
        answered += answered_alt
        problems += problems_alt
    order = {s.name: i for i, s in enumerate(scenarios)}
    results.sort(key=lambda r: order[r.name])
    alt.sort(key=lambda r: order[r.name])
    mode = "without-flow" if without_flow else "without-reader" if without_reader else "normal"
    return Report(mode, str(out), round(time.monotonic() - started, 1), results, jobs, answered, problems, alt)


async def _run_pass(scenarios: list[Scenario], *, catalogue: Path, out: Path, without_flow: bool,
                    progress: Callable[[str], None]) -> tuple[list[ScenarioResult], list[dict[str, Any]],
                                                              list[dict[str, Any]], list[str]]:
    units = group_scenarios([s for s in scenarios if not s.job]) + [[s] for s in scenarios if s.job]
    results: list[ScenarioResult] = []
    jobs: list[dict[str, Any]] = []
    answered: list[dict[str, Any]] = []
    problems: list[str] = []
    for i, group in enumerate(units):
        progress(f"job {i + 1}/{len(units)}: {len(group)} scenario(s): {', '.join(s.name for s in group)}")
        if group[0].job:
            job = load_shipped_job(Path(group[0].job), without_flow=without_flow, model_steps=group[0].model_steps)
        else:
            job = load_job(write_job(group, index=i, catalogue=catalogue, out=out, without_flow=without_flow))
        runs = out / f"job-{i}" / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        result, records = await _run_job(job, runs, group, answered, problems)
        jobs.append({"job": result.job, "job_id": result.job_id, "ok": result.ok, "audit_logs": result.audit_logs,
                     "audit_ok": result.audit_ok, "audit_records": result.audit_records, "seconds": result.seconds,
                     "errors": dict(result.errors), "scenarios": [s.name for s in group], "mode": group[0].mode})
        for s in group:
            r = judge_scenario(s, records, job=result.job_id, agent_errors=result.errors)
            results.append(r)
            progress(f"  {s.name}: {sum(a.stopped for a in r.attacks)}/{len(r.attacks)} attack(s) stopped, benign "
                     f"task {r.benign_summary}")
    return results, jobs, answered, problems


async def _run_job(job: Any, runs: Path, group: list[Scenario], answered: list[dict[str, Any]],
                   problems: list[str]) -> tuple[Any, list[dict[str, Any]]]:
    """Run one job with the scripted operator beside it; its result and every audit record it wrote."""
    from ..auditlog import read_records
    from ..job import run_loaded

    done = asyncio.Event()
    operator = asyncio.ensure_future(operate(runs, group, done, answered, problems))
    try:
        result = await run_loaded(job, runs_dir=runs)
    finally:
        done.set()
        await operator
    return result, [r for log in result.audit_logs for r in read_records(log)]


def new_run_dir(runs_dir: str | Path = "runs") -> Path:
    path = Path(runs_dir) / f"redteam-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    path.mkdir(parents=True)
    return path.resolve()


def save(report: Report) -> Path:
    path = Path(report.run_dir) / "report.json"
    path.write_text(json.dumps(report.to_dict(), indent=2, default=str))
    return path
