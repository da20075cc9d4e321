"""What the supervisor reports as it decides: the seam between the trusted core and metrics.

The supervisor calls an ``Observer`` at each step; ``runtime.metrics`` implements it with
Prometheus counters and histograms. The signals come from the orchestrator, never from an
agent, so an agent cannot suppress or forge them. Observers must be cheap and must not
raise (they sit on the hot path); ``NullObserver`` is the default.
"""

from __future__ import annotations

from typing import Any, Protocol


class Observer(Protocol):
    def decision(self, agent: str, tool: str, decision: str, code: str | None, authz_s: float) -> None:
        """decision is "allow" or "deny"; code is the denial's ErrorCode value."""

    def outcome(self, agent: str, tool: str, ok: bool, code: str | None, dispatch_s: float) -> None:
        """After a dispatched call; code is the failure's ErrorCode value (SANDBOX_* for kills)."""

    def budget(self, agent: str, kind: str, used: float, limit: float) -> None:
        """Use of one budget ("calls" or "cost") of the agent's token chain after a reservation."""

    def approvals_pending(self, count: int) -> None: ...

    def anomaly(self, agent: str, tool: str, kind: str) -> None:
        """kind: "rate" (above the agent/tool baseline) or "denial_burst"."""

    def quarantine(self, agent: str) -> None: ...

    def flow(self, agent: str, tool: str, result: str) -> None:
        """A call the flow rules judged (or that used handles): "allow", "deny" or "approve" (parked)."""

    def context(self, agent: str, integrity: int) -> None:
        """A run of the agent has a lower context label: its integrity now (0 untrusted .. 2 trusted)."""

    def handles(self, agent: str, count: int, nbytes: int) -> None:
        """The handles the agent holds after one was issued."""

    def answer(self, agent: str, result: str) -> None:
        """A reader's answer to the agent: "endorsed" (validated), "untrusted" (validated, of a pattern the agent
        wrote), "free" (free text, a handle) or "invalid" (READER_INVALID)."""


class NullObserver(Observer):
    """Reports nothing: every method is the protocol's own, which does nothing (and returns None)."""


def status_of(sup: Any) -> dict[str, Any]:
    """What an operator sees of a supervisor shard (``warden status``): agents, quarantines, revocations,
    parked approvals, counts, keys, and the context label of each agent run."""
    return {"job": sup.job_id, "agents": sorted(sup.agents), "quarantined": sorted(sup.quarantined),
            "revoked_agents": sorted(sup.revocations.snapshot()["agents"]),
            "approvals_pending": sup.approvals.list(), "stats": stats_of(sup),
            "keys": sup.keyring.kids, "current_key": sup.keyring.current_kid, "shard": sup.shard,
            "contexts": [{"agent": r.agent, "run": rid.hex()[:8], "depth": r.depth, "label": r.label.public(),
                          "origin": r.origin, "handles": sup.handles.usage(r.agent)[0]} for rid, r in sup.runs.items()]}


def stats_of(sup: Any) -> list[dict[str, Any]]:
    """The supervisor's decision counts, one row per (agent, tool, result)."""
    return [{"agent": a, "tool": t, "result": r, "count": n} for (a, t, r), n in sorted(sup.counts.items())]
