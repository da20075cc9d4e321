"""Jobs: a YAML file of agents (class, policy, resources) and a task, run on Ray.

The driver is part of the trusted computing base for the length of start-up: it loads and
validates every policy (a policy that does not load stops the job), generates the key
ring, mints each agent's root token from its policy, and hands each actor only its own key.
It then starts the tool workers, the supervisor and the agents, runs the entry agents,
and closes and verifies the audit log.
"""

from __future__ import annotations

import asyncio
import atexit
import hmac
import os
import posixpath
import re
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from hashlib import sha256
from pathlib import Path
from typing import Any, Awaitable, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .artifacts import collect_artifacts
from .control import merge_stats, write_control_file
from .egress import FetchSettings
from .errors import ConfigError, ErrorCode, PolicyDenied, ToolFailed
from .agent import Agent, load_agent_class
from .jobcheck import check_job
from .mcpjob import McpServerSpec, job_tools, mcp_sandbox_problem
from .tool import Tool, load_tools
from .trusted.capability import KeyRing, url_origin
from .trusted.policy import OutputRule, Policy
from .policyfile import load_policy, read_yaml, validated
from .reader import ASK, ask_tool
from .registry import check_policy_against_tools, register_agent


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Strict):
    num_cpus: float | None = Field(default=None, ge=0)
    memory: int | None = Field(default=None, ge=0, description="bytes")
    resources: dict[str, float] = Field(default_factory=dict)


class AgentSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    cls: str = Field(alias="class", pattern=r"^[\w.]+:[\w.]+$")
    policy: str
    resources: Resources | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    task: Any = None


TRUSTED_RESOURCE, AGENT_RESOURCE, SANDBOX_RESOURCE = "warden_trusted", "warden_agent", "warden_sandbox"
LOCAL_ROLE_UNITS = 1000  # what a local Ray started by `warden run` advertises of each role
_RUNTIME_ENV_KEYS = {"pip", "env_vars", "image_uri", "py_modules", "working_dir", "container"}


class Role(_Strict):
    """The custom Ray resource that marks the nodes of one role, and how much each actor takes."""

    resource: str | None = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="null: no placement constraint")
    amount: float = Field(default=1.0, gt=0)

    def request(self, into: dict[str, float] | None = None) -> dict[str, float]:
        res = dict(into or {})
        if self.resource:
            res[self.resource] = res.get(self.resource, 0) + self.amount
        return res


class PlacementSpec(_Strict):
    """Three roles of node: trusted (supervisors, audit logs), agent (agent actors), sandbox (tool
    workers; the nodes with runsc and bwrap). Each actor requests its role's resource."""

    trusted: Role = Role(resource=TRUSTED_RESOURCE)
    agent: Role = Role(resource=AGENT_RESOURCE)
    sandbox: Role = Role(resource=SANDBOX_RESOURCE)

    def local_resources(self) -> dict[str, float]:
        return {r.resource: LOCAL_ROLE_UNITS for r in (self.trusted, self.agent, self.sandbox) if r.resource}


class SupervisorSpec(_Strict):
    """Supervisor shards: each agent's calls are decided by the shard its root token hashes to."""

    shards: int = Field(default=1, ge=1, le=64)
    max_restarts: int = Field(default=3, ge=0, le=100, description="Ray restarts of a crashed shard")


class WorkerSpec(_Strict):
    """Tool-worker actors. They request the sandbox role's resource, which only nodes with the
    sandbox runtimes installed advertise, so they never land anywhere else."""

    count: int = Field(default=2, ge=1, le=256)
    max_restarts: int = Field(default=3, ge=0, le=100, description="Ray restarts of a crashed tool worker")
    num_cpus: float = Field(default=0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="Ray runtime_env of the workers")

    @model_validator(mode="after")
    def _known_runtime_env(self) -> "WorkerSpec":
        unknown = sorted(set(self.runtime_env) - _RUNTIME_ENV_KEYS)
        if unknown:
            raise ValueError(f"runtime_env keys {unknown} not supported; use {sorted(_RUNTIME_ENV_KEYS)}")
        return self


