"""The attack catalogue: scenario files, each a benign task with injected actions hidden in it.

A scripted scenario names its agents, the role policy each runs under and the steps its
(adversarial) model plays, tagged ``attack: ID`` (with the layer expected to stop it) or
``benign: true``. A job-file scenario runs a shipped job as it is and names its actions by
agent, tool and occurrence. Loading checks every file and names the file and the problem.

A step may ask the quarantined reader about a handle (``{ask: NAME, question, schema, as}``,
the ``reader.ask`` call), and carries what the agent does without the reader
(``without_reader:``, steps; by default it reveals the handle and reads the content itself).
``Scenario.without_reader()`` is the scenario played that way: the same policies, the task
done the old way, for the report's approvals per benign task with and without the reader.
A scenario may configure the job's scripted reader (``reader: {rules: [...]}``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from ..errors import ConfigError, ErrorCode

LAYERS = ("capability", "flow", "reader", "quota", "sandbox", "approval")
SCENARIO_KEYS = {"name", "class", "summary", "agents", "job", "attacks", "benign", "reader", "without_reader"}
AGENT_KEYS = {"name", "policy", "task", "steps", "model"}
TAG_KEYS = {"attack", "benign", "layer", "allowance", "approval", "layer_without_reader", "approval_without_reader"}
STEP_KINDS = ("call", "delegate", "reveal", "batch", "leak_token", "ask", "let")
ASK_KEYS = {"ask", "question", "schema", "as", "when", "without_reader"} | TAG_KEYS
LLM_STEP_KEYS = {"call", "args"} | TAG_KEYS  # what the generic LLM agent's scripted model can play
ASK = "reader.ask"  # the tool name of a question to the reader (runtime.trusted.flow.ASK)
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
    # The earlier actions whose results this one uses (``$ref``, ``ask``, ``reveal``): when one of them
    # was refused, the agent never makes this call, and the refusal is what stopped it.
    inputs: tuple["Action", ...] = ()


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
    reader: dict[str, Any] = field(default_factory=dict)  # the scripted reader's config ({rules: [...]})
    mode: str = "reader"  # or "without-reader": the task done without asking the reader
    # a job-file scenario without the reader: its agents' scripted model steps, and its actions then
    model_steps: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    alternative: "Scenario | None" = None

    @property
    def uses_reader(self) -> bool:
        """The scenario asks the reader somewhere (so it has a way of doing without)."""
        return self.alternative is not None or any("ask" in step for a in self.agents for step in a.steps)

    def without_reader(self) -> "Scenario":
        """The scenario with every question to the reader replaced by its ``without_reader`` steps:
        the agent reveals the data and decides itself (same policies, same world)."""
        if self.mode != "reader" or not self.uses_reader:
            return self
        if self.job:
            assert self.alternative is not None
            return self.alternative
        agents = [replace(a, steps=expand_asks(a.steps)) for a in self.agents]
        return replace(self, agents=agents, mode="without-reader")

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


def expand_asks(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The steps with each ``ask`` replaced by its ``without_reader`` steps (default: reveal the
    handle, and use what it shows). ``layer_without_reader`` becomes the step's layer."""
    out: list[dict[str, Any]] = []
    for step in steps:
        if "ask" in step:
            alt = step.get("without_reader")
            out += expand_asks(alt if alt is not None else [{"reveal": step["ask"], **({"as": step["as"]} if
                                                                                         "as" in step else {})}])
            continue
        for key in ("layer", "approval"):
            if f"{key}_without_reader" in step:
                step = {**step, key: step[f"{key}_without_reader"]}
        out.append(step)
    return out


