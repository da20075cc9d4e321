"""The agent every scenario of the catalogue runs: it plays a scripted (adversarial) model.

Its ``config.steps`` are what a prompt-injected model would make the agent do, one action
per step, in order. Every action goes through the real agent API (``call``, ``call_many``,
``delegate``, ``ask``), so the supervisor decides each one exactly as it would for a real model; a
refusal is noted and the script goes on, as a model that is told ``POLICY_DENIED`` would.

Steps (the runner strips the ``attack:`` / ``benign:`` tags before the job starts: the agent
never knows which of its actions are the attack):

    {call: TOOL, args: {...}, as: NAME?, repeat: N?}   one call (N times)
    {batch: [{call: TOOL, args: {...}}, ...]}            several calls in one message
    {delegate: AGENT, task: TEXT, tools: [...]?, max_calls: N?, handles: [REF]?, flow: [...]?, as: NAME?}
    {reveal: NAME}                                      handle.reveal of a result that is a handle
    {ask: NAME, question: Q, schema: S, as: NAME?}      reader.ask about a result that is a handle
    {let: NAME, value: V}                               what the model concludes itself (no call)
    any step, with when: NAME                           only if that earlier result is true (a yes/no answer)
    {call: TOOL, args: {...}, token_of: NAME}          a call made with a token taken from a result
    {leak_token: true}                                  put this run's token into the result

An argument value ``{$ref: NAME}`` is an earlier result (``as: NAME``), passed as it came back:
a handle stays a handle, content stays content. ``{$ref: NAME, item: [k, ...]}`` picks a part,
``{$ref: NAME, each: KEY}`` the KEY of each item of a list (the names of the saved payees, say,
for an enum of the reader). The delegated task is available as ``{$ref: task}``. A step that
needs a result its earlier step did not get (refused, or the reader's answer was invalid) is
skipped, as a model without that value would not make the call.

Two steps play an agent process that is itself hostile, not only its model: ``token_of`` sends a
call with a token it was handed, and a delegation to an agent outside its policy's peers is sent
to the supervisor anyway (``Agent.delegate`` would refuse it before asking). Both show that the
supervisor, not the agent's own code, is what refuses them.
"""

from __future__ import annotations

from typing import Any

from runtime.agent import Agent
from runtime.errors import WardenError
from runtime.protocol import decode_reply, encode_call, encode_delegate


def is_handle(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("$handle"), str)


class ScriptedAgent(Agent):
    """Runs ``config.steps``; returns what happened to each (its own account: the report reads the audit log)."""

    async def run(self, task: Any) -> dict[str, Any]:
        results: dict[str, Any] = {"task": task}
        log: list[dict[str, Any]] = []
        out: dict[str, Any] = {"steps": log}
        for step in self.config.get("steps", []):
            if step.get("leak_token"):
                out["token"] = self.token
                continue
            for _ in range(int(step.get("repeat", 1))):
                log.append(await self._step(step, results))
        return out

    async def _step(self, step: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
        what = step.get("call") or step.get("delegate") or step.get("reveal") or step.get("ask") or "batch"
        missing = sorted(needs(step) - set(results))
        if missing:
            return {"step": what, "ok": False, "skipped": f"no result {missing}"}
        if "when" in step and results[step["when"]] is not True:
            return {"step": what, "ok": False, "skipped": f"{step['when']} is {results[step['when']]!r}"}
        if "let" in step:
            results[step["let"]] = resolve(step.get("value"), results)
            return {"step": f"let {step['let']}", "ok": True}
        try:
            value = await self._act(step, results)
        except WardenError as exc:
            return {"step": what, "ok": False, "code": exc.code.value}
        if step.get("as"):
            results[step["as"]] = value
        return {"step": what, "ok": True}

    async def _act(self, step: dict[str, Any], results: dict[str, Any]) -> Any:
        if "call" in step:
            args = resolve(step.get("args", {}), results)
            if step.get("token_of"):
                return await self._call_with(results[step["token_of"]], step["call"], args)
            return await self.call(step["call"], **args)
        if "ask" in step:  # a reader.ask call: the supervisor substitutes the handle and checks the answer
            return await self.ask(results[step["ask"]], step["question"], resolve(step["schema"], results))
        if "batch" in step:
            replies = await self.call_many((c["call"], resolve(c.get("args", {}), results)) for c in step["batch"])
            return [r for r in replies if not isinstance(r, Exception)]
        if "reveal" in step:
            value = results.get(step["reveal"])
            if not is_handle(value):  # the content is already in the agent's context (no hide: in force)
                return value
            return await self.call("handle.reveal", handle=value)
        if "delegate" in step:
            kwargs = {k: step[k] for k in ("tools", "max_calls", "max_depth", "flow") if k in step}
            if "handles" in step:
                kwargs["handles"] = [h for h in resolve(step["handles"], results) if is_handle(h)]
            if step["delegate"] not in self._peers:  # a hostile agent does not stop at its own peer list
                return await self._delegate_anyway(step["delegate"])
            return await self.delegate(step["delegate"], resolve(step.get("task", ""), results), **kwargs)
        raise ValueError(f"unknown step {sorted(step)}")

    async def _delegate_anyway(self, target: str) -> Any:
        """Ask the supervisor to re-bind this run's token to an agent the policy does not name."""
        request = encode_delegate(agent=self.name, token=self.token, to=target, request_key=self._request_key)
        return decode_reply(await self._supervisor.delegate(request))["token"]

    async def _call_with(self, stolen: Any, tool: str, args: dict[str, Any]) -> Any:
        """A call made with someone else's token (taken from a delegate's result)."""
        token = stolen.get("token") if isinstance(stolen, dict) else stolen
        if not isinstance(token, bytes):
            raise ValueError("no token to steal in that result")
        request = encode_call(agent=self.name, token=token, tool=tool, args=args, request_key=self._request_key)
        return decode_reply(await self._supervisor.call(request))["value"]


def needs(step: dict[str, Any]) -> set[str]:
    """The earlier results a step uses (``$ref``, the handle it asks about or reveals, a token)."""
    def refs(value: Any) -> set[str]:
        if isinstance(value, dict):
            if isinstance(value.get("$ref"), str):
                return {value["$ref"]}
            return {n for v in value.values() for n in refs(v)}
        if isinstance(value, list):
            return {n for v in value for n in refs(v)}
        return set()

    names = refs({k: v for k, v in step.items() if k not in ("as", "let")})
    return names | {str(step[k]) for k in ("ask", "reveal", "token_of", "when") if k in step}


def resolve(value: Any, results: dict[str, Any]) -> Any:
    """``value`` with every ``{$ref: NAME, item: [...]?, each: KEY?}`` replaced by that earlier result
    (or its part; ``each``: the KEY of each item of that list)."""
    if isinstance(value, dict) and "$ref" in value:
        out = results.get(value["$ref"])
        for key in value.get("item", []):
            out = out[key] if isinstance(out, (dict, list)) else None
        if "each" in value:
            out = [x.get(value["each"]) for x in out if isinstance(x, dict)] if isinstance(out, list) else None
        return out
    if isinstance(value, dict):
        return {k: resolve(v, results) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, results) for v in value]
    return value
