"""The job file's ``mcp_servers:`` section: validated completely, the real servers listed at load (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.errors import ConfigError, ErrorCode
from runtime.job import load_job
from runtime.jobcheck import check_job
from runtime.mcpjob import McpServerSpec, server_of

ROOT = Path(__file__).resolve().parents[2]

JOB = """name: j
task: t
entry: [a]
tools: [agents.chat]
mcp_servers:
  - name: git
    prefix: git
    command: [mcp-server-git]
    sandbox: {backend: bwrap, limits: {cpu_s: 30}}
  - name: files
    prefix: files
    command: [mcp-server-filesystem, /workspace]
    path_args: [path, paths, source, destination]
agents:
  - {name: a, class: "agents.demo:LeadAgent", policy: p.yaml}
"""

POLICY = """agent: a
tools:
  git.git_status: {effect: read}
  git.git_log: {effect: read}
  files.read_text_file:
    effect: read
    args:
      path: {path_under: /workspace}
sandbox: {backend: bwrap}
"""


@pytest.fixture(autouse=True)
def project_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))


def write(tmp_path: Path, job: str = JOB, policy: str = POLICY) -> Path:
    (tmp_path / "p.yaml").write_text(policy)
    (tmp_path / "job.yaml").write_text(job)
    return tmp_path / "job.yaml"


def test_a_job_with_two_real_servers_loads_their_tools(tmp_path):
    job = load_job(write(tmp_path))
    assert job.tools["git.git_status"].spec.effect == "read"
    assert job.tools["git.git_reset"].spec.effect == "delete"
    assert job.tools["files.write_file"].spec.effect == "delete"
    assert job.tools["files.read_text_file"].spec.sandboxed
    assert job.tools["files.read_text_file"].spec.params["path"].format == "path"
    assert job.tools["files.read_multiple_files"].spec.params["paths"].items.format == "path"
    assert job.tools["git.git_status"].spec.params["repo_path"].format is None  # not named in path_args
    assert [e["server"]["name"] for e in job.mcp] == ["git", "files"]
    assert check_job(tmp_path / "job.yaml") == []


@pytest.mark.parametrize("policy, message", [
    (POLICY.replace("git.git_log: {effect: read}", "git.git_reset: {effect: write}"),
     "tool 'git.git_reset' has effect 'delete', policy says 'write'"),  # the policy cannot call it less than it is
    (POLICY.replace("git.git_log", "git.git_push"), "names tool 'git.git_push', which"),  # not listed at start
    (POLICY.replace("sandbox: {backend: bwrap}\n", ""), "run in the agent's bwrap sandbox"),
])
def test_a_policy_must_fit_the_listed_tools(tmp_path, policy, message):
    with pytest.raises(ConfigError) as err:
        load_job(write(tmp_path, policy=policy))
    assert err.value.code == ErrorCode.JOB_INVALID and message in err.value.reason


@pytest.mark.parametrize("change, message", [
    (("command: [mcp-server-git]", "comand: [mcp-server-git]"), "did you mean 'command'?"),
    (("command: [mcp-server-git]", "url: http://127.0.0.1:9/mcp"),
     "url host 127.0.0.1 is not a globally routable address; set allow_private_networks: true"),
    (("command: [mcp-server-git]", "url: ftp://mcp.example/x"), "URL scheme 'ftp' not allowed"),
    (("command: [mcp-server-git]", "url: https://me:pw@mcp.example/mcp"), "no credentials in the URL"),
    (("command: [mcp-server-git]", "url: https://mcp.example/mcp\n    network: [a.example]"), "is remote"),
    (("command: [mcp-server-git]", "url: https://mcp.example/mcp\n    headers_from: {Host: '${X}'}"),
     "set by the MCP transport itself"),
    (("command: [mcp-server-git]", "url: http://mcp.example/mcp\n    headers_from: {X-Key: '${HOME}'}"),
     "headers_from would send its credentials in clear text"),
    (("command: [mcp-server-git]", "url: https://mcp.example/mcp\n    headers_from: {Authorization: TOKEN}"),
     "a template naming the driver's environment variables"),
    (("command: [mcp-server-git]", "url: https://mcp.example/mcp\n    headers_from: {X-Key: '${WARDEN_TEST_UNSET_VAR}'}"),
     "headers_from needs environment variables ['WARDEN_TEST_UNSET_VAR']"),
    (("    command: [mcp-server-git]", "    command: [mcp-server-git]\n    headers_from: {X-Key: '${HOME}'}"),
     "headers_from is for url: servers"),
    (("command: [mcp-server-git]", "command: [mcp-server-git]\n    url: http://h/mcp"), "not both or neither"),
    (("backend: bwrap, limits", "backend: gvisor, limits"), "run in the agent's gvisor sandbox (their server's backend)"),
    (("cpu_s: 30", "cpu: 30"), "did you mean 'cpu_s'?"),
    (("prefix: files", "prefix: git"), "prefixes used twice: ['git']"),
    (("prefix: git", "prefix: Git.x"), "should match pattern"),
    (("    command: [mcp-server-git]", "    command: [mcp-server-git]\n    network: [https://github.com]"),
     "is not host, host:port or [IPv6]:port"),
    (("    command: [mcp-server-git]", "    command: [mcp-server-git]\n    env_from: {TOKEN: WARDEN_TEST_UNSET_VAR}"),
     "WARDEN_TEST_UNSET_VAR"),
    (("command: [mcp-server-git]", "command: [no-such-mcp-server]"), "cannot list its tools"),
])
def test_bad_server_entries_are_refused_with_the_reason(tmp_path, change, message):
    with pytest.raises(ConfigError) as err:
        load_job(write(tmp_path, JOB.replace(*change)))
    assert err.value.code == ErrorCode.JOB_INVALID and message in err.value.reason


def test_credentials_come_from_the_driver_env_and_show_nowhere(tmp_path):
    spec = McpServerSpec(name="git", prefix="git", command=["mcp-server-git"], env_from={"GIT_TOKEN": "MY_TOKEN"})
    server = server_of(spec, {"MY_TOKEN": "s3cret-value"})
    assert dict(server.env) == {"GIT_TOKEN": "s3cret-value"}
    assert "s3cret" not in repr(server)
    with pytest.raises(ConfigError) as err:
        server_of(spec, {})
    assert "MY_TOKEN" in err.value.reason and "s3cret" not in err.value.reason


def test_the_mcp_demo_job_loads_and_checks():
    job = load_job(ROOT / "jobs" / "mcp.yaml")
    assert {"git.git_status", "git.git_commit", "files.read_text_file"} <= set(job.tools)
    assert check_job(ROOT / "jobs" / "mcp.yaml") == []


def test_a_gvisor_server_s_tools_run_in_the_agent_s_gvisor_sandbox(tmp_path):
    """Also with a network allow-list: discovery starts the server in gVisor behind its egress proxy."""
    job = JOB.replace("backend: bwrap, limits: {cpu_s: 30}}", "backend: gvisor, limits: {cpu_s: 30}}\n    network: [api.github.com]")
    policy = (POLICY.replace("git.git_status: {effect: read}", "git.git_status: {effect: read, sandbox: {backend: gvisor}}")
              .replace("git.git_log: {effect: read}", "git.git_log: {effect: read, sandbox: {backend: gvisor}}"))
    loaded = load_job(write(tmp_path, job, policy))  # listed by the server started under gVisor
    assert loaded.tools["git.git_log"].spec.effect == "read"
    assert [e["server"]["backend"] for e in loaded.mcp] == ["gvisor", "bwrap"]
    assert loaded.mcp[0]["server"]["network"] == ["api.github.com"]


REMOTE_JOB = """name: j
task: t
entry: [a]
tools: [agents.chat]
mcp_servers:
  - name: notes
    prefix: notes
    url: {url}
    headers_from: {{Authorization: "Bearer ${{WARDEN_TEST_NOTES_TOKEN}}"}}
    allow_private_networks: true
