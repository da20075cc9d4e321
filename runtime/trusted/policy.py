"""Policies: what a policy file means, as an agent's root-token caveats, quotas and labels.

Invariants: a policy validates completely (``extra="forbid"``, every regex compiles, every effect
is known) or the job does not start; nothing is guessed or defaulted to "allow". A tool the policy
does not name is denied; an argument constraint or sink rule it names holds on every call of the
tool. Threat: a typo that silently widens an agent's rights (``tool:`` for ``tools:``, an unknown
key, a misspelt effect): ``runtime.policyfile`` reports each with the file, the place and the reason.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from ..anomaly import AnomalySpec
from ..isolation import SandboxRule
from ..errors import PolicyDenied
from .capability import (Arg, Audience, Caveat, CallBudget, CostBudget, Effects, Expires, Flow, MaxDepth, Tools,
                         canonical_path, decode_caveat, encode_caveat, host_pattern)
from .flow import Label, Output, answer_kind
from .approvals import ApprovalRule
from .ledger import AgentQuota

Effect = Literal["read", "write", "delete", "execute"]
Level = Literal["trusted", "endorsed", "untrusted"]
Reader = Annotated[str, Field(pattern=r"^(\*|\*[@.][^*]+|[^*]+)$")]  # a name, '*', '*@domain' or '*.domain'


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArgRule(_Strict):
    """Constraints on one argument; every one given must hold."""

    exact: Any = None
    one_of: list[Any] | None = None
    min: float | None = None
    max: float | None = None
    regex: str | None = None
    path_under: str | None = None
    url_host: list[Annotated[str, AfterValidator(lambda p: host_pattern(p) and p)]] | None = None  # checked at load
    max_bytes: int | None = Field(default=None, ge=0)
    each: ArgRule | None = None  # a rule every item of a list argument must satisfy
    min_items: int | None = Field(default=None, ge=0)
    max_items: int | None = Field(default=None, ge=0)

    @field_validator("path_under")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        if v is None:
            return None
        try:  # refuses a relative path too
            return canonical_path(v)
        except PolicyDenied as exc:  # not a ValueError: pydantic would let it escape as a denial
            raise ValueError(exc.reason) from None

    @model_validator(mode="after")
    def _each_key_constrains(self) -> "ArgRule":
        """Every key given becomes a caveat the token check accepts; one that would not is an error."""
        empty = sorted(k for k in self.model_fields_set if k != "exact" and getattr(self, k) is None)
        if empty or not self.model_fields_set:
            raise ValueError(f"a rule needs at least one key, each with a value (empty: {empty})")
        for c in self.caveats("tool", "arg"):
            try:
                decode_caveat(encode_caveat(c))
            except Exception as exc:  # what the token parser would refuse at every call
                raise ValueError(f"{c.check}: {exc}") from None
        return self

    def caveats(self, tool: str, arg: str) -> list[Arg]:
        """One Arg caveat per key given, in this order; lists as tuples, bounds as (min, max) pairs."""
        each = self.each.caveats(tool, arg) if self.each is not None else []
        given = [("exact", self.exact)] if "exact" in self.model_fields_set else []  # exact: null is a value
        given += [("one_of", self.one_of), ("range", (self.min, self.max)), ("regex", self.regex),
                  ("path_under", self.path_under), ("url_host", self.url_host), ("max_bytes", self.max_bytes),
                  *(("each", (c.check, c.param)) for c in each), ("items", (self.min_items, self.max_items))]
        return [Arg(tool, arg, k, tuple(p) if k in ("one_of", "url_host") else p) for k, p in given
                if k == "exact" or (p is not None and p != (None, None))]


class ApprovalSpec(_Strict):
    """A human must approve calls whose arguments match every rule in ``when`` (all calls if empty)."""

    when: dict[str, ArgRule] = Field(default_factory=dict)
    timeout_s: float = Field(default=300.0, gt=0, le=86400)


class ItemRule(_Strict):
    path: str = ""  # the key of the list in a map result; '' when the result is the list
    when: dict[str, ArgRule] = Field(min_length=1)  # rules on each item's fields


class OutputRule(_Strict):
    """The label of a tool's results; unset: the job file's, then ``@tool``'s, else untrusted, public."""

    integrity: Level | None = None
    readers: Literal["public"] | Annotated[list[Reader], Field(min_length=1)] | None = None
    hide: bool | None = None  # the agent gets a handle, not the content
    carries_inputs: bool | None = None  # false: the result (a receipt) says nothing of the data passed in
    trusted_items: ItemRule | None = None

    def over(self, base: "OutputRule | None") -> "OutputRule":
        return OutputRule.model_validate({**base.model_dump(exclude_none=True), **self.model_dump(exclude_none=True)}
                                         ) if base else self

    def output(self) -> Output:
        label = Label.parse({"integrity": self.integrity or "untrusted", "readers": self.readers or "public"})
        items = self.trusted_items
        when = tuple((c.arg, c.check, c.param) for f, r in sorted(items.when.items()) for c in r.caveats("", f)
                     ) if items else ()
        return Output(label, bool(self.hide), self.carries_inputs is not False, items.path if items else None, when)


