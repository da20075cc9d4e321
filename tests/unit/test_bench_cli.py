"""`warden bench` works end to end (no timing is asserted: figures are for people, not tests)."""

from __future__ import annotations

import json

from runtime.cli import main


def test_bench_cost_quick_writes_json_and_a_plot(tmp_path, capsys):
    assert main(["bench", "cost", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "supervisor memory per active agent" in out and "machine:" in out
    latest = json.loads((tmp_path / "latest.json").read_text())
    figures = latest["suites"]["cost"]["figures"]
    assert {f["unit"] for f in figures} >= {"us", "ratio", "bytes", "KiB"}
    for f in figures:
        assert f["suite"] == "cost" and f["p50"] >= 0
    assert (tmp_path / "bench-cost.json").exists()
    assert (tmp_path / "cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert latest["machine"]["cpus"] >= 1 and latest["command"] == "warden bench cost --quick"


def test_bench_json_output(tmp_path, capsys):
    assert main(["bench", "cost", "--quick", "--json", "--out", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed["suites"]) == ["cost"]
