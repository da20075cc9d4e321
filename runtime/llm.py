"""The LLM seam: one small Protocol between agents and whatever model proposes tool calls.

An agent talks to a model only through ``ChatModel.complete(messages, tools)``, which
returns a ``ModelTurn`` (text and/or proposed tool calls). Messages are plain OpenAI
chat-format dicts and tools are OpenAI function-calling schemas, so any OpenAI-compatible
server (vLLM, Ollama, OpenAI) fits behind ``OpenAIChatModel``, and ``ScriptedModel`` is a
deterministic fake for demos, job files and tests.

Threat: model output is untrusted. Nothing here authorises anything; ``run_tool_loop``
hands every proposed call to ``call_tool`` (in Warden, the trusted supervisor). Invariants:

- garbage from the model never crashes the loop: unparsable tool arguments become a
  ``ToolCallRequest`` with ``arguments == {}`` and ``parse_error`` set; the loop does not
  dispatch it and feeds ``{"error": "MALFORMED: ..."}`` back as the tool result;
- a Warden denial reaches the model only as ``{"error": e.public()}`` (code and tool),
  never ``str(e)``, which carries audit-only values;
- tool results are size-capped before they enter the context;
- the API key never appears in an error message or repr, and is never sent to another
  host (redirects are not followed; the environment's proxy settings are not used);
- tool names on the wire match ``^[a-zA-Z0-9_-]{1,64}$`` (``ToolNames``): Warden's dotted
  names are mapped one to one and mapped back on the way in, so the rest of Warden only
  ever sees its own names;
- a handle in a tool result (``{"$handle": "h_...", "label", "bytes", "tool"}``: a reference
  the supervisor gave instead of hidden content) reaches the model as JSON it can copy, even
  when the result is cut to size (the handles are then listed after the cut); handles in
  the model's arguments go to ``call_tool`` unchanged. Nothing here decides what a handle
  may do: the supervisor resolves it, checks it is this agent's, and labels the argument.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import itertools
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Literal, NamedTuple, Protocol, Union

from .trusted.flow import HANDLE_KEYS  # what makes a dict a handle reference, as the supervisor reads it

MAX_TOOL_RESULT_BYTES = 16 * 1024
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
_EXCERPT_CHARS = 300
EXHAUSTED_ANSWER = "(script exhausted)"


class ModelError(Exception):
    """The model backend failed: HTTP error, timeout, unreachable, or an unusable response."""

    def __init__(self, message: str, *, status: int | None = None, body_excerpt: str = "") -> None:
        self.status = status
        self.body_excerpt = body_excerpt
        text = message if status is None else f"{message}: HTTP {status}"
        super().__init__(f"{text}: {body_excerpt}" if body_excerpt else text)


@dataclass
class ToolCallRequest:
    """One call the model proposed. ``parse_error`` set means: do not dispatch."""

    id: str
    name: str
    arguments: dict[str, Any]
    parse_error: str | None = None


@dataclass
class ModelTurn:
    content: str | None
    tool_calls: list[ToolCallRequest] = field(default_factory=list)
    usage: dict[str, int] | None = None  # prompt/completion token counts, when the backend reports them


class ChatModel(Protocol):
    async def complete(self, messages: list[dict], tools: list[dict]) -> ModelTurn: ...


def parse_tool_call(raw: Any, fallback_id: str) -> ToolCallRequest:
    """Turn one OpenAI ``tool_calls[]`` entry into a request; never raises on bad input."""
    raw = raw if isinstance(raw, dict) else {}
    call_id = raw.get("id") if isinstance(raw.get("id"), str) and raw.get("id") else fallback_id
    fn = raw.get("function") if isinstance(raw.get("function"), dict) else {}
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        return ToolCallRequest(call_id, "", {}, "tool call has no function name")
    args, error = parse_arguments(fn.get("arguments"))
    return ToolCallRequest(call_id, name, args, error)


def parse_arguments(raw: Any) -> tuple[dict[str, Any], str | None]:
    """Arguments arrive as a JSON string (some servers send an object). Returns (args, error)."""
    if isinstance(raw, dict):
        return raw, None
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}, None  # some servers send "" for a call without parameters
    if not isinstance(raw, str):
        return {}, f"arguments must be a JSON string, got {type(raw).__name__}"
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return {}, "arguments are not valid JSON"
    if not isinstance(value, dict):
        return {}, f"arguments must be a JSON object, got {type(value).__name__}"
    return value, None


API_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # what the OpenAI API accepts as a function name
_NOT_API = re.compile(r"[^a-zA-Z0-9_-]")


class ToolNames:
    """Warden tool names <-> function names the OpenAI API accepts, one to one over a set of tools.

    A name that fits ``API_TOOL_NAME`` keeps itself. Any other has each character outside
    ``[a-zA-Z0-9_-]`` replaced by ``_`` and is cut to 64 (``chat.read`` -> ``chat_read``);
    if another tool already has that name, it becomes its first 55 characters, ``_`` and 8 hex
    digits of a SHA-256 of the Warden name. Names that fit are placed first, the others in
    sorted order, so the mapping depends only on the set of names (the same every turn) and no
    two tools share a wire name. ``from_api`` maps back; a wire name no tool has comes back
    unchanged, and the supervisor refuses it like any unknown tool (``UNKNOWN_TOOL``).
    """

    def __init__(self, names: Iterable[str]) -> None:
        names = sorted(set(names))
        self._to_api = {n: n for n in names if API_TOOL_NAME.fullmatch(n)}
        for name in names:
            if name not in self._to_api:
                self._to_api[name] = self._free(name, set(self._to_api.values()))
        self._from_api = {api: name for name, api in self._to_api.items()}

    @staticmethod
    def _free(name: str, taken: set[str]) -> str:
        api = _NOT_API.sub("_", name)[:64] or "_"
        for i in itertools.count():
            if api not in taken:
                return api
            digest = hashlib.sha256(f"{i}:{name}".encode("utf-8", "surrogatepass")).hexdigest()[:8]
            api = f"{_NOT_API.sub('_', name)[:55]}_{digest}"
        raise AssertionError("unreachable")

    def to_api(self, name: str) -> str:
        """The wire name of a tool (of a name no tool has, as in a model's bogus call: a fitting name no tool uses)."""
        return self._to_api.get(name) or self._free(name, set(self._from_api))

    def from_api(self, name: str) -> str:
        return self._from_api.get(name, name)

    def tools(self, tools: list[dict]) -> list[dict]:
        """``tools`` with their wire names (copies; the caller's schemas are not touched)."""
        return [{**t, "function": {**t["function"], "name": self.to_api(t["function"]["name"])}} for t in tools]

    def messages(self, messages: list[dict]) -> list[dict]:
        """``messages`` with the wire names in assistant tool calls (copies where a name changes)."""
        out = []
        for m in messages:
            calls = m.get("tool_calls") if isinstance(m, dict) else None
            if isinstance(calls, list):
                m = {**m, "tool_calls": [self._call(c) for c in calls]}
            out.append(m)
        return out

    def _call(self, call: Any) -> Any:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            return call
        return {**call, "function": {**fn, "name": self.to_api(fn["name"])}}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[override]
        return None  # a redirect would carry the Authorization header to another URL


class OpenAIChatModel:
    """An OpenAI-compatible ``/chat/completions`` backend (vLLM, Ollama, OpenAI).

    Blocking urllib runs in ``asyncio.to_thread``. ``timeout_s`` bounds each socket
    operation. The key is taken from ``api_key`` or, at construction, from the environment
    variable named by ``api_key_env``.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout_s: float = 60.0,
        temperature: float = 0.0,
        max_tokens: int | None = None,
        extra_headers: dict[str, str] | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        if api_key is None and api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ValueError(f"environment variable {api_key_env} (api_key_env) is not set")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout_s = timeout_s
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_response_bytes = max_response_bytes
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        self._headers.update(extra_headers or {})
        self._api_key = api_key
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)

    def __repr__(self) -> str:
        return f"OpenAIChatModel(url={self.url!r}, model={self.model!r})"

    async def complete(self, messages: list[dict], tools: list[dict]) -> ModelTurn:
        names = ToolNames(t["function"]["name"] for t in tools)
        body: dict[str, Any] = {"model": self.model, "messages": names.messages(messages),
                                "temperature": self.temperature}
        if tools:
            body["tools"] = names.tools(tools)
            body["tool_choice"] = "auto"
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        data = await asyncio.to_thread(self._post, json.dumps(body).encode())
        turn = self._parse(data)
        for call in turn.tool_calls:
            call.name = names.from_api(call.name) if call.name else call.name
        return turn

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "[redacted]") if self._api_key else text

    def _excerpt(self, raw: bytes) -> str:
        return self._redact(raw[: _EXCERPT_CHARS * 4].decode("utf-8", "replace")[:_EXCERPT_CHARS])

    def _post(self, payload: bytes) -> bytes:
        req = urllib.request.Request(self.url, data=payload, headers=self._headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                raw = resp.read(self.max_response_bytes + 1)
        except urllib.error.HTTPError as e:
            try:
                excerpt = self._excerpt(e.read(_EXCERPT_CHARS * 4))
            except OSError:
                excerpt = ""
            raise ModelError(
                f"model request to {self.url} failed", status=e.code, body_excerpt=excerpt
            ) from None
        except urllib.error.URLError as e:
            raise ModelError(f"model request to {self.url} failed: {self._redact(str(e.reason))}") from None
        except (TimeoutError, OSError) as e:
            kind = "timed out" if isinstance(e, TimeoutError) else f"failed: {type(e).__name__}"
            raise ModelError(f"model request to {self.url} {kind}") from None
        if len(raw) > self.max_response_bytes:
            raise ModelError(f"model response larger than {self.max_response_bytes} bytes")
        return raw

    def _parse(self, raw: bytes) -> ModelTurn:
        try:
            data = json.loads(raw)
            message = data["choices"][0]["message"]
            if not isinstance(message, dict):
                raise TypeError("message is not an object")
        except (ValueError, RecursionError, KeyError, IndexError, TypeError) as e:
            raise ModelError(
                f"unusable model response ({type(e).__name__})", body_excerpt=self._excerpt(raw)
            ) from None
        content = message.get("content")
        calls = message.get("tool_calls") or []
        calls = calls if isinstance(calls, list) else []
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
        return ModelTurn(
            content=content if isinstance(content, str) else None,
            tool_calls=[parse_tool_call(c, f"call_{i}") for i, c in enumerate(calls)],
            usage=usage,
        )


# ------------------------------------------------------------------------------ handles

HANDLE_KEY = "$handle"  # a handle as the supervisor returns it: {"$handle": "h_<hex>", "label", "bytes", "tool"}
HANDLE_OF = "$handle_of"  # a scripted step's reference to a handle from an earlier result
HANDLES_MARKER = "[handles in this result: "
MAX_LISTED_HANDLES = 64
_MAX_WALK_DEPTH = 32
_HANDLE_ID = re.compile(r'"\$handle"\s*:\s*"(h_[0-9A-Za-z]{1,64})"')
_REF_FORMS = ("object", "ref", "id")

HANDLE_GUIDE = """\
About handles. Some tool results are handles instead of content: a JSON object such as
{"$handle": "h_0123456789ab", "label": {"integrity": "untrusted", "readers": "public"}, "bytes": 1234, "tool": "email.read"}.
A handle stands for data the system keeps out of this conversation; you do not see it and do not need to.
To use that data, pass the handle as the value of a tool argument: the whole object as you received it,
or just {"$handle": "h_0123456789ab"}, as an argument of its own or as an item of a list argument.
The tool receives the content. Copy handles exactly; never write one as a plain string, change it or
make one up: only the handles given to you work. "label" says how trusted the data is (integrity) and
who may read it (readers), "bytes" its size, "tool" the tool it came from.
The tool handle.reveal (argument "handle") shows you the content, at a cost: everything you do after
that counts as influenced by that data, so consequential actions (sending, paying, deleting) may be
refused or need a human's approval. Reveal a handle only when you must read the content yourself.
When you need one fact from the data (an amount, a date, yes or no, one of a few choices), ask the
reader instead, if you have the tool reader.ask (arguments "handle", "question", "schema"): a separate
model reads the content and the system checks its answer against the schema, and your context stays
as it is. A free-text answer ({"type": "string"}) comes back as a new handle."""


def is_handle(value: Any) -> bool:
    """Whether ``value`` is a handle: a hidden result the supervisor keeps (pass it as an argument)."""
    return type(value) is dict and isinstance(value.get(HANDLE_KEY), str) and value.keys() <= HANDLE_KEYS


def is_handle_ref(value: Any) -> bool:
    """A handle as the supervisor reads one (``is_handle``: ``$handle`` and nothing but ``label``,
    ``bytes``, ``tool`` beside it), with an id of the supervisor's form ``h_...``."""
    return is_handle(value) and value[HANDLE_KEY].startswith("h_")


def handles_in(value: Any) -> list[dict]:
    """The handle references inside a tool result, in JSON order (a handle, or lists and dicts holding them)."""
    found: list[dict] = []

    def walk(v: Any, depth: int) -> None:
        if depth > _MAX_WALK_DEPTH:
            return
        if is_handle_ref(v):
            found.append(v)
        elif isinstance(v, dict):
            for item in v.values():
                walk(item, depth + 1)
        elif isinstance(v, (list, tuple)):
            for item in v:
                walk(item, depth + 1)

    walk(value, 0)
    return found


def with_handle_guide(system: str | None) -> str:
    """The job's system prompt followed by ``HANDLE_GUIDE`` (what a handle is, how to pass one on)."""
    return f"{system}\n\n{HANDLE_GUIDE}" if system else HANDLE_GUIDE


def handles_in_text(content: Any) -> list[dict]:
    """The handles in a tool message as the model saw it: its JSON, else the list after a cut, else the
    ids written in it (``{"$handle": id}`` each)."""
    if not isinstance(content, str):
        return handles_in(content)
    try:
        return handles_in(json.loads(content))
    except (ValueError, RecursionError):
        pass
    at = content.rfind("\n" + HANDLES_MARKER)
    if at >= 0:
        listed = content[at + 1 + len(HANDLES_MARKER):]
        try:
            return handles_in(json.JSONDecoder().raw_decode(listed)[0])
        except (ValueError, RecursionError):
            pass
    return [{HANDLE_KEY: h} for h in _HANDLE_ID.findall(content)]


class ScriptError(ValueError):
    """A scripted step cannot be played: a ``$handle_of`` that names no handle the model has seen."""


TASK_HANDLES = "(task)"  # ``$handle_of`` name of the handles in the task (a delegator passes them so)


def _results_seen(messages: list[dict]) -> list[tuple[str, str, list[dict]]]:
    """(tool, call id, handles) for every tool result in ``messages``, oldest first; the task (a user
    message) counts as a result of ``(task)``."""
    names = {c.get("id"): (c.get("function") or {}).get("name", "?")
             for m in messages if m.get("role") == "assistant" for c in m.get("tool_calls") or [] if isinstance(c, dict)}
    return [(names.get(m.get("tool_call_id"), "?"), str(m.get("tool_call_id")), handles_in_text(m.get("content")))
            if m.get("role") == "tool" else (TASK_HANDLES, "task", handles_in_text(m.get("content")))
            for m in messages if m.get("role") in ("tool", "user")]


def _check_ref(ref: dict, where: str) -> None:
    if extra := ref.keys() - {HANDLE_OF, "index", "as"}:
        raise ValueError(f"{where}: a {HANDLE_OF} reference takes only {HANDLE_OF}, index and as; "
                         f"unknown keys {sorted(extra)}")
    target, index = ref[HANDLE_OF], ref.get("index", 0)
    if not ((isinstance(target, str) and target) or type(target) is int):
        raise ValueError(f"{where}: {HANDLE_OF} must be a tool name or an integer position, got {target!r}")
    if "index" in ref and (type(index) is not int or not isinstance(target, str)):
        raise ValueError(f"{where}: 'index' (an integer) goes only with {HANDLE_OF}: TOOL")
    if ref.get("as", "object") not in _REF_FORMS:
        raise ValueError(f"{where}: 'as' must be one of {list(_REF_FORMS)}, got {ref.get('as')!r}")


def _walk_refs(value: Any, where: str, fn: Callable[[dict, str], Any], depth: int = 0) -> Any:
    """``value`` with every ``$handle_of`` dict replaced by ``fn(ref, where)``."""
    if depth > _MAX_WALK_DEPTH:
        return value
    if isinstance(value, dict):
        if HANDLE_OF in value:
            return fn(value, where)
        return {k: _walk_refs(v, f"{where}.{k}", fn, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk_refs(v, f"{where}[{i}]", fn, depth + 1) for i, v in enumerate(value)]
    return value


def _resolve_ref(ref: dict, where: str, seen: list[tuple[str, str, list[dict]]]) -> Any:
    _check_ref(ref, where)
    target = ref[HANDLE_OF]
    if isinstance(target, str):
        calls = [(cid, hs) for tool, cid, hs in seen if tool == target]
        if not calls:
            raise ScriptError(f"{where}: {{{HANDLE_OF!r}: {target!r}}}: the model has seen no result of {target!r}")
        call_id, handles = calls[-1]
        index = ref.get("index", 0)
        if not -len(handles) <= index < len(handles):
            raise ScriptError(f"{where}: {{{HANDLE_OF!r}: {target!r}}}: the latest result of {target!r} (call "
                              f"{call_id}) holds {len(handles)} handle(s), no index {index}")
        handle = handles[index]
    else:
        handles = [h for _, _, hs in seen for h in hs]
        if not -len(handles) <= target < len(handles):
            raise ScriptError(f"{where}: {{{HANDLE_OF!r}: {target}}}: the model has seen {len(handles)} handle(s)")
        handle = handles[target]
    form = ref.get("as", "object")
    return dict(handle) if form == "object" else {HANDLE_KEY: handle[HANDLE_KEY]} if form == "ref" else handle[HANDLE_KEY]


Step = Union[dict, Callable[[list[dict]], Any]]
_STEP_KEYS = {"call", "calls", "answer", "answer_from_results"}


class ScriptedModel:
    """A deterministic model that plays a script, one step per ``complete`` call.

    Steps (plain data, so a job file can embed them; extra keys are an error):

    - ``{"call": NAME, "args": {...}, "content": TEXT?, "id": ID?}``: one tool call;
      ``args`` may also be a JSON string, parsed like a real server's (to script garbage);
    - ``{"calls": [{"name": NAME, "args": {...}, "id": ID?}, ...], "content": TEXT?}``;
    - ``{"answer": TEXT}``: a final answer;
    - ``{"answer_from_results": true | TEMPLATE}``: a final answer built from the tool
      messages since the last assistant turn, joined by newlines; a TEMPLATE string has
      ``{results}`` replaced by them;
    - a callable ``messages -> ModelTurn | step dict | str`` (a str is a final answer).

    Handles: anywhere in a call's ``args`` (an argument's value, an item of a list, a value
    inside a dict), a reference ``{"$handle_of": ...}`` is replaced, when the step is played,
    by a handle from a tool result the model has seen in ``messages`` (results of this turn's
    earlier calls are not seen yet):

    - ``{"$handle_of": "email.read"}``: the handle in the result of the latest call of that
      tool (with several in that result, the first; ``"index": i`` picks another, negative
      counting from the end);
    - ``{"$handle_of": -1}``: the latest handle seen in any result (``-2`` the one before,
      ``0`` the first ever);
    - ``{"$handle_of": "(task)"}``: a handle in the task (a delegator passes handles so);
    - ``"as"``: ``"object"`` (default; the handle as the model saw it, label and all),
      ``"ref"`` (``{"$handle": "h_..."}`` only) or ``"id"`` (the bare ``"h_..."`` string, which
      is not a handle reference to the supervisor: to script a model that gets it wrong).

    A reference that names no handle the model has seen raises ``ScriptError`` (a
    ``ValueError``) naming the step, the argument and what was there; a malformed one is
    refused at construction.

    Call ids default to ``call_<turn>_<index>``. After the last step every turn answers
    ``"(script exhausted)"``. ``seen`` holds a copy of the messages of every call.
    """

    def __init__(self, steps: list[Step]) -> None:
        if not isinstance(steps, list):
            raise ValueError("ScriptedModel steps must be a list")
        for i, step in enumerate(steps):
            if not callable(step):
                _check_step(step, f"step {i}")
        self.steps = list(steps)
        self.seen: list[list[dict]] = []
        self.tools_seen: list[list[dict]] = []

    @property
    def turns(self) -> int:
        return len(self.seen)

    async def complete(self, messages: list[dict], tools: list[dict]) -> ModelTurn:
        turn = len(self.seen)
        self.seen.append(copy.deepcopy(messages))
        self.tools_seen.append(copy.deepcopy(tools))
        if turn >= len(self.steps):
            return ModelTurn(EXHAUSTED_ANSWER)
        step = self.steps[turn]
        if callable(step):
            step = step(copy.deepcopy(messages))
            if isinstance(step, ModelTurn):
                return step
            if isinstance(step, str):
                return ModelTurn(step)
            _check_step(step, f"step {turn} (callable result)")
        return _play(step, turn, messages)


def _check_step(step: Any, where: str) -> None:
    if not isinstance(step, dict):
        raise ValueError(f"{where}: a step must be a dict or a callable, got {type(step).__name__}")
    kinds = _STEP_KEYS & step.keys()
    if len(kinds) != 1:
        raise ValueError(f"{where}: needs exactly one of {sorted(_STEP_KEYS)}")
    kind = kinds.pop()
    allowed = {"call": {"call", "args", "content", "id"}, "calls": {"calls", "content"}}.get(kind, {kind})
    if extra := step.keys() - allowed:
        raise ValueError(f"{where}: unknown keys {sorted(extra)}")
    calls = [step] if kind == "call" else step.get("calls", [])
    if kind == "calls" and (not isinstance(calls, list) or not calls):
        raise ValueError(f"{where}: 'calls' must be a non-empty list")
    for c in calls:
        name = c.get("call" if kind == "call" else "name") if isinstance(c, dict) else None
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: every call needs a tool name")
        if kind == "calls" and (extra := c.keys() - {"name", "args", "id"}):
            raise ValueError(f"{where}: unknown call keys {sorted(extra)}")
        if isinstance(c.get("args"), (dict, list)):
            _walk_refs(c["args"], f"{where} args", _check_ref)
    if kind == "answer" and not isinstance(step["answer"], str):
        raise ValueError(f"{where}: 'answer' must be a string")
    if kind == "answer_from_results" and not (step[kind] is True or isinstance(step[kind], str)):
        raise ValueError(f"{where}: 'answer_from_results' must be true or a template string")


def _play(step: dict, turn: int, messages: list[dict]) -> ModelTurn:
    if "answer" in step:
        return ModelTurn(step["answer"])
    if "answer_from_results" in step:
        results = "\n".join(str(m.get("content", "")) for m in _latest_tool_messages(messages))
        template = step["answer_from_results"]
        return ModelTurn(template.replace("{results}", results) if isinstance(template, str) else results)
    if "call" in step:
        specs = [{"name": step["call"], "args": step.get("args"), "id": step.get("id")}]
    else:
        specs = step["calls"]
    calls = []
    seen = _results_seen(messages)
    for i, spec in enumerate(specs):
        args, error = parse_arguments(spec.get("args") or {})
        if error is None:
            args = _walk_refs(args, f"step {turn} call {i} ({spec['name']}) args",
                              lambda ref, where: _resolve_ref(ref, where, seen))
        calls.append(ToolCallRequest(spec.get("id") or f"call_{turn}_{i}", spec["name"], args, error))
    return ModelTurn(step.get("content"), calls)


def _latest_tool_messages(messages: list[dict]) -> list[dict]:
    out: list[dict] = []
    for m in reversed(messages):
        if m.get("role") != "tool":
            break
        out.append(m)
    return out[::-1]


class CallRecord(NamedTuple):
    name: str
    args: dict[str, Any]
    ok: bool
    error_code: str | None


@dataclass
class LoopResult:
    answer: str | None
    turns: int
    calls: list[CallRecord]
    stopped: Literal["answer", "max_turns"]
    messages: list[dict] = field(default_factory=list)


def _result_text(result: Any, max_bytes: int) -> str:
    text = result if isinstance(result, str) else json.dumps(result, default=str, ensure_ascii=False)
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    kept = raw[:max_bytes].decode("utf-8", "ignore")
    out = f"{kept}\n[truncated: {len(raw) - max_bytes} more bytes]"
    handles = [] if isinstance(result, str) else handles_in(result)
    if handles:  # a handle cut in half is useless to the model: list them whole after the cut
        shown = handles[:MAX_LISTED_HANDLES]
        more = f" (and {len(handles) - len(shown)} more)" if len(handles) > len(shown) else ""
        out += f"\n{HANDLES_MARKER}{json.dumps(shown, default=str, ensure_ascii=False)}]{more}"
    return out


def _assistant_message(turn: ModelTurn) -> dict:
    msg: dict[str, Any] = {"role": "assistant", "content": turn.content}
    if turn.tool_calls:
        msg["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
            }
            for c in turn.tool_calls
        ]
    return msg


async def run_tool_loop(
    model: ChatModel,
    *,
    task: str,
    tools: list[dict],
    call_tool: Callable[[str, dict], Awaitable[Any]],
    system: str | None = None,
    max_turns: int = 8,
    max_result_bytes: int = MAX_TOOL_RESULT_BYTES,
) -> LoopResult:
    """Let the model call tools until it answers (a turn without calls) or ``max_turns``.

    A turn is one ``complete`` call; its tool calls run in order before the next turn,
    including on the last turn. Results go back as ``tool`` messages (strings verbatim,
    anything else JSON, capped at ``max_result_bytes``). An exception with ``public()``
    becomes ``{"error": e.public()}`` and the loop goes on; any other exception propagates.
    """
    if max_turns < 1:
        raise ValueError("max_turns must be at least 1")
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": task})
    calls: list[CallRecord] = []
    for turn_no in range(1, max_turns + 1):
        turn = await model.complete(messages, tools)
        messages.append(_assistant_message(turn))
        if not turn.tool_calls:
            return LoopResult(turn.content, turn_no, calls, "answer", messages)
        for call in turn.tool_calls:
            if call.parse_error:
                content = json.dumps({"error": f"MALFORMED: {call.parse_error}"})
                calls.append(CallRecord(call.name, {}, False, "MALFORMED"))
            else:
                try:
                    result = await call_tool(call.name, call.arguments)
                except Exception as e:
                    if not callable(getattr(e, "public", None)):
                        raise
                    code = getattr(e, "code", None)
                    content = json.dumps({"error": e.public()})
                    calls.append(CallRecord(call.name, call.arguments, False, getattr(code, "value", code)))
                else:
                    content = _result_text(result, max_result_bytes)
                    calls.append(CallRecord(call.name, call.arguments, True, None))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": content})
    return LoopResult(None, max_turns, calls, "max_turns", messages)


# ------------------------------------------------------------------------------ scripted reader

_RULE_KINDS = ("extract", "answer", "text")
_TRUE, _FALSE = {"true", "yes", "y", "1"}, {"false", "no", "n", "0"}
_NUMBER = re.compile(r"[-+]?\d[\d,_ ]*(?:\.\d+)?|[-+]?\.\d+")


class ScriptedReader:
    """A deterministic reader model: answers from rules on the question and the data, no real model.

    ``rules`` are tried in order; a rule applies when its ``question`` regex is found in the question
    (case-insensitive) and it can answer:

    - ``{"question": REGEX, "extract": REGEX}``: the first match of ``extract`` in the data (its one
      group, or the whole match), coerced to the schema's type where obvious: ``"1,240.50"`` is
      ``1240.5`` for a number or integer schema, ``yes``/``no`` a boolean, a case-insensitive match
      of an enum value that value; for an array schema, every match (up to ``maxItems``). Like a
      model, it takes what it finds first: a value an attacker placed earlier in the data wins.
      No match: the rule does not apply;
    - ``{"question": REGEX, "answer": VALUE}``: ``VALUE`` (any JSON value);
    - ``{"question": REGEX, "text": TEXT}``: ``TEXT`` as the model's raw output (to script a model that
      writes prose or broken JSON).

    No rule applies: ``default`` if given, else a ``ModelError``. The answer is written as JSON, as a
    real reader is asked to. A rule may add ``delay_s`` (seconds before it answers: a slow model).
    ``seen`` holds each question asked.
    """

    def __init__(self, rules: list[dict], default: Any = ...) -> None:
        if not isinstance(rules, list):
            raise ValueError("scripted reader 'rules' must be a list")
        self.rules = [self._check(r, f"rule {i}") for i, r in enumerate(rules)]
        self.default = default
        self.seen: list[str] = []

    @staticmethod
    def _check(rule: Any, where: str) -> tuple[re.Pattern[str], str, Any, float]:
        if not isinstance(rule, dict):
            raise ValueError(f"{where}: a rule is a mapping with 'question' and one of {list(_RULE_KINDS)}")
        kinds = [k for k in _RULE_KINDS if k in rule]
        delay = rule.get("delay_s", 0)
        if type(delay) not in (int, float) or not 0 <= delay <= 3600:
            raise ValueError(f"{where}: delay_s must be a number of seconds (0 to 3600)")
        if len(kinds) != 1 or set(rule) - {"question", "delay_s", *_RULE_KINDS}:
            raise ValueError(f"{where}: takes 'question' and exactly one of {list(_RULE_KINDS)}; "
                             f"got {sorted(rule)}")
        question, kind = rule.get("question", ""), kinds[0]
        try:
            pattern = re.compile(question, re.IGNORECASE)
        except (re.error, TypeError) as exc:
            raise ValueError(f"{where}: question is not a regex: {exc}") from None
        value = rule[kind]
        if kind == "extract":
            try:
                value = re.compile(value)
            except (re.error, TypeError) as exc:
                raise ValueError(f"{where}: extract is not a regex: {exc}") from None
            if value.groups > 1:
                raise ValueError(f"{where}: extract has {value.groups} groups; at most one")
        elif kind == "text" and not isinstance(value, str):
            raise ValueError(f"{where}: text must be a string")
        return pattern, kind, value, float(delay)

    async def complete(self, messages: list[dict], tools: list[dict]) -> ModelTurn:
        from .reader import prompt_parts

        try:
            content, question, schema = prompt_parts(messages)
        except ValueError as exc:
            raise ModelError(f"scripted reader: {exc}") from None
        self.seen.append(question)
        for pattern, kind, value, delay_s in self.rules:
            if not pattern.search(question):
                continue
            if delay_s:
                await asyncio.sleep(delay_s)  # a slow model: nothing to wait for but time
            if kind == "text":
                return ModelTurn(value)
            if kind == "answer":
                return ModelTurn(json.dumps(value))
            found = _extract(value, content, schema)
            if found is not None:
                return ModelTurn(json.dumps(found))
        if self.default is not ...:
            return ModelTurn(json.dumps(self.default))
        raise ModelError(f"scripted reader: no rule answers the question {question!r:.120}")


def _extract(pattern: re.Pattern[str], content: str, schema: Any) -> Any:
    schema = schema if isinstance(schema, dict) else {}
    matches = [m.group(1) if pattern.groups else m.group(0) for m in pattern.finditer(content)]
    matches = [m for m in matches if m is not None]
    if not matches:
        return None
    if schema.get("type") == "array":
        n = schema.get("maxItems") if type(schema.get("maxItems")) is int else len(matches)
        return [_coerce(m, schema.get("items")) for m in matches[:n]]
    return _coerce(matches[0], schema)


def _coerce(text: str, schema: Any) -> Any:
    """``text`` as the schema's type, where the conversion is obvious; else ``text``."""
    schema, text = (schema if isinstance(schema, dict) else {}), text.strip()
    kind = schema.get("type")
    if kind in ("number", "integer"):
        number = _NUMBER.search(text)
        if number is None:
            return text
        value = float(re.sub(r"[,_ ]", "", number.group(0)))
        return int(value) if kind == "integer" and value.is_integer() else value
    if kind == "boolean" and text.lower() in _TRUE | _FALSE:
        return text.lower() in _TRUE
    if isinstance(schema.get("enum"), list):
        for option in schema["enum"]:
            if isinstance(option, str) and option.lower() == text.lower():
                return option
            if isinstance(option, (int, float)) and not isinstance(option, bool):
                number = _NUMBER.fullmatch(text)
                if number and float(re.sub(r"[,_ ]", "", text)) == option:
                    return option
    return text


def model_from_config(cfg: dict) -> ChatModel:
    """Build a model from a job-file dict; unknown kinds and keys raise ``ValueError``.

    ``{"kind": "scripted", "steps": [...]}``, ``{"kind": "scripted", "rules": [...], "default"?: ...}``
    (a reader: ``ScriptedReader``) or ``{"kind": "openai", "base_url": ...,
    "model": ..., "api_key_env"?, "timeout_s"?, "temperature"?, "max_tokens"?,
    "extra_headers"?}``. A literal ``api_key`` is refused: job files must not hold secrets.
    """
    if not isinstance(cfg, dict):
        raise ValueError("model config must be a mapping")
    kind = cfg.get("kind")
    rest = {k: v for k, v in cfg.items() if k != "kind"}
    if kind == "scripted":
        if "rules" in rest:  # a reader: answers from rules on the question and the data
            if extra := set(rest) - {"rules", "default"}:
                raise ValueError(f"scripted reader config takes 'rules' and 'default'; unknown keys {sorted(extra)}")
            return ScriptedReader(rest["rules"], rest.get("default", ...))
        if set(rest) != {"steps"}:
            raise ValueError("scripted model config takes exactly one key: 'steps' (or, for a reader, "
                             "'rules' and optionally 'default')")
        return ScriptedModel(rest["steps"])
    if kind == "openai":
        if "api_key" in rest:
            raise ValueError("model config must not contain 'api_key'; name a variable with 'api_key_env'")
        allowed = {"base_url", "model", "api_key_env", "timeout_s", "temperature", "max_tokens",
                   "extra_headers"}
        if extra := set(rest) - allowed:
            raise ValueError(f"unknown openai model config keys: {sorted(extra)}")
        if missing := {"base_url", "model"} - set(rest):
            raise ValueError(f"openai model config needs {sorted(missing)}")
        base_url, model = rest.pop("base_url"), rest.pop("model")
        return OpenAIChatModel(base_url, model, **rest)
    raise ValueError(f"unknown model kind {kind!r}; expected 'scripted' or 'openai'")
