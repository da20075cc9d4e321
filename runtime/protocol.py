"""The messages that cross the trust boundary, as agents build and read them.

A request is msgpack ``[body, mac]``: ``body`` a msgpack map (see
``runtime.trusted.wire.decode_envelope`` for the exact, bounded schema the supervisor
accepts) and ``mac = HMAC-SHA256(agent request key, body)``, the proof that the agent
presenting the token is the agent it was issued to. Every request carries a fresh random
nonce and a timestamp, so a copied request cannot be replayed.

A reply is a msgpack map: ``{"ok": true, "value": ..., "call_id": ...}`` or
``{"ok": false, "error": {"code": ..., "tool": ..., ["retry_after_s"], ["detail"]}}``.
"""

from __future__ import annotations

import hmac
import os
import time
from hashlib import sha256
from typing import Any

import msgpack

from .errors import TokenRejected, ToolFailed, WardenError
from .trusted.capability import Holder, Token, decode_caveat

REQUEST_VERSION = 1


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def seal_request(body: dict[str, Any], request_key: bytes) -> bytes:
    body_bytes = _pack(body)
    return _pack([body_bytes, hmac.new(request_key, body_bytes, sha256).digest()])


def encode_call(*, agent: str, token: bytes, tool: str, args: dict[str, Any], request_key: bytes) -> bytes:
    return seal_request({"v": REQUEST_VERSION, "op": "call", "agent": agent, "token": token, "tool": tool,
                         "args": args, "nonce": os.urandom(16), "ts": time.time()}, request_key)


def encode_delegate(*, agent: str, token: bytes, to: str, request_key: bytes, handles: list[str] = ()) -> bytes:
    body = {"v": REQUEST_VERSION, "op": "delegate", "agent": agent, "token": token, "to": to,
            "nonce": os.urandom(16), "ts": time.time()}
    if handles:  # handle ids passed on to the delegate
        body["handles"] = list(handles)
    return seal_request(body, request_key)


def encode_batch(*, agent: str, token: bytes, calls: list[tuple[str, dict[str, Any]]], request_key: bytes) -> bytes:
    """Several calls in one message: one MAC and nonce, each call still checked and audited on its own."""
    return seal_request({"v": REQUEST_VERSION, "op": "batch", "agent": agent, "token": token,
                         "batch": [{"tool": t, "args": a} for t, a in calls], "nonce": os.urandom(16),
                         "ts": time.time()}, request_key)


def decode_reply(raw: bytes) -> dict[str, Any]:
    """The reply as a map; a refusal or failure is raised as its typed error."""
    return check_reply(msgpack.unpackb(raw, raw=False))


def check_reply(reply: Any) -> dict[str, Any]:
    """``reply`` if it is a success; else its typed error, raised."""
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ToolFailed("malformed reply from the supervisor")
    if not reply["ok"]:
        err = reply.get("error") or {}
        raise WardenError.from_wire(err)  # with its detail, for the codes that carry one
    return reply


def first_holder(raw: Any) -> str:
    """The agent an (unverified) token was minted for; for routing only, never for a decision."""
    tok = Token.decode(raw)
    c = decode_caveat(tok.caveats[0]) if tok.caveats else None
    if not isinstance(c, Holder):
        raise TokenRejected("token does not start with a holder")
    return c.agent
