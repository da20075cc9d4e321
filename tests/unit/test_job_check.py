"""``warden job check`` and ``warden run --dry-run`` as a user runs them: a subprocess, good and broken job files.

A broken job reports every problem (not just the first), one readable line each, and exits 1;
``warden run`` of such a job stops before Ray starts, so no agent has run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

GOOD_POLICY = "agent: a\ntools:\n  chat.read: {effect: read, args: {channel: {one_of: [general]}}}\n"
JOB = """name: j
task: t
entry: [a]
tools: [agents.chat]
agents:
  - {name: a, class: "agents.demo:LeadAgent", policy: p.yaml}
"""

BROKEN = """name: j
task: t
entry: [a]
tools: [agents.chat]
credentails: {}
credentials:
  chat.read: {Authorization: {env: WARDEN_TEST_NO_SUCH_VAR, origin: "https://api.example"}}
agents:
  - {name: a, class: "agents.demo:LeadAgent", policy: p.yaml}
  - name: b
    class: "agent.demo:Nope"
    policy: q.yaml
    config: {model: {kind: openai, base_url: "http://127.0.0.1:9", model: m, api_key_env: WARDEN_TEST_NO_KEY}}
"""

BROKEN_POLICY = ("agent: a\ntools:\n  chat.read: {effect: read, args: {chanel: {one_of: [general]}, "
                 "limit: {each: {max: 3}}}}\n  chat.nope: {effect: read}\n")


def warden(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARDEN_TEST_") and k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = "" if cwd != ROOT else str(ROOT)  # elsewhere: only the installed package
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


def write(tmp_path: Path, job: str, policy: str, q: str = "agent: b\ntools: {}\n") -> Path:
    (tmp_path / "p.yaml").write_text(policy)
    (tmp_path / "q.yaml").write_text(q)
    (tmp_path / "job.yaml").write_text(job)
    return tmp_path / "job.yaml"


def test_good_jobs_pass(tmp_path):
    out = warden("job", "check", str(write(tmp_path, JOB, GOOD_POLICY)), "jobs/demo.yaml")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "jobs/demo.yaml: ok"


def test_a_broken_job_reports_every_problem_one_line_each(tmp_path):
    path = write(tmp_path, BROKEN, BROKEN_POLICY)
    out = warden("job", "check", str(path))
    assert out.returncode == 1
    expected = [
        "at credentails: Extra inputs are not permitted (did you mean 'credentials'?)",
        f"agent 'b': cannot import agent.demo:Nope: No module named 'agent' (modules are imported from {ROOT}",
        "policy of 'a': tool 'chat.nope' is defined by no module in ['agents.chat']",
        "tool 'chat.read' has no parameter 'chanel'; its parameters: channel, limit (did you mean 'channel'?)",
        "at tools.chat.read.args.limit: each/min_items/max_items need a list parameter; 'limit' is integer",
        "credential 'Authorization' of tool 'chat.read' needs environment variable WARDEN_TEST_NO_SUCH_VAR",
        "agent 'b': the model's api_key_env WARDEN_TEST_NO_KEY is not set in the environment",
    ]
    for line in expected:
        assert line in out.stderr, (line, out.stderr)
    assert out.stderr.splitlines()[-1] == f"{path}: 6 problem(s)"
    assert warden("run", "--dry-run", str(path)).returncode == 1


def test_a_misspelt_policy_key_and_local_placement(tmp_path):
    job = JOB.replace("policy: p.yaml}", "policy: p.yaml, resources: {num_cpus: 100000, resources: {gpu_x: 1}}}")
    out = warden("job", "check", str(write(tmp_path, job, "agent: a\nquota: {}\ntools: {}\n")))
    assert out.returncode == 1
    assert "at quota: Extra inputs are not permitted (did you mean 'quotas'?)" in out.stderr
    assert "agent 'a': resource 'gpu_x' is not on a local Ray" in out.stderr
    assert "agent 'a': num_cpus 100000.0 > this machine's" in out.stderr


def test_import_error_from_the_wrong_directory_names_the_import_directory(tmp_path):
    out = warden("job", "check", str(write(tmp_path, JOB, GOOD_POLICY)), cwd=tmp_path)
    assert out.returncode == 1
    assert f"modules are imported from {tmp_path}" in out.stderr


def test_run_stops_before_ray_when_a_model_key_is_missing(tmp_path):
    job = JOB.replace("policy: p.yaml}", "policy: p.yaml, config: {model: {kind: openai, base_url: 'http://127.0.0.1:9',"
                      " model: m, api_key_env: WARDEN_TEST_NO_KEY}}}")
    out = warden("run", str(write(tmp_path, job, GOOD_POLICY)))
    assert out.returncode == 1
    assert "JOB_INVALID" in out.stderr and "api_key_env WARDEN_TEST_NO_KEY is not set" in out.stderr
    assert "starting a local Ray" not in out.stderr


def test_policy_check_tools_must_cover_the_policy(tmp_path):
    (tmp_path / "p.yaml").write_text(BROKEN_POLICY)
    out = warden("policy", "check", str(tmp_path / "p.yaml"), "--tools", "agents.chat")
    assert out.returncode == 1
    assert "tool 'chat.nope' is defined by none of ['agents.chat']" in out.stderr
    assert "did you mean 'channel'?" in out.stderr


def test_a_delegation_whose_token_would_be_too_big_is_reported(tmp_path):
    names = [f"user{i:04d}" for i in range(1000)]  # each policy fits alone; the two together do not
    rule = f"{{one_of: {names}}}"
    lead = f"agent: a\ntools:\n  chat.read: {{effect: read, args: {{channel: {rule}}}}}\n" \
           "delegation: {can_delegate_to: [b], max_depth: 1}\n"
    helper = f"agent: b\ntools:\n  chat.post: {{effect: write, args: {{channel: {rule}}}}}\n"
    job = JOB.replace("policy: p.yaml}", "policy: p.yaml}\n  - {name: b, class: \"agents.demo:LeadAgent\", policy: q.yaml}")
    out = warden("job", "check", str(write(tmp_path, job, lead, helper)))
    assert out.returncode == 1
    assert "policy of 'a': a token delegated to 'b' would be" in out.stderr


def test_wrong_shapes_are_problems_not_crashes(tmp_path):
    from runtime import check_job

    for text, fragment in [("name: j\nagents: 5\ntools: agents.chat\ncredentials: 3\n", "at agents: Input should be"),
                           ("- a\n", "a job file must be a YAML mapping"), ("a: [\n", "cannot read the job file")]:
        (tmp_path / "j.yaml").write_text(text)
        problems = check_job(tmp_path / "j.yaml", environ={})
        assert problems and any(fragment in p for p in problems), problems
    assert check_job(tmp_path / "missing.yaml") == [f"{tmp_path / 'missing.yaml'}: cannot read the job file: "
                                                    "No such file or directory"]
