"""A new user's first runs: another Ray already on the machine, a stale session file, Ray
printing into `warden run --json`, and artifacts kept from an agent's workspace.

The second Ray is started here with `ray start --head --block` in a process tree, temp dir and
ports of its own (never `ray stop`), and made findable the way a user's own Ray is: its
`ray_current_cluster` file is in Ray's default temp dir of the `warden` processes under test
(`RAY_TMPDIR`), which is exactly what `ray.init()` without an address attaches to.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime.job import load_job, run_loaded
from tests.cluster.test_job_submit import _PORT_NAMES, _clean_env, _free_port_block, _kill_with_env

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
JOBS = Path(__file__).resolve().parent / "jobs"
MARKER_RESOURCE = "second_ray_marker"  # only the second Ray has it
START_TIMEOUT_S = 60
RUN_TIMEOUT_S = 300


@dataclass
class SecondRay:
    proc: subprocess.Popen[bytes]
    base: Path  # RAY_TMPDIR that finds it: base/ray/ray_current_cluster
    address: str
    marker: str  # an environment entry only its processes carry


def _start_second_ray() -> SecondRay:
    base = Path(tempfile.mkdtemp(prefix="wfr-", dir="/tmp" if os.path.isdir("/tmp") else None))
    marker = f"WARDEN_TEST_SECOND_RAY={secrets.token_hex(8)}"
    ports = range(_free_port_block(len(_PORT_NAMES) + 40), 10**6)
    named = dict(zip(_PORT_NAMES, ports))
    first_worker = named[_PORT_NAMES[-1]] + 1
    command = [str(BIN / "ray"), "start", "--head", "--block", "--temp-dir", str(base / "ray"),
               *[arg for name, port in named.items() for arg in (f"--{name}", str(port))],
               "--min-worker-port", str(first_worker), "--max-worker-port", str(first_worker + 39),
               "--num-cpus", "1", "--resources", json.dumps({MARKER_RESOURCE: 1}),
               "--include-dashboard", "false", "--disable-usage-stats"]
    token = base / "auth_token"  # its own token: token authentication on, as a user's Ray should have it
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**_clean_env(), marker.split("=")[0]: marker.split("=")[1], "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    out = open(base / "ray-start.out", "wb")
    proc = subprocess.Popen(command, cwd=base, env=env, stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    second = SecondRay(proc, base, f"127.0.0.1:{named['port']}", marker)
    address_file = base / "ray" / "ray_current_cluster"
    deadline = time.monotonic() + START_TIMEOUT_S
    while not address_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # `ray start` writes it once the head is up; there is nothing to wait on
    if not address_file.exists():
        _stop(second)
        pytest.fail(f"second Ray did not start:\n{(base / 'ray-start.out').read_text(errors='replace')[-3000:]}")
    second.address = address_file.read_text().strip()
    return second


def _stop(second: SecondRay) -> None:
    """This Ray's processes only: SIGTERM to its `ray start --block`, then any straggler with its marker."""
    if second.proc.poll() is None:
        second.proc.send_signal(signal.SIGTERM)
        try:
            second.proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            second.proc.kill()
            second.proc.wait(timeout=10)
    _kill_with_env(second.marker.encode())
    shutil.rmtree(second.base, ignore_errors=True)


@pytest.fixture(scope="module")
def second_ray():
    second = _start_second_ray()
    try:
        yield second
    finally:
        _stop(second)


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text(errors="replace")
    except FileNotFoundError:
        return False


def _warden(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "warden"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)


def _ok_summary(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)  # the document alone
    assert summary["ok"] and summary["audit_ok"], summary
    return summary


# ------------------------------------------------------------------------ item 10: another Ray running


