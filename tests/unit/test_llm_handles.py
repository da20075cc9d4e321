"""Handles at the model's side: ToolCallingAgent shows them, the scripted model passes them on (no Ray).

The supervisor is a fake here (it answers each request with a scripted reply): what is under test is
what the model sees and what reaches the supervisor, not the supervisor's handling of handles.
"""

from __future__ import annotations

import asyncio
import json
import time

import msgpack
import pytest

from runtime.agent import ToolCallingAgent
from runtime.llm import (HANDLE_GUIDE, HANDLES_MARKER, ScriptedModel, ScriptError, _result_text,
                         handles_in, handles_in_text, is_handle_ref, run_tool_loop, with_handle_guide)

LABEL = {"integrity": "untrusted", "readers": [["*@corp.example"]]}


def handle(n: int, tool: str = "email.read", size: int = 120) -> dict:
    return {"$handle": f"h_{n:012x}", "label": LABEL, "bytes": size, "tool": tool}


class FakeSupervisor:
    """Answers ``call`` requests from ``replies`` (tool -> value, or a callable of the args); records them."""

    def __init__(self, replies: dict) -> None:
        self.replies = replies
        self.requests: list[tuple[str, dict]] = []

    async def call(self, request: bytes) -> bytes:
        body_bytes, _mac = msgpack.unpackb(request, raw=False)
        body = msgpack.unpackb(body_bytes, raw=False)
        self.requests.append((body["tool"], body["args"]))
        reply = self.replies.get(body["tool"])
        if isinstance(reply, Exception):
            return msgpack.packb({"ok": False, "error": {"code": "POLICY_DENIED", "tool": body["tool"]}})
        value = reply(body["args"]) if callable(reply) else reply
        return msgpack.packb({"ok": True, "value": value, "call_id": "c1"}, use_bin_type=True)


class Agent(ToolCallingAgent):
    """A ToolCallingAgent whose model the test holds (to read what it saw)."""

    def build_model(self):
        return self.model


def agent_with(steps: list, replies: dict, **config) -> tuple[Agent, FakeSupervisor]:
    sup = FakeSupervisor(replies)
    agent = Agent()
    agent._attach(name="mailer", token=b"token", request_key=b"k" * 32, supervisor=sup, peers={}, tool_schemas=[],
                  config={"model": {"kind": "scripted", "steps": []}, **config}, clock=time.time)
    agent.model = ScriptedModel(steps)
    return agent, sup


def tool_messages(model: ScriptedModel, turn: int) -> list[dict]:
    return [m for m in model.seen[turn] if m["role"] == "tool"]


# ------------------------------------------------------------------------ ToolCallingAgent


def test_a_handle_result_is_shown_as_copyable_json_and_passed_on_unchanged():
    h = handle(0xAB12)
    agent, sup = agent_with([
        {"call": "email.read", "args": {"folder": "inbox"}},
        {"call": "email.send", "args": {"to": "bob@corp.example", "body": {"$handle_of": "email.read"}}},
        {"answer": "sent"},
    ], {"email.read": h, "email.send": {"id": 7}})
    out = asyncio.run(agent.run("forward the latest mail to bob"))
    shown = tool_messages(agent.model, 1)[0]["content"]
    assert json.loads(shown) == h  # the model sees the handle whole: id, label, bytes, tool
    assert sup.requests == [("email.read", {"folder": "inbox"}),
                            ("email.send", {"to": "bob@corp.example", "body": h})]  # as the model wrote it
    assert out["answer"] == "sent"
    assert out["calls"] == [{"tool": "email.read", "ok": True, "code": None, "handles": ["h_00000000ab12"]},
                            {"tool": "email.send", "ok": True, "code": None}]


def test_handles_inside_a_result_and_in_list_arguments():
    inbox = {"messages": [handle(1), {"note": "plain"}, handle(2)], "count": 2}
    agent, sup = agent_with([
        {"call": "email.read", "args": {}},
        {"call": "email.send", "args": {"to": "a@corp.example", "attachments": [
            {"$handle_of": "email.read", "index": 1, "as": "ref"}, {"$handle_of": -2, "as": "object"}]}},
        {"call": "note.write", "args": {"text": {"$handle_of": 0, "as": "id"}}},
    ], {"email.read": inbox, "email.send": "ok", "note.write": "ok"})
    asyncio.run(agent.run("t"))
    assert sup.requests[1][1]["attachments"] == [{"$handle": "h_000000000002"}, handle(1)]
    assert sup.requests[2][1] == {"text": "h_000000000001"}  # the bare id: a string, not a reference


