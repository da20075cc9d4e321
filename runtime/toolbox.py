"""Built-in tools. Add ``runtime.toolbox`` to a job's ``tools:`` to offer them.

* ``python.exec`` and ``shell.exec`` run model-written code in the calling agent's sandbox
  (backend and limits from its policy), never in a Ray worker process.
* ``fs.read`` / ``fs.write`` / ``fs.list`` work on the agent's workspace (``/workspace``);
  symlinks are never followed and nothing outside the workspace is reachable; only regular
  files are read or written (a FIFO, socket or device node is refused without blocking).
* Labels: what ``python.exec``, ``shell.exec``, ``fs.read`` and ``fs.list`` return is untrusted and
  readable only by ``(workspace)``, a reader no destination matches: the workspace may hold what the
  agent wrote there, private data included, so it reaches no sink with a ``destination`` rule unless
  a policy declares the tool's readers (``output: {readers: public}``). ``fs.write`` is a receipt.
* ``handle.reveal`` returns a handle's content (the supervisor put it in the argument); the
  result carries the handle's label (its own declaration adds nothing: trusted).
* ``http.fetch`` runs in the tool worker, outside any code sandbox: the supervisor has
  already checked the URL against the token's ``url_host`` allow-list; redirects are not
  followed (a redirect could leave that list); the name is resolved once, every address that
  is not globally routable is refused unless the job's ``tool_config.http.allow_private_networks``
  is true, and the connection goes to exactly the checked address (``runtime.egress``); the
  response is capped. Credentials reach it from the trusted side per call, only for their own
  origin (scheme, host, port), and never enter a sandbox or an agent.
"""

from __future__ import annotations

from typing import Annotated, Any

from .errors import ErrorCode, ToolFailed
from .egress import FetchSettings, fetch
from .sandbox.context import ToolContext
from .tool import PATH, URL, tool

MAX_FETCH_BYTES = 4 << 20
MAX_FILE_BYTES = 4 << 20
FAILURE_TAIL_BYTES = 400  # of a failed program's stderr, in its TOOL_FAILED reason (the agent sees it)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _exec(ctx: ToolContext, argv: list[str], stdin: bytes, tool_name: str) -> dict[str, Any]:
    result = ctx.sandbox.run(argv, stdin=stdin, tool=tool_name)  # a breached limit raises SANDBOX_*
    if result.exit_code != 0:  # the program's own failure, whatever it printed or exited with
        tail = _text(result.stderr[-FAILURE_TAIL_BYTES:] or result.stdout[-FAILURE_TAIL_BYTES:]).strip()
        raise ToolFailed(f"exit status {result.exit_code}: {tail}", code=ErrorCode.TOOL_FAILED, tool=tool_name)
    return {"exit_code": result.exit_code, "stdout": _text(result.stdout), "stderr": _text(result.stderr),
            "wall_ms": round(result.wall_s * 1e3, 1), "backend": result.backend}


@tool(effect="execute", name="python.exec", sandboxed=True, output={"readers": ["(workspace)"]})
def python_exec(code: str, *, ctx: ToolContext) -> dict[str, Any]:
    """Run Python code in the sandbox; returns stdout and stderr (a non-zero exit is TOOL_FAILED)."""
    return _exec(ctx, ["python3", "-I", "-"], code.encode(), "python.exec")


@tool(effect="execute", name="shell.exec", sandboxed=True, output={"readers": ["(workspace)"]})
def shell_exec(command: str, *, ctx: ToolContext) -> dict[str, Any]:
    """Run a POSIX shell command in the sandbox; returns stdout and stderr (a non-zero exit is TOOL_FAILED)."""
    return _exec(ctx, ["/bin/sh", "-s"], command.encode(), "shell.exec")


@tool(effect="read", name="fs.read", sandboxed=True, output={"readers": ["(workspace)"]})
def fs_read(path: Annotated[str, PATH], *, ctx: ToolContext) -> str:
    """Read a text file from the workspace (/workspace/...)."""
    return _text(ctx.sandbox.workspace.read(path, MAX_FILE_BYTES))


@tool(effect="write", name="fs.write", sandboxed=True, output={"integrity": "trusted", "carries_inputs": False})
def fs_write(path: Annotated[str, PATH], content: str, *, ctx: ToolContext) -> dict[str, Any]:
    """Write a text file in the workspace (/workspace/...), replacing it."""
    return {"path": path, "bytes": ctx.sandbox.workspace.write(path, content.encode())}


@tool(effect="read", name="fs.list", sandboxed=True, output={"readers": ["(workspace)"]})
def fs_list(path: Annotated[str, PATH] = "/workspace", *, ctx: ToolContext) -> list[dict[str, Any]]:
    """List a directory of the workspace."""
    return ctx.sandbox.workspace.list(path)


@tool(effect="read", name="http.fetch")
def http_fetch(url: Annotated[str, URL], max_bytes: int = 1 << 20, *, ctx: ToolContext) -> dict[str, Any]:
    """HTTP GET a URL (hosts limited by policy). Returns status, headers and the body as text."""
    settings = FetchSettings.from_config(ctx.config.get("http"))
    limit = max(0, min(int(max_bytes), MAX_FETCH_BYTES))
    reply = fetch(url, max_bytes=limit, settings=settings, credentials=ctx.credentials)
    return {**reply, "body": _text(reply["body"])}


@tool(effect="read", name="handle.reveal", output={"integrity": "trusted"})
def handle_reveal(handle: Any) -> Any:
    """Show the content of a handle (a hidden result). Your context then carries its label: if the
    content is untrusted, calls that need a trusted context are refused or wait for a human."""
    return handle
