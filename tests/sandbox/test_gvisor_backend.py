"""The gVisor backend on a real runsc: isolation, every limit, and recovery after a breach.

Skipped as a whole only when ``GVisorBackend().check()`` says this host cannot run gVisor
(CI installs runsc, so there these tests run). Limits are kept small so the module is quick.
"""

from __future__ import annotations

import fcntl
import json
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from runtime.errors import ErrorCode, SandboxKilled, SandboxUnavailable
from runtime.sandbox import gvisor as gvisor_backend
from runtime.sandbox.base import WORKSPACE, Limits
from runtime.sandbox.gvisor import GVisorBackend

PY = ["python3", "-I", "-"]
SH = ["/bin/sh", "-s"]
# The wall clock is generous: a test of another limit must reach that limit on a busy machine too.
LIMITS = Limits(cpu_s=1, wall_s=60, memory_mb=256, max_pids=16, max_output_bytes=64_000, workspace_mb=16)
CANARY = ("WARDEN_CANARY_SECRET", "canary-7f3a9c1e")


@pytest.fixture(scope="module")
def backend() -> GVisorBackend:
    b = GVisorBackend()
    try:
        b.check()
    except SandboxUnavailable as e:
        pytest.skip(f"gVisor cannot run on this host: {e}")
    return b


@pytest.fixture(scope="module")
def session(backend, tmp_path_factory):
    """One warm session shared by the module, created while a host secret is in the environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(*CANARY)
        s = backend.open(tmp_path_factory.mktemp("ws"), workspace_mb=LIMITS.workspace_mb, key="agent-a")
        s.prewarm(PY, LIMITS)
        yield s
        s.close()


def py(session, code: str, limits: Limits = LIMITS):
    return session.run(PY, stdin=code.encode(), limits=limits)


def ok(session, code: str, limits: Limits = LIMITS) -> str:
    r = py(session, code, limits)
    assert (r.exit_code, r.killed) == (0, None), r
    return r.stdout.decode()


def cmdlines(session) -> list[str]:
    """The command line of every process in the session's sandbox, as seen from inside."""
    return json.loads(ok(session, """
import json, os
pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
print(json.dumps([open(f'/proc/{p}/cmdline').read().replace('\\0', ' ').strip() for p in pids]))
"""))


def assert_next_call_works(session) -> None:
    assert ok(session, "print('still here')") == "still here\n"


def host_ipv4_addresses() -> list[str]:
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            found.append(socket.inet_ntoa(packed[20:24]))
    return sorted(set(found))


def test_check_names_the_debian_package_when_runsc_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable) as e:
        GVisorBackend().check()
    assert e.value.code is ErrorCode.SANDBOX_UNAVAILABLE and "apt-get install runsc" in str(e.value)


def test_check_names_the_pip_package_when_the_bindings_are_missing(backend, monkeypatch):
    monkeypatch.setattr(gvisor_backend, "gvisor", None)
    with pytest.raises(SandboxUnavailable, match="pip install gvisor"):
        GVisorBackend().check()


def test_hello_world_from_stdin(session):
    r = py(session, "import sys; print('hello', sys.stdin.read() == '')")
    assert (r.exit_code, r.stdout, r.killed, r.backend) == (0, b"hello True\n", None, "gvisor")


def test_exit_codes_are_reported(session):
    assert py(session, "import sys; sys.exit(3)").exit_code == 3
    assert session.run(SH, stdin=b"exit 7", limits=LIMITS).exit_code == 7
    assert session.run(["true"], limits=LIMITS).exit_code == 0
    r = session.run(["false"], limits=LIMITS)
    assert (r.exit_code, r.killed) == (1, None)


