"""Operating a running job from another terminal: approvals, revocation, status.

The supervisor actor serves, next to ``/metrics``, a small authenticated HTTP API::

    GET  /control/status                 job, agents, quarantined and revoked agents, counts
    GET  /control/approvals              parked calls waiting for a human
    POST /control/approvals/{id}         {"decision": "approve"|"deny", "approver": ..., "reason": ...}
    POST /control/revoke                 {"agent": NAME[, "cascade": true]} or {"token_id": HEX}, plus {"by": ...}
    POST /control/keys                   {"action": "rotate"} or {"action": "retire", "kid": KID}

In a sharded job every shard serves the API; a change made through one reaches every other
shard before the request is answered, and status and approvals cover all shards.

Every request needs ``Authorization: Bearer <operator token>``. The driver generates the
token at job start and writes it, with the address, to ``<run dir>/control.json`` (mode
0600): whoever can read the run directory can operate the job; nobody else, including
agents and other processes in the Ray cluster, can. The API listens on 127.0.0.1 unless
the job file says otherwise.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .observe import status_of

CONTROL_FILE = "control.json"


# --------------------------------------------------------------------- server side


class PeersBehind(Exception):
    """A change was made on one supervisor shard but did not reach every other one (yet)."""


def merge_stats(per_shard: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The (agent, tool, result) counts of several supervisor shards, summed."""
    counts: dict[tuple[str, str, str], int] = {}
    for rows in per_shard:
        for r in rows:
            key = (r["agent"], r["tool"], r["result"])
            counts[key] = counts.get(key, 0) + r["count"]
    return [{"agent": a, "tool": t, "result": r, "count": n} for (a, t, r), n in sorted(counts.items())]


class LocalOperator:
    """The operator's actions on one supervisor. A sharded job uses ``actors.ShardOperator``, which
    carries each change to every other shard (``_everywhere``) and asks them for status."""

    def __init__(self, supervisor: Any) -> None:
        self.sup = supervisor

    @property
    def agents(self) -> dict[str, Any]:
        return self.sup.agents

    async def _everywhere(self, op: str, **args: Any) -> None:
        """Carry a change made here to the other supervisors: there are none."""

    async def status(self) -> dict[str, Any]:
        return status_of(self.sup)

    async def approvals(self) -> list[dict[str, Any]]:
        return self.sup.approvals.list()

    async def decide(self, approval_id: str, **kw: Any) -> dict[str, Any]:
        return self.sup.decide_approval(approval_id, **kw)

    async def revoke_agent(self, agent: str, by: str, cascade: bool = False) -> None:
        """``cascade``: every token derived from one the agent held is revoked too, whoever holds it."""
        self.sup.revoke_agent(agent, by=by, cascade=cascade)
        await self._everywhere("revoke_agent", agent=agent, by=by, cascade=cascade)

    async def revoke_token(self, token_id: bytes, by: str) -> None:
        self.sup.revoke_token(token_id, by=by)
        await self._everywhere("revoke_token", token_id=token_id, by=by)

    async def rotate_key(self, by: str) -> str:
        kid, key = secrets.token_hex(4), secrets.token_bytes(32)
        epoch = self.sup.add_key(kid, key, by=by)
        await self._everywhere("add_key", kid=kid, key=key, epoch=epoch, by=by)
        return kid

    async def retire_key(self, kid: str, by: str) -> None:
        self.sup.retire_key(kid, by=by)
        await self._everywhere("retire_key", kid=kid, by=by)


def control_routes(operator: Any, token: str) -> list[Any]:
    """aiohttp routes bound to an operator (``LocalOperator`` or ``actors.ShardOperator``)."""
    from aiohttp import web

    if not hasattr(operator, "rotate_key"):
        operator = LocalOperator(operator)

    def authorized(request: web.Request) -> bool:
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    def guard(handler: Any) -> Any:
        async def wrapped(request: web.Request) -> web.Response:
            if not authorized(request):
                return web.json_response({"error": "missing or wrong operator token"}, status=401)
            try:
                return await handler(request)
            except (ValueError, KeyError, TypeError) as exc:
                return web.json_response({"error": f"bad request: {exc}"}, status=400)
            except PeersBehind as exc:  # a peer shard did not take the change: say so, do not hide it
                return web.json_response({"error": str(exc)}, status=503)
        return wrapped

    async def status(request: web.Request) -> web.Response:
        return web.json_response(await operator.status())

    async def approvals(request: web.Request) -> web.Response:
        return web.json_response(await operator.approvals())

    async def decide(request: web.Request) -> web.Response:
        body = await request.json()
        decision, approver = body.get("decision"), str(body.get("approver") or "").strip()
        if decision not in ("approve", "deny") or not approver:
            raise ValueError("need decision approve|deny and a non-empty approver")
        try:
            decided = await operator.decide(request.match_info["id"], approve=decision == "approve",
                                            approver=approver[:64], reason=str(body.get("reason", ""))[:500])
        except KeyError:
            return web.json_response({"error": "no such pending approval (unknown, decided or timed out)"},
                                     status=404)
        return web.json_response({"decided": decided, "decision": decision})

    async def revoke(request: web.Request) -> web.Response:
        body = await request.json()
        by = str(body.get("by") or "operator")[:64]
        if body.get("agent"):
            agent = str(body["agent"])
            if agent not in operator.agents:
                return web.json_response({"error": f"no agent {agent!r} in this job"}, status=404)
            cascade = body.get("cascade", False)
            if not isinstance(cascade, bool):
                raise ValueError("'cascade' must be true or false")
            await operator.revoke_agent(agent, by, cascade)
            return web.json_response({"revoked_agent": agent, "cascade": cascade})
        if body.get("token_id"):
            await operator.revoke_token(_token_ref(str(body["token_id"])), by)
            return web.json_response({"revoked_token": str(body["token_id"])})
        raise ValueError("need 'agent' or 'token_id'")

    async def keys(request: web.Request) -> web.Response:
        body = await request.json()
        by = str(body.get("by") or "operator")[:64]
        if body.get("action") == "rotate":
            return web.json_response({"current": await operator.rotate_key(by)})
        if body.get("action") == "retire" and body.get("kid"):
            if str(body["kid"]) not in operator.sup.keyring.kids:
                return web.json_response({"error": f"no key {str(body['kid'])[:64]!r} in the ring "
                                                   f"(keys: {operator.sup.keyring.kids})"}, status=404)
            await operator.retire_key(str(body["kid"])[:64], by)
            return web.json_response({"retired": str(body["kid"])})
        raise ValueError("need action 'rotate', or action 'retire' with 'kid'")

    return [web.get("/control/status", guard(status)), web.get("/control/approvals", guard(approvals)),
            web.post("/control/approvals/{id}", guard(decide)), web.post("/control/revoke", guard(revoke)),
            web.post("/control/keys", guard(keys))]


