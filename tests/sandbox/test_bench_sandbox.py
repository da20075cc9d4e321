"""``warden bench sandbox`` returns every figure, for both backends, with its target and profile.

It drives the real backends (as ``tests/sandbox`` does): a backend that cannot run here is an
error, never a skipped figure. No timing is asserted: figures are for people, not tests.
"""

from __future__ import annotations

import pytest

from runtime.bench import sandbox
from runtime.errors import ErrorCode, SandboxUnavailable

NAMES = {f"{backend}.{kind}" for backend in ("bwrap", "gvisor")
         for kind in ("cold_start.trivial", "cold_start.python_exec", "session_start.trivial",
                      "session_start.python_exec", "warm.python_exec", "warm.trivial")}
TARGETS = {"bwrap.cold_start.trivial": 20, "bwrap.cold_start.python_exec": 20, "gvisor.cold_start.trivial": 250,
           "gvisor.cold_start.python_exec": 250, "bwrap.warm.python_exec": 20, "gvisor.warm.python_exec": 20}
FIELDS = {"suite", "name", "unit", "p50", "p99", "spread", "runs", "n", "target", "met", "extra"}


@pytest.fixture(scope="module")
def result() -> dict:
    lines: list[str] = []
    out = sandbox.run(quick=True, progress=lines.append)
    out["progress"] = lines
    return out


def test_every_figure_for_both_backends(result):
    assert result["suite"] == "sandbox"
    figures = {f["name"]: f for f in result["figures"]}
    assert set(figures) == NAMES and len(result["figures"]) == len(NAMES)
    for name, f in figures.items():
        assert set(f) == FIELDS, name
        assert f["suite"] == "sandbox" and f["unit"] == "ms" and f["p50"] > 0 and f["p99"] >= f["p50"]
        assert f["runs"] >= 1 and f["n"] >= f["runs"] and f["spread"][0] <= f["p50"] <= f["spread"][1]
        assert f["extra"]["backend"] == name.split(".")[0]


def test_targets_are_attached_as_the_issue_names_them(result):
    figures = {f["name"]: f for f in result["figures"]}
    for name, f in figures.items():
        if name in TARGETS:
            assert f["target"] == f"p50 <= {TARGETS[name]} ms" and f["met"] is (f["p50"] <= TARGETS[name]), name
        else:
            assert f["target"] is None and f["met"] is None, name
    for backend in ("bwrap", "gvisor"):
        for kind in ("trivial", "python_exec"):
            cold, pooled = figures[f"{backend}.cold_start.{kind}"], figures[f"{backend}.session_start.{kind}"]
            assert cold["extra"]["warm_pool"] is False and pooled["extra"]["warm_pool"] is True
            assert isinstance(pooled["extra"]["within_cold_start_target"], bool)


def test_profile_and_notes_say_where_the_time_goes(result):
    profile = result["profile"]
    for piece in ("== bwrap ==", "== gvisor ==", "workspace (", "session open", "first python3 -I",
                  "sandbox start, runsc run", "bwrap setup"):
        assert piece in profile, piece
    notes = " ".join(result["notes"])
    assert "cold_start" in notes and "session_start" in notes and "apply to these figures" in notes
    missed = [f["name"] for f in result["figures"] if f["met"] is False]
    for name in missed:
        assert f"MISSED: {name}" in notes
    assert any("gvisor" in line for line in result["progress"])


def test_an_unavailable_backend_is_an_error_not_a_skip(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap, runsc or prlimit
    with pytest.raises(SandboxUnavailable) as info:
        sandbox.run(quick=True, progress=lambda _: None)
    assert info.value.code is ErrorCode.SANDBOX_UNAVAILABLE
