"""Agents of the cascade-revocation cluster test (imported by Ray workers from the project dir)."""

from __future__ import annotations

from typing import Any

from runtime.agent import Agent
from runtime.errors import WardenError


async def _outcome(coro: Any) -> dict[str, Any]:
    try:
        return {"ok": True, "value": await coro}
    except WardenError as exc:
        return {"ok": False, "code": exc.code.value}


class Lead(Agent):
    """Hands its peer a token of its own and reports what the peer saw."""

    async def run(self, task: Any) -> Any:
        return await self.delegate("quiet", task, tools=["echo", "note.write"])


class ParkedDelegate(Agent):
    """Parks a call under the delegated token (a human must approve it), then calls again."""

    async def run(self, task: Any) -> dict[str, Any]:
        return {"parked": await _outcome(self.call("note.write", text="waiting")),
                "after": await _outcome(self.call("echo", text="still here?"))}
