"""A small chat workspace (channels of messages) as tools, for the demo job.

The workspace is a JSON file in the job's run directory, seeded from ``chat_seed.json``,
and guarded by a file lock because several tool workers may touch it at once.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated, Any

from runtime.egress import FetchSettings, fetch
from runtime.tool import URL, ToolContext, run_state, tool

_SEED = Path(__file__).with_name("chat_seed.json")
MAX_POST_BYTES = 64 * 1024


def _workspace(ctx: ToolContext, write: bool = False) -> Any:
    return run_state(ctx, "chat", ctx.config.get("chat", {}).get("seed") or _SEED, write=write)


def _channel(data: dict[str, Any], channel: str) -> list[dict[str, Any]]:
    if channel not in data["channels"]:
        raise KeyError(f"no channel {channel!r}")
    return data["channels"][channel]


@tool(effect="read", name="chat.list_channels")
def list_channels(ctx: ToolContext) -> list[str]:
    """List the channels of the workspace."""
    with _workspace(ctx) as data:
        return sorted(data["channels"])


@tool(effect="read", name="chat.read")
def read(channel: str, limit: int = 50, *, ctx: ToolContext) -> list[dict[str, Any]]:
    """Read the latest messages of a channel."""
    with _workspace(ctx) as data:
        return _channel(data, channel)[-limit:]


# Labels: what the tools return is untrusted (anyone can write a message) unless it is the tool's own
# receipt, which says nothing of the data passed in (a policy or job file may say otherwise).
@tool(effect="write", name="chat.post", output={"integrity": "trusted", "carries_inputs": False})
def post(channel: str, text: str, mentions: list = [], *, ctx: ToolContext) -> dict[str, Any]:  # noqa: B006
    """Post a message to a channel, notifying the users in ``mentions``; returns its id."""
    with _workspace(ctx, write=True) as data:
        messages = _channel(data, channel)
        msg = {"id": max((m["id"] for m in messages), default=0) + 1, "user": ctx.agent, "text": text,
               "mentions": list(mentions), "ts": round(time.time(), 3)}
        messages.append(msg)
        return {"id": msg["id"], "channel": channel}


@tool(effect="write", name="chat.dm", output={"integrity": "trusted", "carries_inputs": False})
def dm(user: str, text: str, *, ctx: ToolContext) -> dict[str, Any]:
    """Send a direct message to one user of the workspace; returns its id."""
    with _workspace(ctx, write=True) as data:
        inbox = data.setdefault("dms", {}).setdefault(user, [])
        inbox.append({"id": len(inbox) + 1, "from": ctx.agent, "text": text, "ts": round(time.time(), 3)})
        return {"id": inbox[-1]["id"], "user": user}


@tool(effect="read", name="chat.export")
def export(channel: str, *, ctx: ToolContext) -> str:
    """A channel as text, one line per message (to forward or digest it)."""
    with _workspace(ctx) as data:
        return "\n".join(f"{m['user']}: {m['text']}" for m in _channel(data, channel))


@tool(effect="delete", name="chat.delete_message", output={"integrity": "trusted", "carries_inputs": False})
def delete_message(channel: str, message_id: int, *, ctx: ToolContext) -> dict[str, Any]:
    """Delete one message from a channel."""
    with _workspace(ctx, write=True) as data:
        messages = _channel(data, channel)
        kept = [m for m in messages if m["id"] != message_id]
        if len(kept) == len(messages):
            raise KeyError(f"no message {message_id} in {channel!r}")
        data["channels"][channel] = kept
        return {"deleted": message_id, "channel": channel}


@tool(effect="delete", name="chat.delete_channel", output={"integrity": "trusted", "carries_inputs": False})
def delete_channel(channel: str, *, ctx: ToolContext) -> dict[str, Any]:
    """Delete a whole channel and every message in it."""
    with _workspace(ctx, write=True) as data:
        _channel(data, channel)
        del data["channels"][channel]
        return {"deleted_channel": channel}


@tool(effect="write", name="http.post")
def http_post(url: Annotated[str, URL], body: str, timeout_s: float = 10.0, *, ctx: ToolContext) -> dict[str, Any]:
    """POST a text body to a URL (only to hosts the token allows)."""
    settings = FetchSettings.from_config(ctx.config.get("http"))  # the same destination checks as http.fetch
    settings = dataclasses.replace(settings, timeout_s=max(0.1, min(timeout_s, 30.0, settings.timeout_s)))
    reply = fetch(url, method="POST", body=body.encode()[:MAX_POST_BYTES], headers={"Content-Type": "text/plain"},
                  max_bytes=4096, settings=settings, credentials=ctx.credentials)
    return {"status": reply["status"], "body": reply["body"].decode("utf-8", "replace")}
