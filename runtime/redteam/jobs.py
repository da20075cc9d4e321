"""The jobs of a catalogue run: scenarios grouped into job files, policies with or without flow rules."""

from __future__ import annotations

import copy
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, ErrorCode
from ..job import LoadedJob, load_job
from .catalogue import ASK, TAG_KEYS, Scenario


def group_scenarios(scenarios: list[Scenario]) -> list[list[Scenario]]:
    """As few groups as possible such that no agent name appears twice in a group and no two scenarios
    of a group give the job's scripted reader different rules for one question (greedy, in order)."""
    groups: list[tuple[set[str], list[Scenario]]] = []
    for s in scenarios:
        names = {a.name for a in s.agents}
        for used, members in groups:
            if not used & names and not any(rules_conflict(s, m) for m in members):
                used |= names
                members.append(s)
                break
        else:
            groups.append((set(names), [s]))
    return [members for _, members in groups]


def rules_conflict(a: Scenario, b: Scenario) -> bool:
    """One scenario's reader rule would answer a question the other asks (the job's reader has one list
    of rules, tried in order), or their rules for one question pattern differ."""
    def questions(s: Scenario) -> list[str]:
        return [str(step["question"]) for agent in s.agents for step in agent.steps if "ask" in step]

    def clash(x: Scenario, y: Scenario) -> bool:
        mine, theirs = x.reader.get("rules", []), y.reader.get("rules", [])
        return any(r not in theirs and (any(re.search(str(r["question"]), q, re.IGNORECASE) for q in questions(y))
                                        or any(str(r["question"]) == str(t["question"]) for t in theirs))
                   for r in mine)

    return clash(a, b) or clash(b, a)


