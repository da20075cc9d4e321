"""Tools: plain Python functions with typed parameters and a declared effect.

    @tool(effect="read", name="chat.read")
    def read(channel: str, limit: int = 20) -> list[dict]:
        '''Read the latest messages of a channel.'''

The signature gives two things: the OpenAI function-calling schema the model sees, and
the ``ToolSpec`` the supervisor checks arguments against. Parameters annotated
``Annotated[str, PATH]``, ``Annotated[str, URL]`` or ``Annotated[str, HOST]`` are
canonicalised by the supervisor before any caveat is evaluated. A keyword-only parameter
``ctx: ToolContext`` is not part of the schema: the tool worker fills it in.

A tool whose parameters are a JSON Schema (an MCP ``inputSchema``, an OpenAI function's
``parameters``) is declared with ``tool_from_schema``; ``runtime.schema`` says which part
of JSON Schema is enforced.
"""

from __future__ import annotations

import copy
import fcntl
import importlib
import inspect
import json
import shutil
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Iterator, get_args, get_origin

from .sandbox.context import ToolContext
from .schema import SchemaError, params_from_schema
from pydantic import ValidationError

from .trusted.capability import EFFECTS
from .trusted.policy import OutputRule
from .trusted.wire import ParamSpec, ToolSpec

__all__ = ["HOST", "PATH", "URL", "SchemaError", "Tool", "ToolContext", "tool", "tool_from_schema",
           "tools_in_module", "load_tools"]

PATH = "path"
URL = "url"
HOST = "host"  # a bare host name or IP address ('www.example.com'), lower-cased and checked like a URL's host

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
        fmt = next((m for m in meta if m in (PATH, URL, HOST)), None)
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
    elif fmt == HOST:
        schema["format"] = "hostname"
    items = None
    if origin is list and get_args(annotation):  # list[int]: every item is checked (and canonicalised) too
        items, schema["items"] = _param(get_args(annotation)[0], inspect.Parameter.empty)
    required = default is inspect.Parameter.empty
    if json_type == "number" and type(default) is int:
        default = float(default)  # as the supervisor would make a passed value: x: float = 1 gives 1.0
    spec = ParamSpec(type=json_type, required=required, default=None if required else default, format=fmt,
                     nullable=optional, items=items)
    if not required and default is not None:
        schema["default"] = default
    return spec, schema


def tool(*, effect: str, name: str | None = None, cost: float = 1.0, sandboxed: bool = False,
         output: dict[str, Any] | None = None) -> Callable[[Callable[..., Any]], Tool]:
    """Declare a tool. ``effect`` is one of read / write / delete / execute.

    ``sandboxed=True``: the tool runs code or touches files, and gets ``ctx.sandbox`` (the
    calling agent's sandbox session and workspace, with the limits of its policy).
    ``output``: the label of its results unless the job file or a policy says otherwise
    (``{"integrity": "trusted", "readers": [...], "hide": True, "trusted_items": {...}}``, the
    keys of a policy's ``output``); none: untrusted and public.
    """
    if effect not in EFFECTS:
        raise ValueError(f"effect must be one of {EFFECTS}, not {effect!r}")
    declared = _output_rule(name, output)

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
        return Tool(fn, ToolSpec(tool_name, effect, params, cost, doc, sandboxed, declared), schema, wants_ctx)

    return wrap


def _output_rule(name: str | None, output: dict[str, Any] | None) -> Any:
    """``output`` checked as a policy's ``output`` is (ValueError naming the fault)."""
    if output is None:
        return None
    try:
        return OutputRule.model_validate(output)
    except ValidationError as exc:
        raise ValueError(f"tool {name}: output: " + "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors())) from None


def tool_from_schema(name: str, schema: dict[str, Any], fn: Callable[..., Any], *, effect: str,
                     description: str | None = None, cost: float = 1.0, sandboxed: bool = False,
                     unenforced: Iterable[str] = (), output: dict[str, Any] | None = None) -> Tool:
    """Declare a tool from a JSON Schema of its arguments and a callable that takes them as keywords.

    ``schema`` is an object schema (``{"type": "object", "properties": {...}, "required": [...]}``,
    the shape of an MCP ``inputSchema`` or an OpenAI function's ``parameters``); the model sees
    it as given. The supervisor checks and canonicalises every call against it as it does a
    ``@tool`` function's parameters; what of JSON Schema is enforced is in ``runtime.schema``,
    and anything else is a ``SchemaError`` here, unless named in ``unenforced`` (a few
    validation keywords such as ``pattern``: the model sees them, nothing checks them). ``fn`` gets the canonical arguments as keyword
    arguments (an optional argument the call left out and that has no default is left out),
    plus ``ctx`` if it has a parameter of that name. Put the returned ``Tool`` at the top level
    of a module named in the job's ``tools:``, as you would a ``@tool`` function.
    """
    if not isinstance(name, str) or not name:
        raise SchemaError("a tool needs a non-empty name")
    if effect not in EFFECTS:
        raise ValueError(f"effect must be one of {EFFECTS}, not {effect!r}")
    try:
        params = params_from_schema(schema, unenforced)
    except SchemaError as exc:
        raise SchemaError(f"tool {name}: {exc}") from None
    wants_ctx = _check_callable(name, fn, params)
    if sandboxed and not wants_ctx:
        raise TypeError(f"tool {name}: a sandboxed tool needs a 'ctx' parameter")
    if description is None:
        description = schema.get("description") or (inspect.getdoc(fn) or "").split("\n\n")[0]
    openai = {"type": "function", "function": {"name": name, "description": description,
                                               "parameters": copy.deepcopy(schema)}}
    declared = _output_rule(name, output)
    return Tool(fn, ToolSpec(name, effect, params, cost, description, sandboxed, declared), openai, wants_ctx)


def _check_callable(name: str, fn: Callable[..., Any], params: dict[str, ParamSpec]) -> bool:
    """Whether ``fn`` wants ``ctx``; TypeError if it cannot be called with every argument the schema allows."""
    if not callable(fn):
        raise TypeError(f"tool {name}: {fn!r:.60} is not callable")
    sig = inspect.signature(fn)
    named = {n: p for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if "ctx" in params:
        raise SchemaError(f"tool {name}: an argument may not be called 'ctx' (the tool context)")
    if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()) and set(params) - set(named):
        raise TypeError(f"tool {name}: {fn.__name__} takes no argument {sorted(set(params) - set(named))}")
    needed = {n for n, p in named.items() if p.default is p.empty and n != "ctx"}
    if needed - {n for n, p in params.items() if p.required or p.default is not None or p.nullable}:
        raise TypeError(f"tool {name}: {fn.__name__} needs {sorted(needed)}, which the schema does not require")
    return "ctx" in named


@contextmanager
def run_state(ctx: ToolContext, name: str, seed: str | Path, *, write: bool = False) -> Iterator[dict[str, Any]]:
    """The JSON document ``<run dir>/<name>.json`` that a job's tool calls share (a demo's chat, a test's
    world), created from the file ``seed`` on first use, held under a file lock (several tool workers
    may use it at once) and, with ``write``, saved back (whole, by rename) when the block ends."""
    run_dir = Path(ctx.config["run_dir"])
    store = run_dir / f"{name}.json"
    with open(run_dir / f"{name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not store.exists():
            shutil.copyfile(seed, store)
        data = json.loads(store.read_text())
        yield data
        if write:
            tmp = store.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(store)


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
