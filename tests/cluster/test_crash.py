"""Crashes on the shared three-node cluster: a tool worker, an agent actor and a supervisor shard
killed with SIGKILL (as the OOM killer would), by the pid of the real process, under load."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import pytest
import yaml

from runtime.control import ControlClient
from runtime.job import load_job, run_loaded
from runtime import auditlog
from runtime.trusted.supervisor import shard_of, sign_dispatch

from .test_control_plane import Background
from .test_scale_out import _lines

pytestmark = pytest.mark.cluster
TOOLS = ["tests.cluster.agents_under_test", "runtime.toolbox"]


def _job(tmp_path: Path, name: str, agents: dict[str, dict[str, Any]], **extra: Any) -> Path:
    """A job file of CrashLoadAgents (or ``cls``) with a policy each: crash.* and fs.* under bubblewrap."""
    specs = []
    for agent, task in agents.items():
        policy = tmp_path / f"{agent}-policy.yaml"
        policy.write_text(yaml.safe_dump({
            "agent": agent, "sandbox": {"backend": "bwrap"}, "quotas": {"max_concurrent": 16},
            "tools": {"crash.mark": {"effect": "write"}, "crash.hold": {"effect": "write"},
                      "worker.pid": {"effect": "read"}, "fs.write": {"effect": "write"},
                      "fs.read": {"effect": "read"}}}))
        specs.append({"name": agent, "class": f"tests.cluster.agents_under_test:{task.pop('cls', 'CrashLoadAgent')}",
                      "policy": str(policy), "task": task.pop("task", task)})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "entry": list(agents), "tools": TOOLS, "agents": specs,
                                    "call_timeout_s": 60, **extra}))
    return path


def _wait_for(what: str, ready: Any, job: Background, deadline_s: float = 90) -> None:
    end = time.monotonic() + deadline_s
    while not ready():
        assert time.monotonic() < end and job.thread.is_alive(), f"never: {what}"
        time.sleep(0.02)  # another process's file: nothing to await


def _marks(path: Path) -> list[tuple[int, int]]:
    return [(int(i), int(pid)) for i, pid in (line.split() for line in _lines(path))]


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [r for log in sorted(run_dir.glob("audit*.log")) for r in auditlog.read_records(log)]


def _one_outcome_each(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every allowed call has exactly one outcome record; returns the outcomes by call id."""
    allowed = {r["call_id"] for r in records if r["kind"] == "decision" and r["decision"] == "allow"}
    outcomes = [r for r in records if r["kind"] == "outcome"]
    assert Counter(r["call_id"] for r in outcomes) == Counter(allowed)
    return {r["call_id"]: r for r in outcomes}


def test_agents_are_spread_evenly_over_the_workers_and_stay_on_theirs(ray_instance, tmp_path):
    agents = {f"a{i}": {"cls": "PidAgent", "task": 3} for i in range(4)}  # crc32 put all four on one of two
    result = asyncio.run(run_loaded(load_job(_job(tmp_path, "spread", agents, workers={"count": 2})),
                                    runs_dir=tmp_path / "runs"))
    assert result.ok, result.errors
    pids = {name: set(seen) for name, seen in result.results.items()}
    assert all(len(p) == 1 for p in pids.values()), pids  # one worker per agent: its session stays put
    assert sorted(Counter(p for s in pids.values() for p in s).values()) == [2, 2]


