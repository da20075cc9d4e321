"""Supervisor state that must outlive one call: quotas, nonces, revocations.

Invariants:

* ``QuotaLedger.reserve`` checks every limit first and commits only if all pass, so a
  denied call charges nothing. Budgets are keyed by the tag that follows the budget caveat
  in a token's chain; a delegated token shares its parent's prefix, so a delegate's call is
  charged to every budget up its chain without any extra bookkeeping.
* ``NonceWindow`` accepts each (agent, nonce) once, and only with a finite timestamp inside
  the window, so a captured request cannot be replayed later.
* ``RevocationList`` holds token ids and chain tags; a token is revoked when any id on its
  chain is, which revokes every descendant of a revoked parent.

Every class here snapshots to and restores from plain msgpack-able data, so the state can
be persisted and later sharded by agent id. Threat: an agent that exhausts shared capacity,
replays a request, or keeps using a token after an operator revoked it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..errors import ErrorCode, QuotaExceeded, TokenRejected

Clock = Callable[[], float]


@dataclass(frozen=True)
class AgentQuota:
    rate_per_s: float | None = None  # token-bucket refill rate; None = unlimited
    burst: int = 1
    max_concurrent: int | None = None


@dataclass
class _Bucket:
    tokens: float
    last: float


@dataclass
class Reservation:
    agent: str
    charges: tuple[tuple[bytes, float], ...]  # (budget key, amount)
    projected_cost: float
    cost_keys: tuple[bytes, ...] = field(default=())
    open: bool = True


class QuotaLedger:
    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._quota: dict[str, AgentQuota] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._inflight: dict[str, int] = {}
        self._used: dict[bytes, float] = {}

    def configure(self, agent: str, quota: AgentQuota) -> None:
        self._quota[agent] = quota
        self._buckets.setdefault(agent, _Bucket(float(quota.burst), self._clock()))
        self._inflight.setdefault(agent, 0)

    def used(self, key: bytes) -> float:
        return self._used.get(key, 0.0)

    def inflight(self, agent: str) -> int:
        return self._inflight.get(agent, 0)

    def check_rate(self, agent: str, tool: str | None = None, now: float | None = None) -> float:
        """The agent's rate tokens now, or RATE_LIMITED if it has none (nothing is taken: ``reserve`` takes)."""
        quota, bucket, now = self._quota.get(agent), self._buckets.get(agent), self._clock() if now is None else now
        if quota is None or bucket is None or quota.rate_per_s is None:
            return 0.0
        tokens = min(float(quota.burst), bucket.tokens + (now - bucket.last) * quota.rate_per_s)
        if tokens < 1.0:
            raise QuotaExceeded(f"rate {quota.rate_per_s}/s burst {quota.burst} exceeded", code=ErrorCode.RATE_LIMITED,
                                tool=tool, retry_after_s=round((1.0 - tokens) / quota.rate_per_s, 4))
        return tokens

    def reserve(self, agent: str, budgets: Iterable[tuple[bytes, str, float]], cost: float,
                tool: str | None = None) -> Reservation:
        quota = self._quota.get(agent)
        if quota is None:
            raise QuotaExceeded(f"agent {agent!r} has no quota configured", tool=tool,
                                code=ErrorCode.BUDGET_EXHAUSTED)
        now, bucket = self._clock(), self._buckets[agent]
        tokens = self.check_rate(agent, tool, now)
        if quota.max_concurrent is not None and self._inflight[agent] >= quota.max_concurrent:
            raise QuotaExceeded(f"concurrent={self._inflight[agent]}, limit={quota.max_concurrent}",
                                code=ErrorCode.CONCURRENCY_LIMIT, tool=tool)
        charges, cost_keys = [], []
        for key, kind, limit in budgets:
            amount = 1.0 if kind == "calls" else cost
            if self._used.get(key, 0.0) + amount > limit + 1e-9:
                raise QuotaExceeded(f"{kind}={self._used.get(key, 0.0):g}+{amount:g}, limit={limit:g}",
                                    code=ErrorCode.BUDGET_EXHAUSTED, tool=tool)
            charges.append((key, amount))
            if kind == "cost":
                cost_keys.append(key)
        # All checks passed: commit.
        if quota.rate_per_s is not None:
            bucket.tokens, bucket.last = tokens - 1.0, now
        self._inflight[agent] += 1
        for key, amount in charges:
            self._used[key] = self._used.get(key, 0.0) + amount
        return Reservation(agent, tuple(charges), cost, tuple(cost_keys))

    def settle(self, res: Reservation, actual_cost: float | None = None) -> None:
        """The call ran: keep the charge, correcting cost budgets to the actual cost."""
        if not res.open:
            return
        res.open = False
        self._inflight[res.agent] -= 1
        if actual_cost is not None and actual_cost >= 0:
            for key in res.cost_keys:
                self._used[key] += actual_cost - res.projected_cost

    def release(self, res: Reservation) -> None:
        """The call never ran (refused before dispatch): refund everything."""
        if not res.open:
            return
        res.open = False
        self._inflight[res.agent] -= 1
        for key, amount in res.charges:
            self._used[key] -= amount

    def recharge(self, agent: str, charges: Iterable[tuple[bytes, float]], projected_cost: float,
                 cost_keys: Iterable[bytes], *, charged: bool = False) -> Reservation:
        """Re-open a reservation from the journal of a restarted supervisor (no checks: it was allowed).
        ``charged``: its charges are already in the restored totals (a snapshot), not to be added again."""
        charges = tuple((bytes(k), float(a)) for k, a in charges)
        self._inflight[agent] = self._inflight.get(agent, 0) + 1
        if not charged:
            for key, amount in charges:
                self._used[key] = self._used.get(key, 0.0) + amount
        return Reservation(agent, charges, float(projected_cost), tuple(bytes(k) for k in cost_keys))

    def drain_buckets(self) -> None:
        """After a restart: no agent starts with a full burst (the time it had them is unknown)."""
        now = self._clock()
        for bucket in self._buckets.values():
            bucket.tokens, bucket.last = 0.0, now

    def snapshot(self) -> dict[str, Any]:
        return {
            "used": {k.hex(): v for k, v in self._used.items()},
            "buckets": {a: [b.tokens, b.last] for a, b in self._buckets.items()},
        }

    def restore(self, snap: dict[str, Any]) -> None:
        self._used = {bytes.fromhex(k): float(v) for k, v in snap.get("used", {}).items()}
        for agent, (tokens, last) in snap.get("buckets", {}).items():
            self._buckets[agent] = _Bucket(float(tokens), float(last))


