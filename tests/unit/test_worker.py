"""Tool worker (runs only what the supervisor signed) and the @tool decorator (schemas and specs)."""

import asyncio
import secrets
from typing import Annotated, Any

import msgpack
import pytest

from runtime.errors import ErrorCode, MalformedRequest, PolicyDenied
from runtime.sandbox.worker import MAX_DISPATCH_BYTES, MAX_RESULT_BYTES, ToolWorker
from runtime.testing import FakeClock
from runtime.tool import PATH, URL, Tool, ToolContext, load_tools, tool
from runtime.trusted.supervisor import sign_dispatch
from runtime.trusted.wire import ParamSpec

KEY = bytes(range(32))
JOB = "job-worker"
RAN: list[Any] = []


@tool(effect="read")
def echo(text: str, *, ctx: ToolContext) -> dict:
    """Echo the text with who asked."""
    RAN.append(("echo", text))
    return {"text": text, "agent": ctx.agent, "call_id": ctx.call_id, "job": ctx.job, "config": ctx.config}


@tool(effect="read")
async def aecho(text: str) -> str:
    """Async echo."""
    RAN.append(("aecho", text))
    await asyncio.sleep(0)
    return text.upper()


@tool(effect="write")
def fail(text: str) -> None:
    """Always raises."""
    RAN.append(("fail", text))
    raise ValueError(f"cannot handle {text}")


@tool(effect="read")
def weird() -> Any:
    """Returns something msgpack cannot encode."""
    RAN.append(("weird", None))
    return object()


@tool(effect="read")
def huge() -> str:
    """Returns more than a worker may hand back."""
    RAN.append(("huge", None))
    return "x" * (MAX_RESULT_BYTES + 1)


TOOLS = {t.name: t for t in (echo, aecho, fail, weird, huge)}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def worker(clock: FakeClock) -> ToolWorker:
    RAN.clear()
    return ToolWorker(dispatch_key=KEY, tools=TOOLS, job=JOB, tool_config={"run_dir": "run-dir"}, clock=clock)


def dispatch_body(clock: FakeClock, **changes: Any) -> dict[str, Any]:
    body = {"call_id": secrets.token_hex(8), "job": JOB, "agent": "alice", "tool": "echo",
            "args": {"text": "hi"}, "deadline": clock() + 30}
    body.update(changes)
    return body


def run(worker: ToolWorker, message: Any) -> dict[str, Any]:
    raw = asyncio.run(worker.execute(message))
    assert isinstance(raw, bytes)
    return msgpack.unpackb(raw, raw=False)


def assert_error(result: dict[str, Any], code: ErrorCode) -> str:
    assert result["ok"] is False
    assert result["error"]["code"] == code.value
    return result["error"]["reason"]


def assert_refused(worker: ToolWorker, message: Any) -> str:
    before = worker.refused
    reason = assert_error(run(worker, message), ErrorCode.DISPATCH_REFUSED)
    assert worker.refused == before + 1
    assert RAN == []
    assert worker.executed == 0
    return reason


# --------------------------------------------------------------------------- worker


def test_signed_dispatch_executes(worker, clock):
    body = dispatch_body(clock)
    result = run(worker, sign_dispatch(KEY, body))
    assert result == {"ok": True, "cost": None, "value": {
        "text": "hi", "agent": "alice", "call_id": body["call_id"], "job": JOB, "config": {"run_dir": "run-dir"}}}
    assert RAN == [("echo", "hi")]
    assert (worker.executed, worker.refused) == (1, 0)


def test_async_tool_executes(worker, clock):
    result = run(worker, sign_dispatch(KEY, dispatch_body(clock, tool="aecho", args={"text": "hi"})))
    assert result["ok"] is True and result["value"] == "HI"


def test_unsigned_dispatch_refused(worker, clock):
    body = msgpack.packb(dispatch_body(clock), use_bin_type=True)
    assert "undecodable" in assert_refused(worker, body)
    assert "does not verify" in assert_refused(worker, msgpack.packb([body, b""], use_bin_type=True))


def test_wrong_key_refused(worker, clock):
    reason = assert_refused(worker, sign_dispatch(secrets.token_bytes(32), dispatch_body(clock)))
    assert "not sent by the supervisor" in reason


def test_edited_body_refused(worker, clock):
    body_bytes, mac = msgpack.unpackb(sign_dispatch(KEY, dispatch_body(clock)), raw=False)
    body = msgpack.unpackb(body_bytes, raw=False)
    body["args"] = {"text": "something else"}
    edited = msgpack.packb([msgpack.packb(body, use_bin_type=True), mac], use_bin_type=True)
    assert_refused(worker, edited)