def test_the_system_prompt_explains_handles_after_the_jobs_own():
    agent, _ = agent_with([{"answer": "x"}], {}, system="You forward mail.")
    asyncio.run(agent.run("t"))
    system = agent.model.seen[0][0]
    assert system == {"role": "system", "content": "You forward mail.\n\n" + HANDLE_GUIDE}
    for words in ('{"$handle": "h_', "the whole object", "handle.reveal", "list argument", "label"):
        assert words in HANDLE_GUIDE
    plain, _ = agent_with([{"answer": "x"}], {}, system="You forward mail.", handle_guide=False)
    asyncio.run(plain.run("t"))
    assert plain.model.seen[0][0]["content"] == "You forward mail."
    assert with_handle_guide(None) == HANDLE_GUIDE


def test_a_denied_call_has_no_handle_and_a_reference_to_it_is_a_clear_error():
    agent, sup = agent_with([
        {"call": "email.read", "args": {}},
        {"call": "email.send", "args": {"body": {"$handle_of": "email.read"}}},
    ], {"email.read": PermissionError("denied")})
    with pytest.raises(ScriptError, match=r"step 1 call 0 \(email.send\) args.body: .*latest result of "
                                          r"'email.read' \(call call_0_0\) holds 0 handle"):
        asyncio.run(agent.run("t"))
    assert [t for t, _ in sup.requests] == ["email.read"]  # nothing was sent for the broken step


@pytest.mark.parametrize("ref, message", [
    ({"$handle_of": "email.read"}, "has seen no result of 'email.read'"),
    ({"$handle_of": -1}, "has seen 0 handle"),
    ({"$handle_of": 3}, "has seen 0 handle"),
])
def test_references_to_nothing_seen_raise_script_error(ref, message):
    model = ScriptedModel([{"call": "x", "args": {"a": ref}}])
    with pytest.raises(ScriptError, match=message):
        asyncio.run(model.complete([{"role": "user", "content": "t"}], []))


def test_results_of_the_same_turn_are_not_seen_yet():
    model = ScriptedModel([{"calls": [{"name": "email.read"}, {"name": "email.send",
                                                               "args": {"body": {"$handle_of": "email.read"}}}]}])
    with pytest.raises(ScriptError, match="no result of 'email.read'"):
        asyncio.run(run_tool_loop(model, task="t", tools=[], call_tool=lambda n, a: asyncio.sleep(0, handle(1))))


def test_index_out_of_range_names_the_call_and_the_count():
    agent, _ = agent_with([{"call": "email.read"}, {"call": "x", "args": {"h": {"$handle_of": "email.read",
                                                                                 "index": 2}}}],
                          {"email.read": [handle(1), handle(2)]})
    with pytest.raises(ScriptError, match="holds 2 handle.*no index 2"):
        asyncio.run(agent.run("t"))


@pytest.mark.parametrize("ref", [
    {"$handle_of": True},
    {"$handle_of": ""},
    {"$handle_of": 1.5},
    {"$handle_of": -1, "index": 0},
    {"$handle_of": "t", "index": "1"},
    {"$handle_of": "t", "as": "content"},
    {"$handle_of": "t", "extra": 1},
])
def test_malformed_references_are_refused_at_construction(ref):
    with pytest.raises(ValueError, match=r"step 0 args\.a\[0\]"):
        ScriptedModel([{"call": "x", "args": {"a": [ref]}}])


def test_a_reference_in_json_string_arguments_is_resolved_too():
    model = ScriptedModel([{"call": "email.read"},
                           {"call": "x", "args": json.dumps({"h": {"$handle_of": -1, "as": "ref"}})}])
    seen = []

    async def call_tool(name, args):
        seen.append(args)
        return handle(5)

    asyncio.run(run_tool_loop(model, task="t", tools=[], call_tool=call_tool))
    assert seen[1] == {"h": {"$handle": "h_000000000005"}}


def test_callable_steps_get_references_resolved():
    model = ScriptedModel([{"call": "email.read"}, lambda messages: {"call": "x", "args": {"h": {"$handle_of": -1}}}])
    seen = []

    async def call_tool(name, args):
        seen.append(args)
        return {"inbox": handle(9)}

    asyncio.run(run_tool_loop(model, task="t", tools=[], call_tool=call_tool))
    assert seen[1] == {"h": handle(9)}


def test_a_model_turn_with_handles_goes_out_unchanged():
    h = handle(4)
    model = ScriptedModel([lambda m: {"call": "email.send", "args": {"body": {"$handle": h["$handle"]},
                                                                      "cc": [h, "h_not_a_reference"]}}])
    seen = []

    async def call_tool(name, args):
        seen.append(args)
        return "ok"

    asyncio.run(run_tool_loop(model, task="t", tools=[], call_tool=call_tool))
    assert seen == [{"body": {"$handle": "h_000000000004"}, "cc": [h, "h_not_a_reference"]}]