class ReaderSpec(_Strict):
    """The quarantined reader pool (``reader.ask``): its model, like an agent's ``config.model``, and its
    own Ray actors. Without this section the job offers no ``reader.ask``."""

    model: dict[str, Any] = Field(description="{kind: scripted, rules: [...]} or {kind: openai, base_url, model, ...}")
    system: str = Field(default="", max_length=8000, description="added to the reader's own system prompt")
    count: int = Field(default=1, ge=1, le=64, description="reader actors in the pool")
    max_restarts: int = Field(default=3, ge=0, le=100, description="Ray restarts of a crashed reader")
    resources: Resources | None = None
    cost: float = Field(default=1.0, ge=0, description="charged to the asking agent's cost budget per question")

    @field_validator("model")
    @classmethod
    def _buildable(cls, model: dict[str, Any]) -> dict[str, Any]:
        from .llm import model_from_config

        try:  # the key itself is read where the reader runs (and checked by `warden job check`)
            model_from_config({k: v for k, v in model.items() if k != "api_key_env"})
        except (ValueError, TypeError) as exc:
            raise ValueError(f"reader model: {exc}") from None
        return model


class CredentialRef(_Strict):
    """A secret for a tool, read from the driver's environment at job start (never written in a job file),
    and the one origin (scheme, host, port) it may be sent to."""

    env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    format: str = Field(default="{}", description="e.g. 'Bearer {}'")
    origin: str = Field(description="'https://host[:port]'; 'host[:port]' means https, plain http only if written")

    @field_validator("origin")
    @classmethod
    def _canonical_origin(cls, v: str) -> str:
        """``scheme://host:port`` with the port written out, so one origin has one spelling."""
        v = v if "://" in v else "https://" + v
        try:
            scheme, host, port = url_origin(v)
        except PolicyDenied as exc:
            raise ValueError(exc.reason) from None
        if not re.fullmatch(r"[a-z]+://[^/?#@]+/?", v, re.IGNORECASE):
            raise ValueError(f"origin {v!r} must be scheme://host[:port], without user, path or query")
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


class ControlSpec(_Strict):
    """Where the supervisor serves /metrics and the operator API (/control, token in control.json)."""

    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535, description="0: a free port, printed at start")


class AuditSpec(_Strict):
    """The job's audit log: segment size and when records reach the disk (see runtime.trusted.audit)."""

    rotate_mb: float | None = Field(default=64.0, gt=0, description="start a new segment past this size")
    fsync: Literal["never", "rotate", "always"] = "rotate"


class ArtifactSpec(_Strict):
    """Workspace paths kept when the job ends: copied to ``<run dir>/artifacts/<agent>/``."""

    paths: list[str] = Field(default_factory=list, description="files or directories; relative: to /workspace")
    max_mb: float = Field(default=16.0, gt=0, le=1024, description="all of one agent's files together")
    max_files: int = Field(default=1000, ge=1, le=100_000)

    @field_validator("paths")
    @classmethod
    def _in_workspace(cls, paths: list[str]) -> list[str]:
        out = []
        for path in paths:
            norm = posixpath.normpath(posixpath.join("/workspace", path)) if "\0" not in path else ""
            if norm != "/workspace" and not norm.startswith("/workspace/"):
                raise ValueError(f"artifact path {path!r} is not under /workspace")
            out.append(norm)
        return out

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * (1 << 20))


class JobSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str = ""
    task: Any = None
    entry: list[str] = Field(min_length=1)
    agents: list[AgentSpec] = Field(min_length=1)
    tools: list[str] = Field(min_length=1, description="modules whose @tool functions the job may use")
    tool_config: dict[str, Any] = Field(default_factory=dict)
    mcp_servers: list[McpServerSpec] = Field(
        default_factory=list, description="MCP servers whose tools the job may use (runtime.mcpjob)")
    outputs: dict[str, OutputRule] = Field(
        default_factory=dict, description="tool -> the label of its results, for every agent whose policy sets none")
    credentials: dict[str, dict[str, CredentialRef]] = Field(
        default_factory=dict, description="tool -> header name -> secret; attached by the supervisor per call")
    workers: WorkerSpec = Field(default_factory=WorkerSpec)
    reader: ReaderSpec | None = Field(default=None, description="the quarantined reader behind reader.ask")
    supervisors: SupervisorSpec = Field(default_factory=SupervisorSpec)
    placement: PlacementSpec = Field(default_factory=PlacementSpec)
    call_timeout_s: float = Field(default=120.0, gt=0)
    timeout_s: float = Field(default=3600.0, gt=0, description="the whole job; unfinished agents then fail")
    control: ControlSpec = Field(default_factory=ControlSpec)
    audit: AuditSpec = Field(default_factory=AuditSpec)
    artifacts: ArtifactSpec = Field(default_factory=ArtifactSpec)
    runs_dir: str = Field(default="runs", description="relative to the current directory")

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
        names = [a.name for a in self.agents]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"agent names must be unique: {dupes}")
        unknown = sorted(set(self.entry) - set(names))
        if unknown:
            raise ValueError(f"entry names unknown agents {unknown}")
        for a in self.agents:
            if a.name in self.entry and a.task is None and self.task is None:
                raise ValueError(f"entry agent {a.name!r} has no task (set job 'task' or the agent's 'task')")
        return self


