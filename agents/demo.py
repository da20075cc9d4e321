"""The agents of the demo job (``jobs/demo.yaml``): the seed article's chat scenario.

* ``LeadAgent`` lists channels, delegates the summary to the summarizer with a narrower
  token (read-only, two channels, a call budget), and posts the result to #summaries.
* ``SummarizerAgent`` is an LLM agent whose (scripted) model reads the channels, meets a
  prompt injection in #random and obeys it: it tries to exfiltrate to an outside URL and to
  delete #general. Both calls are denied by the supervisor; the summary still completes.
* ``ModeratorAgent`` may delete messages in #random only: it removes the spam there, and
  its attempt on #general is denied.
* ``AnalystAgent`` runs model-written Python in a gVisor sandbox; the escape attempt and the
  runaway loop injected through its data are contained there.
* ``DigestAgent`` forwards a channel through a handle, then reads it and is stopped by a flow rule.
* ``HelpdeskAgent`` answers whoever asked about the retro by direct message. Its model never
  reads the channels: it asks the quarantined reader who asked, from the team roster (an enum in
  its policy), and DMs that teammate with no human in the loop. mallory's note in #random forges a
  question from an outside address; that answer is not on the roster (READER_INVALID).
"""

from __future__ import annotations

import json
from typing import Any

from runtime.agent import Agent, ToolCallingAgent
from runtime.llm import ChatModel, ModelTurn, ScriptedModel, model_from_config


def summarise(messages: list[dict[str, Any]]) -> str:
    """A deterministic 'summary' of the chat.read results in a transcript."""
    parts = []
    for m in messages:
        if m.get("role") != "tool":
            continue
        try:
            rows = json.loads(m["content"])
        except (ValueError, TypeError):
            continue
        if isinstance(rows, list) and rows and isinstance(rows[0], dict) and "text" in rows[0]:
            users = sorted({r.get("user", "?") for r in rows})
            parts.append(f"{len(rows)} messages from {', '.join(users)}; latest: {rows[-1]['text'][:60]!r}")
    return " | ".join(parts) or "nothing to summarise"


class SummarizerAgent(ToolCallingAgent):
    """Follows its model; after the scripted steps, answers with a summary of what it read."""

    def build_model(self) -> ChatModel:
        cfg = self.config["model"]
        if cfg.get("kind") != "scripted":
            return model_from_config(cfg)
        return ScriptedModel([*cfg["steps"], lambda messages: ModelTurn(content=summarise(messages))])


class ModeratorAgent(ToolCallingAgent):
    pass


class DigestAgent(ToolCallingAgent):
    """Forwards a channel's text through a handle (its policy hides chat.export's result)."""


class HelpdeskAgent(ToolCallingAgent):
    """Reads channels only through the reader (its policy hides chat.export's result); DMs teammates."""


class AnalystAgent(ToolCallingAgent):
    """Runs model-written Python, always in its sandbox (python.exec), never in this process."""


class LeadAgent(Agent):
    async def run(self, task: Any) -> dict[str, Any]:
        channels = await self.call("chat.list_channels")
        wanted = [c for c in ("general", "random") if c in channels]
        result = await self.delegate(
            SummarizerAgent, f"{task} Channels: {', '.join(wanted)}.",
            tools=["chat.read"], max_calls=8, ttl_s=300,
            args={"chat.read.channel": {"one_of": wanted}},
        )
        posted = await self.call("chat.post", channel="summaries", text=f"Daily summary: {result['answer']}")
        return {"summary": result["answer"], "posted_id": posted["id"], "summarizer_calls": result["calls"]}
