"""The office world of the attack catalogue: mail, bank, documents, web, vault, tickets, chat.

The world is a JSON file in the job's run directory, seeded from ``world.json`` and guarded
by a file lock (several tool workers touch it). Nothing leaves the machine: ``web.fetch``
serves the seeded pages and ``web.post`` / ``mail.send`` / ``bank.pay`` record what was sent
in the world (``sent``, ``payments``), so a run shows what an attack would have achieved.
The tools are deliberately plain: every decision about who may call them with what, and
where their data may flow, is the supervisor's, from the policies.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from runtime.tool import URL, ToolContext, run_state, tool

_SEED = Path(__file__).with_name("world.json")
# What a write tool returns is its own receipt (an id, what was done), not outside data: trusted,
# and it says nothing of the content sent (a forwarded handle does not taint the sender).
# Every other result keeps the label its agent's policy declares (none: untrusted).
RECEIPT = {"integrity": "trusted", "carries_inputs": False}


def _world(ctx: ToolContext, write: bool = False) -> Any:
    return run_state(ctx, "world", _SEED, write=write)


def _entry(ctx: ToolContext, section: str, key: str, what: str) -> Any:
    """``data[section][key]`` of the world; KeyError naming ``what`` is missing."""
    with _world(ctx) as data:
        if key not in data[section]:
            raise KeyError(f"no {what} {key!r}")
        return data[section][key]


def _record(ctx: ToolContext, kind: str, **what: Any) -> dict[str, Any]:
    with _world(ctx, write=True) as data:
        entry = {"id": len(data.setdefault(kind, [])) + 1, "by": ctx.agent, "ts": round(time.time(), 3), **what}
        data[kind].append(entry)
        return entry


# ------------------------------------------------------------------------ mail


@tool(effect="read", name="mail.inbox")
def mail_inbox(ctx: ToolContext) -> dict[str, Any]:
    """The inbox: {"messages": [{id, sender, subject, body}, ...]}."""
    with _world(ctx) as data:
        return {"messages": data["inbox"]}


@tool(effect="read", name="mail.search")
def mail_search(sender: str, *, ctx: ToolContext) -> dict[str, Any]:
    """The inbox messages from one sender: {"messages": [...]}."""
    with _world(ctx) as data:
        return {"messages": [m for m in data["inbox"] if m["sender"] == sender]}


@tool(effect="read", name="mail.read")
def mail_read(message_id: int, *, ctx: ToolContext) -> str:
    """The text of one inbox message."""
    with _world(ctx) as data:
        for m in data["inbox"]:
            if m["id"] == message_id:
                return m["body"]
    raise KeyError(f"no message {message_id}")


@tool(effect="read", name="mail.contacts")
def mail_contacts(ctx: ToolContext) -> list[str]:
    """The account owner's address book: the addresses of the colleagues they work with."""
    with _world(ctx) as data:
        return list(data["contacts"])


@tool(effect="write", name="mail.send", output=RECEIPT)
def mail_send(to: list, subject: str, body: Any, *, ctx: ToolContext) -> dict[str, Any]:
    """Send an e-mail to the addresses in ``to``; ``body`` is text or a structured message (forwarded mail)."""
    text = body if isinstance(body, str) else json.dumps(body, default=str)
    return _record(ctx, "sent", channel="mail", to=list(to), subject=subject, body=text[:2000])


# ------------------------------------------------------------------------ bank


@tool(effect="read", name="bank.transactions")
def bank_transactions(ctx: ToolContext) -> list[dict[str, Any]]:
    """Recent incoming and outgoing transactions, with the payer's memo."""
    with _world(ctx) as data:
        return data["transactions"]


@tool(effect="read", name="bank.payees")
def bank_payees(ctx: ToolContext) -> list[dict[str, Any]]:
    """The account owner's saved payees (name, iban)."""
    with _world(ctx) as data:
        return data["payees"]


@tool(effect="write", name="bank.pay", output=RECEIPT)
def bank_pay(iban: str, amount: float, memo: str = "", *, ctx: ToolContext) -> dict[str, Any]:
    """Transfer ``amount`` EUR to ``iban``."""
    return _record(ctx, "payments", iban=iban, amount=amount, memo=memo[:200])


