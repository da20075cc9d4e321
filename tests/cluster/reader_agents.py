"""Agents and tools for the reader's cluster test: a bill an outsider wrote (kept hidden), a private
note the reader is never asked about, a payment tool whose IBAN must be trusted and whose amount may
be endorsed, and a mail tool whose body may be anything."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from runtime import is_handle
from runtime.agent import Agent, outcome
from runtime.tool import tool

PRIVATE_MARKER = "pz7-note-that-no-reader-may-see-41c9"
BILL = ("ACME Corp invoice 7731\nVendor: initech (see the letterhead)\nIBAN: DE89-3704-0044-0532-0130-00\n"
        "Amount due: 1,240.50 EUR\nPlease pay by 2026-12-31.\n")


@tool(effect="read", name="docs.bill")
def bill() -> str:
    """The latest bill, as its sender wrote it."""
    return BILL


@tool(effect="read", name="docs.note")
def note() -> str:
    """A private note."""
    return f"private: {PRIVATE_MARKER}"


@tool(effect="write", name="bank.pay", output={"integrity": "trusted", "carries_inputs": False})
def pay(iban: str, amount: float) -> dict[str, Any]:
    """Pay an amount to an IBAN."""
    return {"paid": amount, "iban": iban}


@tool(effect="write", name="mail.send", output={"integrity": "trusted", "carries_inputs": False})
def send(to: str, body: str) -> dict[str, Any]:
    """Send a mail."""
    return {"sent": len(body), "to": to}


async def _wait_file(path: Path) -> None:
    while not path.exists():  # written by the test process: nothing to await here
        await asyncio.sleep(0.05)


class BillAgent(Agent):
    """Pays a bill it never reads: asks the reader for the amount, tries two questions whose answers do
    not validate, asks for a summary (a handle) and mails it; then lets the test look at the reader's
    process, and asks once more while the test kills the reader."""

    async def run(self, task: Any) -> dict[str, Any]:
        d = Path(task["dir"])
        out: dict[str, Any] = {}
        doc = await self.call("docs.bill")
        await self.call("docs.note")  # hidden too; never asked about
        out["hidden"] = is_handle(doc)
        out["amount"] = await outcome(self.ask(doc, "What is the amount due?", "amount"))
        if out["amount"]["ok"]:
            out["pay"] = await outcome(self.call("bank.pay", iban=task["iban"], amount=out["amount"]["value"]))
            out["pay_to_answer"] = await outcome(self.call("bank.pay", iban=str(out["amount"]["value"]),
                                                            amount=1.0))  # an endorsed IBAN: refused
        out["iban"] = await outcome(self.ask(doc, "What is the IBAN?", {
            "type": "string", "pattern": "[A-Z]{2}[0-9]{2}[0-9]{12,30}", "maxLength": 34}))
        out["vendor"] = await outcome(self.ask(doc, "Which vendor sent it?", {"enum": ["acme", "globex"]}))
        summary = await outcome(self.ask(doc, "Summarise the bill", {"type": "string"}))
        out["summary_is_handle"] = summary["ok"] and is_handle(summary["value"])
        if out["summary_is_handle"]:
            out["mail"] = await outcome(self.call("mail.send", to=task["boss"], body=summary["value"]))
        out["no_schema"] = await outcome(self.ask(doc, "What is the amount due?", {"type": "object"}))
        out["no_handle"] = await outcome(self.ask("the bill", "What is the amount due?", "amount"))
        (d / "secrets.json").write_text(json.dumps({"token": self.token.hex(), "request_key": self._request_key.hex()}))
        await _wait_file(d / "inspected")
        out["killed"] = await outcome(self.ask(doc, "Slowly: is it paid?", {"type": "boolean"}))
        out["after_restart"] = await outcome(self.ask(doc, "What is the amount due?", "amount"))
        return out
