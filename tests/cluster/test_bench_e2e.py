"""The e2e benchmark runs on the shared Ray instance (its figures are not asserted)."""

from __future__ import annotations

import pytest

from runtime.bench import e2e

pytestmark = pytest.mark.cluster


def test_e2e_quick_measures_every_path_side_by_side(ray_instance):
    result = e2e.run(quick=True, progress=lambda _m: None)
    names = {f["name"] for f in result["figures"]}
    for c in e2e.CONCURRENCY:
        for what in ("direct", "supervised", f"batched x{e2e.BATCH}"):
            assert f"{what}, {c} agent(s)" in names
        assert f"supervised/direct p50, {c} agent(s)" in names
        assert f"authorization share of supervised p50, {c} agent(s)" in names
        assert f"batched/direct throughput, {c} agent(s)" in names
        assert f"added per call by Warden (supervised - direct p50), {c} agent(s)" in names
    for f in result["figures"]:
        assert f["p50"] > 0 or f["extra"].get("added_per_call")  # a difference of two noisy medians


def test_e2e_shards_quick_reports_throughput_per_shard_count(ray_instance):
    result = e2e.run(quick=True, progress=lambda _m: None, shards=[1, 2])
    names = {f["name"] for f in result["figures"]}
    for s in (1, 2):
        assert f"supervised throughput, 16 agents, {s} shard(s)" in names
        assert f"supervised/direct throughput, 16 agents, {s} shard(s)" in names
        assert f"shard routing on the agent side, {s} shard(s)" in names
    assert all(f["p50"] > 0 for f in result["figures"])
