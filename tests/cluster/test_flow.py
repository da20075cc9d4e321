"""Information-flow control through a real Ray job: three agents in a delegation chain, a shard
killed (SIGKILL) in the middle. The chain's taint and the sink rule survive the restart, the hidden
result does not (a typed error), and another agent's context is its own."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from runtime import auditlog
from runtime.control import ControlClient

from .test_control_plane import Background

pytestmark = pytest.mark.cluster
PAY = {"effect": "write", "ifc": {"context": "trusted"}}


def _job(tmp_path: Path) -> Path:
    policies = {
        "boss": {"tools": {"flowtest.pay": PAY, "flowtest.web": {"effect": "read"},
                           "flowtest.page": {"effect": "read", "output": {"hide": True}}},
                 "delegation": {"can_delegate_to": ["helper", "scout"], "max_depth": 2}},
        "helper": {"tools": {"flowtest.pay": PAY, "flowtest.web": {"effect": "read"}},
                   "delegation": {"can_delegate_to": ["scout"], "max_depth": 1}},
        "scout": {"tools": {"flowtest.pay": PAY, "flowtest.web": {"effect": "read"}}},
        "clean": {"tools": {"flowtest.pay": PAY}},
    }
    agents = []
    for name, policy in policies.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"agent": name, **policy}))
        agents.append({"name": name, "class": f"tests.cluster.flow_agents:{name.capitalize()}Agent",
                       "policy": str(tmp_path / f"{name}.yaml"), "task": {"dir": str(tmp_path)}})
    job = tmp_path / "flow.yaml"
    job.write_text(yaml.safe_dump({
        "name": "flow", "entry": ["boss", "clean"], "tools": ["tests.cluster.flow_agents"], "agents": agents,
        "outputs": {"flowtest.page": {"integrity": "untrusted"}}, "supervisors": {"max_restarts": 2},
        "call_timeout_s": 60}))
    return job


def test_a_tainted_chain_stays_tainted_across_a_shard_restart(ray_instance, tmp_path):
    job = Background(str(_job(tmp_path)), tmp_path / "runs")
    run_dir = job.run_dir()
    end = time.monotonic() + 120
    while not (tmp_path / "tainted").exists():
        assert time.monotonic() < end and job.thread.is_alive(), "the chain never finished its research"
        time.sleep(0.05)  # another process's file: nothing to await
    control = ControlClient.from_run_dir(run_dir)
    status = control.status()
    before = status["shards"][0]
    assert {(c["agent"], c["depth"], c["label"]["integrity"]) for c in status["contexts"]} >= {
        ("boss", 0, "untrusted"), ("helper", 1, "untrusted"), ("scout", 2, "untrusted")}
    os.kill(before["pid"], signal.SIGKILL)
    while True:  # the restarted shard answers with another pid, its state replayed from its journal
        try:
            status = control.status()
            if status["shards"][0]["pid"] != before["pid"]:
                break
        except Exception as exc:  # refused while it restarts
            assert time.monotonic() < end, f"the shard never came back: {exc}"
        time.sleep(0.1)
    assert ("boss", 0, "untrusted") in {(c["agent"], c["depth"], c["label"]["integrity"]) for c in status["contexts"]}
    (tmp_path / "restarted").write_text("1")
    result = job.join()

    boss = result.results["boss"]
    assert boss["before"] == boss["handle_before"] == "ok"  # clean, and a hidden page does not taint
    scout = boss["research"]["scout"]
    assert scout["read"] > 0 and scout["pay"] == "FLOW_DENIED"  # the scout read the attacker's page
    assert boss["research"]["pay"] == "FLOW_DENIED"  # the helper saw what the scout read
    assert boss["after_research"] == "FLOW_DENIED"  # so did the boss: no laundering through delegates
    assert boss["after_restart"] == "FLOW_DENIED"  # the restored context
    assert boss["handle_after_restart"] == "HANDLE_UNKNOWN"  # handles do not survive a restart
    assert boss["fresh_delegate"] == {"pay": "FLOW_DENIED"}  # a fresh delegate starts where its delegator is
    assert result.results["clean"] == {"pay": "ok"}
    assert result.restarts == 1 and result.audit_ok, result.audit_problem

    records = [r for log in result.audit_logs for r in auditlog.read_records(log)]
    denied = [r for r in records if r.get("code") == "FLOW_DENIED"]
    assert {r["agent"] for r in denied} == {"boss", "helper", "scout"}
    assert all(r["flow"]["origin"]["tool"] == "flowtest.web" and r["flow"]["origin"]["agent"] == "scout"
               for r in denied), denied
    lost = next(r for r in records if r.get("code") == "HANDLE_UNKNOWN")
    assert "restarted" in lost["reason"]
    assert any(r["kind"] == "shard_restart" for r in records)