def refs(value: Any) -> set[str]:
    """The names of earlier results a step's value uses (``{$ref: NAME}``)."""
    if isinstance(value, dict):
        if isinstance(value.get("$ref"), str):
            return {value["$ref"]}
        return set().union(*(refs(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(refs(v) for v in value)) if value else set()
    return set()


def step_refs(step: dict[str, Any]) -> set[str]:
    """Every earlier result a step needs: those its values name, the handle it asks about or reveals,
    the token it uses. ``task`` is always there."""
    names = refs({k: v for k, v in step.items() if k not in TAG_KEYS | {"without_reader", "as"}})
    names |= {str(step[k]) for k in ("ask", "reveal", "token_of", "when") if k in step}
    return names - {"task"}


def actions_of(agent: AgentDef) -> list[Action]:
    out: list[Action] = []
    made: dict[str, Action] = {}  # result name -> the action that made it (the latest)
    for i, step in enumerate(agent.steps):
        inputs = tuple(made[n] for n in sorted(step_refs(step)) if n in made)
        if "call" in step:
            key, args = step["call"], literal_args(step.get("args", {}))
        elif "delegate" in step:
            key, args = f"delegate:{step['delegate']}", {}
        elif "reveal" in step:
            key, args = "handle.reveal", {}
        elif "ask" in step:
            key, args = ASK, {k: step[k] for k in ("question", "schema") if not refs(step.get(k))}
        elif "batch" in step:  # one action per tool of the batch, each item one attempt
            for tool, n in Counter(str(c.get("call")) for c in step["batch"]).items():
                out.append(_action(agent.name, tool, {}, i, step, repeat=n, inputs=inputs))
            continue
        else:
            if "let" in step and inputs:  # a value the model derives from an earlier result
                made[str(step["let"])] = inputs[0]
            continue
        out.append(_action(agent.name, key, args, i, step, repeat=int(step.get("repeat", 1)), inputs=inputs))
        if step.get("as"):
            made[str(step["as"])] = out[-1]
    return out


def _action(agent: str, key: str, args: dict[str, Any], index: int, step: dict[str, Any], *, repeat: int,
            inputs: tuple[Action, ...] = ()) -> Action:
    return Action(agent, key, args, index, attack=step.get("attack"), benign=bool(step.get("benign")),
                  layer=step.get("layer"), allowance=int(step.get("allowance", 0)),
                  approval=bool(step.get("approval")), repeat=repeat, inputs=inputs)


def literal_args(args: dict[str, Any]) -> dict[str, Any]:
    """The arguments a script writes out (a ``$ref`` is only known when the agent runs)."""
    return {k: v for k, v in args.items() if not (isinstance(v, dict) and {"$ref", "$handle", "$handle_of"} & set(v))
            and not refs(v)}


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
            _check_step(step, a, bad)
            if a.get("model") and (set(step) - LLM_STEP_KEYS or "$ref" in json.dumps(step.get("args", {}))):
                raise bad(f"agent {a['name']!r} (model: scripted): a step is {{call, args}} with written-out "
                          f"arguments: {step!r}")
        if a.get("model") not in (None, "scripted"):
            raise bad(f"agent {a['name']!r}: model must be 'scripted' (the generic LLM agent with a scripted model)")
        agents.append(AgentDef(str(a["name"]), str(a["policy"]), a.get("task"), steps, a.get("model") == "scripted"))
    if "without_reader" in data:
        raise bad("without_reader: is for a job-file scenario; a scripted one gives it on each ask step")
    scenario = Scenario(str(data["name"]), str(data.get("class", "")), " ".join(str(data.get("summary", "")).split()),
                        agents, str(path), reader=_reader(data, bad))
    if not scenario.entry:
        raise bad("no agent has a task (the entry agents are those with one)")
    for variant in (scenario, scenario.without_reader()):
        ids = [a.attack for a in variant.attacks]
        if len(ids) != len(set(ids)):
            raise bad(f"attack ids must be unique ({variant.mode}): {ids}")
    return scenario


def _check_step(step: Any, agent: dict[str, Any], bad: Callable[[str], ConfigError]) -> None:
    name = agent.get("name")
    if not isinstance(step, dict) or len(set(STEP_KINDS) & set(step)) != 1:
        raise bad(f"agent {name!r}: a step needs one of {', '.join(STEP_KINDS)}: {step!r}")
    for layer_key in ("layer", "layer_without_reader"):
        if step.get("attack") and layer_key in step and step[layer_key] not in LAYERS:
            raise bad(f"attack {step['attack']!r}: {layer_key} must be one of {list(LAYERS)}")
    if step.get("attack") and "layer" not in step:
        raise bad(f"attack {step['attack']!r}: layer must be one of {list(LAYERS)}")
    if "let" in step and set(step) != {"let", "value"}:
        raise bad(f"agent {name!r}: a let step is {{let: NAME, value: V}} (what the model concludes itself): {step!r}")
    if "ask" in step:
        if set(step) - ASK_KEYS or not {"question", "schema"} <= set(step) or not isinstance(step["ask"], str):
            raise bad(f"agent {name!r}: an ask step is {{ask: NAME (a handle from an earlier step), question, "
                      f"schema, as?, without_reader?: [steps]}}: {step!r}")
        alt = step.get("without_reader")
        if alt is not None:
            if not isinstance(alt, list):
                raise bad(f"agent {name!r}: without_reader is a list of steps: {alt!r}")
            for sub in alt:
                if isinstance(sub, dict) and "ask" in sub:
                    raise bad(f"agent {name!r}: the steps without the reader cannot ask it: {sub!r}")
                _check_step(sub, agent, bad)


def _reader(data: dict[str, Any], bad: Callable[[str], ConfigError]) -> dict[str, Any]:
    """A scenario's scripted reader: ``{rules: [...], default: ...?}`` (the job's reader model, merged
    with the other scenarios of the job)."""
    reader = data.get("reader") or {}
    if not isinstance(reader, dict) or set(reader) - {"rules"} or not isinstance(reader.get("rules", []), list) \
            or not all(isinstance(r, dict) and "question" in r for r in reader.get("rules", [])):
        raise bad(f"reader: is {{rules: [{{question: REGEX, extract: REGEX | answer: VALUE}}, ...]}}: {reader!r}")
    return reader


JOB_ACTION_KEYS = {"id", "agent", "tool", "nth", "layer", "allowance", "repeat", "approval", "args"}
JOB_WITHOUT_READER_KEYS = {"steps", "attacks", "benign"}


def _job_scenario(path: Path, data: dict[str, Any], bad: Callable[[str], ConfigError]) -> Scenario:
    """A scenario over a shipped job file: its agents and scripts as they are, its injected and benign
    actions named by agent, tool and occurrence (``nth``, from 1); ``args`` (optional) are what the
    scripted operator tells a parked call of the action by. ``without_reader:`` gives the scripted
    model steps of the agents that ask the reader, played without it (``steps: {AGENT: [...]}``),
    and the actions then (``attacks``, ``benign``; by default the same)."""
    job_path = (path.parent / str(data["job"])).resolve()
    try:
        job = yaml.safe_load(job_path.read_text(encoding="utf-8"))
        agents = [AgentDef(str(a["name"]), str(a["policy"]), a.get("task"), []) for a in job["agents"]]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise bad(f"job {job_path}: {type(exc).__name__}: {exc}") from None
    if "reader" in data:
        raise bad("reader: a job-file scenario runs the job's own reader")
    scenario = Scenario(str(data["name"]), str(data.get("class", "")), " ".join(str(data.get("summary", "")).split()),
                        agents, str(path), str(job_path), _job_actions(data, {a.name for a in agents}, bad))
    alt = data.get("without_reader")
    if alt is None:
        return scenario
    if not isinstance(alt, dict) or set(alt) - JOB_WITHOUT_READER_KEYS or not isinstance(alt.get("steps"), dict) \
            or not set(alt["steps"]) <= {a.name for a in agents}:
        raise bad("without_reader: is {steps: {AGENT: [scripted model steps]}, attacks?: [...], benign?: [...]} "
                  f"naming agents of the job: {alt!r}")
    played = set(alt["steps"])  # the other agents' actions stay as they are
    other = _job_actions({kind: [i for i in data.get(kind) or [] if isinstance(i, dict) and i.get("agent") not in
                                 played] + list(alt.get(kind) or []) for kind in ("attacks", "benign")},
                         {a.name for a in agents}, bad)
    return replace(scenario, alternative=replace(scenario, declared=other, mode="without-reader",
                                                 model_steps={str(k): list(v) for k, v in alt["steps"].items()}))


def _job_actions(data: dict[str, Any], names: set[str], bad: Callable[[str], ConfigError]) -> tuple[Action, ...]:
    actions: list[Action] = []
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
    ids = [a.attack for a in actions if a.attack]
    if len(ids) != len(set(ids)):
        raise bad(f"attack ids must be unique: {ids}")
    return tuple(actions)


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