def reader_section(group: list[Scenario], policies: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The job's ``reader:``: a scripted model with the rules of every scenario of the group, when one
    of them has rules or a policy of the job allows ``reader.ask`` (which needs a reader to load)."""
    rules: list[dict[str, Any]] = []
    for s in group:
        rules += [r for r in s.reader.get("rules", []) if r not in rules]
    if not rules and not any(ASK in (p.get("tools") or {}) for p in policies):
        return None
    return {"model": {"kind": "scripted", "rules": rules}, "count": 1, "resources": {"num_cpus": 0}}


def strip_flow(policy: dict[str, Any]) -> dict[str, Any]:
    """The policy with every flow rule gone: tool and policy-wide ``ifc`` rules, and ``hide``."""
    out = copy.deepcopy(policy)
    out.pop("ifc", None)
    for rule in (out.get("tools") or {}).values():
        if isinstance(rule, dict):
            rule.pop("ifc", None)
            if isinstance(rule.get("output"), dict):
                rule["output"].pop("hide", None)
    return out


def job_steps(steps: list[dict[str, Any]], *, without_flow: bool = False) -> list[dict[str, Any]]:
    """The script as the agent gets it: without the tags that say which actions are the attack
    (and, ``without_flow``, without the flow rules a delegator adds to a delegation)."""
    drop = TAG_KEYS | {"without_reader"} | ({"flow"} if without_flow else set())
    return [{k: v for k, v in step.items() if k not in drop} for step in steps]


def write_job(group: list[Scenario], *, index: int, catalogue: Path, out: Path, without_flow: bool) -> Path:
    """Write one job file (and the policies it uses) for a group of scenarios; returns its path."""
    job_dir = out / f"job-{index}"
    (job_dir / "policies").mkdir(parents=True, exist_ok=True)
    agents = []
    for s in group:
        for a in s.agents:
            source = catalogue / "policies" / f"{a.policy}.yaml"
            try:
                policy = yaml.safe_load(source.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigError(f"scenario {s.name}: policy {source}: {exc}", code=ErrorCode.JOB_INVALID) from None
            if without_flow:
                policy = strip_flow(policy)
            (job_dir / "policies" / f"{a.policy}.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
            spec: dict[str, Any] = {"name": a.name, "class": "redteam.agents:ScriptedAgent",
                                    "policy": f"policies/{a.policy}.yaml", "resources": {"num_cpus": 0},
                                    "config": {"steps": job_steps(a.steps, without_flow=without_flow)}}
            if a.model:  # the generic LLM agent, its model scripted: one tool call per turn, then an answer
                spec["class"] = "runtime:ToolCallingAgent"
                spec["config"] = {"max_turns": len(a.steps) + 1,
                                  "model": {"kind": "scripted", "steps": [*job_steps(a.steps), {"answer": "done"}]}}
            if a.task is not None:
                spec["task"] = a.task
            agents.append(spec)
    agents += idle_delegates(agents, catalogue=catalogue, job_dir=job_dir, without_flow=without_flow)
    job = {"name": f"redteam-{index}", "description": "scenarios: " + ", ".join(s.name for s in group),
           "entry": [n for s in group for n in s.entry], "tools": ["redteam.tools", "runtime.toolbox"],
           "workers": {"count": 1}, "call_timeout_s": 60, "timeout_s": 300, "agents": agents}
    policies = [yaml.safe_load(f.read_text(encoding="utf-8")) or {} for f in sorted((job_dir / "policies").glob("*.yaml"))]
    reader = reader_section(group, policies)
    if reader:
        job["reader"] = reader
    path = job_dir / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def idle_delegates(agents: list[dict[str, Any]], *, catalogue: Path, job_dir: Path,
                   without_flow: bool) -> list[dict[str, Any]]:
    """Agents a policy of the job may delegate to that no scenario of the job plays: a policy names
    its delegates by role (``helper``), so each is started idle, under its role's policy."""
    have = {a["name"] for a in agents}
    out: list[dict[str, Any]] = []
    todo = list(agents)
    while todo:
        policy = yaml.safe_load((job_dir / todo.pop()["policy"]).read_text(encoding="utf-8")) or {}
        for name in (policy.get("delegation") or {}).get("can_delegate_to", []):
            if name in have:
                continue
            source = catalogue / "policies" / f"{name}.yaml"
            if not source.exists():
                raise ConfigError(f"a policy delegates to {name!r}: no scenario of the job plays it and the "
                                  f"catalogue has no policy {source}", code=ErrorCode.JOB_INVALID)
            role = yaml.safe_load(source.read_text(encoding="utf-8"))
            (job_dir / "policies" / f"{name}.yaml").write_text(
                yaml.safe_dump(strip_flow(role) if without_flow else role, sort_keys=False))
            have.add(name)
            out.append({"name": name, "class": "redteam.agents:ScriptedAgent", "policy": f"policies/{name}.yaml",
                        "resources": {"num_cpus": 0}, "config": {"steps": []}})
            todo.append(out[-1])
    return out


def load_shipped_job(path: Path, *, without_flow: bool, model_steps: dict[str, list[dict[str, Any]]] | None = None
                     ) -> LoadedJob:
    """A job file as ``warden run`` loads it; ``without_flow``: its policies and ``outputs:`` without
    flow rules and ``hide``; ``model_steps``: those agents' scripted model steps instead of the job's
    (the job played without the reader). The job file and its policies on disk are not touched."""
    from ..policyfile import load_policy

    job = load_job(path)
    if model_steps:
        agents = []
        for a in job.spec.agents:
            if a.name in model_steps:
                steps = model_steps[a.name]
                config = {**a.config, "model": {**a.config["model"], "steps": steps},
                          "max_turns": max(int(a.config.get("max_turns", 0)), len(steps) + 1)}
                a = a.model_copy(update={"config": config})
            agents.append(a)
        job = replace(job, spec=job.spec.model_copy(update={"agents": agents}))
    if not without_flow:
        return job
    policies = {a.name: load_policy(strip_flow(yaml.safe_load((job.base / a.policy).read_text(encoding="utf-8"))))
                for a in job.spec.agents}
    outputs = {t: o.model_copy(update={"hide": None}) for t, o in job.spec.outputs.items()}
    return replace(job, spec=job.spec.model_copy(update={"outputs": outputs}), policies=policies)