@dataclass
class LoadedJob:
    spec: JobSpec
    base: Path
    policies: dict[str, Policy]
    tools: dict[str, Tool]
    classes: dict[str, type[Agent]]  # agent name -> its class, imported and checked at load
    mcp: list[dict[str, Any]] = field(default_factory=list, repr=False)  # servers, listings and credentials: workers only


def load_job(path: str | Path) -> LoadedJob:
    """Parse and validate a job file and everything it names. Raises ConfigError(JOB_INVALID)."""
    path = Path(path)
    data = read_yaml(path, "job file", ErrorCode.JOB_INVALID)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job file must be a YAML mapping", code=ErrorCode.JOB_INVALID)
    spec = validated(JobSpec, data, path, ErrorCode.JOB_INVALID)
    base = path.resolve().parent
    classes: dict[str, type[Agent]] = {}
    for a in spec.agents:
        try:
            classes[a.name] = load_agent_class(a.cls)
        except TypeError as exc:
            raise ConfigError(f"{path}: agent {a.name!r}: {exc}", code=ErrorCode.JOB_INVALID) from None
        except Exception as exc:
            raise ConfigError(f"{path}: agent {a.name!r}: cannot import {a.cls}: {type(exc).__name__}: {exc}",
                              code=ErrorCode.JOB_INVALID) from None
    policies = {a.name: load_policy(base / a.policy) for a in spec.agents}
    try:
        tools = load_tools(spec.tools)
    except Exception as exc:
        raise ConfigError(f"{path}: cannot load tools {spec.tools}: {exc}", code=ErrorCode.JOB_INVALID) from None
    problem = reader_problem(spec.reader is not None, tools, policies)
    if problem:
        raise ConfigError(f"{path}: {problem}", code=ErrorCode.JOB_INVALID)
    mcp_tools, mcp, _ = job_tools(list(spec.mcp_servers), os.environ)
    clash = sorted(set(mcp_tools) & set(tools))
    if clash:
        raise ConfigError(f"{path}: MCP tools {clash} are also defined by a module in tools:", code=ErrorCode.JOB_INVALID)
    tools.update(mcp_tools)
    for agent, policy in policies.items():
        problem = mcp_sandbox_problem(agent, policy, mcp_tools, spec.mcp_servers)
        if problem:
            raise ConfigError(f"{path}: {problem}", code=ErrorCode.JOB_INVALID)
    if spec.reader is not None:
        tools[ASK] = ask_tool(spec.reader.cost)
    for agent, policy in policies.items():
        check_policy_against_tools(agent, policy, tools, offered_by=f"no module in {spec.tools}")
        unknown = sorted(set(policy.delegation.can_delegate_to) - set(policies))
        if unknown:
            raise ConfigError(f"policy of {agent!r} delegates to unknown agents {unknown}", code=ErrorCode.JOB_INVALID)
    unknown = sorted(set(spec.outputs) - set(tools))
    if unknown:
        raise ConfigError(f"{path}: outputs for unknown tools {unknown}", code=ErrorCode.JOB_INVALID)
    unknown = sorted(set(spec.credentials) - set(tools))
    if unknown:
        raise ConfigError(f"{path}: credentials for unknown tools {unknown}", code=ErrorCode.JOB_INVALID)
    try:  # http.fetch would refuse every call with it: say so now
        FetchSettings.from_config(spec.tool_config.get("http"))
    except ToolFailed as exc:
        raise ConfigError(f"{path}: {exc.reason}", code=ErrorCode.JOB_INVALID) from None
    return LoadedJob(spec, base, policies, tools, classes, mcp)


def reader_problem(has_reader: bool, tools: Any, policies: dict[str, Policy]) -> str | None:
    """Why the job's ``reader:`` section and its tools and policies do not fit together, or None."""
    if has_reader:
        return (f"tool {ASK!r} is defined by a module in tools:, and the job's reader: section offers it too"
                if ASK in tools else None)
    askers = sorted(name for name, policy in policies.items() if ASK in policy.tools)
    if askers:
        return (f"the policies of {askers} allow {ASK}, but the job has no reader: section to answer it "
                f"(add reader: {{model: ...}}, or remove {ASK} from those policies)")
    return None