def test_a_tool_worker_killed_under_load_fails_its_in_flight_calls_once_and_its_agents_carry_on(ray_instance,
                                                                                                  tmp_path):
    marks, spared_marks, held = tmp_path / "hit.marks", tmp_path / "spared.marks", tmp_path / "held.pid"
    calls, parallel = 120, 2
    job_file = _job(tmp_path, "worker-crash", workers={"count": 2}, agents={
        "hit": {"calls": calls, "parallel": parallel, "path": str(marks), "hold": str(held), "workspace": True},
        "spared": {"calls": calls, "parallel": parallel, "path": str(spared_marks), "workspace": True}})
    job = Background(str(job_file), tmp_path / "runs")
    run_dir = job.run_dir()
    _wait_for("a call held on hit's worker, under load", lambda: held.exists() and len(_lines(marks)) >= 20, job)
    victim = int(held.read_text())
    old_root = Path((run_dir / "worker-0.workspaces").read_text())  # hit's worker, by placement
    assert [ws for ws in old_root.iterdir()]  # hit's workspace (and the pool's spare) live here
    os.kill(victim, signal.SIGKILL)
    result = job.join()

    assert result.ok, result.errors
    hit, spared = result.results["hit"], result.results["spared"]
    # The call in flight at the kill ended WORKER_UNAVAILABLE, once; so did at most the load calls in flight.
    assert hit["hold"]["code"] == "WORKER_UNAVAILABLE"
    assert hit["codes"]["ok"] >= calls * parallel - parallel and set(hit["codes"]) <= {"ok", "WORKER_UNAVAILABLE"}
    assert spared["codes"] == {"ok": calls * parallel}  # the other worker never noticed
    # Later calls ran on the restarted worker (a new process); none ran twice.
    ran = _marks(marks)
    lost_load = hit["codes"].get("WORKER_UNAVAILABLE", 0)
    assert len(ran) == len({i for i, _ in ran})
    assert hit["codes"]["ok"] <= len(ran) <= hit["codes"]["ok"] + lost_load  # a lost call may have run, once
    pids = [pid for _, pid in ran]
    assert pids[0] == victim and pids[-1] != victim and set(pids) == {victim, pids[-1]}
    assert pids.index(pids[-1]) == pids.count(victim)  # no call on the old process after the new one started
    assert {pid for _, pid in _marks(spared_marks)} - {victim, pids[-1]} == {pid for _, pid in _marks(spared_marks)}
    # The agent's workspace died with its worker: the new session started with an empty one.
    assert hit["wrote"]["ok"] and hit["read"]["code"] == "TOOL_FAILED"
    assert spared["read"] == {"ok": True, "value": "kept"}
    assert not old_root.exists() and str(old_root) not in Path("/proc/mounts").read_text()  # removed on restart
    # Every allowed call has exactly one outcome record; the failures are the ones the agent saw.
    records = _records(run_dir)
    outcomes = _one_outcome_each(records)
    lost = [r for r in outcomes.values() if r.get("code") == "WORKER_UNAVAILABLE"]
    assert len(lost) == lost_load + 1 and {r["agent"] for r in lost} == {"hit"}
    assert result.audit_ok, result.audit_problem
    # Every call that ran was allowed first, and each ran where it says.
    allowed_i = {r["args"]["i"] for r in records if r["kind"] == "decision" and r["agent"] == "hit"
                 and r["tool"] == "crash.mark"}
    assert {i for i, _ in ran} <= allowed_i


def test_a_restarted_worker_refuses_a_replay_of_what_its_predecessor_ran(ray_instance, tmp_path):
    """The Ray actor, restarted after a real SIGKILL, against dispatches signed with the job's key."""
    import ray

    from runtime.actors import ToolWorkerActor

    key, marks = os.urandom(32), tmp_path / "replay.marks"
    worker = ToolWorkerActor.options(max_restarts=2, max_task_retries=0).remote(
        dispatch_key=key, tool_modules=TOOLS[:1], job_id="job-r", tool_config={"run_dir": str(tmp_path)},
        index=0, call_timeout_s=60.0)

    def dispatch(i: int) -> bytes:
        return sign_dispatch(key, {"call_id": f"c{i}", "job": "job-r", "agent": "a", "tool": "crash.mark",
                                   "args": {"path": str(marks), "i": i}, "deadline": time.time() + 60.0})

    def run(message: bytes) -> str:
        reply = msgpack.unpackb(ray.get(worker.execute.remote(message)))
        return "ok" if reply["ok"] else reply["error"]["code"]

    def restarted(old_pid: int) -> dict[str, Any]:
        """Kill the worker's process, and wait until Ray has a new one answering."""
        os.kill(old_pid, signal.SIGKILL)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                status = ray.get(worker.status.remote())  # read-only: safe to ask again
            except ray.exceptions.ActorUnavailableError:  # sent before Ray noticed the death
                continue
            if status["pid"] != old_pid:
                return status
        raise AssertionError("the worker was not restarted")

    first, never_sent = dispatch(1), dispatch(2)
    assert run(first) == "ok"
    new = restarted(ray.get(worker.status.remote())["pid"])
    assert new["restarted"] and not new["record_lost"]
    assert run(first) == "DISPATCH_REFUSED"  # replayed into the new process: its predecessor ran it
    assert run(never_sent) == "ok"  # signed before the restart, never run: it may run once

    # Restarted where its record is not (another node): whatever was issued before its start is refused.
    (tmp_path / "worker-0.dispatches").unlink()
    before = dispatch(3)
    assert restarted(new["pid"])["record_lost"]
    assert run(before) == "DISPATCH_REFUSED"
    assert run(dispatch(4)) == "ok"  # issued after the restart
    assert [i for i, _ in _marks(marks)] == [1, 2, 4]
    ray.kill(worker)


