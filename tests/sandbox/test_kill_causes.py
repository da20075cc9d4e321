"""A limit is named only from what the worker observed, never from what the program says.

Each attack runs through the whole trusted path (supervisor -> signed dispatch -> tool
worker -> real sandbox) on both backends. A program that prints a limit's words or exits
with a kill's status merely failed: the call returns its exit status and the audit log
records no breach. A program that really breaches a limit is killed with that limit's code
however it behaves (quietly, catching the error, exiting 0), and the next call works.
"""

from __future__ import annotations

import pytest

from runtime.errors import ErrorCode, SandboxKilled, ToolFailed
from runtime import auditlog

from .conftest import require_backend
from .harness import LIMITS, Env, assert_killed, assert_next_call_works, assert_program_failed

MAX_PIDS = 8


@pytest.fixture
def env(tmp_path, backend_name):
    e = Env(tmp_path, backend_name, {**LIMITS, "max_pids": MAX_PIDS})
    yield e
    e.close()
    assert auditlog.verify(e.audit_path).ok


FORGERIES = {
    "prints MemoryError": ("import sys\nprint('MemoryError', file=sys.stderr)\nsys.exit(1)", 1),
    "prints a refused fork": ("import sys\nprint('BlockingIOError: [Errno 11] Resource temporarily unavailable',"
                              " file=sys.stderr)\nsys.exit(1)", 1),
    "exits 137 (SIGKILL's status)": ("import os\nos._exit(137)", 137),
    "exits 152 (SIGXCPU's status)": ("import os\nos._exit(152)", 152),
    "exits 137 after some work": ("x = sum(range(10**6))\nimport os\nos._exit(137)", 137),
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_a_forged_kill_is_the_programs_own_failure(env, forgery):
    code, status = FORGERIES[forgery]
    assert_program_failed(env, status, code)  # no SandboxKilled: the call ran, the program failed
    assert not any("limit breached" in str(r.get("reason", "")) for r in env.outcomes())


def test_a_program_killing_itself_is_not_a_limit(env):
    for sig in ("SIGXCPU", "SIGKILL"):
        # bwrap runs the program as its namespace's pid 1, which its own signals cannot kill;
        # under gVisor it dies by them. Either way it is the program's doing, not a limit's.
        try:
            out = env.py(f"import os, signal\nos.kill(os.getpid(), signal.{sig})\nprint('alive')")
            assert (out["exit_code"], out["stdout"]) == (0, "alive\n"), out
        except ToolFailed as exc:
            assert exc.code is ErrorCode.TOOL_FAILED and exc.detail.split(":")[0] in (
                "exit status 137", "exit status 152", "exit status -9", "exit status -24"), exc.detail
    assert all(r["ok"] or r["code"] == "TOOL_FAILED" for r in env.outcomes())


def test_shell_words_of_a_limit_are_not_a_limit(env):
    told = assert_program_failed(env, 1, tool="shell.exec",
                                 command="echo 'Cannot allocate memory' >&2; echo \"can't fork\" >&2; exit 1")
    assert "Cannot allocate memory" in told


def test_memory_bomb_that_keeps_quiet_is_still_a_memory_breach(env):
    assert_killed(env, "chunks = []\ntry:\n    while True:\n        chunks.append(bytearray(16 << 20))\n"
                       "except MemoryError:\n    pass\nimport os\nos._exit(0)", {ErrorCode.SANDBOX_MEMORY})


def test_cpu_spent_in_a_child_is_the_calls_cpu(env):
    # The parent sleeps; a child spins. The call's CPU time is the whole tree's.
    assert_killed(env, "import os, time\nif os.fork() == 0:\n    while True:\n        pass\nos.wait()",
                  {ErrorCode.SANDBOX_CPU})


@pytest.mark.parametrize("scratch", ["/tmp", "/dev/shm", "/dev"])
def test_filling_memory_backed_files_is_a_memory_breach(env, backend_name, scratch):
    # /tmp and /dev/shm are memory: bounded, and counted in the sandbox's memory limit (/dev
    # itself is read-only under bwrap). The program even swallows the error; the kernel's
    # kill is what the worker reports.
    code = (f"import os\ni = 0\ntry:\n    os.makedirs('{scratch}/fill', exist_ok=True)\n    while True:\n"
            f"        open(f'{scratch}/fill/f{{i}}', 'wb').write(b'x' * (8 << 20))\n        i += 1\n"
            "except OSError as e:\n    print('STOPPED', i, e.errno)")
    if scratch == "/dev" and backend_name == "bwrap":
        out = env.py(code)
        assert out["stdout"].startswith("STOPPED 0 30"), out  # EROFS
        return
    assert_killed(env, code, {ErrorCode.SANDBOX_MEMORY})


def test_processes_held_past_the_limit_are_a_pids_breach(env):
    # Children that stay alive, refused forks swallowed: the count is over the limit until killed.
    assert_killed(env, "import os, time\nfor _ in range(64):\n    try:\n        if os.fork() == 0:\n"
                       "            time.sleep(60)\n            os._exit(0)\n    except OSError:\n        pass\n"
                       "time.sleep(60)", {ErrorCode.SANDBOX_PIDS})


def test_exactly_max_pids_processes_is_within_the_limit(env):
    # The call's own process and MAX_PIDS - 1 children, all alive at once for a while.
    out = env.py("import os, time\nkids = []\n"
                 f"for _ in range({MAX_PIDS - 1}):\n"
                 "    pid = os.fork()\n    if pid == 0:\n        time.sleep(1)\n        os._exit(0)\n"
                 "    kids.append(pid)\nfor pid in kids:\n    os.waitpid(pid, 0)\nprint(len(kids))")
    assert (out["exit_code"], out["stdout"]) == (0, f"{MAX_PIDS - 1}\n")


def test_empty_files_cannot_exhaust_the_workspace_inodes(tmp_path, backend_name):
    env = Env(tmp_path, backend_name, {**LIMITS, "cpu_s": 60})  # creating files is slow under gVisor
    try:
        out = env.py("import os\nn = 0\ntry:\n    for n in range(50_000):\n"
                     "        open(f'/workspace/e{n}', 'w').close()\n    print('ALL', n + 1)\n"
                     "except OSError as e:\n    print('STOPPED', n, e.errno)")
        words = out["stdout"].split()
        assert words[0] == "STOPPED" and words[2] == "28", out  # ENOSPC: out of inodes, not bytes
        assert int(words[1]) <= LIMITS["workspace_mb"] * 256  # one inode per 4 KiB page
        assert_next_call_works(env)
    finally:
        env.close()


def test_a_one_process_limit_still_runs_a_call(tmp_path, backend_name):
    # The warm interpreters waiting under the same host uid (bwrap) or in the same sandbox
    # (gVisor) are not the call's processes.
    env = Env(tmp_path, backend_name, {**LIMITS, "max_pids": 1})
    try:
        for _ in range(3):
            assert_next_call_works(env)
        assert_killed(env, "import os\nos.fork()\nimport time\ntime.sleep(60)", {ErrorCode.SANDBOX_PIDS})
    finally:
        env.close()


def test_without_cgroups_a_chosen_exit_status_is_still_not_a_limit(tmp_path, monkeypatch):
    # A worker that may not make cgroups (not root) falls back to rlimits: they still bound
    # the call, and the worker still believes only what it measured (wait4's CPU time).
    from runtime.sandbox import bwrap

    require_backend("bwrap")
    monkeypatch.setattr(bwrap.CallCgroup, "create", classmethod(lambda cls, **kw: None))
    env = Env(tmp_path, "bwrap", {**LIMITS, "max_pids": MAX_PIDS})
    try:
        for code, status in FORGERIES.values():
            assert_program_failed(env, status, code)
        with pytest.raises(SandboxKilled) as info:  # a loop is stopped by RLIMIT_CPU, well before the wall clock
            env.py("while True:\n    pass")
        assert info.value.code is ErrorCode.SANDBOX_CPU  # killed at the limit, and wait4 saw the CPU time
    finally:
        env.close()
