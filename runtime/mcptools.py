"""An MCP server's tools as Warden tools: names, schemas, effects and results, mapped conservatively.

What a server says about its tools is untrusted input. At job start its ``tools/list`` is
turned into ``Tool``s through ``tool_from_schema``, so the supervisor canonicalises and
type-checks every argument as for a built-in tool; a tool whose schema uses what Warden
does not enforce is not registered (validation keywords that do not change a value's shape,
``minItems``, ``pattern``, ..., are left to the server, which checks them itself) (a call to it is ``UNKNOWN_TOOL``), and so is any tool
that appears after start. The annotations are hints, read only in the safe direction:

    readOnlyHint true            -> effect ``read``
    destructiveHint true/absent  -> effect ``delete`` (MCP's default for a non-read-only tool)
    destructiveHint false        -> effect ``write``
    any tool                     -> output ``untrusted`` (openWorldHint changes nothing: already untrusted)

A policy can only narrow this: it grants effects and tools, and its ``output`` label can
only be stated by the operator, never by the server.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Iterable

from .errors import ErrorCode, SandboxKilled, ToolFailed
from .schema import UNENFORCEABLE, SchemaError
from .tool import Tool, tool_from_schema
from .trusted.wire import ParamSpec

MAX_TEXT_CHARS = 1 << 20  # the most text one MCP result may bring back to the agent


def effect_of(annotations: Any) -> str:
    """The Warden effect of an MCP tool, from its (untrusted) annotations."""
    if annotations is None:
        return "delete"
    if getattr(annotations, "read_only_hint", None) is True:
        return "read"
    return "write" if getattr(annotations, "destructive_hint", None) is False else "delete"


def warden_name(prefix: str, tool: str) -> str:
    return f"{prefix}.{tool}"


def to_tools(prefix: str, listed: Iterable[Any], call: Callable[[str, dict[str, Any], Any], Any], *,
             path_args: Iterable[str] = ()) -> tuple[dict[str, Tool], dict[str, str]]:
    """``listed`` (``mcp.types.Tool``s) as Warden tools named ``PREFIX.TOOL``, and the tools left out with why.

    Each is a sandboxed tool (the worker hands it the agent's sandbox session, in which the
    server runs); ``call(mcp_name, arguments, ctx)`` runs one call. The string arguments (or
    arrays of strings) named in ``path_args`` are canonicalised as paths, as ``PATH`` parameters
    are, so that a policy's ``path_under`` rules apply to them.
    """
    tools: dict[str, Tool] = {}
    skipped: dict[str, str] = {}
    for t in listed:
        name = warden_name(prefix, t.name)
        if name in tools:
            skipped[name] = "listed twice"
            continue
        try:
            tools[name] = tool_from_schema(name, dict(t.input_schema), _bound(call, t.name),
                                           effect=effect_of(t.annotations), description=t.description or t.name,
                                           sandboxed=True, unenforced=UNENFORCEABLE,
                                           output={"integrity": "untrusted"})
            tools[name] = _with_paths(tools[name], set(path_args))
        except (SchemaError, TypeError, ValueError) as exc:
            skipped[name] = str(exc)
    return tools, skipped


def _with_paths(t: Tool, names: set[str]) -> Tool:
    params = {n: _as_path(p) if n in names else p for n, p in t.spec.params.items()}
    return t if params == t.spec.params else replace(t, spec=replace(t.spec, params=params))


def _as_path(p: ParamSpec) -> ParamSpec:
    if p.type == "string" and p.format is None:
        return replace(p, format="path")
    if p.type == "array" and p.items is not None and p.items.type == "string" and p.items.format is None:
        return replace(p, items=replace(p.items, format="path"))
    return p


def _bound(call: Callable[[str, dict[str, Any], Any], Any], mcp_name: str) -> Callable[..., Any]:
    def fn(ctx: Any, **kwargs: Any) -> Any:
        return call(mcp_name, kwargs, ctx)
    return fn


def result_value(result: Any, *, max_text_chars: int = MAX_TEXT_CHARS) -> Any:
    """An MCP ``CallToolResult`` as the value a Warden tool returns, or ``ToolFailed``.

    ``isError`` is ``TOOL_FAILED`` with the server's text as detail (the agent may correct its
    call). Structured content is returned as is; otherwise the text blocks, joined; other
    blocks (images, resources) are described, not passed on. Over ``max_text_chars`` is
    ``SANDBOX_OUTPUT``.
    """
    texts = [b.text for b in result.content if getattr(b, "type", None) == "text"]
    others = [b.type for b in result.content if getattr(b, "type", None) != "text"]
    text = "\n".join(texts)
    if len(text) > max_text_chars:
        raise SandboxKilled(f"MCP result of {len(text)} characters, over {max_text_chars}",
                           code=ErrorCode.SANDBOX_OUTPUT)
    if result.is_error:
        raise ToolFailed(text[:500] or "the MCP server reported an error", code=ErrorCode.TOOL_FAILED)
    if result.structured_content is not None:
        return result.structured_content
    if others:
        return {"text": text, "omitted": others}
    return text