agents:
  - {{name: a, class: "agents.demo:LeadAgent", policy: p.yaml}}
"""


def test_a_url_server_loads_with_its_credential_for_the_workers_only(tmp_path, monkeypatch):
    from tests.unit.mcp_remote import mcp_http_server

    monkeypatch.setenv("WARDEN_TEST_NOTES_TOKEN", "notes-s3cret")
    with mcp_http_server() as remote:
        job = load_job(write(tmp_path, REMOTE_JOB.format(url=remote.url), "agent: a\ntools:\n  notes.lookup: {effect: read}\n"))
        assert job.tools["notes.lookup"].spec.effect == "read" and job.tools["notes.lookup"].spec.output.integrity == "untrusted"
        [entry] = job.mcp
        assert entry["server"]["headers"] == {"Authorization": "Bearer notes-s3cret"}  # for the tool workers
        assert "notes-s3cret" not in str(job.tools) and "notes-s3cret" not in str(job.spec) and "notes-s3cret" not in repr(job)
        # the same server by a name that resolves to loopback, without the opt-in: refused at load
        private = REMOTE_JOB.format(url=remote.url.replace("127.0.0.1", "localhost")).replace(
            "allow_private_networks: true", "allow_private_networks: false")
        with pytest.raises(ConfigError) as err:
            load_job(write(tmp_path, private, "agent: a\ntools:\n  notes.lookup: {effect: read}\n"))
    assert err.value.code == ErrorCode.JOB_INVALID
    assert "EGRESS_REFUSED: 'localhost' resolves to" in err.value.reason
    assert "set allow_private_networks: true on this mcp_servers entry" in err.value.reason


def test_the_readme_shows_the_shipped_mcp_job_and_policy_in_full():
    """No copy drift: the README's blocks are the files the demo and the cluster tests load."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("jobs/mcp.yaml", "jobs/mcp-dev-policy.yaml"):
        shipped = (ROOT / name).read_text(encoding="utf-8")
        assert f"```yaml\n{shipped}```" in readme, f"README's copy of {name} differs from the file"
