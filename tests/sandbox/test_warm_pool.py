"""The warm pool on real backends: a pre-started sandbox goes to exactly one new agent, with a
fresh, empty workspace of its own, and is never handed back or on; closing the pool leaves
nothing running."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

from runtime.errors import ErrorCode, SandboxUnavailable
from runtime.sandbox import pool as pool_module
from runtime.sandbox.base import Limits
from runtime.sandbox.pool import SandboxPool

from .conftest import require_backend

PY = ["python3", "-I", "-"]
LIMITS = Limits(cpu_s=2, wall_s=5, memory_mb=256, max_pids=32, workspace_mb=16)


def py(handle, code: str) -> str:
    r = handle.run(PY, stdin=code.encode())
    assert (r.exit_code, r.killed) == (0, None), r
    return r.stdout.decode()


def marker(session) -> str:
    """A string only this session's host processes carry on their command line."""
    return str(getattr(session, "_runtime_dir", session.workspace))


def running(text: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", text], capture_output=True, text=True).stdout.split()


def eventually_running(text: str, timeout_s: float = 5.0) -> list[str]:
    """Warm processes are started just after a spare is made ready, without waiting for them."""
    deadline = time.monotonic() + timeout_s
    while not (found := running(text)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


@pytest.fixture
def ready_pool(backend_name):
    pool = SandboxPool(spares=2)
    try:
        pool.prepare(backend_name, LIMITS)
        assert pool.wait_ready(60) and pool.spare_count(backend_name, LIMITS) == 2, pool.spare_failures
        yield pool
    finally:
        pool.close()


def test_a_spare_goes_to_one_agent_only(ready_pool, backend_name):
    spares = [s.session for s in ready_pool._spares[(backend_name, LIMITS)]]
    handles: dict[str, object] = {}

    def claim(agent: str) -> None:
        handles[agent] = ready_pool.handle(agent, backend_name, LIMITS)

    threads = [threading.Thread(target=claim, args=(f"agent-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sessions = [h.session for h in handles.values()]
    assert len({id(s) for s in sessions}) == 4 and len({h.workspace.root for h in handles.values()}) == 4
    assert ready_pool.claimed == 2
    assert sorted(map(id, spares)) == sorted(id(s) for s in sessions if any(s is x for x in spares))
    # A claimed spare stays with its agent, and is out of the pool for good.
    for agent, h in handles.items():
        assert ready_pool.handle(agent, backend_name, LIMITS).session is h.session
    assert py(handles["agent-0"], "print(0)") == "0\n"  # a finished call lets the pool refill
    assert ready_pool.wait_ready(60)
    left = [s.session for s in ready_pool._spares[(backend_name, LIMITS)]]
    assert len(left) == 2 and not any(s is x for s in left for x in sessions)


def test_a_claimed_spare_sees_only_its_own_empty_workspace(ready_pool, backend_name):
    alice = ready_pool.handle("alice", backend_name, LIMITS)
    bob = ready_pool.handle("bob", backend_name, LIMITS)
    assert ready_pool.claimed == 2 and alice.workspace.root != bob.workspace.root
    assert py(alice, "import os; print(os.listdir('/workspace'))") == "[]\n"
    py(alice, "open('/workspace/alice.txt', 'w').write('for alice')")
    seen = json.loads(py(bob, f"""
import json, os
print(json.dumps({{'listing': os.listdir('/workspace'),
                  'alice_host_path': os.path.exists({str(alice.workspace.root)!r})}}))
"""))
    assert seen == {"listing": [], "alice_host_path": False}
    # The sandbox is bound to the workspace the agent's file tools use.
    assert (alice.workspace.root / "alice.txt").read_text() == "for alice"
    bob.workspace.write("/workspace/from-tool.txt", b"written by fs.write")
    assert py(bob, "print(open('/workspace/from-tool.txt').read())") == "written by fs.write\n"
    assert sorted(p.name for p in bob.workspace.root.iterdir()) == ["from-tool.txt"]


def test_spares_are_made_after_a_call_and_only_for_the_same_limits():
    require_backend("bwrap")
    pool = SandboxPool(spares=1)
    try:
        first = pool.handle("first", "bwrap", LIMITS)
        assert pool.spare_count("bwrap", LIMITS) == 0  # nothing is started on the path of a call
        py(first, "print(1)")
        assert pool.wait_ready(60) and pool.spare_count("bwrap", LIMITS) == 1
        other_limits = Limits(cpu_s=3, wall_s=5, memory_mb=256, max_pids=32, workspace_mb=16)
        pool.handle("other-policy", "bwrap", other_limits)
        assert pool.claimed == 0  # a spare made for other limits is not handed out
        second = pool.handle("second", "bwrap", LIMITS)
        assert pool.claimed == 1 and py(second, "print(2)") == "2\n"
    finally:
        pool.close()


def test_an_agent_with_a_workspace_gets_a_new_session_on_it_not_a_spare():
    require_backend("bwrap")
    require_backend("gvisor")
    pool = SandboxPool(spares=1)
    try:
        pool.prepare("gvisor", LIMITS)
        assert pool.wait_ready(60) and pool.spare_count("gvisor", LIMITS) == 1
        in_bwrap = pool.handle("alice", "bwrap", LIMITS)
        in_gvisor = pool.handle("alice", "gvisor", LIMITS)
        assert pool.claimed == 0 and pool.spare_count("gvisor", LIMITS) == 1
        assert in_gvisor.workspace is in_bwrap.workspace and in_gvisor.session.workspace == in_bwrap.workspace.root
    finally:
        pool.close()


def test_close_stops_every_spare_and_refuses_new_agents(backend_name):
    pool = SandboxPool(spares=1)
    try:
        pool.prepare(backend_name, LIMITS)
        assert pool.wait_ready(60)
        spare = pool._spares[(backend_name, LIMITS)][0]
        assert eventually_running(marker(spare.session))  # started ahead, with its interpreters waiting
    finally:
        pool.close()
    assert running(marker(spare.session)) == []
    assert not spare.workspace.root.exists()
    with pytest.raises(SandboxUnavailable) as info:
        pool.handle("late", backend_name, LIMITS)
    assert info.value.code is ErrorCode.SANDBOX_UNAVAILABLE


def test_a_spare_that_cannot_be_made_is_reported_and_new_agents_start_cold(monkeypatch, caplog):
    require_backend("bwrap")

    def broken(*args, **kwargs):
        raise SandboxUnavailable("no spare today", code=ErrorCode.SANDBOX_UNAVAILABLE)

    monkeypatch.setattr(pool_module, "_make_spare", broken)
    pool = SandboxPool(spares=1)
    try:
        pool.prepare("bwrap", LIMITS)
        assert pool.wait_ready(60)
        assert pool.spare_failures and "no spare today" in pool.spare_failures[0]
        assert "no spare bwrap sandbox" in caplog.text
        h = pool.handle("alice", "bwrap", LIMITS)
        assert pool.claimed == 0 and py(h, "print(3)") == "3\n"
        assert pool.wait_ready(60) and len(pool.spare_failures) == 1  # not retried on every call
    finally:
        pool.close()


def test_workspace_directories_do_not_carry_agent_names():
    require_backend("bwrap")
    pool = SandboxPool(spares=0)
    try:
        h = pool.handle("../escape", "bwrap", LIMITS)
        assert h.workspace.root.parent == pool.root and h.workspace.root.name.startswith("ws-")
        assert not (pool.root.parent / "escape").exists()
        assert py(h, "print(1)") == "1\n"
    finally:
        pool.close()
    assert not h.workspace.root.exists()


def test_spares_are_kept_for_a_bounded_number_of_limits():
    require_backend("bwrap")
    pool = SandboxPool(spares=1)
    try:
        keys = [Limits(cpu_s=1 + i, wall_s=5, memory_mb=256, max_pids=32, workspace_mb=16)
                for i in range(pool_module.MAX_SPARE_KEYS + 1)]
        pool.prepare("bwrap", keys[0])
        assert pool.wait_ready(60)
        first = pool._spares[("bwrap", keys[0])][0]
        for limits in keys[1:]:
            pool.prepare("bwrap", limits)
            assert pool.wait_ready(60)
        assert [pool.spare_count("bwrap", k) for k in keys] == [0] + [1] * pool_module.MAX_SPARE_KEYS
        for thread in pool._discarding:
            thread.join(30)
        assert running(marker(first.session)) == [] and not first.workspace.root.exists()
    finally:
        pool.close()
