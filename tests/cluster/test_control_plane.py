"""The control plane against real running jobs: a real HTTP scrape of the metrics endpoint,
and approvals and revocation decided by a real second process (the `warden` CLI)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from runtime.job import load_job, run_loaded
from runtime.metrics import parse_metrics, sum_samples
from runtime import auditlog

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
JOBS = Path(__file__).resolve().parent / "jobs"


def warden(*args: str) -> subprocess.CompletedProcess[str]:
    """The operator's second terminal."""
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


class Background:
    """A job running in another thread while the test operates it."""

    def __init__(self, job: str, runs_dir: Path) -> None:
        self.runs_dir = runs_dir
        self.result: Any = None
        self.error: BaseException | None = None
        loaded = load_job(JOBS / job)
        self.thread = threading.Thread(target=self._run, args=(loaded,), daemon=True)
        self.thread.start()

    def _run(self, loaded: Any) -> None:
        try:
            self.result = asyncio.run(run_loaded(loaded, runs_dir=self.runs_dir))
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    def run_dir(self, deadline_s: float = 60) -> Path:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            found = list(self.runs_dir.glob("*/control.json"))
            if found:
                return found[0].parent
            time.sleep(0.05)  # another process's file: nothing to await
        raise AssertionError("the job never wrote control.json")

    def pending(self, run_dir: Path, n: int, deadline_s: float = 60) -> list[dict[str, Any]]:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            out = warden("approvals", "list", "--json", "--run", str(run_dir))
            assert out.returncode == 0, out.stderr
            pending = json.loads(out.stdout)
            if len(pending) >= n:
                return pending
            time.sleep(0.1)
        raise AssertionError(f"fewer than {n} parked call(s)")

    def join(self) -> Any:
        self.thread.join(timeout=120)
        if self.error is not None:
            raise self.error
        return self.result


def test_metrics_endpoint_counts_match_the_job(ray_instance, runs_dir):
    scraped: dict[str, Any] = {}

    async def scrape(url: str) -> None:
        def get() -> tuple[str, str]:
            with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
                return resp.headers["Content-Type"], resp.read().decode()
        scraped["type"], scraped["text"] = await asyncio.to_thread(get)

    result = asyncio.run(run_loaded(load_job(JOBS / "probe.yaml"), runs_dir=runs_dir, before_teardown=scrape))
    assert result.ok, result.errors
    assert scraped["type"].startswith("text/plain")
    m = parse_metrics(scraped["text"])
    assert sum_samples(m, "warden_calls_total", agent="probe", tool="echo", decision="allow") == 1
    assert sum_samples(m, "warden_denials_total", agent="probe", code="POLICY_DENIED") == 1
    assert sum_samples(m, "warden_denials_total", agent="probe", code="UNKNOWN_TOOL") == 1
    assert sum_samples(m, "warden_denials_total", agent="probe", code="MALFORMED") == 1
    assert sum_samples(m, "warden_denials_total", agent="peer", code="BUDGET_EXHAUSTED") == 1
    assert sum_samples(m, "warden_outcomes_total", agent="peer", tool="echo", result="ok") == 2
    assert sum_samples(m, "warden_authorization_seconds_count") == sum_samples(m, "warden_calls_total")
    assert sum_samples(m, "warden_calls_total", agent="chain", tool="delegate:peer", decision="allow") == 1
    assert sum_samples(m, "warden_budget_remaining", agent="peer", kind="calls") == 0
    # The same counts as the job's own summary.
    total = sum(s["count"] for s in result.stats if s["result"] == "allow")
    assert sum_samples(m, "warden_calls_total", decision="allow") == total


def test_approvals_from_a_second_process(ray_instance, runs_dir):
    job = Background("approvals.yaml", runs_dir)
    run_dir = job.run_dir()
    (first,) = job.pending(run_dir, 1)
    assert first["tool"] == "note.write" and first["args"] == {"text": "approve me"}
    ok = warden("approvals", "approve", first["id"], "--as", "alice-oncall", "--reason", "looks fine",
                "--run", str(run_dir))
    assert ok.returncode == 0 and "approved" in ok.stdout, ok.stderr
    (second,) = job.pending(run_dir, 1)
    assert second["id"] != first["id"]  # the approval covered one call only
    no = warden("approvals", "deny", second["id"], "--as", "bob-oncall", "--run", str(run_dir))
    assert no.returncode == 0, no.stderr
    again = warden("approvals", "approve", first["id"], "--as", "x", "--run", str(run_dir))
    assert again.returncode == 1 and "no such pending approval" in again.stderr
    result = job.join()
    out = result.results["careful"]
    assert out["first"] == {"ok": True, "value": "wrote 10 chars"}
    assert out["second"]["code"] == "APPROVAL_DENIED"
    assert out["unattended"]["code"] == "APPROVAL_TIMEOUT"  # nobody answered within 1 s
    decisions = [(r["decision"], r["approver"]) for r in auditlog.read_records(result.audit_log)
                 if r["kind"] == "approval"]
    assert decisions == [("approve", "alice-oncall"), ("deny", "bob-oncall"), ("deny", "(nobody)")]


def test_revoke_from_a_second_process_denies_in_flight_and_later_calls(ray_instance, runs_dir):
    job = Background("revoke.yaml", runs_dir)
    run_dir = job.run_dir()
    job.pending(run_dir, 1)  # the agent's call is in flight, parked
    out = warden("revoke", "--agent", "revoked", "--as", "dan", "--run", str(run_dir))
    assert out.returncode == 0 and "revoked agent revoked" in out.stdout, out.stderr
    result = job.join()
    seen = result.results["revoked"]
    assert seen["in_flight"]["code"] == "APPROVAL_DENIED"
    assert seen["after"]["code"] == "TOKEN_REVOKED"
    records = list(auditlog.read_records(result.audit_log))
    assert [r for r in records if r["kind"] == "revoke" and r.get("agent") == "revoked" and r["by"] == "dan"]
    assert warden("status", "--run", str(run_dir)).returncode == 1  # the job is over: clear error


def test_misbehaving_agent_is_quarantined_and_stopped(ray_instance, runs_dir):
    result = asyncio.run(run_loaded(load_job(JOBS / "rogue.yaml"), runs_dir=runs_dir))
    assert result.quarantined == ["rogue"]
    assert result.errors["rogue"].startswith("quarantined:")
    assert result.results["probe"]["allowed"] == {"ok": True, "value": "hi"}  # the others carry on
    records = list(auditlog.read_records(result.audit_log))
    assert [r for r in records if r["kind"] == "anomaly" and r["agent"] == "rogue" and r["flag"] == "denial_burst"]
    (q,) = [r for r in records if r["kind"] == "quarantine"]
    assert q["agent"] == "rogue" and q["violations"] >= 4
    rogue_calls = [r for r in records if r["kind"] == "decision" and r.get("agent") == "rogue"]
    assert len(rogue_calls) < 50  # stopped long before it finished its loop
    assert records[-1]["quarantined"] == ["rogue"]
