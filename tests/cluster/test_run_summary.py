"""What a real job tells the agent and the person who ran it about mistakes (issue 11, item 14)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.job import load_job, run_loaded
from runtime import auditlog

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
JOB = Path(__file__).resolve().parent / "jobs" / "mistakes.yaml"


def test_agents_are_told_their_own_mistakes_and_a_delegation_fails_at_once(ray_instance, runs_dir):
    result = asyncio.run(run_loaded(load_job(JOB), runs_dir=runs_dir))
    assert result.ok, result.errors
    probe, over = result.results["probe"], result.results["over"]
    assert probe["bad_args"]["public"] == "MALFORMED on tool 'echo': unknown arguments ['txt']"
    assert probe["unlisted_tool"]["public"] == "POLICY_DENIED on tool 'note.write'"  # no policy values
    assert over["parse"]["code"] == "TOOL_FAILED" and "invalid literal for int()" in over["parse"]["public"]
    assert over["delegate_unheld"]["public"] == "DELEGATION_DENIED"
    records = list(auditlog.read_records(result.audit_log))
    denied = [r for r in records if r.get("code") == "DELEGATION_DENIED"]
    assert [(r["agent"], r["tool"]) for r in denied] == [("over", "delegate:peer")]  # blamed on the delegator
    assert "names ['note.write'], not held" in denied[0]["reason"]
    assert not [r for r in records if r.get("agent") == "peer"]  # the delegate never ran
    stats = {(s["agent"], s["tool"], s["result"]): s["count"] for s in result.stats}
    assert stats[("over", "delegate:peer", "DELEGATION_DENIED")] == 1


def test_warden_run_prints_the_reason_of_every_failure(ray_instance, tmp_path):
    env = dict(os.environ, RAY_ADDRESS=ray_instance.address)
    proc = subprocess.run([sys.executable, "-m", "runtime.cli", "run", str(JOB.relative_to(ROOT)), "--quiet",
                           "--runs-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = proc.stdout.split("why calls were denied or failed (from the audit log):")[1]
    for reason in ("unknown arguments ['txt']", "tool 'note.write' not in ['echo']",
                   "delegation to 'peer' names ['note.write'], not held", "invalid literal for int()"):
        assert reason in summary, proc.stdout
    assert "DeprecationWarning" not in proc.stderr, proc.stderr[-3000:]
