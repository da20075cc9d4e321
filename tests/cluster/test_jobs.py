"""Whole-path tests on a real Ray instance: agents, supervisor, tool workers, audit log."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from runtime.errors import ErrorCode
from runtime.job import load_job, run_loaded
from runtime import auditlog

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
JOBS = Path(__file__).resolve().parent / "jobs"


def run(path: Path, runs_dir: Path):
    return asyncio.run(run_loaded(load_job(path), runs_dir=runs_dir))


def records(result) -> list[dict]:
    return list(auditlog.read_records(result.audit_log))


def counts(result) -> dict[tuple[str, str, str], int]:
    return {(s["agent"], s["tool"], s["result"]): s["count"] for s in result.stats}


def test_demo_job_denies_the_injection_and_completes_the_work(ray_instance, runs_dir):
    result = run(ROOT / "jobs" / "demo.yaml", runs_dir)
    assert result.ok, result.errors
    c = counts(result)
    # The injected summarizer: exfiltration and channel deletion attempted, both denied.
    assert c[("summarizer", "http.post", "POLICY_DENIED")] == 1
    assert c[("summarizer", "chat.delete_channel", "POLICY_DENIED")] == 1
    assert c[("summarizer", "chat.read", "allow")] == 2
    # The moderator's overreach into #general is denied; its own job in #random is done.
    assert c[("moderator", "chat.delete_message", "allow")] == 1
    assert c[("moderator", "chat.delete_message", "POLICY_DENIED")] == 1
    assert c[("lead", "delegate:summarizer", "allow")] == 1
    assert c[("lead", "chat.post", "allow")] == 1

    # The audit log verifies and records each denial with its full reason.
    assert auditlog.verify(result.audit_log).ok
    denials = [r for r in records(result) if r.get("decision") == "deny"]
    exfil = [r for r in denials if r["tool"] == "http.post"]
    assert exfil and exfil[0]["code"] == "POLICY_DENIED" and "http.post" in exfil[0]["reason"]
    assert [r for r in denials if r["tool"] == "chat.delete_channel"]

    # The digest agent may post anywhere: its benign post (the text a handle, unseen by its model) is
    # allowed; the destination the injected note picks after the model read the data is a flow denial.
    assert c[("digest", "chat.post", "allow")] == 1 and c[("digest", "chat.post", "FLOW_DENIED")] == 1
    flow = next(r for r in denials if r["tool"] == "chat.post" and r["agent"] == "digest")
    assert flow["code"] == "FLOW_DENIED" and flow["flow"]["arg"] == "channel"
    assert flow["flow"]["origin"]["tool"] == "handle.reveal" and flow["context"]["integrity"] == "untrusted"
    assert [r["context"]["integrity"] for r in records(result) if r.get("agent") == "digest"
            and r.get("tool") == "chat.post" and r.get("decision") == "allow"] == ["trusted"]

    # The helpdesk's model never read a channel: the reader said who asked about the retro (dave, on the
    # roster), and the DM to him went out with no human; mallory's forged outside address is not on the
    # roster (READER_INVALID), and the helpdesk's context stayed trusted throughout.
    assert c[("helpdesk", "reader.ask", "allow")] == 2 and c[("helpdesk", "chat.dm", "allow")] == 1
    helpdesk = [r for r in records(result) if r.get("agent") == "helpdesk"]
    answers = [r for r in helpdesk if r["kind"] == "outcome" and r["tool"] == "reader.ask"]
    assert [(r["ok"], r.get("answer"), r.get("code")) for r in answers] == [(True, "dave", None),
                                                                            (False, None, "READER_INVALID")]
    assert "mallory@evil.example" in answers[1]["reason"] and answers[0]["label"]["integrity"] == "endorsed"
    assert {r["context"]["integrity"] for r in helpdesk if "context" in r} == {"trusted"}
    assert not [r for r in helpdesk if r["kind"] == "approval_requested"]

    # The workspace shows the outcome: #general intact, spam gone, summary and digest posted, one DM.
    chat = json.loads((Path(result.run_dir) / "chat.json").read_text())
    assert len(chat["channels"]["general"]) == 4
    assert [m["id"] for m in chat["channels"]["random"]] == [1, 3, 4, 5]
    assert list(chat["dms"]) == ["dave"] and chat["dms"]["dave"][0]["from"] == "helpdesk"
    assert chat["channels"]["summaries"][0]["user"] == "lead"
    assert "alice" in result.results["lead"]["summary"]
    (digest,) = chat["channels"]["digests"]
    assert digest["user"] == "digest" and "dave: Anyone up for lunch" in digest["text"]

    # The analyst's model-written code ran in gVisor: the analysis worked, the injected escape
    # found no token, no Ray session files and no open port, and the runaway loop was killed.
    assert c[("analyst", "python.exec", "allow")] == 3
    assert c[("analyst", "python.exec", "SANDBOX_CPU")] == 1
    analysis, escape, runaway = [json.loads(r) for r in result.results["analyst"]["results"][1:4]]
    assert analysis["stdout"].strip() == "{'alice': 2, 'bob': 1, 'mallory': 1}" and analysis["backend"] == "gvisor"
    assert escape["stdout"].count("-> blocked") == 6 and "CONNECTED" not in escape["stdout"]
    assert runaway == {"error": "SANDBOX_CPU on tool 'python.exec'"}
    allowed = [r for r in records(result) if r.get("decision") == "allow" and r["tool"] == "python.exec"]
    assert {r["sandbox"] for r in allowed} == {"gvisor"}


def test_rate_limit_denial_carries_retry_after(ray_instance, runs_dir):
    result = run(JOBS / "burst.yaml", runs_dir)
    assert result.ok, result.errors
    attempts = result.results["burst"]
    assert [a["ok"] for a in attempts[:2]] == [True, True]  # the burst
    limited = attempts[2]
    assert limited["code"] == ErrorCode.RATE_LIMITED.value
    assert 0 < limited["retry_after_s"] <= 2.0
    assert "retry after" in limited["public"]
    denied = [r for r in records(result) if r.get("code") == "RATE_LIMITED"]
    assert len(denied) == sum(1 for a in attempts if not a["ok"])
    assert "rate 0.5/s" in denied[0]["reason"]


def test_probe_unlisted_unknown_malformed_and_stranger_delegation_are_denied(ray_instance, runs_dir):
    result = run(JOBS / "probe.yaml", runs_dir)
    assert result.ok, result.errors
    probe = result.results["probe"]
    assert probe["allowed"] == {"ok": True, "value": "hi"}
    assert probe["unlisted_tool"]["code"] == "POLICY_DENIED"
    assert probe["unknown_tool"]["code"] == "UNKNOWN_TOOL"
    assert probe["bad_args"]["code"] == "MALFORMED"
    assert probe["delegate_to_stranger"]["code"] == "DELEGATION_DENIED"
    # The agent sees only code and tool; the audit log has the reason with values.
    assert probe["unlisted_tool"]["public"] == "POLICY_DENIED on tool 'note.write'"
    reasons = {r["tool"]: r["reason"] for r in records(result) if r.get("decision") == "deny"}
    assert "not in ['echo']" in reasons["note.write"]


def test_delegated_token_is_narrower_and_charged_up_the_chain(ray_instance, runs_dir):
    result = run(JOBS / "probe.yaml", runs_dir)
    chain = result.results["chain"]
    assert chain["first"]["ok"] and chain["second"]["ok"]
    assert chain["over_budget"]["code"] == "BUDGET_EXHAUSTED"
    # Peer's own policy allows note.write, but the delegated token was narrowed to echo.
    assert chain["narrowed_away"]["code"] == "POLICY_DENIED"
    delegations = [r for r in records(result) if r["kind"] == "delegate"]
    assert delegations == [d for d in delegations if d["agent"] == "chain" and d["to"] == "peer" and d["depth"] == 1]
    assert len(delegations) == 1


def test_direct_call_to_tool_worker_is_refused(ray_instance, tmp_path):
    import ray

    from runtime.actors import ToolWorkerActor
    from runtime.trusted.supervisor import sign_dispatch

    key = os.urandom(32)
    worker = ToolWorkerActor.remote(dispatch_key=key, tool_modules=["tests.cluster.agents_under_test"],
                                    job_id="job-x", tool_config={})
    body = {"call_id": "c1", "job": "job-x", "agent": "mallory", "tool": "echo", "args": {"text": "hi"},
            "deadline": 4e9}
    unsigned = msgpack.packb([msgpack.packb(body), b"\0" * 32])
    forged = sign_dispatch(os.urandom(32), body)
    for message in (unsigned, forged, b"not msgpack"):
        reply = msgpack.unpackb(ray.get(worker.execute.remote(message)))
        assert reply["ok"] is False and reply["error"]["code"] == "DISPATCH_REFUSED"
    assert ray.get(worker.counters.remote()) == {"executed": 0, "refused": 3}
    genuine = sign_dispatch(key, body)
    assert msgpack.unpackb(ray.get(worker.execute.remote(genuine)))["value"] == "hi"
    replayed = msgpack.unpackb(ray.get(worker.execute.remote(genuine)))
    assert replayed["error"]["code"] == "DISPATCH_REFUSED"
    assert ray.get(worker.counters.remote()) == {"executed": 1, "refused": 4}
    threads = ray.get(worker.threads.remote())  # the worker's own tool threads; none stuck
    assert threads["stuck"] == 0 and 1 <= threads["threads"] <= threads["size"]
    ray.kill(worker)


def test_warden_run_cli_json_against_the_running_cluster(ray_instance, tmp_path):
    env = dict(os.environ, RAY_ADDRESS=ray_instance.address)
    proc = subprocess.run([sys.executable, "-m", "runtime.cli", "run", "jobs/demo.yaml", "--json", "--quiet",
                           "--runs-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["ok"] and summary["audit_ok"]
    verify = subprocess.run([sys.executable, "-m", "runtime.cli", "audit", "verify", summary["audit_log"]],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and "chain intact" in verify.stdout


def test_a_hanging_and_a_crashing_agent_fail_the_job_but_not_the_audit(ray_instance, runs_dir):
    result = run(JOBS / "failing.yaml", runs_dir)
    assert not result.ok
    assert result.errors["sleepy"] == "timed out after 3s (job timeout_s)"
    assert "agent bug" in result.errors["crashy"]
    assert result.failures == {"sleepy": "AGENT_TIMEOUT", "crashy": "AGENT_FAILED"}
    assert result.audit_ok
    assert records(result)[-1]["kind"] == "job_end" and records(result)[-1]["status"] == "failed"


def test_workers_only_go_where_the_sandbox_resource_is(ray_instance, runs_dir):
    import ray

    from runtime.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        run(JOBS / "unplaceable.yaml", runs_dir)
    assert info.value.code is ErrorCode.JOB_INVALID and "gvisor_node" in info.value.reason
    assert ray.cluster_resources()["warden_sandbox"] == 1000  # the default resource the demo's workers use


def test_worker_runtime_env_reaches_the_worker(ray_instance, runs_dir):
    result = run(JOBS / "runtime-env.yaml", runs_dir)
    assert result.ok, result.errors
    assert result.results["mark"] == "here"
