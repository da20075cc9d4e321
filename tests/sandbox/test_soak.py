"""500 sandboxed calls as one agent, on each backend, through the whole trusted path.

Every call must succeed, and nothing may be left unreaped: the tool worker reaps its own
descendants (it is their subreaper), whatever the host's pid 1 does. A zombie left per call
would count against the agent's process limit (``max_pids`` is small here on purpose) and
lock the agent out after a handful of calls. Calls whose sandbox is killed (output cap) are
mixed in, because a kill is where a sandbox leaves orphans behind.
"""

from __future__ import annotations

import time

import pytest

from runtime.errors import ErrorCode, SandboxKilled
from runtime.sandbox.base import ORPHAN_GRACE_S, REAP_PERIOD_S
from runtime import auditlog

from .harness import LIMITS, Env, reaped_within, zombie_children, zombies_of_uid

CALLS = 500
KILL_EVERY = 50  # every 50th call breaches the output cap and is killed
MAX_PIDS = 6



def test_500_calls_as_one_agent_all_succeed_and_leave_no_zombie(tmp_path, backend_name):
    env = Env(tmp_path, backend_name, {**LIMITS, "max_pids": MAX_PIDS, "max_output_bytes": 4096}, agents=("alice",))
    try:
        started = time.monotonic()
        for i in range(1, CALLS + 1):
            if i % KILL_EVERY == 0:
                with pytest.raises(SandboxKilled) as info:
                    env.call("shell.exec", command="yes")
                assert info.value.code is ErrorCode.SANDBOX_OUTPUT
                continue
            out = env.call("shell.exec", command=f"echo {i}")
            assert (out["exit_code"], out["stdout"]) == (0, f"{i}\n"), (i, out)
        elapsed_s = time.monotonic() - started
        print(f"{backend_name}: {CALLS} calls in {elapsed_s:.1f}s")
        uid = getattr(env.session(), "_uid", None)
        assert reaped_within(lambda: not zombie_children() and (uid is None or not zombies_of_uid(uid)),
                       ORPHAN_GRACE_S + 10 * REAP_PERIOD_S), (zombie_children(), uid and zombies_of_uid(uid))
        outcomes = env.outcomes()
        assert len(outcomes) == CALLS
        assert sum(r["ok"] for r in outcomes) == CALLS - CALLS // KILL_EVERY
    finally:
        env.close()
    assert auditlog.verify(env.audit_path).ok
    assert reaped_within(lambda: not zombie_children(), ORPHAN_GRACE_S + 10 * REAP_PERIOD_S), zombie_children()
