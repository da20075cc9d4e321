"""`ray job submit -- warden run JOB.yaml` against a real head started with `ray start --head`.

The head runs in its own process tree with its own temp dir, ports and token, so it can live
next to the shared in-process Ray instance of the other cluster tests. Token authentication
is on: the job server refuses clients without the token and serves those that present it.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv Warden is installed in: `ray` and `warden` live here
JOB = "tests/cluster/jobs/probe.yaml"  # relative to the uploaded working directory
ROLE_RESOURCES = {"warden_trusted": 1000, "warden_agent": 1000, "warden_sandbox": 1000}

START_TIMEOUT_S = 60
JOB_TIMEOUT_S = 180
CLI_TIMEOUT_S = 60

# Single ports the head needs, then a range for its workers. They come from 20000-32767: below
# the kernel's ephemeral range (outgoing connections, port-0 binds) and above Ray's default
# worker ports (10002-19999), which the shared Ray instance of this test run uses.
_PORT_NAMES = ("port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
               "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
               "metrics-export-port")
_WORKER_PORTS = 60


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _free_port_block(n: int) -> int:
    """The first of ``n`` consecutive ports that are all free right now."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32768 - n)
        if all(_port_free(p) for p in range(base, base + n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports found in 20000-32767")


def _clean_env() -> dict[str, str]:
    """This process's environment without any RAY_* setting (an in-process ray.init of the shared
    fixture sets some, e.g. RAY_AUTH_MODE), so each command below gets exactly what it is given."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}


def _http_get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def _kill_with_env(entry: bytes, within_s: float = 10) -> None:
    """SIGKILL this user's processes whose environment holds ``entry`` until none is left (or ``within_s``)."""
    deadline = time.monotonic() + within_s
    while (left := _processes_with_env(entry)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue  # gone already
        time.sleep(0.1)  # another process's exit: nothing to await


def _processes_with_env(entry: bytes) -> list[int]:
    """Pids of this user's processes whose environment holds ``entry`` (Linux /proc)."""
    pids = []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if entry in f.read().split(b"\0"):
                    pids.append(int(name))
        except OSError:  # gone, or not ours
            continue
    return pids


@dataclass
class Head:
    proc: subprocess.Popen[bytes]
    temp_dir: Path
    output: Path
    dashboard: str
    token: str
    token_file: Path
    default_token_before: bytes | None
    submissions: list[str] = field(default_factory=list)
    resources: dict[str, float] = field(default_factory=dict)  # the head node's, once it is up

    def env(self) -> dict[str, str]:
        """A client environment that presents this cluster's token (and nothing else's)."""
        return {**_clean_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file)}

    def ray(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "ray"), *args], cwd=ROOT, env=env if env is not None else self.env(),
                              capture_output=True, text=True, timeout=timeout)

    def job(self, command: str, submission_id: str, *args: str,
            timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        return self.ray("job", command, "--address", self.dashboard, *args, submission_id, timeout=timeout)

    def output_tail(self) -> str:
        return self.output.read_text(errors="replace")[-4000:] if self.output.exists() else ""

    def state(self) -> str:
        """For failure messages: whether the head is still up, and its output if it is not."""
        if self.proc.poll() is None:
            return "the head is running"
        return f"the head exited with {self.proc.returncode}; its output:\n{self.output_tail()}"


def _start_head(tmp: Path) -> Head:
    for tool in ("ray", "warden"):
        if not (BIN / tool).exists():
            pytest.fail(f"no {tool} next to {sys.executable}: run the tests from the venv Warden is installed in")
    # Ray's unix socket paths must stay short (about 107 bytes), so not under pytest's tmp_path.
    temp_dir = Path(tempfile.mkdtemp(prefix="wjs-", dir="/tmp" if os.path.isdir("/tmp") else None))
    token = secrets.token_hex(32)
    token_file = tmp / "ray-auth-token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    default_token = Path.home() / ".ray" / "auth_token"
    default_token_before = default_token.read_bytes() if default_token.exists() else None

    base = _free_port_block(len(_PORT_NAMES) + _WORKER_PORTS)
    ports = dict(zip(_PORT_NAMES, range(base, base + len(_PORT_NAMES))))
    first_worker = base + len(_PORT_NAMES)
    command = [str(BIN / "ray"), "start", "--head", "--block", "--temp-dir", str(temp_dir),
               *[arg for name, port in ports.items() for arg in (f"--{name}", str(port))],
               "--min-worker-port", str(first_worker), "--max-worker-port", str(first_worker + _WORKER_PORTS - 1),
               "--num-cpus", "2", "--resources", json.dumps(ROLE_RESOURCES), "--object-store-memory", str(100 << 20),
               "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--disable-usage-stats"]
    # Job entrypoints run in a shell on the head with the head's PATH: put the venv's bin first
    # (as an activated venv would) so that `warden` is found. Running BIN/ray alone does not.
    # No drain on SIGTERM (it waits up to 30 s while anything runs): the head is stopped only
    # after its jobs have ended or been stopped, and nothing else uses it.
    env = {**_clean_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    output = temp_dir / "ray-start.out"
    with open(output, "wb") as out:
        # --block keeps `ray start` in the foreground as the parent of every process it starts,
        # and a new session makes it and them a tree of their own (see _stop_head).
        proc = subprocess.Popen(command, cwd=temp_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    head = Head(proc, temp_dir, output, f"http://127.0.0.1:{ports['dashboard-port']}", token, token_file,
                default_token_before)
    try:
        _wait_until_up(head)
    except BaseException:
        _stop_head(head)
        raise
    return head


def _wait_until_up(head: Head) -> None:
    """Until the dashboard's state API (asked with the token) lists the head node as alive."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        if head.proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.proc.returncode}:\n{head.output_tail()}")
        try:
            status, body = _http_get(f"{head.dashboard}/api/v0/nodes?detail=1", head.token)
        except OSError as exc:  # not listening yet
            status, body = 0, str(exc)
        if status == 200:
            nodes = json.loads(body)["data"]["result"]["result"]
            alive = [n for n in nodes if n["state"] == "ALIVE" and n["is_head_node"]]
            if alive:
                head.resources = alive[0]["resources_total"]
                return
        last = f"{status} {body[:300]}"
        time.sleep(0.25)
    raise RuntimeError(f"the head did not come up in {START_TIMEOUT_S}s (last answer: {last}):\n"
                       f"{head.output_tail()}")


def _stop_head(head: Head) -> None:
    """Stop this head and only this head.

    Not `ray stop`: it stops every Ray process on the machine, the shared Ray instance of this
    test run included. Instead, SIGTERM to the `ray start --block` process, which then stops the
    processes it started (GCS, raylet, dashboard, agents; the raylet's workers go with the
    raylet). Whatever is still alive a few seconds later and carries this head's token-file
    setting in its environment (a dashboard helper, a worker, a job's driver, which Ray starts
    in a session of its own) is SIGKILLed: no other process can have that setting, as it names
    a file of this test.
    """
    if head.proc.poll() is None:
        head.proc.send_signal(signal.SIGTERM)
        try:
            head.proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            head.proc.kill()
            head.proc.wait(timeout=10)
    marker = f"RAY_AUTH_TOKEN_PATH={head.token_file}".encode()
    deadline = time.monotonic() + 3
    while _processes_with_env(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    _kill_with_env(marker)
    shutil.rmtree(head.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    h = _start_head(tmp_path_factory.mktemp("head"))
    try:
        yield h
    finally:
        for submission_id in h.submissions:  # a job still running (a failed test) is stopped first
            try:
                h.job("stop", submission_id, timeout=30)
            except subprocess.TimeoutExpired:
                pass
        _stop_head(h)


def test_the_head_advertises_the_role_resources(head):
    assert {k: head.resources.get(k) for k in ROLE_RESOURCES} == ROLE_RESOURCES, head.resources


def test_the_job_server_refuses_clients_without_the_cluster_token(head):
    # Plain HTTP: no token, a wrong token, the right token.
    status, body = _http_get(f"{head.dashboard}/api/jobs/")
    assert status == 401, (status, body[:300])
    status, body = _http_get(f"{head.dashboard}/api/jobs/", secrets.token_hex(32))
    assert status == 403, (status, body[:300])
    status, body = _http_get(f"{head.dashboard}/api/jobs/", head.token)
    assert status == 200 and isinstance(json.loads(body), list), (status, body[:300])

    # The Ray CLI: without a token (RAY_AUTH_MODE unset, so nothing is presented) and with
    # another cluster's token, refused; with this cluster's token, served.
    assert head.proc.poll() is None, head.state()
    refused = head.ray("job", "list", "--address", head.dashboard, env=_clean_env())
    assert refused.returncode != 0 and "Missing authentication token" in refused.stderr + refused.stdout, \
        refused.stderr[-2000:]
    wrong = head.ray("job", "list", "--address", head.dashboard,
                     env={**_clean_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)})
    assert wrong.returncode != 0 and "Invalid authentication token" in wrong.stderr + wrong.stdout, \
        wrong.stderr[-2000:]
    listed = head.ray("job", "list", "--address", head.dashboard)
    assert listed.returncode == 0, listed.stderr[-2000:]

    # The cluster runs on the test's own token: the default token file was not written.
    default_token = Path.home() / ".ray" / "auth_token"
    assert (default_token.read_bytes() if default_token.exists() else None) == head.default_token_before


def test_ray_job_submit_runs_a_warden_job_whose_logs_hold_the_summary(head, tmp_path):
    runs_dir = tmp_path / "runs"  # absolute, on the head's machine: the test reads it afterwards
    submission_id = f"warden-e2e-{secrets.token_hex(4)}"
    head.submissions.append(submission_id)
    try:
        # Blocks until the job ends, streaming its logs.
        submit = head.ray("job", "submit", "--address", head.dashboard, "--working-dir", ".",
                          "--submission-id", submission_id, "--",
                          "warden", "run", JOB, "--runs-dir", str(runs_dir), timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        logs = head.job("logs", submission_id)
        pytest.fail(f"job {submission_id} still running after {JOB_TIMEOUT_S}s; its logs so far:\n"
                    f"{logs.stdout[-6000:]}{logs.stderr[-2000:]}\n{head.state()}")
    assert submit.returncode == 0, \
        f"ray job submit failed:\n{submit.stdout[-6000:]}\n{submit.stderr[-3000:]}\n{head.state()}"

    status = head.job("status", submission_id, "--log-color", "false")
    logs = head.job("logs", submission_id)
    context = (f"ray job status:\n{status.stdout}{status.stderr[-2000:]}\n"
               f"ray job logs:\n{logs.stdout[-6000:]}{logs.stderr[-2000:]}\n{head.state()}")
    assert status.returncode == 0 and f"Job '{submission_id}' succeeded" in status.stdout, context
    code, body = _http_get(f"{head.dashboard}/api/jobs/{submission_id}", head.token)
    assert code == 200 and json.loads(body)["status"] == "SUCCEEDED", (code, body[:2000])
    head.submissions.remove(submission_id)  # finished: nothing to stop at teardown
    assert logs.returncode == 0, context
    summary = [line for line in logs.stdout.splitlines() if line.startswith("Warden job probe (")]
    assert len(summary) == 1 and summary[0].split(": ", 1)[1].startswith("ok in "), context
    audit_lines = [line for line in logs.stdout.splitlines() if line.startswith("audit log: ")]
    assert len(audit_lines) == 1 and audit_lines[0].endswith("records, chain verified)"), context
    # The job's own results are in the logs too: its denials happened on the cluster.
    assert "POLICY_DENIEDx1" in logs.stdout and "UNKNOWN_TOOLx1" in logs.stdout, context
    reasons = logs.stdout.split("why calls were denied or failed (from the audit log):")[-1]
    assert "unknown arguments ['txt']" in reasons and "tool 'note.write' not in ['echo']" in reasons, context
    assert "DeprecationWarning" not in logs.stdout + logs.stderr, context

    # The audit log landed where --runs-dir said, and it verifies outside the job as well.
    audit_log = Path(audit_lines[0][len("audit log: "):].rsplit(" (", 1)[0])
    job_id = summary[0][len("Warden job probe ("):].split(")", 1)[0]
    assert audit_log == runs_dir / job_id / "audit.log" and audit_log.is_file(), context
    verify = subprocess.run([str(BIN / "warden"), "audit", "verify", str(audit_log)], env=_clean_env(),
                            capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert verify.returncode == 0 and "chain intact" in verify.stdout, verify.stdout + verify.stderr
