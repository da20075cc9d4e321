"""`warden bench peers`: every adapter decides the same request right, the probes find what each
decision covers, and the CLI path runs (no timing is asserted)."""

from __future__ import annotations

import json

import pytest

from runtime.bench import SUITES, peer_adapters, peers
from runtime.cli import main

PEER_LIBRARIES = {"tenuo": "tenuo_core", "biscuit": "biscuit_auth", "macaroons": "pymacaroons", "agt": "agent_os"}


def _peer(name: str) -> peer_adapters.Adapter:
    pytest.importorskip(PEER_LIBRARIES[name], reason="pip install -e '.[peers]'")
    return peer_adapters.PEERS[name][1]()


@pytest.mark.parametrize("adapter", [lambda: peer_adapters.WardenAuthorize(token_cache=True),
                                     lambda: peer_adapters.WardenAuthorize(token_cache=False),
                                     peer_adapters.WardenCheck, peer_adapters.WardenCaveats],
                         ids=["authorize", "authorize.cold", "check", "caveats"])
def test_warden_decides_the_three_cases_and_the_narrowing_holds(adapter):
    assert peers.gate(adapter()) == []


@pytest.mark.parametrize("name", sorted(PEER_LIBRARIES))
def test_each_peer_decides_the_three_cases_and_the_narrowing_holds(name):
    assert peers.gate(_peer(name)) == []


# What the README says each decision covers, found out by the probes (not declared by the adapters).
COVERS = {
    "tenuo": {"proof_of_possession": True, "replay": False, "revocation": True},
    "biscuit": {"proof_of_possession": True, "replay": False, "revocation": True},
    "macaroons": {"proof_of_possession": True, "replay": False, "revocation": True},
    "agt": {"proof_of_possession": False, "replay": False, "revocation": False},
}


@pytest.mark.parametrize("name", sorted(COVERS))
def test_probes_find_what_each_peer_covers(name):
    assert peers.probe(_peer(name)) == COVERS[name]


def test_probes_find_what_warden_covers():
    full = {"proof_of_possession": True, "replay": True, "revocation": True}
    assert peers.probe(peer_adapters.WardenAuthorize(token_cache=False)) == full
    assert peers.probe(peer_adapters.WardenCheck()) == {"proof_of_possession": False, "replay": False,
                                                        "revocation": False}


def test_a_forged_holder_proof_is_denied_by_every_peer_that_binds_one():
    for name in ("tenuo", "biscuit", "macaroons"):
        adapter = _peer(name)
        case, _, args, _ = peer_adapters.CASES[0]
        assert adapter.decide(adapter.request(case, False, args)) is True
        assert adapter.decide(adapter.forge(case, False, args)) is False, name


def test_a_wrong_decision_is_reported_and_not_timed(monkeypatch):
    class AllowsEverything(peer_adapters.AgtAdapter):
        name = "allows-everything"

        def decide(self, req):
            return True

    pytest.importorskip("agent_os", reason="pip install -e '.[peers]'")
    monkeypatch.setattr(peer_adapters, "PEERS", {"agt": ("agent-os-kernel", AllowsEverything)})
    result = peers.run(quick=True, progress=lambda _: None)
    row = next(r for r in result["deciders"] if r["name"] == "allows-everything")
    assert row["status"].startswith("wrong decision: denied: allowed, should be denied")
    assert not row["p50"] and not any(f["name"].startswith("allows-everything") for f in result["figures"])


def test_a_peer_not_installed_is_skipped_with_the_install_command(monkeypatch):
    class Missing(peer_adapters.Adapter):
        def __init__(self):
            raise ModuleNotFoundError("No module named 'nowhere'", name="nowhere")

    monkeypatch.setattr(peer_adapters, "PEERS", {"missing": ("missing-dist", Missing)})
    found, skipped = peer_adapters.peer_adapters()
    assert found == [] and skipped == {"missing": "missing-dist not installed (nowhere): pip install -e '.[peers]'"}


def test_bench_all_does_not_need_the_peers():
    assert "peers" not in SUITES


def test_bench_peers_quick_cli(tmp_path, capsys):
    pytest.importorskip("tenuo_core", reason="pip install -e '.[peers]'")
    assert main(["bench", "peers", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "peers, side by side:" in out and "what one decision covers" in out
    suite = json.loads((tmp_path / "bench-peers.json").read_text())
    names = {f["name"] for f in suite["figures"]}
    for decider in ("warden.authorize", "warden.authorize.cold", "warden.caveats", "tenuo", "biscuit", "macaroons",
                    "agt"):
        assert {f"{decider}.{case}" for case in ("allowed", "delegated", "denied")} <= names
    assert "tenuo.allowed.vs.warden.authorize.cold" in names and "agt.denied.vs.warden.caveats" in names
    assert all(r["status"] == "ok" for r in suite["deciders"])
    assert (tmp_path / "peers.png").exists() and (tmp_path / "peers-profile.txt").exists()
