"""Tools: plain Python functions with typed parameters and a declared effect.

    @tool(effect="read", name="chat.read")
    def read(channel: str, limit: int = 20) -> list[dict]:
        '''Read the latest messages of a channel.'''

The signature gives two things: the OpenAI function-calling schema the model sees, and
the ``ToolSpec`` the supervisor checks arguments against. Parameters annotated
``Annotated[str, PATH]`` or ``Annotated[str, URL]`` are canonicalised by the supervisor
before any caveat is evaluated. A keyword-only parameter ``ctx: ToolContext`` is not part
of the schema: the tool worker fills it in.
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable, get_args, get_origin

from .sandbox.context import ToolContext
from .trusted.capability import EFFECTS
from .trusted.wire import ParamSpec, ToolSpec

__all__ = ["PATH", "URL", "Tool", "ToolContext", "tool", "tools_in_module", "load_tools"]

PATH = "path"
URL = "url"

_JSON_OF: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean",
                            list: "array", dict: "object", Any: "any"}


@dataclass(frozen=True)
class Tool:
    fn: Callable[..., Any]
    spec: ToolSpec
    schema: dict[str, Any]
    wants_ctx: bool

    @property
    def name(self) -> str:
        return self.spec.name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def _param(annotation: Any, default: Any) -> tuple[ParamSpec, dict[str, Any]]:
    fmt = None
    if get_origin(annotation) is Annotated:
        base, *meta = get_args(annotation)
        fmt = next((m for m in meta if m in (PATH, URL)), None)
        annotation = base
    optional = False
    if get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        optional = len(members) < len(get_args(annotation))
        annotation = members[0] if len(members) == 1 else Any
    origin = get_origin(annotation) or annotation
    json_type = _JSON_OF.get(origin)
    if json_type is None:
        raise TypeError(f"unsupported parameter type {annotation!r}; use str, int, float, bool, list, dict")
    schema: dict[str, Any] = {} if json_type == "any" else {"type": json_type}
    if optional and schema:
        schema = {"type": [json_type, "null"]}
    if fmt == PATH:
        schema["description"] = "absolute path"
    elif fmt == URL:
        schema["format"] = "uri"
    required = default is inspect.Parameter.empty
    spec = ParamSpec(type=json_type, required=required, default=None if required else default, format=fmt,
                     nullable=optional)
    if not required and default is not None:
        schema["default"] = default
    return spec, schema


def tool(*, effect: str, name: str | None = None, cost: float = 1.0,
         sandboxed: bool = False) -> Callable[[Callable[..., Any]], Tool]:
    """Declare a tool. ``effect`` is one of read / write / delete / execute.

    ``sandboxed=True``: the tool runs code or touches files, and gets ``ctx.sandbox`` (the
    calling agent's sandbox session and workspace, with the limits of its policy).
    """
    if effect not in EFFECTS:
        raise ValueError(f"effect must be one of {EFFECTS}, not {effect!r}")

    def wrap(fn: Callable[..., Any]) -> Tool:
        tool_name = name or fn.__name__
        hints = typing.get_type_hints(fn, include_extras=True)
        params: dict[str, ParamSpec] = {}
        props: dict[str, Any] = {}
        wants_ctx = False
        for pname, p in inspect.signature(fn).parameters.items():
            if pname == "ctx":
                wants_ctx = True
                continue
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"tool {tool_name}: *args / **kwargs are not allowed")
            if pname not in hints:
                raise TypeError(f"tool {tool_name}: parameter {pname!r} needs a type annotation")
            params[pname], props[pname] = _param(hints[pname], p.default)
        doc = inspect.getdoc(fn) or ""
        schema = {
            "type": "function",
            "function": {
                "name": tool_name,
                "description": doc.split("\n\n")[0],
                "parameters": {"type": "object", "properties": props,
                               "required": [n for n, s in params.items() if s.required],
                               "additionalProperties": False},
            },
        }
        if sandboxed and not wants_ctx:
            raise TypeError(f"tool {tool_name}: a sandboxed tool needs a 'ctx: ToolContext' parameter")
        return Tool(fn, ToolSpec(tool_name, effect, params, cost, doc, sandboxed), schema, wants_ctx)

    return wrap


def tools_in_module(module: str) -> list[Tool]:
    """Every ``Tool`` defined at the top level of ``module`` (imported by name)."""
    mod = importlib.import_module(module)
    return [v for v in vars(mod).values() if isinstance(v, Tool)]


def load_tools(modules: list[str]) -> dict[str, Tool]:
    registry: dict[str, Tool] = {}
    for module in modules:
        for t in tools_in_module(module):
            if t.name in registry and registry[t.name] is not t:
                raise ValueError(f"tool {t.name!r} defined twice ({module})")
            registry[t.name] = t
    return registry
