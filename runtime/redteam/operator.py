"""The scripted operator: answers the calls a job parks for a human, through its operator API."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from .catalogue import Action, Scenario

OPERATOR = "redteam-operator"

def operator_decision(scenarios: list[Scenario], pending: dict[str, Any]) -> tuple[bool, str]:
    """What the scripted operator answers to a parked call: approve a call of a benign task,
    deny an injected one, and deny what it cannot place (a human would too). A call is the
    scripted action of that agent and tool whose written-out arguments it matches most fully
    (an injected action wins a tie: when in doubt, refuse)."""
    best: tuple[int, int, str, Action] | None = None
    for s in scenarios:
        for a in s.actions:
            if a.agent == pending.get("agent") and a.key == pending.get("tool") \
                    and args_match(a.args, pending.get("args") or {}):
                rank = (len(a.args), bool(a.attack), s.name, a)
                if best is None or rank[:2] > best[:2]:
                    best = rank
    if best is None:
        return False, "not part of any task the operator knows"
    _, _, name, action = best
    if action.attack:
        return False, f"scenario {name}: injected action {action.attack}"
    return True, f"scenario {name}: part of the task"


def args_match(script: dict[str, Any], actual: dict[str, Any]) -> bool:
    return all(k in actual and _same(v, actual[k]) for k, v in script.items())


def _same(a: Any, b: Any) -> bool:
    """Equal as the supervisor would canonicalise them (2200 is 2200.0; true is not 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


async def operate(runs_dir: Path, scenarios: list[Scenario], done: asyncio.Event,
                  answered: list[dict[str, Any]], problems: list[str], poll_s: float = 0.05) -> None:
    """Answer every parked call of the job under ``runs_dir`` through its operator API until ``done``.
    A request the API refused is kept in ``problems`` (the report shows them) and tried again."""
    from ..control import ControlClient, ControlError

    client = None
    while not done.is_set():
        if client is None:
            found = list(runs_dir.glob("*/control.json"))
            if found:
                client = ControlClient.from_run_dir(found[0].parent)
        else:
            try:
                pending = await asyncio.to_thread(client.approvals)
                for p in pending:
                    approve, why = operator_decision(scenarios, p)
                    await asyncio.to_thread(client.decide, p["id"], approve=approve, approver=OPERATOR, reason=why)
                    answered.append({"agent": p["agent"], "tool": p["tool"], "approved": approve, "why": why})
            except ControlError as exc:
                if "cannot reach" not in str(exc):  # unreachable: the job is ending; a refusal is a problem
                    problems.append(str(exc)[:300])
        try:  # another process's state: polled, there is no event to await
            await asyncio.wait_for(done.wait(), poll_s)
        except asyncio.TimeoutError:
            continue