def test_replayed_call_id_refused(worker, clock):
    body = dispatch_body(clock)
    message = sign_dispatch(KEY, body)
    assert run(worker, message)["ok"] is True
    RAN.clear()
    before = worker.executed
    assert "replayed" in assert_error(run(worker, message), ErrorCode.DISPATCH_REFUSED)
    # Re-signed with a new deadline but the same call id: still a replay.
    again = sign_dispatch(KEY, {**body, "deadline": clock() + 60})
    assert "replayed" in assert_error(run(worker, again), ErrorCode.DISPATCH_REFUSED)
    assert RAN == [] and worker.executed == before and worker.refused == 2


def test_past_deadline_refused(worker, clock):
    message = sign_dispatch(KEY, dispatch_body(clock, deadline=clock() + 5))
    clock.advance(5.001)
    assert "deadline" in assert_refused(worker, message)


def test_wrong_job_refused(worker, clock):
    assert "worker serves" in assert_refused(worker, sign_dispatch(KEY, dispatch_body(clock, job="another-job")))


@pytest.mark.parametrize("message", [
    b"", b"\xc1garbage", None, "text", 42, [b"body", b"mac"],
    msgpack.packb(["body", "mac"]), msgpack.packb([b"a", b"b", b"c"]),
    b"\x00" * (MAX_DISPATCH_BYTES + 1),
], ids=["empty", "garbage", "none", "str", "int", "list", "str-envelope", "triple", "oversized"])
def test_garbage_refused(worker, message):
    assert_refused(worker, message)


def test_unknown_tool_in_signed_dispatch(worker, clock):
    result = run(worker, sign_dispatch(KEY, dispatch_body(clock, tool="rm_rf")))
    assert "no tool 'rm_rf'" in assert_error(result, ErrorCode.TOOL_FAILED)
    assert RAN == []


def test_tool_exception_is_tool_failed(worker, clock):
    result = run(worker, sign_dispatch(KEY, dispatch_body(clock, tool="fail", args={"text": "this"})))
    reason = assert_error(result, ErrorCode.TOOL_FAILED)
    assert reason.startswith("ValueError: cannot handle this at fail:")
    assert RAN == [("fail", "this")]


def test_unserialisable_result_is_tool_failed(worker, clock):
    result = run(worker, sign_dispatch(KEY, dispatch_body(clock, tool="weird", args={})))
    assert "TypeError" in assert_error(result, ErrorCode.TOOL_FAILED)


def test_oversized_result_is_tool_failed(worker, clock):
    result = run(worker, sign_dispatch(KEY, dispatch_body(clock, tool="huge", args={})))
    assert f"> {MAX_RESULT_BYTES}" in assert_error(result, ErrorCode.TOOL_FAILED)


def test_seen_call_ids_are_pruned_after_their_deadline(worker, clock):
    """Pruning runs every 10 s (not on every call: that made each call O(calls in flight))."""
    for _ in range(3):
        assert run(worker, sign_dispatch(KEY, dispatch_body(clock, deadline=clock() + 1)))["ok"]
    clock.advance(11)
    assert run(worker, sign_dispatch(KEY, dispatch_body(clock)))["ok"]
    assert len(worker._gate.seen) == 1


# ----------------------------------------------------------------------------- @tool


@tool(effect="read", name="docs.search", cost=2.5)
def search(query: str, limit: int = 5, exact: bool = False, score: float | None = None,
           tags: list[str] | None = None, filters: dict[str, Any] | None = None, *, ctx: ToolContext) -> list:
    """Search the docs.

    A longer explanation that the model does not need.
    """
    return []


def test_schema_has_openai_function_shape():
    assert isinstance(search, Tool)
    assert search.name == "docs.search"
    assert search.schema == {
        "type": "function",
        "function": {
            "name": "docs.search",
            "description": "Search the docs.",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "limit": {"type": "integer", "default": 5},
                    "exact": {"type": "boolean", "default": False},
                    "score": {"type": ["number", "null"]},
                    "tags": {"type": ["array", "null"], "items": {"type": "string"}},
                    "filters": {"type": ["object", "null"]},
                },
                "required": ["query"],
                "additionalProperties": False,
            },
        },
    }


def test_ctx_is_excluded_and_filled_by_the_worker():
    assert search.wants_ctx
    assert "ctx" not in search.schema["function"]["parameters"]["properties"]
    assert "ctx" not in search.spec.params
    assert not aecho.wants_ctx


