"""What a new user hits first: fs.write into new directories, artifacts kept from a workspace
(worker side and driver side, both path-checked), the job file's ``artifacts:``, and ``--json``
output that is the document alone whatever else writes to standard output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runtime.artifacts import save
from runtime.errors import ErrorCode, ToolFailed
from runtime.job import ArtifactSpec, JobSpec
from runtime.sandbox.artifacts import collect
from runtime.sandbox.workspace import Workspace

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ws(tmp_path):
    w = Workspace(tmp_path / "ws", size_mb=4)
    yield w
    w.remove()


# ------------------------------------------------------------------ fs.write makes parent directories


def test_write_creates_missing_parent_directories(ws):
    assert ws.write("/workspace/out/2026/report.md", b"# report") == 8
    assert (ws.root / "out" / "2026" / "report.md").read_bytes() == b"# report"
    assert ws.read("/workspace/out/2026/report.md", 100) == b"# report"
    assert oct((ws.root / "out").stat().st_mode & 0o777) == "0o700"
    assert ws.write("/workspace/out/2026/other.md", b"x") == 1  # existing directories are reused


def test_write_never_follows_a_link_where_a_parent_directory_should_be(ws, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, ws.root / "out")  # planted by sandboxed code
    with pytest.raises(ToolFailed) as info:
        ws.write("/workspace/out/new/file.txt", b"escape")
    assert info.value.code is ErrorCode.TOOL_FAILED and "symlink" in info.value.reason
    assert list(outside.iterdir()) == []  # nothing made through the link


def test_write_refuses_a_file_in_place_of_a_parent_and_paths_outside(ws):
    ws.write("/workspace/plain", b"file")
    with pytest.raises(ToolFailed):
        ws.write("/workspace/plain/child.txt", b"x")
    with pytest.raises(ToolFailed):
        ws.write("/workspace/../etc/evil", b"x")
    assert sorted(p.name for p in ws.root.iterdir()) == ["plain"]


# ------------------------------------------------------------------ collecting artifacts (worker side)


def test_collect_takes_files_and_directories_and_skips_links_and_fifos(ws, tmp_path):
    ws.write("/workspace/report.md", b"report")
    ws.write("/workspace/out/a.txt", b"a")
    ws.write("/workspace/out/deep/b.txt", b"bb")
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    os.symlink(secret, ws.root / "out" / "link")
    os.mkfifo(ws.root / "out" / "pipe")
    got = collect(ws, ["/workspace/report.md", "/workspace/out", "/workspace/missing"],
                  max_bytes=1 << 20, max_files=100)
    assert {f["path"]: f["data"] for f in got["files"]} == {
        "/workspace/report.md": b"report", "/workspace/out/a.txt": b"a", "/workspace/out/deep/b.txt": b"bb"}
    reasons = {s["path"]: s["reason"] for s in got["skipped"]}
    assert "link" in reasons["/workspace/out/link"] and "fifo" in reasons["/workspace/out/pipe"]
    assert reasons["/workspace/missing"] == "missing"
    assert got["bytes"] == 9 and all(b"host secret" != f["data"] for f in got["files"])


def test_collect_caps_bytes_and_files_skipping_whole_files(ws):
    for i in range(5):
        ws.write(f"/workspace/f{i}", b"x" * 100)
    got = collect(ws, ["/workspace"], max_bytes=250, max_files=10)
    assert [len(f["data"]) for f in got["files"]] == [100, 100] and got["bytes"] == 200
    assert len(got["skipped"]) == 3 and all("larger than" in s["reason"] for s in got["skipped"])
    got = collect(ws, ["/workspace"], max_bytes=1 << 20, max_files=3)
    assert len(got["files"]) == 3 and [s["reason"] for s in got["skipped"]] == ["over max_files (3)"] * 2


# ------------------------------------------------------------------ saving artifacts (driver side)


def test_save_writes_under_the_agent_directory_and_refuses_what_a_worker_should_not_send(tmp_path):
    dest = tmp_path / "artifacts" / "writer"
    got = {"files": [{"path": "/workspace/out/r.md", "data": b"ok"},
                     {"path": "/workspace/../../etc/x", "data": b"no"},
                     {"path": "/etc/passwd", "data": b"no"},
                     {"path": "/workspace/a//b", "data": b"no"},
                     {"path": "/workspace/out/r.md", "data": b"again"},  # never overwrites
                     {"path": "/workspace/big", "data": b"y" * 50},
                     {"path": "/workspace/" + "d/" * 1000 + "f", "data": b"deep"},  # made in a sandbox: 2 KB, legal
                     {"path": "/workspace/" + "d/" * 40 + "f", "data": b"deep"}],
           "skipped": [{"path": "/workspace/l", "reason": "a link"}]}
    report = save(dest, got, max_bytes=20, max_files=10)
    assert (dest / "out" / "r.md").read_bytes() == b"ok"
    assert report["files"] == 1 and report["bytes"] == 2
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "artifacts/writer/out/r.md"]
    reasons = [s["reason"] for s in report["skipped"]]
    assert sum(r.startswith("not a workspace path") for r in reasons) == 5  # and no RecursionError
    assert "over the artifacts caps" in reasons and "a link" in reasons


def test_artifacts_in_a_job_file_must_be_under_the_workspace():
    base = {"name": "j", "task": "t", "entry": ["a"], "tools": ["runtime.toolbox"],
            "agents": [{"name": "a", "class": "runtime:ToolCallingAgent", "policy": "p.yaml"}]}
    spec = JobSpec.model_validate({**base, "artifacts": {"paths": ["/workspace/out/", "report.md"], "max_mb": 2}})
    assert spec.artifacts.paths == ["/workspace/out", "/workspace/report.md"]
    assert spec.artifacts.max_bytes == 2 << 20
    for bad in ("/etc/passwd", "/workspace/../etc", "/workspacex/a"):
        with pytest.raises(ValueError, match="not under /workspace"):
            ArtifactSpec(paths=[bad])
    assert JobSpec.model_validate(base).artifacts.paths == []  # nothing kept unless asked


# ------------------------------------------------------------------ --json: the document alone


def test_json_only_stdout_keeps_every_other_write_off_stdout_down_to_the_file_descriptor():
    """What Ray does to a driver: Python prints, writes to fd 1 from C code, and child processes
    that inherited fd 1, before and after the document."""
    program = textwrap.dedent("""
        import os, subprocess, sys, threading
        from runtime.cli import json_only_stdout
        with json_only_stdout(True) as doc:
            print("(raylet) A worker died or was killed")
            os.write(1, b"(pid=1) raw fd write\\n")
            subprocess.run(["echo", "(child) inherited stdout"], check=True)
            t = threading.Thread(target=print, args=("(thread) log line",)); t.start(); t.join()
            print('{"ok": true}', file=doc)
            print("(raylet) after the document")
        print("restored")
    """)
    proc = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == '{"ok": true}\nrestored\n'
    for line in ("A worker died", "raw fd write", "inherited stdout", "(thread) log line", "after the document"):
        assert line in proc.stderr


def test_cli_json_commands_print_parseable_json(tmp_path, capsys):
    from runtime.cli import main

    assert main(["bench", "cost", "--quick", "--json", "--out", str(tmp_path)]) == 0
    assert list(json.loads(capsys.readouterr().out)["suites"]) == ["cost"]


# ------------------------------------------------------------------ the README's own job example


def _readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(marker)
    return text[start:text.index("```", start)]


def test_the_readme_job_example_validates_and_its_script_plays():
    import asyncio

    import yaml

    from runtime.agent import ToolCallingAgent, load_agent_class
    from runtime.llm import ScriptedModel, model_from_config, run_tool_loop

    spec = JobSpec.model_validate(yaml.safe_load(_readme_block("# jobs/my-job.yaml")))
    (agent,) = spec.agents
    assert load_agent_class(agent.cls) is ToolCallingAgent
    assert spec.artifacts.paths == ["/workspace/report.md"]
    model = model_from_config(agent.config["model"])
    assert isinstance(model, ScriptedModel)
    seen: list[tuple[str, dict]] = []

    async def call_tool(name: str, args: dict) -> str:
        seen.append((name, args))
        return f"<{name}>"

    result = asyncio.run(run_tool_loop(model, task=spec.task, tools=[], call_tool=call_tool,
                                       system=agent.config["system"], max_turns=agent.config["max_turns"]))
    assert [n for n, _ in seen] == ["fs.write", "fs.read", "fs.list"]
    assert result.answer == "Done. Read back: <fs.read>\n<fs.list>"


def test_every_command_with_json_writes_its_document_to_the_json_stream():
    """While a --json command runs, sys.stdout is stderr (see json_only_stdout): a command that
    printed its document with a plain print() would put it on stderr. Each must use args.json_out."""
    import argparse
    import inspect

    from runtime.cli import build_parser

    def parsers(p: argparse.ArgumentParser):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    with_json = [p for p in parsers(build_parser()) if any("--json" in a.option_strings for a in p._actions)]
    assert len(with_json) >= 5
    for p in with_json:
        fn = p._defaults["fn"]
        assert "json_out" in inspect.getsource(fn), f"{p.prog}: write the JSON to args.json_out"


def test_a_failing_command_with_json_still_prints_a_json_document(tmp_path, capsys):
    from runtime.cli import main

    assert main(["run", str(tmp_path / "missing.yaml"), "--json"]) == 1
    out = capsys.readouterr()
    doc = json.loads(out.out)  # the document alone, even for a failure
    assert doc["ok"] is False and doc["error"]["code"] == "JOB_INVALID" and "missing.yaml" in doc["error"]["reason"]
    assert "JOB_INVALID" in out.err