def _token_ref(text: str) -> bytes:
    """A whole token id (16 bytes, as audit records show it) or tag (32): a prefix or a typo would
    revoke nothing and look as if it had."""
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"token_id {text[:80]!r} is not hex") from None
    if len(raw) not in (16, 32):
        raise ValueError(f"token_id must be a whole token id (32 hex digits, as in the audit log's token_id) "
                         f"or tag (64), not {len(text)} characters")
    return raw


def write_control_file(run_dir: Path, *, url: str, token: str, job_id: str, urls: list[str] | None = None) -> Path:
    """``url``: the first shard's API; ``urls``: every shard's (each serves the whole API and its own /metrics)."""
    path = run_dir / CONTROL_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "urls": urls or [url], "token": token, "job": job_id}, f)
    return path


# --------------------------------------------------------------------- client side


class ControlError(Exception):
    """The job could not be reached, or refused the request."""


class ControlClient:
    def __init__(self, url: str, token: str, job: str = "", urls: list[str] | None = None) -> None:
        self.url, self._token, self.job = url.rstrip("/"), token, job
        self.urls = [u.rstrip("/") for u in (urls or [url])]

    @classmethod
    def from_run_dir(cls, run_dir: Path) -> "ControlClient":
        try:
            info = json.loads((run_dir / CONTROL_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise ControlError(f"{run_dir}: no readable {CONTROL_FILE} ({exc})") from None
        return cls(info["url"], info["token"], info.get("job", ""), info.get("urls"))

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Ask the first shard that answers (any shard serves the whole API)."""
        data = None if body is None else json.dumps(body).encode()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        unreachable = []
        for url in self.urls:
            req = urllib.request.Request(url + path, data=data, method=method,
                                         headers={"Authorization": f"Bearer {self._token}",
                                                  "Content-Type": "application/json"})
            try:
                with opener.open(req, timeout=30) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:300]
                raise ControlError(f"{method} {path}: HTTP {exc.code}: {detail}") from None
            except (urllib.error.URLError, OSError) as exc:
                unreachable.append(f"{url} ({exc})")
        raise ControlError(f"cannot reach the job at {', '.join(unreachable)}; has it finished?")

    def status(self) -> dict[str, Any]:
        return self._request("GET", "/control/status")

    def approvals(self) -> list[dict[str, Any]]:
        return self._request("GET", "/control/approvals")

    def decide(self, approval_id: str, *, approve: bool, approver: str, reason: str = "") -> dict[str, Any]:
        return self._request("POST", f"/control/approvals/{approval_id}",
                             {"decision": "approve" if approve else "deny", "approver": approver, "reason": reason})

    def revoke(self, *, agent: str | None = None, token_id: str | None = None, by: str,
               cascade: bool = False) -> dict[str, Any]:
        return self._request("POST", "/control/revoke", {"agent": agent, "token_id": token_id, "by": by,
                                                         "cascade": cascade})

    def keys(self, *, action: str, kid: str | None = None, by: str) -> dict[str, Any]:
        return self._request("POST", "/control/keys", {"action": action, "kid": kid, "by": by})


def find_run(run: str | None, runs_dir: str = "runs") -> Path:
    """The run directory to operate: ``run`` if given, else the newest one with a live job."""
    if run:
        return Path(run)
    candidates = sorted(Path(runs_dir).glob(f"*/{CONTROL_FILE}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for control in candidates:
        try:
            ControlClient.from_run_dir(control.parent).status()
            return control.parent
        except ControlError:
            continue
    raise ControlError(f"no running job found under {runs_dir}/ (pass --run RUN_DIR)")
