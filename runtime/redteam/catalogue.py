"""The attack catalogue: scenario files, each a benign task with injected actions hidden in it.

A scripted scenario names its agents, the role policy each runs under and the steps its
(adversarial) model plays, tagged ``attack: ID`` (with the layer expected to stop it) or
``benign: true``. A job-file scenario runs a shipped job as it is and names its actions by
agent, tool and occurrence. Loading checks every file and names the file and the problem.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from ..errors import ConfigError, ErrorCode

LAYERS = ("capability", "flow", "quota", "sandbox", "approval")
SCENARIO_KEYS = {"name", "class", "summary", "agents", "job", "attacks", "benign"}
AGENT_KEYS = {"name", "policy", "task", "steps", "model"}
TAG_KEYS = {"attack", "benign", "layer", "allowance", "approval"}
LLM_STEP_KEYS = {"call", "args"} | TAG_KEYS  # what the generic LLM agent's scripted model can play
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,40}$")

@dataclass(frozen=True, eq=False)  # identity: two steps of a script are two actions, even if alike
class Action:
    """One scripted action of an agent, as the audit log will show it (``key``: tool or delegate:NAME)."""

    agent: str
    key: str
    args: dict[str, Any]
    index: int  # position in the agent's script
    attack: str | None = None
    benign: bool = False
    layer: str | None = None  # the layer expected to stop the attack
    allowance: int = 0  # attempts of an attack that may take effect before it is cut off (a flood)
    approval: bool = False  # the benign action is expected to park for a human
    repeat: int = 1
    nth: int = 0  # a job-file scenario names its actions by occurrence: the nth call of the tool (from 1)


@dataclass(frozen=True)
class AgentDef:
    name: str
    policy: str
    task: Any
    steps: list[dict[str, Any]]
    model: bool = False  # played by the generic LLM agent (runtime:ToolCallingAgent) and a scripted model


@dataclass(frozen=True)
class Scenario:
    name: str
    attack_class: str
    summary: str
    agents: list[AgentDef]
    path: str = ""
    job: str | None = None  # a shipped job file, run as it is (its actions named in the scenario)
    declared: tuple[Action, ...] = ()  # the actions of a job-file scenario

    @cached_property  # once: the judge keys its verdicts by these very objects
    def actions(self) -> list[Action]:
        if self.job:
            return list(self.declared)
        return [a for agent in self.agents for a in actions_of(agent)]

    @property
    def attacks(self) -> list[Action]:
        return [a for a in self.actions if a.attack]

    @property
    def benign(self) -> list[Action]:
        return [a for a in self.actions if a.benign]

    @property
    def entry(self) -> list[str]:
        return [a.name for a in self.agents if a.task is not None or self.job]


def actions_of(agent: AgentDef) -> list[Action]:
    out = []
    for i, step in enumerate(agent.steps):
        if "call" in step:
            key = step["call"]
        elif "delegate" in step:
            key = f"delegate:{step['delegate']}"
        elif "reveal" in step:
            key = "handle.reveal"
        elif "batch" in step:  # one action per tool of the batch, each item one attempt
            for tool, n in Counter(str(c.get("call")) for c in step["batch"]).items():
                out.append(_action(agent.name, tool, {}, i, step, repeat=n))
            continue
        else:
            continue
        out.append(_action(agent.name, key, literal_args(step.get("args", {})), i, step,
                           repeat=int(step.get("repeat", 1))))
    return out


def _action(agent: str, key: str, args: dict[str, Any], index: int, step: dict[str, Any], *, repeat: int) -> Action:
    return Action(agent, key, args, index, attack=step.get("attack"), benign=bool(step.get("benign")),
                  layer=step.get("layer"), allowance=int(step.get("allowance", 0)),
                  approval=bool(step.get("approval")), repeat=repeat)


def literal_args(args: dict[str, Any]) -> dict[str, Any]:
    """The arguments a script writes out (a ``$ref`` is only known when the agent runs)."""
    return {k: v for k, v in args.items() if not (isinstance(v, dict) and {"$ref", "$handle", "$handle_of"} & set(v))}


def load_scenario(path: Path) -> Scenario:
    """A scenario file, checked; ConfigError(JOB_INVALID) naming the file and the problem."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"{path}: {why}", code=ErrorCode.JOB_INVALID)

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise bad(f"cannot read: {exc}") from None
    if not isinstance(data, dict) or set(data) - SCENARIO_KEYS:
        raise bad(f"a scenario is a mapping with keys {sorted(SCENARIO_KEYS)}")
    if not NAME_RE.match(str(data.get("name"))):
        raise bad(f"name {data.get('name')!r} must be lower-case letters, digits and '-'")
    if "job" in data:
        return _job_scenario(path, data, bad)
    if not {"agents"} <= set(data) or {"attacks", "benign"} & set(data):
        raise bad("a scenario has agents (with scripted steps), or a job file with its attacks and benign actions")
    agents = []
    for a in data["agents"] or []:
        if not isinstance(a, dict) or set(a) - AGENT_KEYS or not {"name", "policy"} <= set(a):
            raise bad(f"an agent is a mapping with keys {sorted(AGENT_KEYS)} (name and policy required): {a!r}")
        steps = a.get("steps") or []
        for step in steps:
            if not isinstance(step, dict) or not {"call", "delegate", "reveal", "batch", "leak_token"} & set(step):
                raise bad(f"agent {a['name']!r}: a step needs call, delegate, reveal, batch or leak_token: {step!r}")
            if step.get("attack") and step.get("layer") not in LAYERS:
                raise bad(f"attack {step['attack']!r}: layer must be one of {list(LAYERS)}")
            if a.get("model") and (set(step) - LLM_STEP_KEYS or "$ref" in json.dumps(step.get("args", {}))):
                raise bad(f"agent {a['name']!r} (model: scripted): a step is {{call, args}} with written-out "
                          f"arguments: {step!r}")
        if a.get("model") not in (None, "scripted"):
            raise bad(f"agent {a['name']!r}: model must be 'scripted' (the generic LLM agent with a scripted model)")
        agents.append(AgentDef(str(a["name"]), str(a["policy"]), a.get("task"), steps, a.get("model") == "scripted"))
    scenario = Scenario(str(data["name"]), str(data.get("class", "")), " ".join(str(data.get("summary", "")).split()),
                        agents, str(path))
    if not scenario.entry:
        raise bad("no agent has a task (the entry agents are those with one)")
    ids = [a.attack for a in scenario.attacks]
    if len(ids) != len(set(ids)):
        raise bad(f"attack ids must be unique: {ids}")
    return scenario