# ------------------------------------------------------------------------ results as text


def test_a_cut_result_still_lists_its_handles_whole():
    result = {"text": "x" * 5000, "attachment": handle(3, size=99)}
    text = _result_text(result, 1000)
    assert "[truncated:" in text and f"\n{HANDLES_MARKER}" in text
    assert handles_in_text(text) == [handle(3, size=99)]
    many = [handle(i) for i in range(100)]
    cut = _result_text(many, 500)
    assert cut.endswith("(and 36 more)") and len(handles_in_text(cut)) == 64


def test_a_model_can_reference_a_handle_from_a_cut_result():
    model = ScriptedModel([{"call": "email.read"}, {"call": "x", "args": {"h": {"$handle_of": "email.read"}}}])
    seen = []

    async def call_tool(name, args):
        seen.append(args)
        return {"text": "y" * 40_000, "h": handle(8)}

    asyncio.run(run_tool_loop(model, task="t", tools=[], call_tool=call_tool))
    assert seen[1] == {"h": handle(8)}


def test_handle_detection():
    assert is_handle_ref({"$handle": "h_abc"}) and not is_handle_ref({"$handle": "x"})
    assert not is_handle_ref({"$handle": 3}) and not is_handle_ref("h_abc")
    assert handles_in({"a": [{"b": handle(1)}], "c": handle(2)}) == [handle(1), handle(2)]
    deep: object = handle(1)
    for _ in range(100):
        deep = [deep]
    assert handles_in(deep) == []  # past the depth bound: not walked, never a RecursionError
    assert handles_in_text('not json, but {"$handle": "h_0a", ...') == [{"$handle": "h_0a"}]
    assert handles_in_text("plain text") == []


def test_handle_detection_agrees_with_the_supervisor():
    from runtime import is_handle

    for value in (handle(1), {"$handle": "h_00000000000a"}, {"$handle": "h_1", "label": LABEL, "note": "x"},
                  {"$handle": "h_1", "bytes": 1, "tool": "t"}, ["h_1"], {"$handle": 3}):
        assert is_handle_ref(value) == (is_handle(value) and value["$handle"].startswith("h_")), value


def test_over_the_openai_wire_a_handle_goes_out_as_json_and_comes_back_unchanged():
    from runtime.llm import OpenAIChatModel
    from tests.unit.test_llm import FakeServer, completion, fn_call

    h = handle(0xC0FFEE)
    send_args = json.dumps({"to": "bob@corp.example", "body": {"$handle": h["$handle"]}, "cc": [h]})
    replies = [(200, completion(tool_calls=[fn_call("c1", "email_read", "{}")]), 0),
               (200, completion(tool_calls=[fn_call("c2", "email_send", send_args)]), 0),
               (200, completion("sent"), 0)]
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {}}}}
             for n in ("email.read", "email.send")]
    seen = []

    async def call_tool(name, args):
        seen.append((name, args))
        return h if name == "email.read" else {"id": 1}

    with FakeServer(replies) as srv:
        result = asyncio.run(run_tool_loop(OpenAIChatModel(srv.base_url, "m"), task="t", tools=tools,
                                           call_tool=call_tool, system=with_handle_guide("Mail.")))
    assert result.answer == "sent"
    assert seen[1] == ("email.send", {"to": "bob@corp.example", "body": {"$handle": h["$handle"]}, "cc": [h]})
    second = srv.requests[1]["json"]["messages"]
    assert json.loads(second[-1]["content"]) == h  # the handle, as JSON the model can copy
    assert second[0]["content"].endswith(HANDLE_GUIDE)


def test_a_task_with_handles_reaches_the_model_as_json_and_can_be_referenced():
    h = handle(0x7A5C)
    agent, sup = agent_with([{"call": "email.send", "args": {"to": "bob@corp.example",
                                                             "body": {"$handle_of": "(task)", "as": "ref"}}},
                             {"answer": "ok"}], {"email.send": "sent"})
    asyncio.run(agent.run({"do": "forward this", "attachment": h}))
    user = agent.model.seen[0][-1]
    assert user["role"] == "user" and json.loads(user["content"]) == {"do": "forward this", "attachment": h}
    assert sup.requests == [("email.send", {"to": "bob@corp.example", "body": {"$handle": h["$handle"]}})]
    with pytest.raises(ScriptError, match=r"no result of '\(task\)'"):
        asyncio.run(ScriptedModel([{"call": "x", "args": {"h": {"$handle_of": "(task)"}}}]).complete([], []))
    with pytest.raises(ScriptError, match="holds 0 handle"):  # a task without handles
        asyncio.run(ScriptedModel([{"call": "x", "args": {"h": {"$handle_of": "(task)"}}}]).complete(
            [{"role": "user", "content": "plain"}], []))