def test_a_plain_ray_init_would_attach_to_the_second_ray(second_ray):
    """The trap is real: Ray's own discovery in this environment finds the second Ray, and
    asking it for resources fails the way `make demo` did."""
    env = {**_clean_env(), "RAY_TMPDIR": str(second_ray.base)}
    program = ("import ray\ntry:\n    ray.init(resources={'warden_trusted': 1})\nexcept ValueError as e:\n"
               "    print('REFUSED', e)\nelse:\n    print('STARTED', ray.cluster_resources())\n")
    proc = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120)
    assert "REFUSED When connecting to an existing cluster, resources must not be provided" in proc.stdout, (
        proc.stdout, proc.stderr[-2000:])


def test_warden_run_beside_another_ray_starts_a_private_one(second_ray, tmp_path):
    env = {**_clean_env(), "RAY_TMPDIR": str(second_ray.base)}
    summary = _ok_summary(_warden("run", "tests/cluster/jobs/probe.yaml", "--json", "--runs-dir", str(tmp_path),
                                  env=env))
    assert summary["results"]["probe"]["allowed"] == {"ok": True, "value": "hi"}
    assert second_ray.proc.poll() is None  # the other Ray is untouched
    assert (second_ray.base / "ray" / "ray_current_cluster").read_text().strip() == second_ray.address


def test_address_local_gives_the_private_node_the_role_resources_even_with_ray_address_set(second_ray, tmp_path):
    env = {**_clean_env(), "RAY_ADDRESS": second_ray.address, "RAY_TMPDIR": str(second_ray.base)}
    summary = _ok_summary(_warden("run", "tests/cluster/jobs/probe.yaml", "--address", "local", "--json",
                                  "--runs-dir", str(tmp_path), env=env))
    assert summary["results"]["probe"]["allowed"]["ok"]


def test_a_stale_session_file_is_not_followed(tmp_path):
    stale = Path(tempfile.mkdtemp(prefix="wfs-", dir="/tmp" if os.path.isdir("/tmp") else None))
    try:
        (stale / "ray").mkdir()
        (stale / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # a Ray that is long gone
        env = {**_clean_env(), "RAY_TMPDIR": str(stale)}
        _ok_summary(_warden("run", "tests/cluster/jobs/probe.yaml", "--json", "--runs-dir", str(tmp_path), env=env))
    finally:
        shutil.rmtree(stale, ignore_errors=True)


def test_bench_e2e_starts_a_private_ray_beside_another_one(second_ray):
    env = {**_clean_env(), "RAY_TMPDIR": str(second_ray.base)}
    program = ("import json\nfrom runtime.bench.e2e import _ray\nray = _ray()\n"
               "print(json.dumps(ray.cluster_resources()))\n")
    proc = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resources = json.loads(proc.stdout.strip().splitlines()[-1])
    assert MARKER_RESOURCE not in resources
    assert all(resources.get(r) == 1000 for r in ("warden_trusted", "warden_agent", "warden_sandbox")), resources


# ------------------------------------------------------------------------ item 11: --json is JSON


def test_run_json_stdout_is_the_document_alone_while_ray_prints(ray_instance, tmp_path):
    env = {**_clean_env(), "RAY_ADDRESS": ray_instance.address}
    proc = _warden("run", "tests/cluster/jobs/noisy.yaml", "--json", "--runs-dir", str(tmp_path), env=env)
    summary = _ok_summary(proc)
    assert proc.stdout.lstrip().startswith("{") and proc.stdout.rstrip().endswith("}")
    assert summary["results"]["noisy"] == {"echo": "still here", "task_worker_died": True}
    # Ray did print, and it went to stderr: the agent's own lines, and the raylet's death notice.
    assert "NOISE-STDOUT from the agent actor" in proc.stderr
    assert "A worker died or was killed" in proc.stderr


# ------------------------------------------------------------------------ item 15: artifacts


def test_artifacts_are_copied_into_the_run_directory_size_capped_and_path_checked(ray_instance, runs_dir):
    result = asyncio.run(run_loaded(load_job(JOBS / "artifacts.yaml"), runs_dir=runs_dir))
    assert result.ok, result.errors
    assert [c["ok"] for c in result.results["writer"]["calls"]] == [True, True, True]
    kept = Path(result.run_dir) / "artifacts" / "writer"
    files = sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file() or p.is_symlink())
    assert files == ["notes.txt", "out/deep/report.md"]
    assert (kept / "out" / "deep" / "report.md").read_text() == "# Report\nall good\n"
    report = result.artifacts["writer"]
    assert report["files"] == 2 and report["bytes"] == len("# Report\nall good\n") + len("notes")
    reasons = {s["path"]: s["reason"] for s in report["skipped"]}
    assert "link" in reasons["/workspace/out/passwd"] and "fifo" in reasons["/workspace/out/pipe"]
    assert "larger than" in reasons["/workspace/out/big.bin"]  # 2 MB against max_mb: 1
    assert reasons["/workspace/missing.txt"] == "missing"
    assert result.artifacts_lost == []


