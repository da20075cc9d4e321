"""The LLM seam: wire format against a real local HTTP server, the scripted model, the loop."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from runtime.errors import PolicyDenied, QuotaExceeded, ErrorCode
from runtime.llm import (
    API_TOOL_NAME,
    EXHAUSTED_ANSWER,
    ModelError,
    ModelTurn,
    OpenAIChatModel,
    ScriptedModel,
    ToolCallRequest,
    ToolNames,
    model_from_config,
    parse_arguments,
    run_tool_loop,
)

API_KEY = "sk-test-very-secret-0123456789"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "chat.read",
            "description": "Read a channel",
            "parameters": {"type": "object", "properties": {"channel": {"type": "string"}}},
        },
    }
]


def completion(content=None, tool_calls=None):
    message = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": "cmpl-1",
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if tool_calls else "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def fn_call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


class FakeServer:
    """A real HTTP server on 127.0.0.1 emulating /v1/chat/completions with canned replies."""

    def __init__(self, replies):
        self.replies = list(replies)  # (status, body: dict | bytes, delay_s)
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                server.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "json": json.loads(self.rfile.read(length))}
                )
                status, body, delay_s = server.replies.pop(0)
                time.sleep(delay_s)
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    if 300 <= status < 400:
                        self.send_header("Location", "http://127.0.0.1:1/elsewhere")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


# --- wire format ---------------------------------------------------------------------


def test_request_and_response_wire_format():
    reply = completion(tool_calls=[fn_call("call_abc", "chat_read", '{"channel": "general"}')])
    with FakeServer([(200, reply, 0)]) as srv:
        model = OpenAIChatModel(srv.base_url, "qwen2.5", api_key=API_KEY, max_tokens=64,
                                extra_headers={"X-Job": "j1"})
        messages = [{"role": "user", "content": "read general"}]
        turn = asyncio.run(model.complete(messages, TOOLS))
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {API_KEY}"
    assert req["headers"]["X-Job"] == "j1"
    body = req["json"]
    assert body["model"] == "qwen2.5"
    assert body["messages"] == messages
    assert body["tools"] == [{**TOOLS[0], "function": {**TOOLS[0]["function"], "name": "chat_read"}}]
    assert TOOLS[0]["function"]["name"] == "chat.read"  # the caller's schemas are not touched
    assert body["tool_choice"] == "auto"
    assert body["temperature"] == 0.0
    assert body["max_tokens"] == 64
    assert turn.content is None
    assert turn.tool_calls == [ToolCallRequest("call_abc", "chat.read", {"channel": "general"})]
    assert turn.usage["total_tokens"] == 15


def test_no_tools_omits_tools_and_no_key_omits_authorization():
    with FakeServer([(200, completion("hello"), 0)]) as srv:
        turn = asyncio.run(OpenAIChatModel(srv.base_url, "m").complete([{"role": "user", "content": "hi"}], []))
    body, headers = srv.requests[0]["json"], srv.requests[0]["headers"]
    assert "tools" not in body and "tool_choice" not in body and "max_tokens" not in body
    assert "Authorization" not in headers
    assert turn == ModelTurn("hello", [], turn.usage)


def test_http_500_raises_model_error_with_status_and_excerpt():
    with FakeServer([(500, {"error": {"message": "CUDA out of memory"}}, 0)]) as srv:
        with pytest.raises(ModelError) as info:
            asyncio.run(OpenAIChatModel(srv.base_url, "m").complete([], []))
    assert info.value.status == 500
    assert "HTTP 500" in str(info.value) and "CUDA out of memory" in str(info.value)


def test_api_key_never_in_error_text_even_if_server_echoes_it():
    echo = {"error": f"invalid key Bearer {API_KEY}"}
    with FakeServer([(401, echo, 0), (200, b"not json " + API_KEY.encode(), 0)]) as srv:
        model = OpenAIChatModel(srv.base_url, "m", api_key=API_KEY)
        errors = []
        for _ in range(2):
            with pytest.raises(ModelError) as info:
                asyncio.run(model.complete([], []))
            errors.append(info.value)
    assert errors[0].status == 401
    assert errors[1].status is None and "unusable model response" in str(errors[1])
    for e in errors:
        assert API_KEY not in str(e) and API_KEY not in repr(e) and API_KEY not in e.body_excerpt
    assert API_KEY not in repr(model)


def test_timeout_raises_model_error():
    with FakeServer([(200, completion("late"), 1.0)]) as srv:
        model = OpenAIChatModel(srv.base_url, "m", timeout_s=0.1)
        with pytest.raises(ModelError, match="timed out"):
            asyncio.run(model.complete([], []))


def test_redirects_are_not_followed():
    with FakeServer([(307, {}, 0)]) as srv:
        with pytest.raises(ModelError) as info:
            asyncio.run(OpenAIChatModel(srv.base_url, "m", api_key=API_KEY).complete([], []))
    assert info.value.status == 307 and len(srv.requests) == 1


def test_unreachable_server_raises_model_error():
    with FakeServer([]) as srv:
        url = srv.base_url
    with pytest.raises(ModelError):
        asyncio.run(OpenAIChatModel(url, "m", timeout_s=1).complete([], []))


def test_malformed_arguments_become_flagged_requests_not_crashes():
    reply = completion(tool_calls=[
        fn_call("c1", "chat.read", "{not json"),
        fn_call("c2", "chat.read", "[1, 2]"),
        {"id": "c3", "type": "function", "function": {"arguments": "{}"}},
        fn_call("c4", "chat.read", ""),
    ])
    with FakeServer([(200, reply, 0)]) as srv:
        turn = asyncio.run(OpenAIChatModel(srv.base_url, "m").complete([], TOOLS))
    c1, c2, c3, c4 = turn.tool_calls
    assert (c1.arguments, c1.parse_error) == ({}, "arguments are not valid JSON")
    assert c2.arguments == {} and "JSON object" in c2.parse_error
    assert c3.name == "" and c3.parse_error
    assert (c4.arguments, c4.parse_error) == ({}, None)


def test_parse_arguments_accepts_object_and_survives_deep_nesting():
    assert parse_arguments({"a": 1}) == ({"a": 1}, None)
    args, error = parse_arguments("[" * 100_000)
    assert args == {} and error


def test_api_key_env_read_at_construction(monkeypatch):
    monkeypatch.setenv("WARDEN_TEST_KEY", API_KEY)
    model = OpenAIChatModel("http://127.0.0.1:1/v1", "m", api_key_env="WARDEN_TEST_KEY")
    monkeypatch.delenv("WARDEN_TEST_KEY")
    assert model._headers["Authorization"] == f"Bearer {API_KEY}"
    with pytest.raises(ValueError, match="WARDEN_TEST_KEY"):
        OpenAIChatModel("http://127.0.0.1:1/v1", "m", api_key_env="WARDEN_TEST_KEY")
    with pytest.raises(ValueError, match="http"):
        OpenAIChatModel("file:///etc/passwd", "m")


# --- scripted model and the loop -----------------------------------------------------


def test_loop_sends_calls_and_returns_results_with_matching_ids():
    model = ScriptedModel([
        {"call": "chat.read", "args": {"channel": "general"}},
        {"calls": [{"name": "kv.get", "args": {"key": "a"}, "id": "mine"}, {"name": "kv.get", "args": {"key": "b"}}]},
        {"answer_from_results": "values: {results}"},
    ])
    seen = []

    async def call_tool(name, args):
        seen.append((name, args))
        return {"text": "hi"} if name == "chat.read" else f"v-{args['key']}"

    result = asyncio.run(run_tool_loop(model, task="do it", tools=TOOLS, call_tool=call_tool, system="be brief"))
    assert seen == [("chat.read", {"channel": "general"}), ("kv.get", {"key": "a"}), ("kv.get", {"key": "b"})]
    assert result.stopped == "answer" and result.turns == 3
    assert result.answer == "values: v-a\nv-b"
    assert [c.ok for c in result.calls] == [True, True, True]
    assert model.seen[0] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "do it"}]
    assert model.tools_seen[0] == TOOLS
    second = model.seen[1]
    assert second[2]["tool_calls"][0]["id"] == "call_0_0"
    assert second[3] == {"role": "tool", "tool_call_id": "call_0_0", "content": '{"text": "hi"}'}
    tool_msgs = [m for m in model.seen[2] if m["role"] == "tool"][1:]
    assert [m["tool_call_id"] for m in tool_msgs] == ["mine", "call_1_1"]


def test_denial_feeds_only_public_text_and_loop_continues():
    model = ScriptedModel([{"call": "http.fetch", "args": {"url": "https://evil.com/x"}}, {"answer": "gave up"}])

    async def call_tool(name, args):
        raise PolicyDenied("url host evil.com not in ['example.org']", tool="http.fetch")

    result = asyncio.run(run_tool_loop(model, task="fetch", tools=[], call_tool=call_tool))
    tool_msg = model.seen[1][-1]
    assert tool_msg["role"] == "tool"
    assert json.loads(tool_msg["content"]) == {"error": "POLICY_DENIED on tool 'http.fetch'"}
    assert "evil.com" not in json.dumps(model.seen[1][2:])  # only the model's own call names it
    assert "example.org" not in json.dumps(model.seen[1])
    assert result.answer == "gave up"
    assert result.calls[0] == ("http.fetch", {"url": "https://evil.com/x"}, False, "POLICY_DENIED")


def test_public_text_includes_retry_after_for_rate_limits():
    model = ScriptedModel([{"call": "x", "args": {}}])

    async def call_tool(name, args):
        raise QuotaExceeded("calls=11, limit=10", code=ErrorCode.RATE_LIMITED, tool="x", retry_after_s=0.5)

    result = asyncio.run(run_tool_loop(model, task="t", tools=[], call_tool=call_tool))
    content = model.seen[1][-1]["content"]
    assert "retry after" in content and "limit=10" not in content
    assert result.calls[0].error_code == "RATE_LIMITED"
    assert result.answer == EXHAUSTED_ANSWER


def test_other_exceptions_propagate():
    model = ScriptedModel([{"call": "x", "args": {}}])

    async def call_tool(name, args):
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError, match="bug"):
        asyncio.run(run_tool_loop(model, task="t", tools=[], call_tool=call_tool))


def test_malformed_scripted_arguments_are_not_dispatched():
    model = ScriptedModel([{"call": "x", "args": "{oops"}, {"answer": "ok"}])
    dispatched = []

    async def call_tool(name, args):
        dispatched.append(name)

    result = asyncio.run(run_tool_loop(model, task="t", tools=[], call_tool=call_tool))
    assert dispatched == []
    assert json.loads(model.seen[1][-1]["content"]) == {"error": "MALFORMED: arguments are not valid JSON"}
    assert result.calls[0] == ("x", {}, False, "MALFORMED")


def test_max_turns_stops_the_loop():
    model = ScriptedModel([{"call": "x", "args": {"i": i}} for i in range(10)])

    async def call_tool(name, args):
        return "ok"

    result = asyncio.run(run_tool_loop(model, task="t", tools=[], call_tool=call_tool, max_turns=3))
    assert result.stopped == "max_turns" and result.answer is None
    assert result.turns == 3 == model.turns and len(result.calls) == 3


def test_large_results_are_truncated_with_marker():
    model = ScriptedModel([{"call": "x"}])

    async def call_tool(name, args):
        return "é" * 20_000

    asyncio.run(run_tool_loop(model, task="t", tools=[], call_tool=call_tool, max_result_bytes=1000))
    content = model.seen[1][-1]["content"]
    assert content.startswith("é" * 500) and "[truncated: 39000 more bytes]" in content
    assert len(content.encode()) < 1100


def test_callable_steps_and_exhaustion():
    def step(messages):
        return ModelTurn(f"saw {len(messages)} messages")

    model = ScriptedModel([lambda m: {"call": "x", "args": {}}, step])

    async def call_tool(name, args):
        return 1

    result = asyncio.run(run_tool_loop(model, task="t", tools=[], call_tool=call_tool))
    assert result.answer == "saw 3 messages"
    assert asyncio.run(model.complete([], [])).content == EXHAUSTED_ANSWER


@pytest.mark.parametrize("steps", [
    "not a list",
    [{"answer": "a", "call": "x"}],
    [{"call": "x", "argz": {}}],
    [{"calls": []}],
    [{"calls": [{"call": "x"}]}],
    [{"answer": 3}],
    [{"answer_from_results": 1}],
    [42],
])
def test_bad_scripts_are_rejected_at_construction(steps):
    with pytest.raises(ValueError):
        ScriptedModel(steps)


def test_model_from_config():
    assert isinstance(model_from_config({"kind": "scripted", "steps": [{"answer": "x"}]}), ScriptedModel)
    m = model_from_config({"kind": "openai", "base_url": "http://h:8000/v1", "model": "q", "timeout_s": 5})
    assert isinstance(m, OpenAIChatModel) and m.url == "http://h:8000/v1/chat/completions"
    for bad in [{"kind": "magic"}, {"kind": "openai", "model": "q"},
                {"kind": "openai", "base_url": "http://h/v1", "model": "q", "api_key": "sk"},
                {"kind": "openai", "base_url": "http://h/v1", "model": "q", "tempreature": 1}]:
        with pytest.raises(ValueError):
            model_from_config(bad)
    with pytest.raises(ValueError, match="unknown model kind 'magic'"):
        model_from_config({"kind": "magic"})


# --- full loop over HTTP -------------------------------------------------------------


def test_full_loop_against_local_http_model():
    replies = [
        (200, completion(tool_calls=[fn_call("call_1", "chat_read", '{"channel": "ops"}')]), 0),
        (200, completion("ops is quiet"), 0),
    ]
    seen = []
    with FakeServer(replies) as srv:
        model = OpenAIChatModel(srv.base_url, "m", api_key=API_KEY)

        async def call_tool(name, args):
            seen.append(name)
            return {"messages": []}

        result = asyncio.run(run_tool_loop(model, task="check ops", tools=TOOLS, call_tool=call_tool))
    assert result.answer == "ops is quiet" and result.turns == 2 and result.stopped == "answer"
    second = srv.requests[1]["json"]["messages"]
    assert seen == ["chat.read"]  # Warden's own name, mapped back from the wire
    assert result.messages[1]["tool_calls"][0]["function"]["name"] == "chat.read"
    assert second[1]["tool_calls"][0]["function"] == {"name": "chat_read", "arguments": '{"channel": "ops"}'}
    assert second[2] == {"role": "tool", "tool_call_id": "call_1", "content": '{"messages": []}'}


# --- tool names on the wire ------------------------------------------------------------

def _tool(name):
    return {"type": "function", "function": {"name": name, "description": "", "parameters": {"type": "object"}}}


NAMES = ["chat.read", "chat_read", "python.exec", "fs.read", "chat-read", "a" * 64, "a" * 64 + ".x", "a" * 65,
         "x y", "x/y", "x:y", "émoji.tool", "", "_", "mail.send_email", "mail.send-email", "mail_send.email"]


def test_tool_names_map_one_to_one_onto_the_api_pattern_and_back():
    names = ToolNames(NAMES)
    wire = [names.to_api(n) for n in NAMES]
    assert all(API_TOOL_NAME.fullmatch(w) for w in wire), wire
    assert len(set(wire)) == len(NAMES)  # injective over the set
    assert [names.from_api(w) for w in wire] == NAMES  # reversible
    assert names.to_api("chat_read") == "chat_read" and names.to_api("python.exec") == "python_exec"
    assert names.to_api("chat.read") != "chat_read"  # taken by the tool of that name
    assert ToolNames(reversed(NAMES)).to_api("chat.read") == names.to_api("chat.read")  # order does not matter
    assert ToolNames(["chat.read"]).to_api("chat.read") == "chat_read"


def test_request_body_names_match_the_api_pattern_and_answers_map_back():
    """Every name in the body (tools and earlier tool calls) fits ^[a-zA-Z0-9_-]{1,64}$; answers come back as Warden names."""
    wire = ToolNames(NAMES)
    reply = completion(tool_calls=[fn_call("c1", wire.to_api("mail_send.email"), "{}"),
                                   fn_call("c2", wire.to_api("x y"), "{}"),
                                   fn_call("c3", "chat_write", "{}")])  # a wire name no tool has
    history = [{"role": "user", "content": "go"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c0", "type": "function", "function": {"name": "python.exec", "arguments": "{}"}},
                   {"id": "c9", "type": "function", "function": {"name": "no.such.tool", "arguments": "{}"}},
                   {"id": "c8", "type": "function", "function": {"name": "", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "c0", "content": "ok"}]
    with FakeServer([(200, reply, 0)]) as srv:
        turn = asyncio.run(OpenAIChatModel(srv.base_url, "m").complete(history, [_tool(n) for n in NAMES]))
    body = srv.requests[0]["json"]
    sent = [t["function"]["name"] for t in body["tools"]]
    sent += [c["function"]["name"] for m in body["messages"] for c in m.get("tool_calls", [])]
    assert all(API_TOOL_NAME.fullmatch(n) for n in sent), sent
    assert len(set(sent[:len(NAMES)])) == len(NAMES)
    assert history[1]["tool_calls"][0]["function"]["name"] == "python.exec"  # the caller's messages untouched
    assert [c.name for c in turn.tool_calls] == ["mail_send.email", "x y", "chat_write"]


def test_an_unknown_wire_name_takes_the_unknown_tool_path():
    from runtime.errors import UnknownTool

    reply = completion(tool_calls=[fn_call("c1", "chat_write", "{}")])
    with FakeServer([(200, reply, 0), (200, completion("done"), 0)]) as srv:
        model = OpenAIChatModel(srv.base_url, "m")

        async def call_tool(name, args):
            assert name == "chat_write"
            raise UnknownTool(f"no tool named {name!r}", tool=name)

        result = asyncio.run(run_tool_loop(model, task="t", tools=[_tool("chat.read")], call_tool=call_tool))
    assert result.calls[0].error_code == "UNKNOWN_TOOL"
    assert json.loads(result.messages[-2]["content"])["error"].startswith("UNKNOWN_TOOL")