class FlowRule(_Strict):
    """What may flow into a call (sink rules), encoded in the token as ``Flow`` caveats."""

    effects: list[Effect] = Field(default_factory=list)  # policy-wide rules: the tools they apply to
    context: Level | None = None
    args: Level | dict[str, Level] | None = None  # one level for every argument, or per argument
    destination: str | None = None  # an argument naming where the data goes, or 'public'
    on_violation: Literal["deny", "approve"] = "deny"

    def caveats(self, tool: str) -> list[Flow]:
        e, m = tuple(self.effects), self.on_violation
        args = {"*": self.args} if isinstance(self.args, str) else self.args or {}
        out = [Flow(tool, e, a, lvl, m) for a, lvl in [("", self.context), *sorted(args.items())]
               if lvl not in (None, "untrusted")]
        if self.destination:
            out.append(Flow(tool, e, "" if self.destination == "public" else self.destination, "readers", m))
        return out


class ToolRule(_Strict):
    effect: Effect
    args: dict[str, ArgRule] = Field(default_factory=dict)
    approval: bool | ApprovalSpec = False
    sandbox: SandboxRule | None = None
    ifc: FlowRule | None = None
    output: OutputRule | None = None

    def approval_rule(self, tool: str) -> ApprovalRule | None:
        if self.approval is False:
            return None
        spec = ApprovalSpec() if self.approval is True else self.approval
        when = tuple((c.arg, c.check, c.param) for arg, rule in sorted(spec.when.items())
                     for c in rule.caveats(tool, arg))
        return ApprovalRule(tool, when, spec.timeout_s)


class Quotas(_Strict):
    rate_per_s: float | None = Field(default=None, gt=0)
    burst: int = Field(default=10, ge=1)
    max_concurrent: int | None = Field(default=8, ge=1)
    max_parked: int = Field(default=8, ge=1)  # calls waiting for human approval at once
    max_calls: int | None = Field(default=None, ge=0)
    max_cost: float | None = Field(default=None, ge=0)
    ttl_s: float = Field(default=3600.0, gt=0)


class Delegation(_Strict):
    can_delegate_to: list[str] = Field(default_factory=list)
    max_depth: int = Field(default=0, ge=0)


class HandleLimits(_Strict):
    max_count: int = Field(default=256, ge=0)
    max_bytes: int = Field(default=16 << 20, ge=0)
    ttl_s: float = Field(default=3600.0, gt=0)


def _schemas(v: dict[str, Any]) -> dict[str, Any]:
    for name, schema in v.items():
        answer_kind(schema)  # ValueError: the policy does not load
    return v


class Policy(_Strict):
    agent: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    tools: dict[str, ToolRule]
    quotas: Quotas = Field(default_factory=Quotas)
    delegation: Delegation = Field(default_factory=Delegation)
    sandbox: SandboxRule = Field(default_factory=SandboxRule)
    anomaly: AnomalySpec = Field(default_factory=AnomalySpec)
    ifc: list[FlowRule] = Field(default_factory=list)
    handles: HandleLimits = Field(default_factory=HandleLimits)
    schemas: Annotated[dict[str, Any], AfterValidator(_schemas)] = Field(default_factory=dict)  # reader.ask's, by name

    def approval_rules(self) -> dict[str, ApprovalRule]:
        return {t: r for t, rule in self.tools.items() if (r := rule.approval_rule(t)) is not None}

    def root_caveats(self, *, job_id: str, now: float) -> list[Caveat]:
        """The caveats of this agent's root token. Every one narrows; together they are the policy."""
        aud, tools, effects, *args = self.delegate_caveats(job_id=job_id)
        caveats = [aud, Expires(now + self.quotas.ttl_s), tools, effects, MaxDepth(self.delegation.max_depth), *args]
        if self.quotas.max_calls is not None:
            caveats.append(CallBudget(self.quotas.max_calls))
        if self.quotas.max_cost is not None:
            caveats.append(CostBudget(self.quotas.max_cost))
        return caveats

    def delegate_caveats(self, *, job_id: str) -> list[Caveat]:
        """What a token delegated *to* this agent is narrowed by: it never exceeds this policy."""
        return [Audience(job_id), Tools(tuple(sorted(self.tools))),
                Effects(tuple(sorted({r.effect for r in self.tools.values()}))),
                *(c for tool, rule in sorted(self.tools.items()) for arg, r in sorted(rule.args.items())
                  for c in r.caveats(tool, arg)),
                *(c for tool, rule in sorted(self.tools.items()) if rule.ifc for c in rule.ifc.caveats(tool)),
                *(c for rule in self.ifc for c in rule.caveats("*"))]

    def outputs(self, declared: dict[str, OutputRule]) -> dict[str, Output]:
        """The label of each named tool's results: the policy's ``output`` over ``declared`` (the
        job file's over ``@tool``'s)."""
        return {t: (r.output or OutputRule()).over(declared.get(t)).output() for t, r in self.tools.items()}

    def agent_quota(self) -> AgentQuota:
        return AgentQuota(**self.quotas.model_dump(include={"rate_per_s", "burst", "max_concurrent"}))