# ------------------------------------------------------------------------ item 17: model keys on a cluster


def test_a_variable_in_the_environment_of_ray_start_reaches_actors_and_not_from_the_submitter(second_ray):
    """What the README tells users to do with model keys under `ray job submit`: the nodes'
    `ray start` environment reaches the actors (where `api_key_env` is read); the driver's
    own environment does not, so nothing secret needs to go into the runtime env."""
    name, value = second_ray.marker.split("=")
    program = (f"import os, ray\nos.environ['WARDEN_TEST_DRIVER_ONLY'] = 'x'\nray.init(address={second_ray.address!r})\n"
               "@ray.remote(num_cpus=0)\nclass A:\n    def env(self, k):\n        return os.environ.get(k)\n"
               f"a = A.remote()\nprint(ray.get(a.env.remote({name!r})), ray.get(a.env.remote('WARDEN_TEST_DRIVER_ONLY')))\n")
    env = {**_clean_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(second_ray.base / "auth_token")}
    proc = subprocess.run([sys.executable, "-c", program], cwd=tempfile.gettempdir(), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [value, "None"]


def test_artifacts_of_an_agent_whose_worker_died_are_reported_lost(ray_instance, runs_dir, tmp_path):
    """Two agents, each on its own worker (no restarts); one worker is SIGKILLed after the agents
    finished, before collection: the other agent's file is kept, the loss is named."""
    import signal as sig

    import yaml

    def agent(name: str) -> dict:
        steps = [{"call": "fs.write", "args": {"path": "/workspace/keep.txt", "content": f"from {name}"}},
                 {"call": "crash.mark", "args": {"path": str(tmp_path / f"{name}.pid"), "i": 0}},
                 {"answer": "done"}]
        return {"name": name, "class": "runtime:ToolCallingAgent", "policy": str(JOBS / "keeper-policy.yaml"),
                "config": {"model": {"kind": "scripted", "steps": steps}}}

    job_file = tmp_path / "keepers.yaml"
    job_file.write_text(yaml.safe_dump({
        "name": "keepers", "task": "keep", "entry": ["a", "b"],
        "tools": ["runtime.toolbox", "tests.cluster.agents_under_test"],
        "workers": {"count": 2, "max_restarts": 0}, "artifacts": {"paths": ["keep.txt"]},
        "agents": [agent("a"), agent("b")]}))

    async def kill_a_worker(_url: str) -> None:
        pid = int((tmp_path / "a.pid").read_text().split()[1])  # "i pid", written by the tool in the worker
        os.kill(pid, sig.SIGKILL)
        while _alive(pid):
            await asyncio.sleep(0.05)  # nothing to await on another process's death

    result = asyncio.run(run_loaded(load_job(job_file), runs_dir=runs_dir, before_teardown=kill_a_worker))
    assert result.failures == {} and result.audit_ok
    assert (tmp_path / "a.pid").read_text().split()[1] != (tmp_path / "b.pid").read_text().split()[1]
    kept = Path(result.run_dir) / "artifacts"
    assert (kept / "b" / "keep.txt").read_text() == "from b" and not (kept / "a").exists()
    assert set(result.artifacts) == {"b"}
    assert len(result.artifacts_lost) == 1 and "are lost" in result.artifacts_lost[0]
