"""Human approval of single calls.

Invariants: a call that a policy marks for approval is parked after its quota is reserved and
before anything is dispatched, and goes on only after a human approved *that call* (by id); an
approval never widens a token or covers a second call. No answer before the timeout, a
denial, or a revocation of the agent all mean deny. Every request and every decision, with
the approver's name, is written to the audit log by the supervisor.

Threat: an agent (or the model behind it) that talks its way into a destructive action; an
approval that silently turns into a standing permission.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .capability import check_arg


@dataclass(frozen=True)
class ApprovalRule:
    """Approval is needed for calls of ``tool`` whose arguments satisfy every check in ``when``."""

    tool: str
    when: tuple[tuple[str, str, Any], ...] = ()  # (arg, check kind, param), as in Arg caveats
    timeout_s: float = 300.0

    def matches(self, args: dict[str, Any]) -> bool:
        """True unless a ``when`` check judged the call's value and found it outside the rule.

        A value a check cannot judge (missing, NaN, wrong type) matches: ask a human (fail safe)."""
        for arg, kind, param in self.when:
            try:
                if arg in args and check_arg(kind, param, args[arg]) is not None:
                    return False
            except Exception:
                continue
        return True


@dataclass
class Pending:
    id: str
    agent: str
    tool: str
    args: dict[str, Any]
    created: float
    expires: float
    future: "asyncio.Future[tuple[bool, str, str]]" = field(repr=False)
    flow: Any = None  # the flow rules the call breaks and its label, when they are why it waits

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "agent": self.agent, "tool": self.tool, "args": self.args,
                "created": self.created, "expires": self.expires, "flow": self.flow}


class Approvals:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._pending: dict[str, Pending] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def park(self, agent: str, tool: str, args: dict[str, Any], timeout_s: float, flow: Any = None) -> Pending:
        now = self._clock()
        p = Pending(secrets.token_hex(6), agent, tool, args, now, now + timeout_s,
                    asyncio.get_running_loop().create_future(), flow)
        self._pending[p.id] = p
        return p

    def done(self, pending: Pending) -> None:
        self._pending.pop(pending.id, None)

    def list(self) -> list[dict[str, Any]]:
        return [p.public() for p in sorted(self._pending.values(), key=lambda p: p.created)]

    def resolve(self, approval_id: str, *, approve: bool, approver: str, reason: str = "") -> Pending:
        """Decide one parked call. KeyError if it is unknown or already decided."""
        p = self._pending.get(approval_id)
        if p is None or p.future.done():
            raise KeyError(approval_id)
        p.future.set_result((approve, approver, reason))
        return p

    def deny_agent(self, agent: str, *, approver: str, reason: str) -> list[Pending]:
        """Deny every parked call of ``agent`` (revocation, quarantine)."""
        hit = [p for p in self._pending.values() if p.agent == agent and not p.future.done()]
        for p in hit:
            p.future.set_result((False, approver, reason))
        return hit
