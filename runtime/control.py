"""Operating a running job from another terminal: approvals, revocation, status.

The supervisor actor serves, next to ``/metrics``, a small authenticated HTTP API::

    GET  /control/status                 job, agents, quarantined and revoked agents, counts
    GET  /control/approvals              parked calls waiting for a human
    POST /control/approvals/{id}         {"decision": "approve"|"deny", "approver": ..., "reason": ...}
    POST /control/revoke                 {"agent": NAME} or {"token_id": HEX}, plus {"by": ...}

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
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

CONTROL_FILE = "control.json"


# --------------------------------------------------------------------- server side


def control_routes(supervisor: Any, token: str) -> list[Any]:
    """aiohttp routes bound to a live ``trusted.Supervisor``."""
    from aiohttp import web

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
        return wrapped

    async def status(request: web.Request) -> web.Response:
        return web.json_response(supervisor.status())

    async def approvals(request: web.Request) -> web.Response:
        return web.json_response(supervisor.approvals.list())

    async def decide(request: web.Request) -> web.Response:
        body = await request.json()
        decision, approver = body.get("decision"), str(body.get("approver") or "").strip()
        if decision not in ("approve", "deny") or not approver:
            raise ValueError("need decision approve|deny and a non-empty approver")
        try:
            decided = supervisor.decide_approval(request.match_info["id"], approve=decision == "approve",
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
            if agent not in supervisor.agents:
                return web.json_response({"error": f"no agent {agent!r} in this job"}, status=404)
            supervisor.revoke_agent(agent, by=by)
            return web.json_response({"revoked_agent": agent})
        if body.get("token_id"):
            supervisor.revoke_token(bytes.fromhex(str(body["token_id"])), by=by)
            return web.json_response({"revoked_token": str(body["token_id"])})
        raise ValueError("need 'agent' or 'token_id'")

    return [web.get("/control/status", guard(status)), web.get("/control/approvals", guard(approvals)),
            web.post("/control/approvals/{id}", guard(decide)), web.post("/control/revoke", guard(revoke))]


def write_control_file(run_dir: Path, *, url: str, token: str, job_id: str) -> Path:
    path = run_dir / CONTROL_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "token": token, "job": job_id}, f)
    return path


# --------------------------------------------------------------------- client side


class ControlError(Exception):
    """The job could not be reached, or refused the request."""


class ControlClient:
    def __init__(self, url: str, token: str, job: str = "") -> None:
        self.url, self._token, self.job = url.rstrip("/"), token, job

    @classmethod
    def from_run_dir(cls, run_dir: Path) -> "ControlClient":
        try:
            info = json.loads((run_dir / CONTROL_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise ControlError(f"{run_dir}: no readable {CONTROL_FILE} ({exc})") from None
        return cls(info["url"], info["token"], info.get("job", ""))

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {self._token}",
                                              "Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise ControlError(f"{method} {path}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ControlError(f"cannot reach the job at {self.url} ({exc}); has it finished?") from None

    def status(self) -> dict[str, Any]:
        return self._request("GET", "/control/status")

    def approvals(self) -> list[dict[str, Any]]:
        return self._request("GET", "/control/approvals")

    def decide(self, approval_id: str, *, approve: bool, approver: str, reason: str = "") -> dict[str, Any]:
        return self._request("POST", f"/control/approvals/{approval_id}",
                             {"decision": "approve" if approve else "deny", "approver": approver, "reason": reason})

    def revoke(self, *, agent: str | None = None, token_id: str | None = None, by: str) -> dict[str, Any]:
        return self._request("POST", "/control/revoke", {"agent": agent, "token_id": token_id, "by": by})


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