JOB_ACTION_KEYS = {"id", "agent", "tool", "nth", "layer", "allowance", "repeat", "approval", "args"}


def _job_scenario(path: Path, data: dict[str, Any], bad: Callable[[str], ConfigError]) -> Scenario:
    """A scenario over a shipped job file: its agents and scripts as they are, its injected and benign
    actions named by agent, tool and occurrence (``nth``, from 1); ``args`` (optional) are what the
    scripted operator tells a parked call of the action by."""
    job_path = (path.parent / str(data["job"])).resolve()
    try:
        job = yaml.safe_load(job_path.read_text(encoding="utf-8"))
        agents = [AgentDef(str(a["name"]), str(a["policy"]), a.get("task"), []) for a in job["agents"]]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise bad(f"job {job_path}: {type(exc).__name__}: {exc}") from None
    names, actions = {a.name for a in agents}, []
    for kind in ("attacks", "benign"):
        for item in data.get(kind) or []:
            if not isinstance(item, dict) or set(item) - JOB_ACTION_KEYS or not {"agent", "tool"} <= set(item) \
                    or (kind == "attacks") != ("id" in item and item.get("layer") in LAYERS):
                raise bad(f"{kind}: each is {{agent, tool, nth?, repeat?}}" + (", with an id and a layer in "
                          f"{list(LAYERS)}" if kind == "attacks" else "") + f": {item!r}")
            if item["agent"] not in names:
                raise bad(f"{kind}: the job has no agent {item['agent']!r} (agents: {sorted(names)})")
            actions.append(Action(str(item["agent"]), str(item["tool"]), dict(item.get("args") or {}), len(actions),
                                  attack=item.get("id") if kind == "attacks" else None, benign=kind == "benign",
                                  layer=item.get("layer"), allowance=int(item.get("allowance", 0)),
                                  approval=bool(item.get("approval")), repeat=int(item.get("repeat", 1)),
                                  nth=int(item.get("nth", 1))))
    return Scenario(str(data["name"]), str(data.get("class", "")), " ".join(str(data.get("summary", "")).split()),
                    agents, str(path), str(job_path), tuple(actions))


def load_catalogue(directory: Path, only: Iterable[str] = ()) -> list[Scenario]:
    """Every ``scenarios/*.yaml`` of the catalogue, by name; ``only``: those names (each must exist)."""
    files = sorted((directory / "scenarios").glob("*.yaml"))
    if not files:
        raise ConfigError(f"{directory}: no scenarios/*.yaml (run from the project directory, or pass --catalogue)",
                          code=ErrorCode.JOB_INVALID)
    scenarios = [load_scenario(f) for f in files]
    names = [s.name for s in scenarios]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{directory}: scenario names used twice: {dupes}", code=ErrorCode.JOB_INVALID)
    wanted = list(only)
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise ConfigError(f"no scenario {unknown}; the catalogue has: {', '.join(names)}", code=ErrorCode.JOB_INVALID)
    return [s for s in scenarios if not wanted or s.name in wanted]