class NonceWindow:
    """Each (agent, nonce) is accepted once; timestamps must be within ``window_s`` of now."""

    def __init__(self, window_s: float = 120.0, clock: Clock = time.time) -> None:
        self.window_s = window_s
        self._clock = clock
        self._seen: dict[tuple[str, bytes], float] = {}
        self._next_prune = 0.0

    def check(self, agent: str, nonce: bytes, ts: float, tool: str | None = None) -> None:
        now = self._clock()
        if not abs(now - ts) <= self.window_s:  # a NaN or infinite time is outside every window
            raise TokenRejected(f"request time {ts:.3f} outside window {self.window_s}s of {now:.3f}",
                                code=ErrorCode.REPLAY, tool=tool)
        if len(nonce) < 12:
            raise TokenRejected("nonce shorter than 12 bytes", code=ErrorCode.REPLAY, tool=tool)
        key = (agent, nonce)
        if key in self._seen:
            raise TokenRejected("nonce already used", code=ErrorCode.REPLAY, tool=tool)
        if now >= self._next_prune:
            self._prune(now)
        self._seen[key] = ts + self.window_s

    def remember(self, agent: str, nonce: bytes, expires: float) -> None:
        """Re-apply an accepted nonce from the journal of a restarted supervisor."""
        self._seen[(agent, bytes(nonce))] = float(expires)

    def _prune(self, now: float) -> None:
        self._seen = {k: exp for k, exp in self._seen.items() if exp >= now}
        self._next_prune = now + self.window_s / 4

    def snapshot(self) -> dict[str, Any]:
        return {"seen": [[a, n, exp] for (a, n), exp in self._seen.items()]}

    def restore(self, snap: dict[str, Any]) -> None:
        self._seen = {(a, bytes(n)): float(exp) for a, n, exp in snap.get("seen", [])}


class RevocationList:
    def __init__(self) -> None:
        self._revoked: set[bytes] = set()
        self._agents: set[str] = set()

    def revoke(self, token_id_or_tag: bytes) -> None:
        self._revoked.add(bytes(token_id_or_tag))

    def revoke_agent(self, agent: str) -> None:
        """Kill switch: every token held by ``agent`` is refused from now on."""
        self._agents.add(agent)

    @property
    def any_ids(self) -> bool:
        """Whether any id is revoked (else ``check`` needs only the holder)."""
        return bool(self._revoked)

    def check(self, chain_ids: Iterable[bytes], holder: str, tool: str | None = None) -> None:
        if holder in self._agents:
            raise TokenRejected(f"agent {holder!r} revoked", code=ErrorCode.TOKEN_REVOKED, tool=tool)
        if self._revoked and not self._revoked.isdisjoint(chain_ids):
            raise TokenRejected("token or an ancestor revoked", code=ErrorCode.TOKEN_REVOKED, tool=tool)

    def snapshot(self) -> dict[str, Any]:
        return {"ids": sorted(self._revoked), "agents": sorted(self._agents)}

    def restore(self, snap: dict[str, Any]) -> None:
        self._revoked = {bytes(x) for x in snap.get("ids", [])}
        self._agents = set(snap.get("agents", []))