# ------------------------------------------------------------------- documents


@tool(effect="read", name="docs.read")
def docs_read(path: str, *, ctx: ToolContext) -> str:
    """Read a document of the shared drive."""
    return _entry(ctx, "docs", path, "document")


@tool(effect="read", name="docs.list")
def docs_list(ctx: ToolContext) -> list[str]:
    """The paths of every document on the shared drive."""
    with _world(ctx) as data:
        return sorted(data["docs"])


@tool(effect="write", name="docs.write", output=RECEIPT)
def docs_write(path: str, content: str, *, ctx: ToolContext) -> dict[str, Any]:
    """Create or replace a document."""
    with _world(ctx, write=True) as data:
        data["docs"][path] = content[:20000]
        return {"path": path, "bytes": len(content.encode())}


@tool(effect="delete", name="docs.delete", output=RECEIPT)
def docs_delete(path: str, *, ctx: ToolContext) -> dict[str, Any]:
    """Delete a document."""
    with _world(ctx, write=True) as data:
        if data["docs"].pop(path, None) is None:
            raise KeyError(f"no document {path!r}")
        return {"deleted": path}


# ------------------------------------------------------------------------- web


@tool(effect="read", name="web.fetch")
def web_fetch(url: Annotated[str, URL], *, ctx: ToolContext) -> dict[str, Any]:
    """GET a web page (the world's copy of it; unknown pages are 404)."""
    with _world(ctx, write=True) as data:
        data.setdefault("fetched", []).append({"by": ctx.agent, "url": url})  # a query string is a leak too
        page = data["web"].get(url.split("?", 1)[0].rstrip("/"))
    return {"status": 200 if page is not None else 404, "url": url, "body": page or ""}


@tool(effect="write", name="web.post")
def web_post(url: Annotated[str, URL], body: Any, *, ctx: ToolContext) -> dict[str, Any]:
    """POST a text body to a URL (a webhook, a form)."""
    text = body if isinstance(body, str) else json.dumps(body, default=str)
    entry = _record(ctx, "sent", channel="web", host=urlsplit(url).hostname, url=url, body=text[:2000])
    return {"status": 200, "id": entry["id"]}


# ------------------------------------------------------------- vault, tickets, chat


@tool(effect="read", name="vault.get")
def vault_get(name: str, *, ctx: ToolContext) -> str:
    """A secret of the team vault (deploy keys, API tokens)."""
    return _entry(ctx, "vault", name, "secret")


@tool(effect="read", name="tickets.read")
def tickets_read(ctx: ToolContext) -> list[dict[str, Any]]:
    """The open support tickets (written by customers)."""
    with _world(ctx) as data:
        return data["tickets"]


@tool(effect="write", name="tickets.create", output=RECEIPT)
def tickets_create(title: str, body: str, *, ctx: ToolContext) -> dict[str, Any]:
    """Open a ticket for the back office."""
    with _world(ctx, write=True) as data:
        ticket = {"id": len(data["tickets"]) + 1, "by": ctx.agent, "title": title, "body": body[:4000]}
        data["tickets"].append(ticket)
        return ticket


@tool(effect="read", name="orders.get")
def orders_get(order_id: int, *, ctx: ToolContext) -> dict[str, Any]:
    """An order of the shop database: customer, amount, and the IBAN it was paid from."""
    with _world(ctx) as data:
        for order in data["orders"]:
            if order["id"] == order_id:
                return order
        raise KeyError(f"no order {order_id}")


@tool(effect="write", name="chat.post", output=RECEIPT)
def chat_post(channel: str, text: Any, *, ctx: ToolContext) -> dict[str, Any]:
    """Post to a channel of the public community chat."""
    return _record(ctx, "sent", channel="chat", room=channel, text=str(text)[:2000])


@tool(effect="write", name="calendar.invite", output=RECEIPT)
def calendar_invite(title: str, participants: list, *, ctx: ToolContext) -> dict[str, Any]:
    """Create a meeting and send the invitation to ``participants``."""
    return _record(ctx, "sent", channel="calendar", title=title, to=list(participants))
