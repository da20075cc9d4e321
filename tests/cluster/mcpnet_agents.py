"""The agent of tests/cluster/test_mcp_net.py: it makes the calls its task lists and reports each outcome."""

from __future__ import annotations

from typing import Any

from runtime import Agent
from runtime.errors import WardenError


class CallsAgent(Agent):
    async def run(self, task: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for label, tool, args in task:
            try:
                out[label] = {"ok": True, "value": await self.call(tool, **args)}
            except WardenError as exc:
                out[label] = {"ok": False, "code": exc.code.value, "reason": exc.reason}
        return out
