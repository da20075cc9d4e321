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

from .errors import ConfigError, ErrorCode
from .trusted.capability import KeyRing
from .trusted.ledger import AgentQuota
from .trusted.policy import Policy, check_policy_tools
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
                   request_key: bytes | None = None) -> Registration:
    """Mint ``name``'s root token from ``policy`` (caveats of ``Policy.root_caveats``, valid from
    ``now`` for the policy's ``ttl_s``) and build its supervisor entry and quota.

    ``name`` is the agent's name in the job (default: the policy's ``agent``); ``request_key``
    is its proof-of-possession key (default: 32 fresh random bytes)."""
    name = name or policy.agent
    key = request_key if request_key is not None else secrets.token_bytes(32)
    if len(key) < 16:
        raise ValueError("a request key needs at least 16 bytes")
    root = keyring.mint(holder=name, caveats=policy.root_caveats(job_id=job_id, now=now))
    entry = AgentEntry(name, key, frozenset(policy.delegation.can_delegate_to),
                       tuple(policy.delegate_caveats(job_id=job_id)), policy.sandbox_settings(),
                       policy.approval_rules(), policy.anomaly.config(), root.token_id, policy.quotas.max_parked)
    return Registration(name, root.encode(), key, entry, policy.agent_quota(), tuple(policy.unsandboxed_tools()))


def check_policy_against_tools(agent: str, policy: Policy, tools: Mapping[str, Any], *, offered_by: str) -> None:
    """Refuse a policy that names a tool not offered (``offered_by`` says by what), gives a tool
    another effect than the tool declares, or has a rule its parameters make wrong
    (``check_policy_tools``). ``tools`` maps names to ``runtime.tool.Tool``. Raises ConfigError."""
    for name, rule in sorted(policy.tools.items()):
        t = tools.get(name)
        if t is None:
            raise ConfigError(f"policy of {agent!r} names tool {name!r}, which {offered_by} does not offer "
                              f"(tools: {sorted(tools)})", code=ErrorCode.JOB_INVALID)
        if t.spec.effect != rule.effect:
            raise ConfigError(f"policy of {agent!r}: tool {name!r} has effect {t.spec.effect!r}, policy "
                              f"says {rule.effect!r}", code=ErrorCode.JOB_INVALID)
    check_policy_tools(policy, {n: t.spec for n, t in tools.items()}, source=f"policy of {agent!r}")