def resolve_credentials(spec: JobSpec, environ: dict[str, str]) -> dict[str, dict[str, dict[str, str]]]:
    """tool -> header -> {"value": the secret, "origin": where it may go}, as the supervisor attaches them."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    for tool_name, headers in spec.credentials.items():
        for header, ref in headers.items():
            if ref.env not in environ:
                raise ConfigError(f"credential {header!r} of tool {tool_name!r} needs environment variable "
                                  f"{ref.env}, which is not set", code=ErrorCode.JOB_INVALID)
            value = ref.format.format(environ[ref.env])
            if any(c in value for c in "\r\n\0"):  # a header value with a line break would be refused and echoed
                raise ConfigError(f"credential {header!r} of tool {tool_name!r}: {ref.env} holds a line break or NUL "
                                  "(a secret read from a file with its trailing newline?)", code=ErrorCode.JOB_INVALID)
            out.setdefault(tool_name, {})[header] = {"value": value, "origin": ref.origin}
    return out


@dataclass
class JobResult:
    job: str
    job_id: str
    ok: bool
    run_dir: str
    audit_log: str  # the log, or with several shards the run directory that holds one per shard
    audit_ok: bool
    audit_records: int
    audit_problem: str | None
    stats: list[dict[str, Any]]
    audit_logs: list[str] = field(default_factory=list)
    restarts: int = 0  # supervisor shard restarts seen during the job
    results: dict[str, Any] = field(default_factory=dict)
    quarantined: list[str] = field(default_factory=list)
    control_url: str = ""
    errors: dict[str, str] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # entry agent -> AGENT_FAILED, AGENT_DIED, ...
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)  # agent -> dir, files, bytes, skipped
    artifacts_lost: list[str] = field(default_factory=list)  # workers that could not be asked
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _actor_options(res: Resources | None, declared: dict[str, Any], default_cpus: float) -> dict[str, Any]:
    """Ray options of an agent actor: the class's ``resources``, overridden by the job file's."""
    opts: dict[str, Any] = {"num_cpus": default_cpus}
    try:
        opts.update(Resources.model_validate(declared).model_dump(exclude_none=True, exclude_defaults=True))
    except ValidationError as exc:
        raise ConfigError(f"bad class-level resources {declared!r}: {exc.errors()[0]['msg']}",
                          code=ErrorCode.JOB_INVALID) from None
    if res is not None:
        if res.num_cpus is not None:
            opts["num_cpus"] = res.num_cpus
        if res.memory is not None:
            opts["memory"] = res.memory
        if res.resources:
            opts["resources"] = dict(res.resources)
    return opts


def ensure_ray(address: str | None, placement: PlacementSpec | None = None) -> None:
    """Connect to the Ray cluster at ``address``; with none (or ``"local"``), start a private one.

    A private Ray never attaches to, or collides with, another Ray on this machine (a user's own
    ``ray start``, another job's, or a stale ``/tmp/ray/ray_current_cluster`` left by a dead one):
    it is started with ``address="local"``, which never looks for an existing cluster, in a temp
    dir of its own (session files, sockets, logs), with every port picked free by Ray. Its one
    node advertises all three role resources. It ends with this process (``stop_private_ray``).
    """
    import ray

    if ray.is_initialized():
        return
    if address and address != LOCAL_ADDRESS:
        ray.init(address=address, logging_level="WARNING")
        return
    # Unix socket paths must stay short (about 107 bytes): under /tmp, not a long $TMPDIR.
    temp_dir = tempfile.mkdtemp(prefix="warden-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    _PRIVATE_RAY.append(temp_dir)
    atexit.register(stop_private_ray)
    ray.init(address=LOCAL_ADDRESS, _temp_dir=temp_dir, include_dashboard=False, logging_level="WARNING",
             resources=(placement or PlacementSpec()).local_resources())


_ensure_ray = ensure_ray  # the name it had before
LOCAL_ADDRESS = "local"
_PRIVATE_RAY: list[str] = []  # temp dir of the private Ray this process started, if any


def stop_private_ray() -> None:
    """Shut down the private Ray ``ensure_ray`` started (not a cluster it connected to) and
    remove its temp dir; nothing otherwise."""
    if not _PRIVATE_RAY:
        return
    import ray

    ray.shutdown()
    while _PRIVATE_RAY:
        shutil.rmtree(_PRIVATE_RAY.pop(), ignore_errors=True)


def _check_placement(spec: JobSpec) -> None:
    """Fail fast, not hang, when the cluster has too little of a role for this job's actors."""
    import ray

    have = ray.cluster_resources()
    p = spec.placement
    wants = [("tool worker", spec.workers.count, p.sandbox.request(spec.workers.resources), "sandbox", "bwrap/runsc"),
             ("supervisor shard", spec.supervisors.shards, p.trusted.request(), "trusted", "the audit disk"),
             ("agent", len(spec.agents), p.agent.request(), "agent", "agent code")]
    if spec.reader is not None:
        wants.append(("reader", spec.reader.count, p.agent.request(), "agent", "agent code"))
    for what, count, need, role, has in wants:
        short = {k: v * count for k, v in need.items() if have.get(k, 0) < v * count}
        if short:
            name = getattr(p, role).resource
            raise ConfigError(f"the cluster cannot place {count} {what}(s): needs {short}, has "
                              f"{ {k: have.get(k, 0) for k in short} }. Start {role} nodes (with {has}) with "
                              f"ray start --resources='{{\"{name}\": 1000}}', or change placement.{role} in "
                              "the job file", code=ErrorCode.JOB_INVALID)


async def run_loaded(job: LoadedJob, *, runs_dir: str | Path | None = None,
                     progress: Callable[[str], None] = lambda _m: None,
                     before_teardown: Callable[[str], Awaitable[None]] | None = None,
                     gateway: tuple[str, Callable[[Callable[[str, dict[str, Any]], Awaitable[Any]], Path],
                                                  Awaitable[Any]]] | None = None) -> JobResult:
    """Run a validated job on the Ray instance this process is connected to.

    ``before_teardown(control_url)`` runs after the agents finished and before the supervisor
    stops, e.g. to scrape its final metrics.

    ``gateway=(name, serve)``: no agent actor starts and no entry agent runs; instead
    ``serve(call, run_dir)`` runs in this process until it returns (its value is ``name``'s
    result), where ``call(tool, args)`` is a call made as agent ``name`` (its token and request
    key, which stay here), through the supervisor like any agent's (``warden mcp serve``)."""
    import ray

    from .actors import (TEARDOWN_TIMEOUT_S, AgentActor, ReaderActor, SupervisorActor, ToolWorkerActor, awaited,
                         place, within)

    spec = job.spec
    started = time.monotonic()
    job_id = f"{spec.name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    run_dir = (Path.cwd() / (runs_dir or spec.runs_dir) / job_id).resolve()
    run_dir.mkdir(parents=True, exist_ok=False)

    keyring = KeyRing.generate()
    request_master, dispatch_key = secrets.token_bytes(32), secrets.token_bytes(32)
    now = time.time()
    tokens, entries = {}, []
    for a in spec.agents:
        reg = register_agent(keyring, job.policies[a.name], job_id=job_id, now=now, name=a.name,
                             request_key=hmac.new(request_master, a.name.encode(), sha256).digest(),
                             tools=job.tools, outputs=spec.outputs)
        tokens[a.name] = reg.token
        for tool_name in reg.unsandboxed_tools:
            progress(f"WARNING: agent {a.name!r} runs {'its tools' if tool_name == '*' else tool_name!r} "
                     f"UNSANDBOXED (policy {a.policy}: unsandboxed: true)")
        entries.append((reg.entry, reg.quota))

    handles: list[Any] = []  # every actor this job starts; all are killed when it ends
    n_shards = spec.supervisors.shards
    audit_paths = [run_dir / ("audit.log" if n_shards == 1 else f"audit-{i}.log") for i in range(n_shards)]
    restarts = 0
    try:
        tool_config = dict(spec.tool_config, run_dir=str(run_dir), job_base=str(job.base))
        progress(f"starting {spec.workers.count} tool worker(s)")
        _check_placement(spec)
        # Restarted on a crash; a call in flight then is never retried (the tool may have acted).
        options: dict[str, Any] = {"num_cpus": spec.workers.num_cpus, "max_restarts": spec.workers.max_restarts,
                                   "max_task_retries": 0,
                                   "resources": spec.placement.sandbox.request(spec.workers.resources)}
        if spec.workers.runtime_env:
            options["runtime_env"] = dict(spec.workers.runtime_env)
        workers = [ToolWorkerActor.options(**options)
                   .remote(dispatch_key=dispatch_key, tool_modules=list(spec.tools), job_id=job_id,
                           tool_config=tool_config, index=i, call_timeout_s=spec.call_timeout_s, mcp=job.mcp)
                   for i in range(spec.workers.count)]
        handles.extend(workers)
        readers: list[Any] = []
        if spec.reader is not None:  # their own actors, on agent nodes: a model client, no sandbox, no key but the MAC's
            progress(f"starting {spec.reader.count} reader(s)")
            reader_opts = _actor_options(spec.reader.resources, {}, 0.0)
            reader_opts["resources"] = spec.placement.agent.request(reader_opts.get("resources"))
            readers = [ReaderActor.options(**reader_opts, max_restarts=spec.reader.max_restarts, max_task_retries=0,
                                           max_concurrency=100)
                       .remote(dispatch_key=dispatch_key, job_id=job_id, model=spec.reader.model,
                               system=spec.reader.system, index=i, run_dir=str(run_dir),
                               call_timeout_s=spec.call_timeout_s)
                       for i in range(spec.reader.count)]
            handles.extend(readers)
        progress(f"starting {n_shards} supervisor shard(s)")
        peer_key = secrets.token_bytes(32) if n_shards > 1 else None
        host = secrets.token_bytes(32)  # the driver's and the shards' own: agents hold shard handles too
        shard_options = _supervisor_options(spec)
        common = dict(job_id=job_id, keys=keyring.to_secret_dict(), dispatch_key=dispatch_key,
                      tools=[t.spec for t in job.tools.values()], workers=workers, agents=entries,
                      placement=place([a.name for a in spec.agents], len(workers)),
                      audit_options={"fsync": spec.audit.fsync,
                                     "rotate_bytes": int(spec.audit.rotate_mb * (1 << 20)) if spec.audit.rotate_mb
                                     else None},
                      call_timeout_s=spec.call_timeout_s, credentials=resolve_credentials(spec, dict(os.environ)),
                      peer_key=peer_key, host_secret=host, readers=readers)
        shards = [SupervisorActor.options(**shard_options).remote(
            shard=(i, n_shards), audit_path=str(audit_paths[i]), state_path=str(run_dir / f"state-{i}.journal"),
            **common) for i in range(n_shards)]
        handles.extend(shards)
        del keyring, common  # the driver keeps no key once the supervisors have them

        dead: set[int] = set()  # shards out of restarts

        def peers_of(i: int) -> list[Any]:
            return [h for j, h in enumerate(shards) if j != i and j not in dead]

        await asyncio.gather(*[sh.connect.remote(host, peers_of(i)) for i, sh in enumerate(shards)])
        operator_token = secrets.token_urlsafe(32)
        urls = list(await asyncio.gather(*[sh.serve.remote(host, spec.control.host, spec.control.port if i == 0 else 0,
                                                           operator_token) for i, sh in enumerate(shards)]))
        control_url = urls[0]
        write_control_file(run_dir, url=control_url, token=operator_token, job_id=job_id, urls=urls)
        progress(f"metrics: {' '.join(u + '/metrics' for u in urls)}   operate: warden status --run {run_dir}")

        actors = {}
        for a, (entry, _) in zip(spec.agents, entries):
            if gateway is not None:
                break
            if a is spec.agents[0]:
                progress(f"starting {len(spec.agents)} agent(s)")
            schemas = [job.tools[t].schema for t in sorted(job.policies[a.name].tools)]
            declared = job.classes[a.name].resources or {}
            opts = _actor_options(a.resources, declared, 0.1)
            opts["resources"] = spec.placement.agent.request(opts.get("resources"))
            actors[a.name] = AgentActor.options(**opts, max_concurrency=100).remote(
                cls_path=a.cls, name=a.name, token=tokens[a.name], request_key=entry.request_key,
                supervisors=shards, tool_schemas=schemas, config=a.config)
            handles.append(actors[a.name])
        await asyncio.gather(*[
            actors[a.name].connect.remote({p: (job.classes[p].__name__, actors[p])
                                           for p in job.policies[a.name].delegation.can_delegate_to})
            for a in spec.agents if a.name in actors])
        stop_gateway: list[asyncio.Future[Any]] = []

        quarantined: dict[str, str] = {}
        shard_errors: dict[str, str] = {}

        async def reconnect(i: int, port: int, attempts: int = 20) -> str | None:
            """Connect a restarted shard to its peers (first: then its API reaches them), then serve
            its API again on the same port. A peer restarting at the same time is waited for."""
            last = ""
            for attempt in range(attempts):
                try:
                    state = await shards[i].connect.remote(host, peers_of(i))
                    break
                except ray.exceptions.RayTaskError as exc:  # raised inside the shard: a peer's trouble
                    last = f"{type(exc).__name__}: {exc}"[:300]
                except ray.exceptions.ActorDiedError as exc:
                    return f"died for good: {exc}"[:500]
                except ray.exceptions.RayActorError as exc:  # restarting again
                    last = f"{type(exc).__name__}: {exc}"[:300]
                await asyncio.sleep(min(0.2 * 2 ** attempt, 5.0))  # a peer coming back: nothing to await
            else:
                return f"not reconnected after {attempts} attempts: {last}"
            if state["state_lost"]:
                return ("restarted on a node without its state journal: it refuses every call (budgets, "
                        "nonces and revocations cannot be trusted there)")
            try:
                await shards[i].serve.remote(host, spec.control.host, port, operator_token)
            except Exception as exc:  # its calls work; its operator API does not
                progress(f"supervisor shard {i}: operator API not served again: {type(exc).__name__}: {exc}")
            return None

        async def watch(i: int) -> None:
            """Act on a shard's events; when it restarted, serve its API again and reconnect it."""
            nonlocal restarts
            port = int(urls[i].rsplit(":", 1)[1])
            while True:
                try:
                    event = await shards[i].next_event.remote(host)
                except ray.exceptions.ActorDiedError as exc:
                    dead.add(i)
                    shard_errors[f"supervisor shard {i}"] = f"died for good: {exc}"[:500]
                    progress(f"supervisor shard {i} DIED (out of restarts)")
                    return
                except ray.exceptions.RayActorError:
                    restarts += 1
                    progress(f"supervisor shard {i} stopped; Ray restarts it, reconnecting")
                    problem = await reconnect(i, port)
                    if problem:
                        shard_errors[f"supervisor shard {i}"] = problem
                        progress(f"supervisor shard {i} could not be reconnected: {problem}")
                        return
                    progress(f"supervisor shard {i} back (state restored from its journal)")
                    continue
                if event.get("event") == "quarantine" and event.get("agent") in actors:
                    quarantined[event["agent"]] = event.get("reason", "")
                    progress(f"QUARANTINE: agent {event['agent']!r} stopped ({event.get('reason')})")
                    ray.kill(actors[event["agent"]])
                elif event.get("event") == "quarantine" and gateway is not None and event.get("agent") == gateway[0]:
                    quarantined[gateway[0]] = event.get("reason", "")
                    progress(f"QUARANTINE: agent {gateway[0]!r} stopped: the gateway closes ({event.get('reason')})")
                    for fut in stop_gateway:
                        fut.cancel()

        watchers = [asyncio.ensure_future(watch(i)) for i in range(n_shards)]
        if gateway is None:
            progress(f"running entry agent(s): {', '.join(spec.entry)}")
            tasks = {name: next(a for a in spec.agents if a.name == name).task or spec.task for name in spec.entry}
            runs = {n: asyncio.ensure_future(awaited(actors[n].run.remote(tasks[n]))) for n in spec.entry}
            await asyncio.wait(runs.values(), timeout=spec.timeout_s)
        else:  # no timeout: the gateway serves until it is stopped
            name, serve = gateway
            entry = entries[[a.name for a in spec.agents].index(name)][0]
            runs = {name: asyncio.ensure_future(serve(_caller(name, tokens[name], entry.request_key, shards), run_dir))}
            stop_gateway.append(runs[name])
            await asyncio.wait(runs.values())
        results, errors, failures = {}, {}, {}
        for name, fut in runs.items():
            if fut.done() and not fut.cancelled() and fut.exception() is None and name not in quarantined:
                results[name] = fut.result()
            else:
                failures[name], errors[name] = _failure(fut, quarantined.get(name), spec.timeout_s)
        errors.update(shard_errors)

        for w in watchers:
            w.cancel()
        if before_teardown is not None:
            await before_teardown(control_url)
        for actor in actors.values():  # no new calls (an agent that timed out may still be calling)
            ray.kill(actor)
        per_shard = await asyncio.gather(*[within(sh.stats.remote(host), TEARDOWN_TIMEOUT_S) for sh in shards],
                                         return_exceptions=True)
        stats = merge_stats([s for s in per_shard if not isinstance(s, BaseException)])
        # Closing first lets calls still in flight end on record (bounded by the call timeout).
        ended = await asyncio.gather(*[within(sh.close.remote(host, "ok" if not errors else "failed"),
                                              TEARDOWN_TIMEOUT_S + spec.call_timeout_s) for sh in shards],
                                     return_exceptions=True)
        closed = []
        for i, c in enumerate(ended):
            if isinstance(c, BaseException):
                errors.setdefault(f"supervisor shard {i}", f"did not close: {type(c).__name__}: {c}"[:500])
                c = _verify_here(audit_paths[i], c)
            closed.append(c)
        artifacts, artifacts_lost = {}, []
        if spec.artifacts.paths:  # before the workers close the workspaces
            progress(f"collecting artifacts {spec.artifacts.paths}")
            artifacts, artifacts_lost = await collect_artifacts(
                workers, paths=spec.artifacts.paths, max_bytes=spec.artifacts.max_bytes,
                max_files=spec.artifacts.max_files, dispatch_key=dispatch_key, job_id=job_id,
                agents=[a.name for a in spec.agents], run_dir=run_dir, timeout_s=TEARDOWN_TIMEOUT_S)
        await asyncio.gather(*[w.shutdown.remote() for w in workers], return_exceptions=True)
    finally:
        for h in handles:
            ray.kill(h)
    bad = [c for c in closed if not c["ok"]]
    return JobResult(job=spec.name, job_id=job_id, ok=not errors and not bad, run_dir=str(run_dir),
                     audit_log=str(audit_paths[0] if n_shards == 1 else run_dir), audit_ok=not bad,
                     audit_records=sum(c["records"] for c in closed),
                     audit_problem="; ".join(f"{c['path']}: {c['problem']}" for c in bad) or None,
                     stats=stats, results=results, errors=errors, failures=failures,
                     quarantined=sorted(quarantined),
                     control_url=control_url, seconds=round(time.monotonic() - started, 3),
                     audit_logs=[str(p) for p in audit_paths], restarts=restarts,
                     artifacts=artifacts, artifacts_lost=artifacts_lost)


def _caller(agent: str, token: bytes, request_key: bytes,
            shards: list[Any]) -> Callable[[str, dict[str, Any]], Awaitable[Any]]:
    """``call(tool, args)`` as agent ``agent`` makes it: sealed with its request key, sent to its shard."""
    from .actors import _SupervisorClient
    from .protocol import decode_reply, encode_call

    client = _SupervisorClient(shards)

    async def call(tool: str, args: dict[str, Any]) -> Any:
        request = encode_call(agent=agent, token=token, tool=tool, args=args, request_key=request_key)
        return decode_reply(await client.call(request))["value"]

    return call


def _failure(run: "asyncio.Future[Any]", quarantine: str | None, timeout_s: float) -> tuple[str, str]:
    """Why an entry agent has no result: its code and the message the job reports."""
    import ray

    if quarantine is not None:
        return "AGENT_QUARANTINED", f"quarantined: {quarantine}"
    if not run.done():
        run.cancel()
        return "AGENT_TIMEOUT", f"timed out after {timeout_s:g}s (job timeout_s)"
    exc = run.exception()
    if isinstance(exc, ray.exceptions.RayActorError):  # the process, not the agent's code: killed, OOM, node lost
        return "AGENT_DIED", f"AGENT_DIED: the agent's actor stopped before it finished ({type(exc).__name__})"
    cause = getattr(exc, "cause", None) or exc
    return "AGENT_FAILED", f"{type(cause).__name__}: {cause}"[:2000]


def _verify_here(path: Path, why: BaseException) -> dict[str, Any]:
    """A shard that could not close its own log (it died): verify what it left, if it is on this node."""
    from .actors import verified

    if not path.exists():
        return {"ok": False, "path": str(path), "records": 0,
                "problem": f"shard did not close ({type(why).__name__}) and its log is not on this node"}
    return verified(path)


def _supervisor_options(spec: JobSpec) -> dict[str, Any]:
    """Ray options of a shard: on a trusted node (the driver's, when it is one: its audit log is
    then where the driver runs), restarted by Ray on a crash, its calls never retried by Ray."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    opts: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 1000, "max_restarts": spec.supervisors.max_restarts,
                            "max_task_retries": 0, "resources": spec.placement.trusted.request()}
    here = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n.get("NodeID") == here), None)
    role = spec.placement.trusted.resource
    if node is not None and (role is None or node.get("Resources", {}).get(role, 0) > 0):
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(here, soft=True)
    return opts


def run_job(path: str | Path, *, address: str | None = None, runs_dir: str | Path | None = None,
            progress: Callable[[str], None] = lambda _m: None) -> JobResult:
    """Load, validate and run a job; connects to ``address`` (or RAY_ADDRESS) or starts a private local
    Ray (``ensure_ray``)."""
    # Example agents and tools are imported by module name from the project directory.
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    address = address or os.environ.get("RAY_ADDRESS")
    problems = check_job(path, local=not address or address == LOCAL_ADDRESS)  # all, before Ray or any agent
    if problems:
        raise ConfigError(f"{path}: {len(problems)} problem(s)\n" + "\n".join(problems), code=ErrorCode.JOB_INVALID)
    job = load_job(path)
    progress("connecting to Ray at " + address if address and address != LOCAL_ADDRESS
             else "starting a private local Ray (--address or RAY_ADDRESS to use a cluster)")
    ensure_ray(address, job.spec.placement)
    return asyncio.run(run_loaded(job, runs_dir=runs_dir, progress=progress))