def test_no_network_to_loopback_host_addresses_or_dns(session):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("0.0.0.0", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    targets = ["127.0.0.1", *(a for a in host_ipv4_addresses() if a != "127.0.0.1")]
    try:
        out = json.loads(ok(session, f"""
import json, socket
res = {{}}
for host in {targets!r}:
    try:
        socket.create_connection((host, {port}), timeout=0.5).close(); res[host] = 'connected'
    except OSError as e:
        res[host] = type(e).__name__
try:
    socket.getaddrinfo('example.com', 80); res['dns'] = 'resolved'
except OSError as e:
    res['dns'] = type(e).__name__
res['interfaces'] = [n for _, n in socket.if_nameindex()]
print(json.dumps(res))
"""))
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing from the sandbox ever reached the host
    finally:
        listener.close()
    assert out.pop("interfaces") == ["lo"]
    assert out["dns"] == "gaierror"
    assert set(out) == {*targets, "dns"} and "connected" not in out.values() and "resolved" not in out.values()


def test_no_host_secrets_home_or_environment(session, tmp_path):
    secret = tmp_path / "host-secret.txt"
    secret.write_text("top secret")
    out = json.loads(ok(session, f"""
import json, os
print(json.dumps({{
    'environ': dict(os.environ),
    'init_environ': open('/proc/1/environ').read(),
    'exists': {{p: os.path.exists(p) for p in ['/root/.ray/auth_token', '/root/.ray', '/root', '/home',
                                          {str(Path.home())!r}, {str(secret)!r}, '/tmp/ray']}},
}}))
"""))
    name, value = CANARY
    assert name not in out["environ"] and value not in json.dumps(out["environ"])
    assert name not in out["init_environ"] and value not in out["init_environ"]
    assert set(out["environ"]) <= {"PATH", "HOME", "LANG", "PYTHONDONTWRITEBYTECODE", "PWD", "LC_CTYPE"}
    assert out["environ"]["HOME"] == WORKSPACE
    assert not any(out["exists"].values()), out["exists"]


def test_proc_lists_only_the_sandbox(session):
    procs = cmdlines(session)
    assert 2 <= len(procs) <= 4, procs  # init, this call, at most two warm interpreters
    assert procs[0] == "sleep infinity" and "python3 -I -" in procs
    assert not any("pytest" in c or "runsc" in c or "ray" in c for c in procs), procs


def test_root_is_read_only_and_the_workspace_is_writable_and_persists(session):
    out = json.loads(ok(session, """
import json
res = {}
for path in ['/usr/x', '/etc/x', '/x', '/workspace/note.txt']:
    try:
        open(path, 'w').write('written'); res[path] = 'ok'
    except OSError as e:
        res[path] = e.strerror
print(json.dumps(res))
"""))
    assert out == {"/usr/x": "Read-only file system", "/etc/x": "Read-only file system",
                   "/x": "Read-only file system", "/workspace/note.txt": "ok"}
    assert (session.workspace / "note.txt").read_text() == "written"
    assert ok(session, "print(open('/workspace/note.txt').read())") == "written\n"


def test_calls_share_one_warm_sandbox_until_a_breach(session):
    ok(session, "open('/tmp/warm-marker', 'w').write('1')")
    assert ok(session, "import os; print(os.path.exists('/tmp/warm-marker'))") == "True\n"
    assert py(session, "while True: pass").killed == "cpu"
    # A breach replaced the sandbox: scratch space is new, the workspace is not.
    assert ok(session, "import os; print(os.path.exists('/tmp/warm-marker'))") == "False\n"


def test_infinite_loop_is_killed_for_cpu(session):
    r = py(session, "while True: pass")
    assert r.killed == "cpu" and r.cpu_s > LIMITS.cpu_s, r  # the sandbox's CPU time, measured by the worker
    with pytest.raises(SandboxKilled) as e:
        r.raise_for_kill(tool="run_python")
    assert e.value.code is ErrorCode.SANDBOX_CPU
    assert_next_call_works(session)


def test_sleeping_past_the_wall_clock_is_killed_for_timeout(session):
    limits = Limits(cpu_s=1, wall_s=1, memory_mb=LIMITS.memory_mb, max_pids=16, workspace_mb=16)
    r = py(session, "import time; time.sleep(30)", limits)
    assert r.killed == "timeout" and r.wall_s >= 1
    assert_next_call_works(session)
    assert [c for c in cmdlines(session) if c.startswith("python3")] in (["python3 -I -"], ["python3 -I -"] * 2)


def test_memory_bomb_is_killed_for_memory(session):
    r = py(session, "x = bytearray(1 << 30)")
    assert r.killed == "memory" and "sandbox memory" in r.detail, r  # the host's memory cgroup killed it
    with pytest.raises(SandboxKilled) as e:
        r.raise_for_kill()
    assert e.value.code is ErrorCode.SANDBOX_MEMORY
    assert_next_call_works(session)


def test_filling_tmp_breaches_the_sandbox_memory_cgroup(session):
    # CPU and wall time are far out of reach however slow the machine: only memory can end this.
    limits = Limits(cpu_s=60, wall_s=120, memory_mb=128, max_pids=16, workspace_mb=16)
    r = py(session, "for i in range(80): open(f'/tmp/f{i}', 'wb').write(b'x' * (8 << 20))", limits)
    assert r.killed == "memory" and "sandbox memory" in r.detail
    assert_next_call_works(session)


def test_fork_bomb_is_contained_and_never_named_another_limit(session):
    # The worker counts the call's processes (runsc ps, every 0.25 s). A bomb whose forks the
    # in-sandbox RLIMIT_NPROC refuses can die of that before a count sees it over max_pids (on
    # a busy machine, often): then it is the program's own failure, as the README says; never
    # CPU, time or memory. Processes held past the limit are always a pids breach
    # (test_kill_causes::test_processes_held_past_the_limit_are_a_pids_breach).
    r = py(session, "import os\nwhile True:\n    os.fork()")
    assert r.killed in ("pids", None), r
    if r.killed == "pids":
        assert r.detail.startswith("processes"), r
    else:
        assert r.exit_code not in (0, None), r
    assert_next_call_works(session)


def test_huge_output_is_killed_for_output(session):
    r = py(session, "import sys\nwhile True: sys.stdout.write('x' * 65536)")
    assert r.killed == "output" and len(r.stdout) + len(r.stderr) <= LIMITS.max_output_bytes
    assert_next_call_works(session)


def test_a_process_left_behind_is_killed_when_its_call_ends(session):
    r = session.run(SH, stdin=b"sleep 30 &\necho started", limits=LIMITS)
    assert (r.exit_code, r.killed, r.stdout) == (0, None, b"started\n")
    assert r.wall_s < 30  # the background sleep holds stdout; it did not keep the call waiting
    assert "sleep 30" not in cmdlines(session)


def test_two_sessions_cannot_see_each_others_files(backend, session, tmp_path):
    ok(session, "open('/workspace/a-only.txt', 'w').write('for a')")
    other = backend.open(tmp_path, workspace_mb=16, key="agent-b")
    try:
        out = json.loads(ok(other, f"""
import json, os
print(json.dumps({{'listing': os.listdir('/workspace'),
                   'a_host_path': os.path.exists({str(session.workspace)!r})}}))
"""))
        assert out == {"listing": [], "a_host_path": False}
        ok(other, "open('/workspace/b-only.txt', 'w').write('for b')")
        assert "b-only.txt" not in ok(session, "import os; print(os.listdir('/workspace'))")
    finally:
        other.close()


def test_close_is_idempotent_and_leaves_no_runsc_process(backend, tmp_path):
    s = backend.open(tmp_path, workspace_mb=16)
    assert ok(s, "print(1)") == "1\n"
    runtime_dir = str(s._runtime_dir)
    running = subprocess.run(["pgrep", "-f", runtime_dir], capture_output=True, text=True).stdout.split()
    assert running  # the sandbox and its gofer
    s.close()
    s.close()
    assert subprocess.run(["pgrep", "-f", runtime_dir], capture_output=True, text=True).stdout == ""
    assert not Path(runtime_dir).exists()
    with pytest.raises(SandboxUnavailable):
        s.run(PY, stdin=b"print(1)", limits=LIMITS)


def test_a_higher_max_pids_after_a_lower_one_gets_its_limit(backend, tmp_path):
    # The Sentry keeps RLIMIT_NPROC per uid for the whole sandbox and a call cannot raise it
    # again once an earlier call lowered it: such a call gets a sandbox of its own.
    s = backend.open(tmp_path, workspace_mb=16, key="agent-c")
    try:
        for max_pids in (2, 6, 2):
            limits = Limits(cpu_s=1, wall_s=60, memory_mb=LIMITS.memory_mb, max_pids=max_pids, workspace_mb=16)
            r = s.run(SH, stdin=b"ls /workspace; echo done", limits=limits)  # two processes
            assert (r.exit_code, r.killed) == (0, None), r
    finally:
        s.close()
