"""Job files are validated completely before anything starts (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.errors import ConfigError, ErrorCode
from runtime.job import load_job

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def project_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))


def write_job(tmp_path: Path, body: str) -> Path:
    (tmp_path / "p.yaml").write_text("agent: a\ntools:\n  chat.read: {effect: read}\n")
    path = tmp_path / "job.yaml"
    path.write_text(body)
    return path


GOOD = """name: j
task: t
entry: [a]
tools: [agents.chat]
agents:
  - {name: a, class: "agents.demo:LeadAgent", policy: p.yaml}
"""


def test_demo_job_loads():
    job = load_job(ROOT / "jobs" / "demo.yaml")
    assert [a.name for a in job.spec.agents] == ["lead", "summarizer", "moderator", "analyst", "digest", "helpdesk"]
    assert "chat.read" in job.tools and "chat.dm" in job.tools
    assert job.spec.reader is not None and job.spec.reader.model["kind"] == "scripted"  # the helpdesk asks it


def test_minimal_job_loads(tmp_path):
    assert load_job(write_job(tmp_path, GOOD)).spec.entry == ["a"]


@pytest.mark.parametrize("change, message", [
    (("entry: [a]", "entry: [b]"), "entry names unknown agents ['b']"),
    (("task: t\n", ""), "has no task"),
    (("name: j", "name: j\ncolour: red"), "colour"),
    (("agents.demo:LeadAgent", "agents.demo:NoSuchAgent"), "cannot import agents.demo:NoSuchAgent"),
    (("agents.demo:LeadAgent", "agents.demo:summarise"), "is not a subclass of runtime.Agent"),
    (("policy: p.yaml", "policy: missing.yaml"), "cannot read policy"),
    (("tools: [agents.chat]", "tools: [agents.nope]"), "cannot load tools"),
    (("tools: [agents.chat]", "tools: [tests.cluster.agents_under_test]"), "names tool 'chat.read', which no module"),
    (("task: t\n", "task: t\ntool_config: {http: {allow_private_network: true}}\n"), "tool_config.http has unknown keys"),
    (("task: t\n", "task: t\ncredentials: {chat.read: {Authorization: {env: T}}}\n"), "origin"),
    (("task: t\n", "task: t\ncredentials: {chat.read: {Authorization: {env: T, origin: 'https://a.example/v1'}}}\n"),
     "without user, path or query"),
])
def test_broken_job_files_do_not_start(tmp_path, change, message):
    path = write_job(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert info.value.code in (ErrorCode.JOB_INVALID, ErrorCode.POLICY_INVALID)
    assert message in info.value.reason


def test_policy_effect_must_match_the_tool(tmp_path):
    path = write_job(tmp_path, GOOD)
    (tmp_path / "p.yaml").write_text("agent: a\ntools:\n  chat.read: {effect: write}\n")
    with pytest.raises(ConfigError, match="has effect 'read', policy says 'write'"):
        load_job(path)


def test_placement_and_shards_have_working_defaults_and_are_validated(tmp_path):
    spec = load_job(write_job(tmp_path, GOOD)).spec
    assert spec.supervisors.shards == 1 and spec.supervisors.max_restarts == 3
    assert spec.placement.local_resources() == {"warden_trusted": 1000, "warden_agent": 1000,
                                                "warden_sandbox": 1000}
    assert spec.placement.sandbox.request({"gpu_box": 1}) == {"gpu_box": 1, "warden_sandbox": 1.0}
    custom = GOOD + "supervisors: {shards: 4}\nplacement: {sandbox: {resource: gvisor_nodes, amount: 0.5}, " \
                    "agent: {resource: null}}\n"
    spec = load_job(write_job(tmp_path, custom)).spec
    assert spec.supervisors.shards == 4
    assert spec.placement.sandbox.request() == {"gvisor_nodes": 0.5} and spec.placement.agent.request() == {}
    for bad, message in (("supervisors: {shards: 0}", "supervisors.shards"),
                         ("supervisors: {shards: 65}", "supervisors.shards"),
                         ("placement: {sandbox: {resource: 'bad name!'}}", "placement.sandbox.resource"),
                         ("placement: {trusted: {resource: x, amount: 0}}", "placement.trusted.amount"),
                         ("placement: {edge: {resource: x}}", "placement.edge"),
                         ("workers: {sandbox_resource: x}", "workers.sandbox_resource")):
        with pytest.raises(ConfigError) as info:
            load_job(write_job(tmp_path, GOOD + bad + "\n"))
        assert message in info.value.reason, info.value.reason
