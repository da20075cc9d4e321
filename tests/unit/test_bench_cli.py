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


def test_bench_shards_flag_is_checked_before_anything_runs(tmp_path, capsys):
    import pytest

    for bad in ("0", "1,x", "", "65"):
        with pytest.raises(SystemExit) as info:
            main(["bench", "e2e", "--shards", bad, "--out", str(tmp_path)])
        assert info.value.code == 2
        assert "shard counts" in capsys.readouterr().err
    assert main(["bench", "cost", "--shards", "1,2", "--out", str(tmp_path)]) == 2
    assert "--shards applies to the e2e suite only" in capsys.readouterr().err
    assert not (tmp_path / "latest.json").exists()


def test_shard_routing_cost_is_measured_without_ray():
    from runtime.bench.e2e import routing_cost_us

    assert routing_cost_us(1, 200) > 0 and routing_cost_us(4, 200) > 0


def test_keys_retire_needs_a_key_id(capsys):
    assert main(["keys", "retire", "--run", "nowhere"]) == 2
    assert "give the key id" in capsys.readouterr().err
