"""Tools declared from JSON Schema, and an agent that calls them, for the cluster tests."""

from __future__ import annotations

from typing import Annotated, Any

from runtime import HOST, Agent, outcome, tool, tool_from_schema

TRANSFER_SCHEMA = {
    "type": "object",
    "properties": {
        "recipient": {"type": "string", "description": "IBAN of the recipient"},
        "amount": {"type": "number"},
        "currency": {"type": "string", "enum": ["EUR", "USD"], "default": "EUR"},
        "tags": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}], "default": None},
    },
    "required": ["recipient", "amount"],
}


def _transfer(**args: Any) -> dict[str, Any]:
    """What the tool received, with the type of the amount (the supervisor's canonical form)."""
    return {**args, "amount_type": type(args["amount"]).__name__}


send_money = tool_from_schema("bank.send_money", TRANSFER_SCHEMA, _transfer, effect="write",
                              description="Send money to an IBAN.")


@tool(effect="read", name="net.ping")
def ping(host: Annotated[str, HOST]) -> str:
    """Ping a host (returns the host it was given)."""
    return host


class SchemaProbeAgent(Agent):
    async def run(self, task: Any) -> dict[str, Any]:
        iban = "DE89370400440532013000"
        return {
            "int_amount": await outcome(self.call("bank.send_money", recipient=iban, amount=2200)),
            "float_amount": await outcome(self.call("bank.send_money", recipient=iban, amount=2200.0)),
            "other_amount": await outcome(self.call("bank.send_money", recipient=iban, amount=2200.5)),
            "bad_enum": await outcome(self.call("bank.send_money", recipient=iban, amount=2200, currency="GBP")),
            "bad_item": await outcome(self.call("bank.send_money", recipient=iban, amount=2200, tags=["a", 1])),
            "host": await outcome(self.call("net.ping", host="WWW.Example.COM.")),
            "other_host": await outcome(self.call("net.ping", host="evil.example")),
            "host_with_user": await outcome(self.call("net.ping", host="www.example.com@evil.example")),
        }
