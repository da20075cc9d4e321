"""Anomaly signals computed by the supervisor, and the quarantine decision.

Per agent and tool the detector keeps a call-rate baseline (an exponentially weighted mean
of calls per window) and flags a window whose count exceeds ``rate_factor`` times the
baseline (after ``warmup_windows`` windows, and only above ``min_calls``). A burst of
``denial_burst`` denials inside one window is flagged too. Denials (except plain quota
back-pressure) and flags are violations; ``quarantine_after`` violations inside one window
quarantine the agent, when the policy asks for it.

Invariant: the signals come from the orchestrator's own observations, so an agent cannot
suppress them. State is per agent (so it shards with the agent) and per tool the supervisor
registered (it names every other one ``OTHER_TOOL``), so invented names cannot grow it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Back-pressure, not misbehaviour: a well-behaved agent can hit these.
NOT_VIOLATIONS = frozenset({"RATE_LIMITED", "CONCURRENCY_LIMIT", "APPROVAL_TIMEOUT", "APPROVAL_QUEUE_FULL"})


@dataclass(frozen=True)
class AnomalyConfig:
    window_s: float = 60.0
    rate_factor: float = 5.0
    min_calls: int = 10
    warmup_windows: int = 2
    denial_burst: int = 5
    quarantine_after: int | None = None  # None: flag only, never quarantine


@dataclass
class _Rate:
    window_start: float
    count: int = 0
    baseline: float | None = None
    windows: int = 0
    flagged: bool = False


@dataclass
class _AgentState:
    rates: dict[str, _Rate] = field(default_factory=dict)
    denials: deque[float] = field(default_factory=deque)
    violations: deque[float] = field(default_factory=deque)
    burst_flagged_at: float = float("-inf")
    quarantined: bool = False


class AnomalyDetector:
    ALPHA = 0.3  # weight of the newest window in the baseline

    def __init__(self) -> None:
        self._config: dict[str, AnomalyConfig] = {}
        self._state: dict[str, _AgentState] = {}

    def configure(self, agent: str, config: AnomalyConfig) -> None:
        self._config[agent] = config
        self._state.setdefault(agent, _AgentState())

    def call(self, agent: str, tool: str, now: float) -> list[str]:
        """Count a call (allowed or not). Returns the flags it raised: [] or ["rate"]."""
        cfg, st = self._config.get(agent), self._state.get(agent)
        if cfg is None or st is None:
            return []
        r = st.rates.get(tool)
        if r is None:
            r = st.rates[tool] = _Rate(window_start=now)
        while now >= r.window_start + cfg.window_s:  # close finished windows into the baseline
            r.baseline = r.count if r.baseline is None else (1 - self.ALPHA) * r.baseline + self.ALPHA * r.count
            r.windows, r.count, r.flagged = r.windows + 1, 0, False
            r.window_start += cfg.window_s
            if r.count == 0 and now >= r.window_start + 10 * cfg.window_s:
                r.window_start = now  # long idle: skip ahead instead of looping window by window
        r.count += 1
        if (not r.flagged and r.baseline is not None and r.windows >= cfg.warmup_windows
                and r.count > max(cfg.min_calls, cfg.rate_factor * r.baseline)):
            r.flagged = True
            self._violation(st, cfg, now)
            return ["rate"]
        return []

    def denial(self, agent: str, code: str, now: float) -> list[str]:
        """Count a denial. Returns the flags it raised: [] or ["denial_burst"]."""
        cfg, st = self._config.get(agent), self._state.get(agent)
        if cfg is None or st is None or code in NOT_VIOLATIONS:
            return []
        self._violation(st, cfg, now)
        st.denials.append(now)
        while st.denials and st.denials[0] <= now - cfg.window_s:
            st.denials.popleft()
        if len(st.denials) >= cfg.denial_burst and now - st.burst_flagged_at >= cfg.window_s:
            st.burst_flagged_at = now
            self._violation(st, cfg, now)
            return ["denial_burst"]
        return []

    def _violation(self, st: _AgentState, cfg: AnomalyConfig, now: float) -> None:
        st.violations.append(now)
        while st.violations and st.violations[0] <= now - cfg.window_s:
            st.violations.popleft()

    def should_quarantine(self, agent: str) -> bool:
        """True once, the first time the agent's violations in a window reach its limit."""
        cfg, st = self._config.get(agent), self._state.get(agent)
        if cfg is None or st is None or st.quarantined or cfg.quarantine_after is None:
            return False
        if len(st.violations) >= cfg.quarantine_after:
            st.quarantined = True
            return True
        return False

    def violations(self, agent: str) -> int:
        st = self._state.get(agent)
        return len(st.violations) if st else 0

    def report(self, agent: str, tool: str, flags: list[str], audit: Any, observer: Any) -> str | None:
        """Record each flag (audit log, metrics); the reason to quarantine the agent, if that is due now."""
        for kind in flags:
            audit.record("anomaly", agent=agent, tool=tool, flag=kind, violations=self.violations(agent))
            observer.anomaly(agent, tool, kind)
        if self.should_quarantine(agent):
            return f"{self.violations(agent)} violations within {self._config[agent].window_s:g}s"
        return None


class AnomalySpec(BaseModel):
    """A policy's ``anomaly:`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_s: float = Field(default=60.0, gt=0)
    rate_factor: float = Field(default=5.0, gt=1)
    min_calls: int = Field(default=10, ge=1)
    denial_burst: int = Field(default=5, ge=1)
    quarantine_after: int | None = Field(default=None, ge=1, description="violations within window_s; null: never")

    def config(self) -> AnomalyConfig:
        return AnomalyConfig(**self.model_dump())
