"""Agents and a tool that make the mistakes users make, for the run-summary tests."""

from __future__ import annotations

from typing import Any

from runtime.agent import Agent
from runtime.tool import tool
from tests.cluster.agents_under_test import _attempt


@tool(effect="read", name="parse")
def parse(text: str) -> int:
    """Parse an integer; fails with the parser's message on anything else."""
    return int(text)


class OverreachAgent(Agent):
    """Delegates a tool it does not hold, and feeds a tool input it cannot parse."""

    async def run(self, task: Any) -> dict[str, Any]:
        return {
            "delegate_unheld": await _attempt(self.delegate("peer", task, tools=["note.write"])),
            "parse": await _attempt(self.call("parse", text="twelve")),
        }
