"""``warden job check``: everything about a job file that can be checked before Ray starts.

Each check adds readable lines to one list instead of stopping at the first problem, so a new
user fixes a job in one round: the file's keys (a misspelt key names the one it meant), agent
classes (an import error says which directory modules are imported from), policies against the
job's tools and their parameters, delegated tokens that would exceed the token limits, every
environment variable the job reads (``credentials``, a model's ``api_key_env``), and what a
local Ray could never place. ``warden run`` runs the same checks first, so a missing model key
fails at start, not after the other agents have run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import ValidationError

from .errors import WardenError
from .agent import load_agent_class
from .llm import model_from_config
from .mcpjob import job_tools
from .tool import load_tools
from .trusted.capability import MAX_CAVEATS, MAX_TOKEN_BYTES, KeyRing
from .trusted.policy import Policy
from .policyfile import check_policy_tools, explain_error, load_policy
from .reader import ASK, ask_tool


def check_job(path: str | Path, *, environ: Mapping[str, str] | None = None, local: bool = True) -> list[str]:
    """Every problem found in the job file at ``path``, one line (or block) each; [] when it is good.

    ``environ`` is where credentials and model keys are read at start (default: this process's);
    ``local``: the job will start its own Ray (no address), so only the role resources exist.
    """
    from .job import JobSpec  # the job module imports this one's caller; import late

    path, environ = Path(path), os.environ if environ is None else environ
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        return [f"{path}: cannot read the job file: {getattr(exc, 'strerror', None) or exc}"]
    if not isinstance(data, dict):
        return [f"{path}: a job file must be a YAML mapping"]
    problems: list[str] = []
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        problems += [f"{path}: at {'.'.join(map(str, e['loc'])) or '(top)'}: {explain_error(JobSpec, e)}"
                     for e in exc.errors()]
        spec = None
    lists = {k: v if isinstance(v, list) else [] for k, v in data.items()}  # a wrong type: reported above
    agents = [a for a in lists.get("agents", []) if isinstance(a, dict)]
    modules = [m for m in lists.get("tools", []) if isinstance(m, str)]
    problems += _agent_classes(agents)
    tools = _tools(modules, problems)
    if tools is not None and spec is not None and spec.mcp_servers:  # started and listed, as at job start
        try:
            tools.update({n: t.spec for n, t in job_tools(list(spec.mcp_servers), environ)[0].items()})
        except WardenError as exc:
            problems.append(exc.reason)
    reader = isinstance(data.get("reader"), dict)
    if tools is not None and reader and ASK not in tools:
        tools[ASK] = ask_tool().spec  # the job's own tool: offered because it has a reader: section
    problems += _policies(path.resolve().parent, agents, tools, modules, reader)
    problems += _environment(data, agents, environ)
    if spec is not None and local:
        problems += _local_placement(spec)
    return problems


def _agent_classes(agents: list[dict[str, Any]]) -> list[str]:
    out = []
    for a in agents:
        try:
            load_agent_class(str(a.get("class", "")))
        except ImportError as exc:
            out.append(f"agent {a.get('name')!r}: cannot import {a.get('class')}: {exc} (modules are imported "
                       f"from {os.getcwd()} and the Python path: run warden from the project directory)")
        except Exception as exc:
            out.append(f"agent {a.get('name')!r}: {a.get('class')}: {type(exc).__name__}: {exc}")
    return out


def _tools(modules: list[str], problems: list[str]) -> dict[str, Any] | None:
    try:
        return {n: t.spec for n, t in load_tools(modules).items()}
    except Exception as exc:
        problems.append(f"cannot load tools {modules}: {type(exc).__name__}: {exc} (modules are imported from "
                        f"{os.getcwd()} and the Python path)")
        return None


def _policies(base: Path, agents: list[dict[str, Any]], tools: dict[str, Any] | None, modules: list[str],
              reader: bool = False) -> list[str]:
    out, names, loaded = [], {a.get("name") for a in agents}, {}
    for a in agents:
        source = f"policy of {a.get('name')!r}"
        try:
            policy = loaded[a.get("name")] = load_policy(base / str(a.get("policy", "")))
        except WardenError as exc:
            out.append(exc.reason)
            continue
        unknown = sorted(set(policy.delegation.can_delegate_to) - names)
        out += [f"{source}: delegates to unknown agents {unknown}"] if unknown else []
        if tools is None:
            continue
        out += [f"{source}: allows {ASK}, but the job has no reader: section to answer it (add reader: "
                "{model: ...} to the job file, or remove it from the policy)"] if ASK in policy.tools and not reader else []
        out += [f"{source}: tool {n!r} is defined by no module in {modules}" for n in sorted(policy.tools)
                if n not in tools and n != ASK]
        out += [f"{source}: tool {n!r} has effect {tools[n].effect!r}, the policy says {r.effect!r}"
                for n, r in sorted(policy.tools.items()) if n in tools and tools[n].effect != r.effect]
        try:
            check_policy_tools(policy, tools, source=source)
        except WardenError as exc:
            out.append(exc.reason)
    return out + _delegated_sizes(loaded)


def _delegated_sizes(policies: dict[str, Policy]) -> list[str]:
    """A delegated token is the delegator's token plus the delegate's rules: it must fit a token too."""
    ring, out = KeyRing.generate(), []
    for name, policy in policies.items():
        root = ring.mint(holder=name, caveats=policy.root_caveats(job_id="j" * 96, now=0.0))
        for to in (t for t in policy.delegation.can_delegate_to if t in policies):
            child = ring.bind(root.attenuate(*policies[to].delegate_caveats(job_id="j" * 96)), to)
            if len(child.encode()) > MAX_TOKEN_BYTES or len(child.caveats) > MAX_CAVEATS:
                out.append(f"policy of {name!r}: a token delegated to {to!r} would be {len(child.encode())} bytes "
                           f"with {len(child.caveats)} caveats (limits {MAX_TOKEN_BYTES} and {MAX_CAVEATS}): "
                           "every delegation would fail; narrow the rules of one of the two")
    return out


def _environment(data: dict[str, Any], agents: list[dict[str, Any]], environ: Mapping[str, str]) -> list[str]:
    out = []
    creds = data.get("credentials") if isinstance(data.get("credentials"), dict) else {}
    for tool, headers in sorted(creds.items()):
        for header, ref in sorted(headers.items()) if isinstance(headers, dict) else ():
            env = ref.get("env") if isinstance(ref, dict) else None
            if isinstance(env, str) and not environ.get(env):
                out.append(f"credential {header!r} of tool {tool!r} needs environment variable {env}, which is not set")
    models = [(f"agent {a.get('name')!r}", "config.model",
               (a.get("config") or {}).get("model") if isinstance(a.get("config"), dict) else None) for a in agents]
    if isinstance(data.get("reader"), dict):
        models.append(("reader", "reader.model", data["reader"].get("model")))
    for who, where, model in models:
        env = model.get("api_key_env") if isinstance(model, dict) else None
        if isinstance(env, str) and not environ.get(env):
            out.append(f"{who}: the model's api_key_env {env} is not set in the environment")
        elif isinstance(model, dict) and "kind" in model and where != "reader.model":  # the reader's: checked above
            try:
                model_from_config(model)
            except (ValueError, TypeError) as exc:
                out.append(f"{who}: {where}: {exc}")
    return out


def _local_placement(spec: Any) -> list[str]:
    """A local Ray advertises the machine's CPUs and the three role resources: more would wait forever."""
    have = set(spec.placement.local_resources())
    cpus, out = os.cpu_count() or 1, []
    asks = [(f"agent {a.name!r}", a.resources) for a in spec.agents if a.resources is not None]
    if spec.reader is not None and spec.reader.resources is not None:
        asks.append(("reader", spec.reader.resources))
    for who, res in asks:
        out += [f"{who}: resource {k!r} is not on a local Ray (only {sorted(have)}); set RAY_ADDRESS to a cluster "
                "that has it" for k in sorted(set(res.resources) - have)]
        out += [f"{who}: num_cpus {res.num_cpus} > this machine's {cpus}"] if (res.num_cpus or 0) > cpus else []
    missing = sorted(set(spec.workers.resources) - have)
    out += [f"workers: resources {missing} are not on a local Ray (only {sorted(have)})"] if missing else []
    return out


def print_problems(path: str | Path, problems: list[str], *, file: Any = sys.stderr) -> None:
    for p in problems:
        print(p, file=file)
    print(f"{path}: {len(problems)} problem(s)" if problems else f"{path}: ok", file=file)
