"""`warden revoke --agent A --cascade` on a real sharded job: made through one shard's API, it
stops A's delegate, whose calls are decided on the other shard, before its next call."""

from __future__ import annotations

import json

import pytest

from runtime import auditlog
from runtime.trusted.supervisor import shard_of

from .test_control_plane import Background, warden

pytestmark = pytest.mark.cluster


def test_revoke_cascade_through_one_shard_stops_a_delegate_decided_on_the_other(ray_instance, runs_dir):
    assert (shard_of("chain", 2), shard_of("quiet", 2)) == (1, 0)
    job = Background("sharded-cascade.yaml", runs_dir)
    run_dir = job.run_dir()
    (pending,) = job.pending(run_dir, 1)  # quiet's call, under chain's token, parked on shard 1
    assert (pending["agent"], pending["tool"]) == ("quiet", "note.write")
    info = json.loads((run_dir / "control.json").read_text())
    assert len(info["urls"]) == 2  # the CLI asks the first one: shard 0
    out = warden("revoke", "--agent", "chain", "--cascade", "--as", "dan", "--run", str(run_dir))
    assert out.returncode == 0 and "every token derived from one it held" in out.stdout, out.stdout + out.stderr
    # A human approves the parked call after the revocation: it still does not run.
    approved = warden("approvals", "approve", pending["id"], "--as", "dan", "--run", str(run_dir))
    assert approved.returncode == 0, approved.stderr
    result = job.join()
    seen = result.results["chain"]
    assert seen["parked"] == {"ok": False, "code": "TOKEN_REVOKED"}
    assert seen["after"] == {"ok": False, "code": "TOKEN_REVOKED"}
    shard1 = list(auditlog.read_records(run_dir / "audit-1.log"))
    revoke = [r for r in shard1 if r["kind"] == "revoke" and r.get("agent") == "chain"]
    assert revoke and revoke[0]["cascade"] is True and revoke[0]["by"] == "dan via shard 0"
    denied = [r for r in shard1 if r["kind"] == "decision" and r.get("code") == "TOKEN_REVOKED"]
    assert [(r["agent"], r["tool"]) for r in denied] == [("quiet", "note.write"), ("quiet", "echo")]
    assert not [r for r in shard1 if r["kind"] == "outcome" and r.get("agent") == "quiet"]  # nothing ran
    assert all(auditlog.verify(run_dir / f"audit-{i}.log").ok for i in (0, 1))
