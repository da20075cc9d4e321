"""`warden bench` works end to end (no timing is asserted: figures are for people, not tests)."""

from __future__ import annotations

import json
import re

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
    captured = capsys.readouterr()
    printed = json.loads(captured.out)  # stdout is the JSON alone
    assert list(printed["suites"]) == ["cost"]
    assert f"saved {tmp_path / 'latest.json'}" in captured.err


def test_bench_without_out_writes_under_runs_never_into_the_repository(tmp_path, monkeypatch, capsys):
    """A smoke run must not overwrite the committed figures in benchmarks/results/."""
    committed = tmp_path / "benchmarks" / "results"
    committed.mkdir(parents=True)
    (committed / "latest.json").write_text('{"committed": true}')
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["bench", "cost", "--quick"]) == 0
    out = capsys.readouterr()
    runs = sorted((tmp_path / "runs").glob("bench-*"))
    assert len(runs) == 2  # one new directory per run: a second run does not overwrite the first
    for run in runs:
        assert json.loads((run / "latest.json").read_text())["suites"]["cost"]["figures"]
        assert (run / "cost.png").exists()
        assert f"results go to {run.relative_to(tmp_path)}/" in out.err
        assert f"saved {run.relative_to(tmp_path) / 'latest.json'}" in out.out
    assert sorted(p.name for p in committed.iterdir()) == ["latest.json"]
    assert json.loads((committed / "latest.json").read_text()) == {"committed": True}


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


def _fig(name, unit, p50, runs, spread, **extra):
    return {"suite": "e2e", "name": name, "unit": unit, "p50": p50, "p99": None, "spread": spread,
            "runs": runs, "target": None, "met": None, "extra": extra}


def test_bench_says_how_many_ms_warden_adds_and_when_a_quick_figure_is_noise():
    from runtime.bench import headline, is_noise, table

    added = _fig("added per call by Warden (supervised - direct p50), 1 agent(s)", "ms", 0.412, 1, None,
                 concurrency=1, added_per_call=True)
    steady = _fig("supervised, 1 agent(s)", "us", 500.0, 5, (490.0, 520.0))
    wobbly = _fig("supervised, 4 agent(s)", "us", 500.0, 5, (300.0, 700.0))
    memory = _fig("memory per agent", "KiB", 12.0, 1, None)
    results = {"quick": True, "suites": {"e2e": {"figures": [added, steady, wobbly, memory]}}}
    assert [is_noise(f, True) for f in (added, steady, wobbly, memory)] == [True, False, True, False]
    assert not is_noise(added, False)  # a full run is judged by its targets, not flagged
    assert headline(results) == ["Warden adds 0.412 ms per call with 1 agent(s) (supervised vs direct Ray call, "
                                 "p50) (--quick: noise, do not quote; run without --quick)"]
    rows = {re.split(r"\s{2,}", line)[1]: line for line in table(results).splitlines()[2:]}
    assert rows["supervised, 4 agent(s)"].endswith("(noise)")
    assert not rows["supervised, 1 agent(s)"].endswith("(noise)")
    results["quick"] = False
    assert headline(results)[0].endswith("(supervised vs direct Ray call, p50)")


def test_quick_noise_is_summed_up_per_suite():
    from runtime.bench import noise_notes

    steady = _fig("steady", "us", 500.0, 5, (490.0, 520.0))
    wobbly = _fig("wobbly", "us", 500.0, 5, (300.0, 700.0))
    one_run = _fig("one run", "ratio", 2.0, 1, None)
    results = {"quick": True, "suites": {"authz": {"figures": [steady, wobbly]}, "e2e": {"figures": [one_run]}}}
    assert noise_notes(results) == [
        "--quick: 1 of 2 (wobbly) timed figures of authz are noise (fewer than 3 runs, or run medians more than "
        "20% apart), targets included; run without --quick to quote them",
        "--quick: all 1 timed figures of e2e are noise (fewer than 3 runs, or run medians more than 20% apart), "
        "targets included; run without --quick to quote them"]
    results["quick"] = False
    assert noise_notes(results) == []


def test_bench_pin_and_profile_flags_are_checked_before_anything_runs(tmp_path, capsys):
    assert main(["bench", "e2e", "--pin", "--out", str(tmp_path)]) == 2
    assert "--pin goes with --shards" in capsys.readouterr().err
    for wrong in (["bench", "cost", "--profile"], ["bench", "e2e", "--shards", "1,2", "--profile"]):
        assert main([*wrong, "--out", str(tmp_path)]) == 2
        assert "--profile applies to the e2e concurrency sweep" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_e2e_profile_counts_busy_time_per_call_and_leaves_the_idle_wait_out():
    from runtime.bench import e2e

    raw = "\n".join([
        "run (t.py:1);handle (a.py:5);record (audit.py:9) 30",
        "run (t.py:1);handle (a.py:6);dispatch (a.py:7) 10",
        "run (t.py:1);EpollSelector.select (selectors.py:468) 500",  # the event loop waiting: not work
        "garbled line",
    ])
    busy, hot = e2e._hot(raw, calls=40)
    per_sample_us = 1e6 / e2e.SPY_RATE / 40
    assert busy == 40 * per_sample_us
    assert hot[0].split()[1:] == ["run", "(t.py)"] and float(hot[0].split()[0]) == busy
    assert [h.split()[1] for h in hot] == ["run", "handle", "record", "dispatch"]  # line numbers merged
