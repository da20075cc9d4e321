"""Scale-out on the shared three-node cluster (one node per role): placement by role, sharded
supervisors, operator changes carried to every shard, and a shard killed under load."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from runtime.control import ControlClient, ControlError
from runtime.job import load_job, run_loaded
from runtime import auditlog
from runtime.trusted.supervisor import shard_of

from .test_control_plane import Background, warden

pytestmark = pytest.mark.cluster
JOBS = Path(__file__).resolve().parent / "jobs"


def test_every_actor_runs_on_a_node_of_its_role_and_each_shard_decides_its_own_agents(ray_instance, runs_dir):
    where: dict[str, Any] = {}

    async def look(url: str) -> None:
        run_dir = next(runs_dir.glob("*/control.json")).parent
        where.update(await asyncio.to_thread(lambda: ControlClient.from_run_dir(run_dir).status()))

    result = asyncio.run(run_loaded(load_job(JOBS / "sharded.yaml"), runs_dir=runs_dir, before_teardown=look))
    assert result.ok, result.errors
    # By node id: supervisors on the trusted node, agents on the agent node, workers on the sandbox node.
    assert [s["node_id"] for s in where["shards"]] == [ray_instance.trusted] * 2
    assert result.results["nodes"] == {"agent": ray_instance.agent, "worker": ray_instance.sandbox}
    assert len({s["pid"] for s in where["shards"]}) == 2
    # Agent code holds shard handles (to send calls) but cannot use them for anything else.
    assert result.results["sneak"] == {"status": "PermissionError", "serve": "PermissionError",
                                       "sync_message": "PermissionError", "next_event": "PermissionError",
                                       "close": "PermissionError", "apply_peer": "MalformedRequest",
                                       "_event": "AttributeError"}

    # The delegate (quiet, shard 0) spent the delegator's budget (chain, shard 1) on shard 1.
    assert (shard_of("chain", 2), shard_of("quiet", 2), shard_of("nodes", 2)) == (1, 0, 0)
    peer = result.results["chain"]
    assert peer["first"]["ok"] and peer["second"]["ok"]
    assert peer["over_budget"]["code"] == "BUDGET_EXHAUSTED" and peer["narrowed_away"]["code"] == "POLICY_DENIED"
    run_dir = Path(result.run_dir)
    logs = {i: list(auditlog.read_records(run_dir / f"audit-{i}.log")) for i in (0, 1)}
    deciders = {i: Counter(r["agent"] for r in recs if r["kind"] in ("decision", "delegate")) for i, recs in logs.items()}
    assert set(deciders[1]) == {"chain", "quiet"} and deciders[1]["quiet"] == 4
    assert set(deciders[0]) == {"nodes"}
    assert result.audit_logs == [str(run_dir / "audit-0.log"), str(run_dir / "audit-1.log")]

    # One command checks every shard's chain; show merges them in time order.
    verify = warden("audit", "verify", str(run_dir))
    assert verify.returncode == 0 and "2 chains, 2 intact" in verify.stdout, verify.stdout + verify.stderr
    shown = warden("audit", "show", str(run_dir), "--json")
    assert shown.returncode == 0, shown.stderr
    merged = [json.loads(line) for line in shown.stdout.splitlines()]
    assert len(merged) == len(logs[0]) + len(logs[1])
    assert [r["ts"] for r in merged] == sorted(r["ts"] for r in merged)
    assert {r["log"] for r in merged} == {"audit-0.log", "audit-1.log"}


def test_operator_changes_made_through_one_shard_reach_the_other_before_the_next_call(ray_instance, runs_dir):
    assert shard_of("rev", 2) == 0
    job = Background("sharded-revoke.yaml", runs_dir)
    run_dir = job.run_dir()
    info = json.loads((run_dir / "control.json").read_text())
    via_shard_1 = ControlClient(info["urls"][1], info["token"])
    end = time.monotonic() + 60
    while not via_shard_1.approvals():  # parked on shard 0, listed through shard 1
        assert time.monotonic() < end, "the call never parked"
        time.sleep(0.05)  # another process's state: nothing to await
    before = via_shard_1.status()
    new_kid = via_shard_1.keys(action="rotate", by="erin")["current"]
    assert new_kid not in before["keys"]
    on_shard_0 = ControlClient(info["urls"][0], info["token"]).status()
    assert on_shard_0["current_key"] == new_kid and new_kid in on_shard_0["keys"]
    via_shard_1.revoke(agent="rev", by="dan")
    result = job.join()
    seen = result.results["rev"]
    assert seen["in_flight"]["code"] == "APPROVAL_DENIED"  # the parked call, on shard 0
    assert seen["after"]["code"] == "TOKEN_REVOKED"
    shard0 = list(auditlog.read_records(run_dir / "audit-0.log"))
    assert [r for r in shard0 if r["kind"] == "revoke" and r.get("agent") == "rev" and "dan via shard 1" in r["by"]]
    assert [r for r in shard0 if r["kind"] == "key_added" and r["kid"] == new_kid]


def _restart_job(tmp_path: Path) -> tuple[Path, Path, Path]:
    marks, quiet_marks = tmp_path / "load.marks", tmp_path / "quiet.marks"
    job = {"name": "restart", "entry": ["load", "quiet"], "tools": ["tests.cluster.agents_under_test"],
           "workers": {"count": 2}, "supervisors": {"shards": 2, "max_restarts": 2},
           "agents": [{"name": "load", "class": "tests.cluster.agents_under_test:LoadAgent",
                       "policy": str(JOBS / "load-policy.yaml"),
                       "task": {"calls": 200, "parallel": 2, "path": str(marks)}},
                      {"name": "quiet", "class": "tests.cluster.agents_under_test:LoadAgent",
                       "policy": str(JOBS / "quiet-load-policy.yaml"),
                       "task": {"calls": 60, "parallel": 1, "path": str(quiet_marks)}}]}
    path = tmp_path / "restart.yaml"
    path.write_text(yaml.safe_dump(job))
    return path, marks, quiet_marks


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_a_shard_killed_under_load_loses_nothing_resets_nothing_and_runs_nothing_twice(ray_instance, tmp_path):
    job_file, marks, quiet_marks = _restart_job(tmp_path)
    runs = tmp_path / "runs"
    victim = shard_of("load", 2)
    assert victim != shard_of("quiet", 2)
    job = Background(str(job_file), runs)  # an absolute path: JOBS / it is it
    run_dir = job.run_dir()
    end = time.monotonic() + 90
    while len(_lines(marks)) < 30:  # the load is running on the victim shard
        assert time.monotonic() < end and job.thread.is_alive(), "the load never got going"
        time.sleep(0.02)  # another process's file: nothing to await
    shards = ControlClient.from_run_dir(run_dir).status()["shards"]
    os.kill(next(s["pid"] for s in shards if s["shard"] == victim), signal.SIGKILL)
    result = job.join()

    assert result.ok, result.errors
    assert result.restarts == 1 and result.audit_ok, result.audit_problem
    load, quiet = result.results["load"], result.results["quiet"]
    # In-flight calls ended with a clear error; none hung (the job finished).
    assert load.get("SUPERVISOR_UNAVAILABLE", 0) >= 1, load
    assert quiet == {"ok": 60}  # the other shard never noticed
    records = list(auditlog.read_records(run_dir / f"audit-{victim}.log"))
    assert [r for r in records if r["kind"] == "shard_restart"]
    # No audit record lost: every allowed call has exactly one outcome, before or after the restart.
    allowed = {r["call_id"]: r for r in records if r["kind"] == "decision" and r["decision"] == "allow"}
    outcomes = Counter(r["call_id"] for r in records if r["kind"] == "outcome")
    assert set(outcomes) == set(allowed) and set(outcomes.values()) == {1}
    # No budget reset: 100 calls in all, across the restart, then BUDGET_EXHAUSTED.
    assert len(allowed) == 100 and load.get("BUDGET_EXHAUSTED", 0) >= 1, load
    # No call ran twice, and nothing ran that was not allowed.
    ran = _lines(marks)
    assert len(ran) == len(set(ran))
    assert {int(i) for i in ran} <= {r["args"]["i"] for r in allowed.values()}
    assert len(ran) >= load["ok"]


def test_a_quarantine_decided_on_one_shard_is_applied_on_the_other(ray_instance, runs_dir):
    result = asyncio.run(run_loaded(load_job(JOBS / "sharded-quarantine.yaml"), runs_dir=runs_dir))
    assert result.quarantined == ["quiet"] and not result.ok
    run_dir = Path(result.run_dir)
    deciding = list(auditlog.read_records(run_dir / "audit-1.log"))  # chain's shard: quiet worked under its token
    other = list(auditlog.read_records(run_dir / "audit-0.log"))     # quiet's own shard
    (q1,) = [r for r in deciding if r["kind"] == "quarantine"]
    (q0,) = [r for r in other if r["kind"] == "quarantine"]
    assert q1["agent"] == q0["agent"] == "quiet" and q1["origin"] == q0["origin"] == 1
    assert [r for r in other if r["kind"] == "revoke" and r.get("agent") == "quiet"
            and r["by"].startswith("quarantine on shard 1")]
    # Applied on shard 0 before shard 1 answered the call that triggered it: any later call of
    # quiet (before the driver stopped its actor) was decided after shard 0 had it, and denied.
    later = [r for r in deciding if r["kind"] == "decision" and r.get("agent") == "quiet" and r["ts"] > q1["ts"]]
    assert all(r.get("code") == "TOKEN_REVOKED" and r["ts"] > q0["ts"] for r in later)


def test_a_change_that_cannot_reach_a_dead_shard_is_made_and_reported(ray_instance, runs_dir):
    job = Background("sharded-peer-down.yaml", runs_dir)
    run_dir = job.run_dir()
    info = json.loads((run_dir / "control.json").read_text())
    via_shard_0 = ControlClient(info["urls"][0], info["token"])
    end = time.monotonic() + 60
    while not via_shard_0.approvals():  # rev's call is parked on shard 0
        assert time.monotonic() < end, "the call never parked"
        time.sleep(0.05)  # another process's state: nothing to await
    pids = {s["shard"]: s["pid"] for s in via_shard_0.status()["shards"]}
    os.kill(pids[1], signal.SIGKILL)
    end = time.monotonic() + 60
    while not via_shard_0.status()["unreachable_shards"]:  # said, not hidden
        assert time.monotonic() < end, "the dead shard was never reported"
        time.sleep(0.05)  # Ray noticing a dead process: nothing to await from here
    with pytest.raises(ControlError, match="HTTP 503") as info_:
        via_shard_0.revoke(agent="rev", by="dan")
    assert "did not take it" in str(info_.value)
    result = job.join()
    assert result.results["rev"]["in_flight"]["code"] == "APPROVAL_DENIED"  # made on shard 0 all the same
    assert result.results["rev"]["after"]["code"] == "TOKEN_REVOKED"
    assert "died for good" in result.errors["supervisor shard 1"] and not result.ok
    assert result.audit_ok, result.audit_problem  # the dead shard's log verified by the driver
    shard0 = list(auditlog.read_records(run_dir / "audit-0.log"))
    assert [r for r in shard0 if r["kind"] == "peer_unreachable"]


def test_a_shard_handle_offers_only_the_intended_methods():
    """Ray lets a handle holder call every method of an actor class, underscored or not: the
    shard's class has only these. (Ray's own __ray_call__, which runs any function inside any
    actor, is not Warden's to remove: that is why Ray is not a security boundary.)"""
    from runtime.actors import SUPERVISOR_METHODS, SupervisorActor

    ray_own = {"__init__", "__ray_ready__", "__ray_terminate__", "__ray_call__"}
    assert set(SupervisorActor.__ray_metadata__.method_meta.methods) - ray_own == SUPERVISOR_METHODS