def test_a_killed_agents_call_in_flight_still_ends_on_record(ray_instance, tmp_path):
    """The agent dies while its call is on the worker; the others finish first. The job waits
    for that call to end (here at its 5 s call timeout) before it closes the log."""
    held, pid_file = tmp_path / "held.pid", tmp_path / "doomed.pid"
    job_file = _job(tmp_path, "agent-crash", workers={"count": 2}, call_timeout_s=5, agents={
        "doomed": {"hold": str(held), "pid_file": str(pid_file)},
        "other": {"calls": 20, "parallel": 1, "path": str(tmp_path / "other.marks")}})
    job = Background(str(job_file), tmp_path / "runs")
    run_dir = job.run_dir()
    _wait_for("doomed's call held on its worker", held.exists, job)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    result = job.join()

    assert result.failures == {"doomed": "AGENT_DIED"} and "AGENT_DIED" in result.errors["doomed"]
    assert result.results["other"]["codes"] == {"ok": 20}
    records = _records(run_dir)
    outcomes = _one_outcome_each(records)
    (held_call,) = [r for r in outcomes.values() if r["agent"] == "doomed"]
    assert held_call["tool"] == "crash.hold" and held_call["code"] == "WORKER_UNAVAILABLE"
    assert [r["kind"] for r in records].index("job_end") > [r["kind"] for r in records].index("outcome")
    assert result.audit_ok, result.audit_problem


def test_chaos_a_worker_an_agent_and_a_shard_killed_in_turn_under_load(ray_instance, tmp_path):
    """One job, three kills: nothing runs twice, every allowed call has exactly one outcome, the
    chains verify, and every agent that was not killed finishes."""
    calls, parallel = 150, 2
    names = ["w", "doomed", "s", "calm"]  # placed in order: w, s on worker 0; doomed, calm on worker 1
    marks = {n: tmp_path / f"{n}.marks" for n in names}
    tasks = {n: {"calls": calls, "parallel": parallel, "path": str(marks[n])} for n in names}
    tasks["w"]["hold"], tasks["doomed"]["pid_file"] = str(tmp_path / "held.pid"), str(tmp_path / "doomed.pid")
    job_file = _job(tmp_path, "chaos", tasks, workers={"count": 2}, supervisors={"shards": 2, "max_restarts": 2})
    victim_shard = shard_of("s", 2)
    job = Background(str(job_file), tmp_path / "runs")
    run_dir = job.run_dir()

    _wait_for("load on w's worker", lambda: (tmp_path / "held.pid").exists() and len(_lines(marks["w"])) >= 20, job)
    os.kill(int((tmp_path / "held.pid").read_text()), signal.SIGKILL)  # 1. a tool worker
    seen = len(_lines(marks["doomed"]))
    _wait_for("more load from doomed", lambda: len(_lines(marks["doomed"])) >= seen + 20, job)
    os.kill(int((tmp_path / "doomed.pid").read_text()), signal.SIGKILL)  # 2. an agent actor
    seen = len(_lines(marks["s"]))
    _wait_for("more load on s's shard", lambda: len(_lines(marks["s"])) >= seen + 20, job)
    shards = ControlClient.from_run_dir(run_dir).status()["shards"]
    os.kill(next(sh["pid"] for sh in shards if sh["shard"] == victim_shard), signal.SIGKILL)  # 3. a shard
    result = job.join()

    # The killed agent is a typed failure; the others finished, with every call accounted for.
    assert result.failures == {"doomed": "AGENT_DIED"} and set(result.errors) == {"doomed"}, result.errors
    assert result.restarts == 1
    for name in ("w", "s", "calm"):
        codes = result.results[name]["codes"]
        assert sum(codes.values()) == calls * parallel, (name, codes)
        assert set(codes) <= {"ok", "WORKER_UNAVAILABLE", "SUPERVISOR_UNAVAILABLE"}, (name, codes)
    assert result.results["w"]["hold"]["code"] == "WORKER_UNAVAILABLE"
    assert result.results["calm"]["codes"].get("WORKER_UNAVAILABLE", 0) == 0
    # Nothing ran twice; nothing ran that was not allowed; every allowed call has one outcome.
    records = _records(run_dir)
    outcomes = _one_outcome_each(records)
    for name in names:
        ran = [i for i, _ in _marks(marks[name])]
        assert len(ran) == len(set(ran)), name
        allowed = {r["args"]["i"] for r in records if r["kind"] == "decision" and r["decision"] == "allow"
                   and r["agent"] == name and r["tool"] == "crash.mark"}
        assert set(ran) <= allowed, name
        ok = [r for r in outcomes.values() if r["agent"] == name and r.get("tool") == "crash.mark" and r["ok"]]
        assert len(ran) >= len(ok), name
    assert [r for r in records if r["kind"] == "shard_restart"]
    assert result.audit_ok, result.audit_problem
    assert all(auditlog.verify(p).ok for p in result.audit_logs)
