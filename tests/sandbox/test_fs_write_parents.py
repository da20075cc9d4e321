"""fs.write makes missing parent directories, through the whole path (agent request ->
supervisor -> signed dispatch -> worker -> the agent's real sandbox), and never through a link
that sandboxed code planted where a directory should be."""

from __future__ import annotations

import os

import pytest

from runtime.errors import ErrorCode, WardenError
from tests.sandbox.test_file_tools import BYSTANDER, env  # noqa: F401  (the fixture)


def test_fs_write_makes_parent_directories_the_sandbox_then_sees(env):  # noqa: F811
    wrote = env.call(BYSTANDER, "fs.write", path="/workspace/out/2026/report.md", content="# report")
    assert wrote == {"path": "/workspace/out/2026/report.md", "bytes": 8}
    seen = env.call(BYSTANDER, "python.exec", code="print(open('/workspace/out/2026/report.md').read())")
    assert seen["stdout"] == "# report\n"


def test_fs_write_refuses_a_planted_link_in_place_of_a_parent_directory(env, tmp_path):  # noqa: F811
    env.call(BYSTANDER, "python.exec", code="import os; os.symlink('/tmp', '/workspace/out'); "
                                            "os.symlink('/etc', '/workspace/etcdir')")
    for path in ("/workspace/out/new/file.txt", "/workspace/etcdir/cron.d/evil"):
        with pytest.raises(WardenError) as info:
            env.call(BYSTANDER, "fs.write", path=path, content="escape")
        assert info.value.code is ErrorCode.TOOL_FAILED, path
    assert not os.path.exists("/etc/cron.d/evil")
    refused = [r for r in env.outcomes(BYSTANDER) if r["kind"] == "outcome" and not r["ok"]]
    assert len(refused) == 2 and all("symlink" in r["reason"] for r in refused)
    assert os.path.islink(env.workspace(BYSTANDER) / "out")  # left as it was
