"""Case files for ``warden policy test``: calls, and the decision each must get.

    tools: [agents.chat]            # modules whose @tool functions exist (their contracts are checked)
    run_tools: false                # default: allowed calls reach a stub returning null, no tool code runs
    stubs: {chat.read: []}          # tool -> the value a stub returns
    agents: {summarizer: summarizer.yaml}   # other agents (delegation targets); paths relative to this file
    reader: {model: {kind: scripted, rules: [...]}}   # optional, as in a job file: offers reader.ask
    cases:
      - name: posts only to #summaries
        call: chat.post
        args: {channel: general, text: hi}
        expect: POLICY_DENIED       # allow | deny (any denial) | an error code
        reason: "'general' != 'summaries'"   # optional: text the audit reason must contain
      - name: the 51st call is over budget
        steps:                      # in order, one harness: quotas and budgets carry over
          - {call: chat.list_channels, repeat: 50, expect: allow}
          - {call: chat.list_channels, expect: BUDGET_EXHAUSTED}
      - name: a delegate cannot widen what it was given
        delegate: {to: summarizer, tools: [chat.read]}     # or a name, or a list for a chain
        call: chat.list_channels
        expect: POLICY_DENIED

Each case runs in a fresh ``PolicyHarness`` (new keys, budgets and audit log), so cases do not
depend on each other's order. A step's caller is ``as`` (default: the policy's agent); with
``delegate`` the caller delegates first, and the last delegate makes the call with the token it
was given (a denied delegation is the step's result). ``advance_s`` moves the clock before the
step; ``approve`` answers a call the policy parks for a human. An argument ``{$handle_of: TOOL}``
is the handle the latest call of TOOL in the case returned (a tool its policy hides: ``output:
{hide: true}``), to test sink rules on hidden data. With ``reader:`` (a job file's reader section),
``reader.ask`` is offered and answered by a reader in this process, and the supervisor checks each
answer against its schema as in a job (``expect: READER_INVALID`` for one it refuses).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import ErrorCode, WardenError
from .agent import is_handle
from .harness import Decision, PolicyHarness
from .job import ReaderSpec
from .trusted.policy import Policy
from .policyfile import load_policy, read_yaml, validated

__all__ = ["CaseFile", "CaseResult", "CasesReport", "load_cases", "run_cases"]

_CODES = {c.value for c in ErrorCode}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class DelegateSpec(_Strict):
    to: str
    tools: list[str] | None = None
    max_calls: int | None = Field(default=None, ge=0)
    max_cost: float | None = Field(default=None, ge=0)
    ttl_s: float | None = Field(default=None, gt=0)
    max_depth: int | None = Field(default=None, ge=0)
    args: dict[str, dict[str, Any]] | None = None  # "tool.arg" -> {check: param}, as Agent.delegate takes


def _chain(v: Any) -> Any:
    """``delegate: NAME``, ``{to: NAME, ...}`` or a list of either: a list of DelegateSpec inputs."""
    items = v if isinstance(v, list) else [v]
    return [{"to": i} if isinstance(i, str) else i for i in items]


class Step(_Strict):
    call: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    caller: str | None = Field(default=None, alias="as")
    delegate: list[DelegateSpec] = Field(default_factory=list)
    expect: str | list[str]  # a list: one expectation per call, in order (repeat is its length)
    reason: str | None = None
    repeat: int = Field(default=1, ge=1, le=100_000)
    advance_s: float = Field(default=0.0, ge=0)
    approve: bool | None = None

    @field_validator("delegate", mode="before")
    @classmethod
    def _links(cls, v: Any) -> Any:
        return _chain(v)

    @field_validator("expect")
    @classmethod
    def _known(cls, v: str | list[str]) -> str | list[str]:
        for e in [v] if isinstance(v, str) else v:
            if e not in ("allow", "deny") and e not in _CODES:
                raise ValueError(f"expect must be allow, deny or an error code ({', '.join(sorted(_CODES))}), "
                                 f"not {e!r}")
        return v

    @model_validator(mode="after")
    def _does_something(self) -> "Step":
        if self.call is None and not self.delegate:
            raise ValueError("a step needs 'call' or 'delegate' (or both)")
        if isinstance(self.expect, list):
            if not self.expect or "repeat" in self.model_fields_set and self.repeat != len(self.expect):
                raise ValueError("a list of expectations is one per call: leave out 'repeat' (or give its length)")
            if self.call is None:
                raise ValueError("a list of expectations needs a 'call'")
            object.__setattr__(self, "repeat", len(self.expect))
        return self

    def expected(self, rep: int) -> str:
        """What call ``rep`` (1-based) must get."""
        return self.expect if isinstance(self.expect, str) else self.expect[rep - 1]


class Case(_Strict):
    name: str = ""
    steps: list[Step] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _one_step(cls, data: Any) -> Any:
        """A case without ``steps`` is one step: its own keys."""
        if isinstance(data, dict) and "steps" not in data:
            step = {k: v for k, v in data.items() if k != "name"}
            return {"name": data.get("name", ""), "steps": [step]}
        return data


class CaseFile(_Strict):
    tools: list[str] = Field(min_length=1, description="modules whose @tool functions exist")
    run_tools: bool = False
    stubs: dict[str, Any] = Field(default_factory=dict)
    tool_config: dict[str, Any] = Field(default_factory=dict)
    agents: dict[str, str] = Field(default_factory=dict, description="agent name -> policy file")
    reader: ReaderSpec | None = Field(default=None, description="as a job file's: offers reader.ask, answered by "
                                                                "a reader with this model")
    cases: list[Case] = Field(min_length=1)


def load_cases(path: str | Path) -> CaseFile:
    """Parse and validate a case file. Raises ConfigError(POLICY_INVALID) with the place and reason."""
    data = read_yaml(path, "case file", ErrorCode.POLICY_INVALID)
    return validated(CaseFile, data, path, ErrorCode.POLICY_INVALID)


@dataclass
class CaseResult:
    index: int  # 1-based, in the file
    name: str
    ok: bool
    problem: str = ""  # the readable mismatch: which step and call, expected, got, why

    def title(self) -> str:
        return f"case {self.index}" + (f" {self.name!r}" if self.name else "")


@dataclass
class CasesReport:
    policy: str
    cases_file: str
    results: list[CaseResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def format(self, *, verbose: bool = False) -> str:
        lines = []
        for r in self.results:
            if not r.ok:
                lines.append(f"FAIL {self.cases_file}: {r.title()}")
                lines += ["     " + line for line in r.problem.splitlines()]
            elif verbose:
                lines.append(f"ok   {self.cases_file}: {r.title()}")
        failed = sum(not r.ok for r in self.results)
        lines.append(f"{self.cases_file} ({self.policy}): {len(self.results)} cases, "
                     f"{len(self.results) - failed} passed" + (f", {failed} FAILED" if failed else ""))
        return "\n".join(lines)


def run_cases(policy: str | Path, cases_path: str | Path) -> CasesReport:
    """Run every case of ``cases_path`` against ``policy`` (a file). ConfigError if either does not load."""
    cases_path = Path(cases_path)
    spec = load_cases(cases_path)
    under_test = load_policy(policy)
    others = {name: load_policy(cases_path.parent / file) for name, file in spec.agents.items()
              if name != under_test.agent}
    report = CasesReport(str(policy), str(cases_path))
    for i, case in enumerate(spec.cases, 1):
        report.results.append(_run_case(i, case, spec, under_test, others))
    return report


def _run_case(index: int, case: Case, spec: CaseFile, policy: Policy, others: dict[str, Policy]) -> CaseResult:
    try:
        with PolicyHarness(spec.tools, stubs=spec.stubs, run_tools=spec.run_tools, tool_config=spec.tool_config,
                           reader=spec.reader.model_dump() if spec.reader else None) as h:
            h.add_agent(policy)
            for name, other in others.items():
                h.add_agent(other, name=name)
            handles: dict[str, Any] = {}  # tool -> the handle its latest call returned
            for n, step in enumerate(case.steps, 1):
                problem = _run_step(h, step, policy.agent, handles)
                if problem:
                    where = f"step {n} of {len(case.steps)}: " if len(case.steps) > 1 else ""
                    return CaseResult(index, case.name, False, where + problem)
    except WardenError as exc:  # a case that cannot run (unknown agent, tool missing) is a failure
        return CaseResult(index, case.name, False, f"could not run: {exc.code.value}: {exc.reason}")
    return CaseResult(index, case.name, True)


def _with_handles(value: Any, handles: dict[str, Any]) -> Any:
    """``value`` with each ``{$handle_of: TOOL}`` replaced by the handle TOOL returned (KeyError if none)."""
    if isinstance(value, dict) and set(value) == {"$handle_of"}:
        if value["$handle_of"] not in handles:
            raise KeyError(f"no handle from {value['$handle_of']!r} yet (a call of it, hidden by the policy, first)")
        return handles[value["$handle_of"]]
    if isinstance(value, (list, dict)):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        out = {k: _with_handles(v, handles) for k, v in items}
        return out if isinstance(value, dict) else list(out.values())
    return value


def _run_step(h: PolicyHarness, step: Step, default_agent: str, handles: dict[str, Any] | None = None) -> str:
    """Run one step: its delegations once, then its call ``repeat`` times with the token they gave.
    The first mismatch, readable, or "" if every decision matched."""
    handles = {} if handles is None else handles
    try:
        args = _with_handles(step.args, handles)
    except KeyError as exc:
        return f"could not run: {exc.args[0]}"
    h.advance(step.advance_s)
    caller, token, delegated = _delegate(h, step, step.caller or default_agent)
    if delegated is not None:  # the step ends at a delegation
        problem = _mismatch(step.expected(1), step.reason, delegated)
        return problem and _diff(step, delegated, problem, "")
    for rep in range(1, step.repeat + 1):
        d = h.call(caller, str(step.call), args, token=token, approve=step.approve)
        if is_handle(d.value):
            handles[str(step.call)] = d.value
        problem = _mismatch(step.expected(rep), step.reason, d)
        if problem:
            what = json.dumps(step.args, sort_keys=True, default=str)
            if step.repeat > 1:
                what += f" (call {rep} of {step.repeat})"
            if step.delegate:
                what += f" (delegated by {' -> '.join([step.caller or default_agent, *[x.to for x in step.delegate]])})"
            return _diff(step, d, problem, what, rep)
    return ""


def _diff(step: Step, d: Decision, problem: str, what: str, rep: int = 1) -> str:
    """Which request, what was expected, what the supervisor decided, and why."""
    wanted = step.expected(rep) + (f" with reason containing {step.reason!r}" if step.reason else "")
    return f"{d.agent} -> {d.tool} {what}".rstrip() + f"\nexpected: {wanted}\ngot:      {d.result}\n{problem}"


def _delegate(h: PolicyHarness, step: Step, caller: str) -> tuple[str, bytes | None, Decision | None]:
    """Follow the step's delegation chain: (the last delegate, its token, None), or the decision that
    ends the step (a refused delegation, or the last one when the step has no call)."""
    token, d = None, None
    for link in step.delegate:
        d = h.delegate(caller, link.to, token=token, **link.model_dump(exclude={"to"}, exclude_none=True))
        if not d.allowed:
            return caller, token, d
        caller, token = link.to, d.token
    return caller, token, d if step.call is None else None


def _mismatch(expect: str, reason: str | None, d: Decision) -> str:
    """Why ``d`` does not meet ``expect`` and, for a denial, ``reason`` ("" if it does)."""
    if expect == "allow":
        good = d.allowed
    elif expect == "deny":
        good = not d.allowed
    else:  # a code: the denial's, or the failure code of an allowed call that failed
        good = d.result == expect or (d.allowed and d.outcome_code == expect)
    if good and (reason is None or d.allowed or reason in (d.reason or "")):  # a reason is a denial's
        return ""
    if d.allowed:
        failed = f"; the tool then failed: {d.outcome_code}: {(d.outcome or {}).get('reason')}" \
            if d.outcome_code else ""
        return f"reason:   allowed (audit record #{(d.audit or {}).get('seq')}){failed}"
    return f"reason:   {d.reason}"
