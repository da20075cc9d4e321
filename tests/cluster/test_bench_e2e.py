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
        assert f"supervised/plain relay p50 (Warden's own cost), {c} agent(s)" in names
        assert f"plain relay/supervised throughput (Warden's own cost), {c} agent(s)" in names
        assert f"decision in the supervisor actor, {c} agent(s)" in names
    assert "decision in the actor / in a quiet process, 1 agent" in names
    for f in result["figures"]:
        assert f["p50"] > 0 or f["extra"].get("added_per_call")  # a difference of two noisy medians


def test_e2e_shards_quick_reports_throughput_per_shard_count(ray_instance):
    result = e2e.run(quick=True, progress=lambda _m: None, shards=[1, 2], pin=True)
    names = {f["name"] for f in result["figures"]}
    assert "scaling efficiency, 2 shard(s)" in names
    assert sum(n.startswith("pinned, ") for n in result["notes"]) == 2  # what was pinned where, per shard count
    for s in (1, 2):
        assert f"supervised throughput per shard, 16 agents, {s} shard(s)" in names
        assert f"supervised throughput, 16 agents, {s} shard(s)" in names
        assert f"supervised/direct throughput, 16 agents, {s} shard(s)" in names
        assert f"shard routing on the agent side, {s} shard(s)" in names
    assert all(f["p50"] > 0 for f in result["figures"])


def test_e2e_profile_samples_the_supervisor_actor(ray_instance):
    import asyncio

    async def profiled() -> tuple[str, dict[str, str]]:
        env = await e2e._setup(1)
        try:
            return await e2e._profile(env, 1, 30)
        finally:
            await e2e._teardown(env)

    text, raw = asyncio.run(profiled())
    assert "CPU per call" in text and "supervisor" in text
    if e2e.shutil.which("py-spy") or (e2e.Path(e2e.sys.executable).with_name("py-spy")).exists():
        assert "-- supervisor, supervised run" in text
        assert set(raw) == {f"e2e-profile-1-{n}.txt" for n in ("supervisor", "tool-worker", "plain-relay",
                                                                 "plain-worker")}
