"""Registering an agent from its policy: the one place a policy becomes a root token.

The job driver (``runtime.job``) and the in-process policy harness (``runtime.harness``)
both turn a validated ``Policy`` into what the supervisor needs about an agent with
``register_agent``: its root token (minted under the job's key ring, holder = the agent),
its own request key, and its supervisor entry and quota. So what a policy test checks is
exactly what a job runs.

This runs in the process that holds the key ring (the driver while a job starts, or a
test), which is trusted for that moment; the agent receives only ``token`` and
``request_key``.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from typing import Any, Mapping

from .isolation import sandbox_settings, unsandboxed_tools
from .errors import ConfigError, ErrorCode, PolicyDenied
from .trusted.capability import KeyRing, canonical_path, host_pattern, host_value
from .trusted.ledger import AgentQuota
from .trusted.policy import OutputRule, Policy
from .policyfile import check_policy_tools
from .trusted.supervisor import AgentEntry

__all__ = ["Registration", "register_agent", "check_policy_against_tools"]


@dataclass(frozen=True)
class Registration:
    """One agent, ready for ``Supervisor.register_agent(entry, quota)``; ``token`` and
    ``request_key`` go to the agent and nowhere else."""

    name: str
    token: bytes  # the encoded root token
    request_key: bytes
    entry: AgentEntry
    quota: AgentQuota
    unsandboxed_tools: tuple[str, ...]  # "*" or tool names the policy runs without a sandbox: warn about them


def register_agent(keyring: KeyRing, policy: Policy, *, job_id: str, now: float, name: str | None = None,
                   request_key: bytes | None = None, tools: Mapping[str, Any] | None = None,
                   outputs: Mapping[str, OutputRule] | None = None) -> Registration:
    """Mint ``name``'s root token from ``policy`` (caveats of ``Policy.root_caveats``, valid from
    ``now`` for the policy's ``ttl_s``) and build its supervisor entry and quota.

    ``name`` is the agent's name in the job (default: the policy's ``agent``); ``request_key``
    is its proof-of-possession key (default: 32 fresh random bytes). The label of each tool's
    results: the policy's ``output``, over ``outputs`` (the job file's), over the ``@tool``
    declaration of ``tools`` (name -> ``Tool``); none: untrusted."""
    name = name or policy.agent
    key = request_key if request_key is not None else secrets.token_bytes(32)
    if len(key) < 16:
        raise ValueError("a request key needs at least 16 bytes")
    root = keyring.mint(holder=name, caveats=policy.root_caveats(job_id=job_id, now=now))
    entry = AgentEntry(name, key, frozenset(policy.delegation.can_delegate_to),
                       tuple(policy.delegate_caveats(job_id=job_id)), sandbox_settings(policy),
                       policy.approval_rules(), policy.anomaly.config(), root.token_id, policy.quotas.max_parked,
                       policy.outputs(declared_outputs(tools or {}, outputs or {})),
                       (policy.handles.max_count, policy.handles.max_bytes, policy.handles.ttl_s), policy.schemas)
    return Registration(name, root.encode(), key, entry, policy.agent_quota(), tuple(unsandboxed_tools(policy)))


def declared_outputs(tools: Mapping[str, Any], outputs: Mapping[str, OutputRule]) -> dict[str, OutputRule]:
    """Per tool, the job file's ``outputs`` entry over the ``@tool`` declaration."""
    declared = {n: t.spec.output for n, t in tools.items() if t.spec.output is not None}
    for name, rule in outputs.items():
        declared[name] = rule.over(declared.get(name))
    return declared


def check_policy_against_tools(agent: str, policy: Policy, tools: Mapping[str, Any], *, offered_by: str) -> None:
    """Refuse a policy that names a tool not offered (``offered_by`` says by what), gives a tool
    another effect than the tool declares, or has a rule its parameters make wrong
    (``check_policy_tools``). ``tools`` maps names to ``runtime.tool.Tool``. Raises ConfigError."""
    for name, rule in sorted(policy.tools.items()):
        t = tools.get(name)
        if t is None:
            hint = (" (it is in runtime.toolbox: add that module to the job's tools)" if name in BUILT_IN else
                    " (it is offered by a job with a reader: section)" if name == "reader.ask" else "")
            raise ConfigError(f"policy of {agent!r} names tool {name!r}, which {offered_by} does not offer "
                              f"(tools: {sorted(tools)}){hint}", code=ErrorCode.JOB_INVALID)
        if t.spec.effect != rule.effect:
            raise ConfigError(f"policy of {agent!r}: tool {name!r} has effect {t.spec.effect!r}, policy "
                              f"says {rule.effect!r}", code=ErrorCode.JOB_INVALID)
    check_policy_tools(policy, {n: t.spec for n, t in tools.items()}, source=f"policy of {agent!r}")
    problems = [f"  at tools.{name}.{where}.{arg}: {why}" for name, rule in sorted(policy.tools.items())
                for where, rules in (("args", rule.args), ("approval.when", _when(rule)))
                for arg, arg_rule in sorted(rules.items()) if arg in tools[name].spec.params
                for why in _never_matching(tools[name].spec.params[arg].format, arg_rule, where == "approval.when")]
    if problems:
        raise ConfigError("\n".join([f"policy of {agent!r}: rules that could never match what the tool receives",
                                     *problems]), code=ErrorCode.POLICY_INVALID)


_CANONICAL = {"path": canonical_path, "host": host_value}
BUILT_IN = frozenset({"python.exec", "shell.exec", "fs.read", "fs.write", "fs.list", "http.fetch", "handle.reveal"})


def _when(rule: Any) -> dict[str, Any]:
    return getattr(rule.approval, "when", None) or {}


def _never_matching(fmt: str | None, rule: Any, approval: bool) -> list[str]:
    """Rules on a canonicalised parameter written in another spelling than the one the check sees.

    An allow rule that never matches denies every call (fail closed, but surely not meant); an
    approval rule that never matches lets every call through unasked, so both are refused."""
    values = ([rule.exact] if "exact" in rule.model_fields_set else []) + list(rule.one_of or [])
    out = []
    for v in values if fmt in _CANONICAL else ():
        try:
            ok = isinstance(v, str) and _CANONICAL[fmt](v) == v
        except PolicyDenied:
            ok = False
        if not ok:
            out.append(f"{v!r:.80} is not in the canonical form of a {fmt.upper()} parameter "
                       f"(the tool gets {fmt}s canonicalised: write it so)")
    if fmt == "host" and any(host_pattern(p)[0] is not None for p in rule.url_host or ()):
        out.append("url_host entries with a scheme or port never match a bare HOST value")
    if approval and fmt == "url" and "regex" in rule.model_fields_set:
        out.append("a regex on a URL sees its raw spelling (case, trailing dot): use url_host in approval rules")
    return out
