"""Built-in tools. Add ``runtime.toolbox`` to a job's ``tools:`` to offer them.

* ``python.exec`` and ``shell.exec`` run model-written code in the calling agent's sandbox
  (backend and limits from its policy), never in a Ray worker process.
* ``fs.read`` / ``fs.write`` / ``fs.list`` work on the agent's workspace (``/workspace``);
  symlinks are never followed and nothing outside the workspace is reachable; only regular
  files are read or written (a FIFO, socket or device node is refused without blocking).
* ``http.fetch`` runs in the tool worker, outside any code sandbox: the supervisor has
  already checked the URL against the token's host allow-list; redirects are not followed
  (a redirect could leave that list); private, loopback and link-local addresses are refused
  unless the job's ``tool_config.http.allow_private_networks`` is true; the response is
  capped. Credentials configured for it reach it from the trusted side per call, and never
  enter a sandbox or an agent.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.error
import urllib.request
from typing import Annotated, Any
from urllib.parse import urlsplit

from .errors import ErrorCode, ToolFailed
from .sandbox.context import ToolContext
from .tool import PATH, URL, tool

MAX_FETCH_BYTES = 4 << 20
MAX_FILE_BYTES = 4 << 20


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _exec(ctx: ToolContext, argv: list[str], stdin: bytes, tool_name: str) -> dict[str, Any]:
    result = ctx.sandbox.run(argv, stdin=stdin, tool=tool_name)
    return {"exit_code": result.exit_code, "stdout": _text(result.stdout), "stderr": _text(result.stderr),
            "wall_ms": round(result.wall_s * 1e3, 1), "backend": result.backend}


@tool(effect="execute", name="python.exec", sandboxed=True)
def python_exec(code: str, *, ctx: ToolContext) -> dict[str, Any]:
    """Run Python code in the sandbox; returns exit code, stdout and stderr."""
    return _exec(ctx, ["python3", "-I", "-"], code.encode(), "python.exec")


@tool(effect="execute", name="shell.exec", sandboxed=True)
def shell_exec(command: str, *, ctx: ToolContext) -> dict[str, Any]:
    """Run a POSIX shell command in the sandbox; returns exit code, stdout and stderr."""
    return _exec(ctx, ["/bin/sh", "-s"], command.encode(), "shell.exec")


@tool(effect="read", name="fs.read", sandboxed=True)
def fs_read(path: Annotated[str, PATH], *, ctx: ToolContext) -> str:
    """Read a text file from the workspace (/workspace/...)."""
    return _text(ctx.sandbox.workspace.read(path, MAX_FILE_BYTES))


@tool(effect="write", name="fs.write", sandboxed=True)
def fs_write(path: Annotated[str, PATH], content: str, *, ctx: ToolContext) -> dict[str, Any]:
    """Write a text file in the workspace (/workspace/...), replacing it."""
    return {"path": path, "bytes": ctx.sandbox.workspace.write(path, content.encode())}


@tool(effect="read", name="fs.list", sandboxed=True)
def fs_list(path: Annotated[str, PATH] = "/workspace", *, ctx: ToolContext) -> list[dict[str, Any]]:
    """List a directory of the workspace."""
    return ctx.sandbox.workspace.list(path)


def _check_destination(host: str, allow_private: bool) -> None:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ToolFailed(f"cannot resolve {host!r}: {exc}") from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if not allow_private and (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved
                                  or ip.is_multicast or ip.is_unspecified):
            raise ToolFailed(f"{host!r} resolves to {ip}, a non-public address; set "
                             "tool_config.http.allow_private_networks to allow it", code=ErrorCode.TOOL_FAILED)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect is returned to the caller as is, never followed


@tool(effect="read", name="http.fetch")
def http_fetch(url: Annotated[str, URL], max_bytes: int = 1 << 20, *, ctx: ToolContext) -> dict[str, Any]:
    """HTTP GET a URL (hosts limited by policy). Returns status, headers and the body as text."""
    cfg = ctx.config.get("http", {}) if isinstance(ctx.config.get("http"), dict) else {}
    host = urlsplit(url).hostname or ""
    _check_destination(host, bool(cfg.get("allow_private_networks")))
    limit = max(0, min(int(max_bytes), MAX_FETCH_BYTES))
    headers = {"User-Agent": "warden-http-fetch/1"}
    headers.update({k: v for k, v in ctx.credentials.items() if isinstance(v, str)})
    opener = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers=headers, method="GET")
    try:
        with opener.open(request, timeout=float(cfg.get("timeout_s", 15))) as resp:
            status, resp_headers, body = resp.status, dict(resp.headers), resp.read(limit + 1)
    except urllib.error.HTTPError as exc:  # 3xx (not followed), 4xx, 5xx: data, not a failure
        status, resp_headers, body = exc.code, dict(exc.headers or {}), exc.read(limit + 1)
    except (urllib.error.URLError, OSError) as exc:
        raise ToolFailed(f"fetch failed: {exc}") from None
    return {"status": status, "headers": {k: v for k, v in resp_headers.items() if k.lower() != "set-cookie"},
            "body": _text(body[:limit]), "truncated": len(body) > limit}
