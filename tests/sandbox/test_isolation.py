"""Each attack the isolation work promises to contain, attempted through the whole trusted
path (supervisor -> signed dispatch -> tool worker -> sandbox) on both backends: the attack
fails or is killed with its typed error, the audit log records it, and the next call works."""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from runtime.errors import ErrorCode, SandboxKilled, SandboxUnavailable, ToolFailed
from runtime.sandbox.pool import SandboxPool
from runtime import auditlog

from .harness import LIMITS, Env, assert_killed, assert_next_call_works, assert_program_failed

CANARY_ENV = "WARDEN_CANARY_SECRET"


@pytest.fixture
def env(tmp_path, backend_name, monkeypatch):
    monkeypatch.setenv(CANARY_ENV, "canary-" + secrets.token_hex(8))
    e = Env(tmp_path, backend_name)
    yield e
    e.close()
    assert auditlog.verify(e.audit_path).ok


@pytest.fixture
def listening_port():
    """A real TCP server on the host's loopback: reachable from the host, not from a sandbox."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    accepted: list[Any] = []
    threading.Thread(target=lambda: accepted.append(srv.accept()), daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


def test_sandboxed_code_runs(env):
    out = env.py("import sys; print(sum(range(10))); print('err', file=sys.stderr)")
    assert out["exit_code"] == 0 and out["stdout"] == "45\n" and "err" in out["stderr"]
    allow = [r for r in auditlog.read_records(env.audit_path) if r.get("decision") == "allow"]
    assert allow[-1]["sandbox"] == env.pool._sessions[("alice", out["backend"])].backend


def test_no_network_even_to_host_loopback(env, listening_port):
    with socket.create_connection(("127.0.0.1", listening_port), timeout=5):
        pass  # the port is really open on the host
    told = assert_program_failed(env, 1, f"import socket\ns = socket.create_connection(('127.0.0.1', {listening_port}),"
                                         " timeout=3)\nprint('CONNECTED')")
    assert "CONNECTED" not in told and "Error" in told
    told = assert_program_failed(env, 1, "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=3)\n"
                                         "print('CONNECTED')")
    assert "CONNECTED" not in told and "Error" in told


def test_no_dns(env):
    assert "gaierror" in assert_program_failed(env, 1, "import socket; print(socket.getaddrinfo('example.com', 443))")


def test_no_host_secrets(env):
    home_canary = Path.home() / f".warden-canary-{secrets.token_hex(4)}"
    home_canary.write_text("host secret")
    try:
        out = env.py(
            "import os, json\n"
            "def read(p):\n"
            "    try:\n"
            "        return open(p, 'rb').read().decode(errors='replace')\n"
            "    except OSError as e:\n"
            "        return 'DENIED ' + type(e).__name__\n"
            f"print(json.dumps({{'token': read(os.path.expanduser('~root/.ray/auth_token')),\n"
            f"    'ray_token': read('/root/.ray/auth_token'), 'canary': read({str(home_canary)!r}),\n"
            "    'environ1': read('/proc/1/environ'), 'self_environ': read('/proc/self/environ'),\n"
            "    'env': dict(os.environ), 'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),\n"
            "    'tmp_sessions': os.path.exists('/tmp/ray')}))")
    finally:
        home_canary.unlink()
    seen = json.loads(out["stdout"])
    assert seen["token"].startswith("DENIED") and seen["ray_token"].startswith("DENIED")
    assert seen["canary"].startswith("DENIED")
    assert seen["tmp_sessions"] is False
    canary = os.environ[CANARY_ENV]
    for field in ("environ1", "self_environ"):
        assert canary not in seen[field] and "PYENV" not in seen[field] and "RAY" not in seen[field]
    assert CANARY_ENV not in seen["env"] and set(seen["env"]) <= {"PATH", "HOME", "LANG", "PYTHONDONTWRITEBYTECODE",
                                                                   "PWD", "LC_CTYPE", "SHLVL", "_"}
    assert len(seen["pids"]) < 10, seen["pids"]  # only the sandbox's own processes


def test_read_only_root_and_private_workspace(env):
    out = env.py("import os\n"
                 "for p in ('/usr/evil', '/etc/evil', '/evil', '/bin/evil'):\n"
                 "    try:\n"
                 "        open(p, 'w').write('x'); print('WROTE', p)\n"
                 "    except OSError as e:\n"
                 "        print('DENIED', p)\n"
                 "open('/workspace/notes.txt', 'w').write('kept')")
    assert "WROTE" not in out["stdout"] and out["stdout"].count("DENIED") == 4
    assert env.py("print(open('/workspace/notes.txt').read())")["stdout"] == "kept\n"
    # Another agent's sandbox sees its own, empty workspace.
    other = env.py("import os; print(os.listdir('/workspace'))", agent="bob")
    assert other["stdout"] == "[]\n"


def test_workspace_size_is_limited(env):
    out = env.py("data = b'x' * (1 << 20)\n"
                 "f = open('/workspace/big', 'wb')\n"
                 "try:\n"
                 "    for i in range(64):\n"
                 "        f.write(data); f.flush()\n"
                 "    print('WROTE 64 MiB')\n"
                 "except OSError as e:\n"
                 "    print('STOPPED', e.errno)")
    assert "WROTE" not in out["stdout"], out
    assert_next_call_works(env)


def test_fork_bomb_is_contained(env, backend_name):
    bomb = "import os\nwhile True:\n    os.fork()"
    if backend_name == "bwrap":  # a pids cgroup per call: its refused forks are the breach, always seen
        assert_killed(env, bomb, {ErrorCode.SANDBOX_PIDS})
        return
    # gVisor: the worker counts processes every 0.25 s; a bomb the in-sandbox rlimit stops first
    # is the program's own failure (README, Isolation), never another limit.
    with pytest.raises((SandboxKilled, ToolFailed)) as info:
        env.py(bomb)
    assert info.value.code in (ErrorCode.SANDBOX_PIDS, ErrorCode.TOOL_FAILED), info.value
    assert_next_call_works(env)


def test_memory_bomb_is_contained(env):
    assert_killed(env, "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))", {ErrorCode.SANDBOX_MEMORY})


def test_infinite_loop_is_contained(env):
    assert_killed(env, "while True:\n    pass", {ErrorCode.SANDBOX_CPU})


def test_sleeping_forever_is_contained_by_the_wall_clock(tmp_path, backend_name):
    env = Env(tmp_path, backend_name, {**LIMITS, "wall_s": 2})
    try:
        assert_killed(env, "import time\ntime.sleep(3600)", {ErrorCode.SANDBOX_TIMEOUT})
    finally:
        env.close()


def test_huge_output_is_contained(env):
    assert_killed(env, "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", {ErrorCode.SANDBOX_OUTPUT})


def test_file_tools_refuse_symlink_escapes(env):
    env.py("import os; os.symlink('/etc', '/workspace/etc'); os.symlink('/etc/passwd', '/workspace/pw')")
    assert env.call("fs.write", path="/workspace/a.txt", content="hello")["bytes"] == 5
    assert env.call("fs.read", path="/workspace/a.txt") == "hello"
    assert {e["name"] for e in env.call("fs.list")} >= {"a.txt", "etc", "pw"}
    for path in ("/workspace/pw", "/workspace/etc/passwd", "/workspace/../etc/passwd", "/etc/passwd"):
        with pytest.raises(Exception) as info:
            env.call("fs.read", path=path)
        assert info.value.code in (ErrorCode.TOOL_FAILED,), (path, info.value)
    with pytest.raises(Exception):
        env.call("fs.write", path="/workspace/pw", content="overwrite through the link")
    assert "root:" in Path("/etc/passwd").read_text()  # untouched
    # The sandbox sees files written by the tool.
    assert env.py("print(open('/workspace/a.txt').read())")["stdout"] == "hello\n"


def test_missing_backend_is_a_clear_error_not_a_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap, no runsc, no prlimit on PATH
    pool = SandboxPool(tmp_path / "ws")
    for name, package in (("bwrap", "bubblewrap"), ("gvisor", "runsc")):
        with pytest.raises(SandboxUnavailable) as info:
            pool.handle("alice", name, __import__("runtime.sandbox.base", fromlist=["Limits"]).Limits())
        assert info.value.code is ErrorCode.SANDBOX_UNAVAILABLE and package in info.value.reason
    pool.close()


def test_unsandboxed_opt_out_runs_outside_the_worker_and_is_on_record(tmp_path, capfd):
    e = Env(tmp_path, "none")
    try:
        out = e.py("import os; print(os.getpid() != 1)")
        assert out["exit_code"] == 0 and out["backend"] == "none"
        assert "UNSANDBOXED" in capfd.readouterr().err  # said loudly
        allow = [r for r in auditlog.read_records(e.audit_path) if r.get("decision") == "allow"]
        assert allow[-1]["sandbox"] == "none"
    finally:
        e.close()