def test_tool_spec_matches_the_signature():
    spec = search.spec
    assert (spec.name, spec.effect, spec.cost) == ("docs.search", "read", 2.5)
    assert spec.description.startswith("Search the docs.")
    assert spec.params["query"] == ParamSpec(type="string", required=True)
    assert spec.params["limit"] == ParamSpec(type="integer", required=False, default=5)
    assert spec.params["score"] == ParamSpec(type="number", required=False, default=None, nullable=True)
    assert spec.canonical_args({"query": "q"}) == {"query": "q", "limit": 5, "exact": False, "score": None,
                                                  "tags": None, "filters": None}


@pytest.mark.parametrize("args", [{"query": "q", "score": ["x"]}, {"query": "q", "tags": "x"},
                                  {"query": "q", "score": True}, {"query": None}])
def test_optional_parameters_keep_their_type(args):
    with pytest.raises(MalformedRequest) as info:
        search.spec.canonical_args(args)
    assert info.value.code is ErrorCode.MALFORMED


def test_optional_parameters_accept_none_and_their_type():
    args = search.spec.canonical_args({"query": "q", "score": None, "tags": ["a"], "filters": {"k": 1}})
    assert (args["score"], args["tags"], args["filters"]) == (None, ["a"], {"k": 1})
    assert search.spec.canonical_args({"query": "q", "score": 1})["score"] == 1


def test_path_and_url_formats():
    @tool(effect="write")
    def fetch(dest: Annotated[str, PATH], src: Annotated[str, URL], anything: Any = None) -> None:
        """Fetch."""

    props = fetch.schema["function"]["parameters"]["properties"]
    assert props["dest"] == {"type": "string", "description": "absolute path"}
    assert props["src"] == {"type": "string", "format": "uri"}
    assert props["anything"] == {}
    assert fetch.spec.params["dest"].format == "path"
    assert fetch.spec.params["src"].format == "url"
    assert fetch.spec.params["anything"].type == "any"
    assert fetch.name == "fetch"
    assert fetch.spec.canonical_args({"dest": "/a/./b/../c", "src": "https://x.example/"})["dest"] == "/a/c"
    with pytest.raises(PolicyDenied):
        fetch.spec.canonical_args({"dest": "/a", "src": "https://good.example\\@evil.example/"})


class Opaque:
    pass


@pytest.mark.parametrize("annotation", [bytes, set, Opaque, tuple[int, int]])
def test_unsupported_annotation_is_type_error(annotation):
    def fn(x):  # type: ignore[no-untyped-def]
        return x

    fn.__annotations__ = {"x": annotation}
    with pytest.raises(TypeError, match="unsupported parameter type"):
        tool(effect="read")(fn)


def test_missing_annotation_is_type_error():
    def fn(x):  # type: ignore[no-untyped-def]
        return x

    with pytest.raises(TypeError, match="needs a type annotation"):
        tool(effect="read")(fn)


def test_var_args_are_type_error():
    def fn(*args: str) -> None:
        return None

    def fn2(**kw: str) -> None:
        return None

    with pytest.raises(TypeError, match=r"\*args"):
        tool(effect="read")(fn)
    with pytest.raises(TypeError, match=r"\*args"):
        tool(effect="read")(fn2)


@pytest.mark.parametrize("effect", ["erase", "READ", "", "admin"])
def test_bad_effect_is_value_error(effect):
    with pytest.raises(ValueError, match="effect must be one of"):
        tool(effect=effect)


def test_tool_is_still_callable():
    assert aecho.fn is not None
    assert asyncio.run(aecho("x")) == "X"


def test_demo_tools_load():
    tools = load_tools(["agents.chat"])
    assert set(tools) == {"chat.list_channels", "chat.read", "chat.export", "chat.post", "chat.dm",
                          "chat.delete_message", "chat.delete_channel", "http.post"}
    effects = {name: t.spec.effect for name, t in tools.items()}
    assert effects["chat.delete_channel"] == "delete" and effects["chat.post"] == effects["chat.dm"] == "write"
    assert all(t.wants_ctx for n, t in tools.items() if n.startswith("chat."))
    assert tools["http.post"].schema["function"]["parameters"]["properties"]["url"] == {"type": "string",
                                                                                          "format": "uri"}
    assert tools["chat.read"].schema["function"]["parameters"]["required"] == ["channel"]


@pytest.mark.parametrize("missing", ["call_id", "deadline", "tool", "args", "agent"])
def test_signed_dispatch_missing_a_field_is_refused_not_crashed(worker, clock, missing):
    body = dispatch_body(clock)
    del body[missing]
    assert "lacks or mistypes" in assert_refused(worker, sign_dispatch(KEY, body))
