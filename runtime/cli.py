"""warden: run multi-agent jobs in which every tool call is checked, quota'd and audited.

    warden run JOB.yaml [--json]        run a job (local Ray, or RAY_ADDRESS's cluster)
    warden job check JOB.yaml...        everything checkable before Ray starts, one line per problem
    warden policy check FILE...         validate policies (exit 1 on any error)
    warden policy explain FILE          what a policy allows, labels, sink rules, reader schemas; or --json
    warden policy test FILE --cases C   run a policy's test cases (exit 1 with a diff on a mismatch)
    warden audit verify PATH            check an audit log's hash chain
    warden audit show PATH [filters]    print audit records
    warden audit export PATH [--out F]  JSON Lines for a SIEM (verifies first)
    warden status                       a running job's agents, quarantines, approvals, counts
    warden approvals list [--full]|approve|deny  decide calls a policy parks for a human
    warden revoke --agent A [--cascade] | --token T   kill switch, effective before the next call
    warden keys rotate | retire KID     root keys of a running job, on every supervisor shard
    warden bench authz|e2e|sandbox|cost|peers|all   what the safety costs, measured (--quick)
    warden redteam [--without flow|reader]   run the attack catalogue; what stopped each attack
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Iterator, Sequence, TextIO

from .control import ControlError
from .errors import ErrorCode, WardenError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    out += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(line.rstrip() for line in out)


# ---------------------------------------------------------------------------- run


def summary_rows(stats: list[dict[str, Any]]) -> list[list[str]]:
    by: dict[tuple[str, str], dict[str, int]] = {}
    for s in stats:
        by.setdefault((s["agent"], s["tool"]), {})[s["result"]] = s["count"]
    rows = []
    for (agent, tool), res in sorted(by.items()):
        allowed = res.pop("allow", 0)
        failed = {k: v for k, v in res.items() if k in ("TOOL_FAILED", "WORKER_UNAVAILABLE")}
        denied = {k: v for k, v in res.items() if k not in failed}
        rows.append([agent, tool, str(allowed), str(sum(denied.values())),
                     ", ".join(f"{k}x{v}" for k, v in sorted({**denied, **failed}.items())) or "-"])
    return rows


def cmd_job_check(args: argparse.Namespace) -> int:
    from .jobcheck import check_job, print_problems

    sys.path.insert(0, os.getcwd())  # agent and tool modules are imported by name from where warden runs
    failed = 0
    for path in args.jobs:
        problems = check_job(path, local=not (getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")))
        print_problems(path, problems, file=sys.stderr if problems else sys.stdout)
        failed += bool(problems)
    return EXIT_FAIL if failed else EXIT_OK


def print_digest(logs: list[str], shown_as: str) -> None:
    """The reason of every denial and failure, and the agents an operator revoked, from the audit log."""
    from .auditlog import digest_run
    from .trusted.audit import AuditFormatError
    from .auditlog import read_records

    try:
        digest = digest_run(rec for path in logs for rec in read_records(path))  # streamed: logs can be large
    except (OSError, AuditFormatError) as exc:
        print(f"\nreasons not read ({exc}); see: warden audit show {shown_as} --decision deny")
        return
    if digest.failures:
        print("\nwhy calls were denied or failed (from the audit log):")
        rows = [[agent, tool, code, str(n), reason] for agent, tool, code, reason, n in digest.failures]
        print(_table(rows, ["agent", "tool", "code", "times", "reason"]))
    if digest.revoked:
        print("\nREVOKED by an operator (every later call denied): "
              + ", ".join(f"{agent} (by {by})" for agent, by in sorted(digest.revoked.items())))


CALLS_LISTED = 40  # a run with at most this many decisions lists every call in order


def print_calls(logs: list[str]) -> None:
    """Every call of a small run, in order, from the audit log: allowed (and how it ended) or denied, and why."""
    from .auditlog import calls_in_order, read_records
    from .trusted.audit import AuditFormatError

    try:
        rows = calls_in_order((r for path in logs for r in read_records(path)), limit=CALLS_LISTED)
    except (OSError, AuditFormatError):
        return  # print_digest says why the log was not read
    if rows:
        print("\ncalls in order (from the audit log):")
        print(_table(rows, ["agent", "tool", "decision", "arguments (allowed) or reason (denied)"]))


def cmd_run(args: argparse.Namespace) -> int:
    from .job import run_job

    if args.dry_run:
        return cmd_job_check(argparse.Namespace(jobs=[args.job], address=args.address))

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"[warden] {msg}", file=sys.stderr, flush=True)

    result = run_job(args.job, address=args.address, runs_dir=args.runs_dir, progress=progress)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str), file=args.json_out)
        return EXIT_OK if result.ok else EXIT_FAIL
    status = "ok" if result.ok else "FAILED"
    print(f"\nWarden job {result.job} ({result.job_id}): {status} in {result.seconds:.1f}s\n")
    print(_table(summary_rows(result.stats), ["agent", "tool", "allowed", "denied", "codes"]))
    totals = {"allowed": 0, "denied": 0}
    for s in result.stats:
        totals["allowed" if s["result"] == "allow" else "denied"] += s["count"]
    print(f"\n{totals['allowed']} allowed, {totals['denied']} denied or failed")
    for name, value in result.results.items():
        print(f"\nresult of {name}:\n  {json.dumps(value, default=str)[:1500]}")
    for name, err in result.errors.items():
        print(f"\nagent {name} FAILED: {err}")
    print_calls(result.audit_logs or [result.audit_log])
    print_digest(result.audit_logs or [result.audit_log], result.audit_log)
    if result.quarantined:
        print(f"\nQUARANTINED (tokens revoked, actor stopped): {', '.join(result.quarantined)}")
    chain = "chain verified" if result.audit_ok else f"CHAIN BROKEN: {result.audit_problem}"
    if len(result.audit_logs) > 1:
        chain = f"{len(result.audit_logs)} shard chains, " + ("all verified" if result.audit_ok else chain)
    if result.restarts:
        print(f"\nsupervisor shard restarts during the job: {result.restarts} (state restored from the journal)")
    for name, kept in sorted(result.artifacts.items()):
        print(f"\nartifacts of {name}: {kept['files']} file(s), {kept['bytes']} bytes in {kept['dir']}"
              + "".join(f"\n  skipped {s['path']}: {s['reason']}" for s in kept["skipped"]))
    for lost in result.artifacts_lost:
        print(f"\nartifacts LOST: {lost}")
    print(f"\naudit log: {result.audit_log} ({result.audit_records} records, {chain})")
    print(f"verify it: warden audit verify {result.audit_log}")
    return EXIT_OK if result.ok else EXIT_FAIL


def cmd_mcp_serve(args: argparse.Namespace) -> int:
    from .mcpgateway import serve_job

    def progress(msg: str) -> None:  # stderr always: on stdio, stdout is the MCP wire
        if not args.quiet:
            print(f"[warden] {msg}", file=sys.stderr, flush=True)

    result = serve_job(args.job, agent=args.agent, transport=args.transport, host=args.host, port=args.port,
                       address=args.address, runs_dir=args.runs_dir, progress=progress)
    totals = {"allowed": 0, "denied": 0}
    for s in result.stats:
        totals["allowed" if s["result"] == "allow" else "denied"] += s["count"]
    chain = "chain verified" if result.audit_ok else f"CHAIN BROKEN: {result.audit_problem}"
    out = sys.stderr
    print(f"\nWarden MCP gateway {result.job} ({result.job_id}) as agent {args.agent!r}: "
          f"{'ok' if result.ok else 'FAILED'} after {result.seconds:.1f}s", file=out)
    print(f"{totals['allowed']} allowed, {totals['denied']} denied or failed", file=out)
    for name, err in result.errors.items():
        print(f"{name} FAILED: {err}", file=out)
    print(f"audit log: {result.audit_log} ({result.audit_records} records, {chain})", file=out)
    return EXIT_OK if result.ok else EXIT_FAIL


# ------------------------------------------------------------------------- policy


def cmd_policy_check(args: argparse.Namespace) -> int:
    from .tool import load_tools
    from .policyfile import check_policy_tools, load_policy

    failed = 0
    sys.path.insert(0, os.getcwd())  # tool modules are named as a job names them, from where warden runs
    try:
        tools = {n: t.spec for n, t in load_tools(args.tools).items()}
    except Exception as exc:
        print(f"cannot load tools {args.tools}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if args.tools:  # offered by a job's reader: section, not by a module
        from .reader import ASK, ask_tool

        tools.setdefault(ASK, ask_tool().spec)
    for path in args.files:
        try:
            p = load_policy(path)
            missing = sorted(set(p.tools) - set(tools)) if args.tools else []  # --tools must cover the policy
            for name in missing:
                print(f"{path}: tool {name!r} is defined by none of {args.tools}", file=sys.stderr)
            check_policy_tools(p, tools, source=path)
            if missing:
                failed += 1
                continue
            print(f"{path}: ok (agent {p.agent}, {len(p.tools)} tools)")
        except WardenError as exc:
            failed += 1
            print(exc.reason, file=sys.stderr)
    return EXIT_FAIL if failed else EXIT_OK


def explain(policy: Any, *, sandboxed: dict[str, bool] | None = None,
            delegates: dict[str, Any] | None = None, job_outputs: dict[str, Any] | None = None,
            tool_outputs: dict[str, Any] | None = None, as_json: bool = False) -> str:
    """What ``policy`` allows, as text (or, ``as_json``, a JSON document). ``sandboxed``: tool name ->
    whether it runs code in a sandbox (tools not in it are shown as "if it runs code"); ``delegates``:
    the policies of the agents it may delegate to, by agent name, to show what each would hold;
    ``job_outputs`` / ``tool_outputs``: output labels declared by the job file and by the tools, which
    the policy's own ``output`` overrides (see ``runtime.explain``)."""
    from .explain import flow_lines, flow_view
    from .isolation import sandbox_settings, unsandboxed_tools
    from .trusted.policy import ArgRule

    sandboxed = sandboxed or {}
    flow = flow_view(policy, job_outputs=job_outputs, tool_outputs=tool_outputs)

    def rule_text(r: ArgRule) -> str:
        return ", ".join(f"each({rule_text(r.each)})" if k == "each" and r.each else f"{k}={getattr(r, k)!r}"
                         for k in sorted(r.model_fields_set))

    from .sandbox.base import Limits

    settings = sandbox_settings(policy)

    def approval_text(rule: Any) -> str:
        if rule.approval is False:
            return "no"
        if rule.approval is True:
            return "always (300s)"
        when = "; ".join(f"{arg}: {rule_text(r)}" for arg, r in sorted(rule.approval.when.items()))
        return f"{'when ' + when if when else 'always'} ({rule.approval.timeout_s:g}s)"

    def where(tool: str) -> str:
        backend = settings.get(tool, settings["*"])["backend"]
        return "UNSANDBOXED" if backend == "none" else backend

    def sandbox_of(tool: str) -> str:
        if tool not in sandboxed:
            return f"{where(tool)} (if it runs code)"
        return where(tool) if sandboxed[tool] else "none (runs no code)"

    rows = []
    for name, rule in sorted(policy.tools.items()):
        constraints = "; ".join(f"{arg}: {rule_text(r)}" for arg, r in sorted(rule.args.items())) or "any arguments"
        rows.append([name, rule.effect, constraints, approval_text(rule), sandbox_of(name)])
    q, d = policy.quotas, policy.delegation
    if as_json:
        return json.dumps(_explain_doc(policy, rows, flow, delegate_rights(policy, delegates or {})), indent=2,
                          default=str)
    lines = [f"agent: {policy.agent}"]
    if policy.description:
        lines.append(f"  {policy.description}")
    lines += ["", "allowed tools (everything else is denied):",
              _table(rows, ["tool", "effect", "argument constraints", "approval", "sandbox"]),
              "", "quotas:"]
    lines.append(f"  rate: {f'{q.rate_per_s}/s, burst {q.burst}' if q.rate_per_s else 'unlimited'}; "
                 f"concurrent: {q.max_concurrent or 'unlimited'}; parked for approval: {q.max_parked}; "
                 f"calls: {q.max_calls if q.max_calls is not None else 'unlimited'}; "
                 f"cost: {q.max_cost if q.max_cost is not None else 'unlimited'}; token lifetime: {q.ttl_s:g}s")
    a = policy.anomaly
    lines.append(f"anomaly: flag > {a.rate_factor:g}x baseline calls or {a.denial_burst} denials per {a.window_s:g}s; "
                 + (f"QUARANTINE after {a.quarantine_after} violations" if a.quarantine_after else "never quarantine"))
    lines.append("delegation:")
    lines.append(f"  may delegate to: {', '.join(d.can_delegate_to) or 'nobody'}; max depth: {d.max_depth}")
    lines += [f"  {line}" for line in delegate_rights(policy, delegates or {})]
    lines.append(f"  delegated to {policy.agent}, a token holds at most the tools above that the delegator holds")
    no_code = all(sandboxed.get(t) is False for t in policy.tools)
    lines.append("sandbox limits per call:" + (" none (no tool of this policy runs code)" if no_code else ""))
    for tool, conf in sorted(settings.items()) if not no_code else ():
        if sandboxed.get(tool) is False:
            continue  # runs no code: no sandbox, no limits
        limits = Limits.from_dict(conf["limits"])
        text = ", ".join(f"{k}={getattr(limits, k)}" for k in Limits.__dataclass_fields__)
        label = "default" if tool == "*" else tool
        lines.append(f"  {label}: {where(tool)}; {text}")
    unsandboxed = [t for t in unsandboxed_tools(policy) if sandboxed.get(t) is not False]
    if no_code and "*" in unsandboxed:
        unsandboxed.remove("*")  # every tool it names runs no code
    if unsandboxed:
        lines += ["", "!!! UNSANDBOXED: " + ("every code-running tool without its own sandbox.backend" if "*" in unsandboxed else
                  ", ".join(unsandboxed)) + " run WITHOUT an OS sandbox (rlimits only) !!!"]
    lines += flow_lines(flow, _table)
    return "\n".join(lines)


def _explain_doc(policy: Any, rows: list[list[str]], flow: dict[str, Any], delegates: list[str]) -> dict[str, Any]:
    """``policy explain --json``: per tool its effect, rules, approval, sandbox, output label and sink rules."""
    from .isolation import sandbox_settings, unsandboxed_tools

    tools = {name: {"effect": effect, "args": {a: r.model_dump(mode="json", exclude_unset=True)
                                               for a, r in sorted(policy.tools[name].args.items())},
                    "constraints": constraints, "approval": approval, "sandbox": sandbox,
                    "output": flow["outputs"][name], "sinks": flow["sinks"].get(name, [])}
             for name, effect, constraints, approval, sandbox in rows}
    return {"agent": policy.agent, "description": policy.description, "tools": tools,
            "quotas": policy.quotas.model_dump(mode="json"), "anomaly": policy.anomaly.model_dump(mode="json"),
            "delegation": {**policy.delegation.model_dump(mode="json"), "delegates": delegates},
            "sandbox": sandbox_settings(policy), "unsandboxed": unsandboxed_tools(policy),
            "handles": flow["handles"]}


def delegate_rights(policy: Any, delegates: dict[str, Any]) -> list[str]:
    """Per agent ``policy`` may delegate to: the tools a delegation can hand it at most (both policies
    must allow a tool; argument constraints of both apply; calls are charged to the delegator too)."""
    lines = []
    for name in policy.delegation.can_delegate_to:
        other = delegates.get(name)
        if other is None:
            lines.append(f"{name} gets at most the tools both policies allow (its policy not given: --job JOB)")
            continue
        both = sorted(t for t, r in policy.tools.items() if t in other.tools and other.tools[t].effect == r.effect)
        lacking = sorted(set(other.tools) - set(policy.tools))
        lines.append(f"{name} gets at most: {', '.join(both) or 'NOTHING (every delegation is DELEGATION_DENIED)'}"
                     + (f"; never {', '.join(lacking)} ({policy.agent} does not hold it)" if lacking else ""))
        lines.append(f"  under the argument constraints of both policies; its calls count against {policy.agent}'s "
                     "budgets too")
    return lines


def cmd_policy_explain(args: argparse.Namespace) -> int:
    from .tool import load_tools
    from .policyfile import load_policy

    policy = load_policy(args.file)
    if args.job:
        from .job import load_job

        if os.getcwd() not in sys.path:  # as ``warden run``: a job's modules are imported from here
            sys.path.insert(0, os.getcwd())
        job = load_job(args.job)
        tools, delegates = job.tools, job.policies
        job_outputs = dict(job.spec.outputs)
    else:  # the built-in tools; delegates' policies found beside this one
        from pathlib import Path

        from .reader import ASK, ask_tool

        tools, delegates, job_outputs = {**load_tools(["runtime.toolbox"]), ASK: ask_tool()}, {}, {}
        for path in sorted(Path(args.file).parent.glob("*.y*ml")):
            try:
                other = load_policy(path)
            except (WardenError, ValueError):
                continue  # not a policy, or a broken one: ``policy check`` reports it
            if other.agent in policy.delegation.can_delegate_to:
                delegates.setdefault(other.agent, other)
    tool_outputs = {n: t.spec.output for n, t in tools.items() if t.spec.output is not None}  # @tool(output=)
    print(explain(policy, sandboxed={n: t.spec.sandboxed for n, t in tools.items()}, delegates=delegates,
                  job_outputs=job_outputs, tool_outputs=tool_outputs, as_json=args.json), file=args.json_out)
    return EXIT_OK


def cmd_policy_test(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .policy_cases import run_cases

    if str(Path.cwd()) not in sys.path:  # tool modules are imported by name from the project directory
        sys.path.insert(0, str(Path.cwd()))
    failed = 0
    for cases in args.cases:
        report = run_cases(args.file, cases)
        print(report.format(verbose=args.verbose))
        failed += not report.ok
    return EXIT_FAIL if failed else EXIT_OK


# -------------------------------------------------------------------------- audit


class NoAuditLog(Exception):
    """A directory given as an audit log holds none."""


def audit_chains(path: str) -> list[str]:
    """The audit logs at ``path``: the file itself, or every shard's log in a run directory."""
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise NoAuditLog(f"{path}: no such file or directory")
    if not p.is_dir():
        return [path]
    logs = [p / "audit.log"] if (p / "audit.log").exists() else []
    logs += sorted(p.glob("audit-[0-9]*.log"), key=lambda q: int(q.stem.split("-")[1]))
    if not logs:
        raise NoAuditLog(f"{path}: no audit.log or audit-N.log in this directory")
    return [str(q) for q in logs]


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from .auditlog import verify

    chains = audit_chains(args.path)
    broken = 0
    for path in chains:
        report = verify(path)
        if report.ok:
            segments = f"{report.segments} segment" + ("s" if report.segments != 1 else "")
            print(f"{path}: ok, {report.records} records in {segments}, chain intact")
            continue
        broken += 1
        where = ""
        if report.first_bad_seq is not None:
            where = f" (first bad record: seq {report.first_bad_seq} in {report.segment})"
        print(f"{path}: BROKEN{where}: {report.problem}", file=sys.stderr)
    if len(chains) > 1:
        print(f"{len(chains)} chains, {len(chains) - broken} intact" + (f", {broken} BROKEN" if broken else ""))
    return EXIT_FAIL if broken else EXIT_OK


def _when(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an ISO time (2026-12-04T09:30) nor UNIX seconds") from None


def cmd_audit_show(args: argparse.Namespace) -> int:
    from .auditlog import FLOW, filter_records, format_flow, format_record, read_records
    from .trusted.audit import AuditFormatError

    chains = audit_chains(args.path)

    def tagged(path: str) -> Any:
        name = os.path.basename(path)
        for rec in read_records(path):
            yield {**rec, "log": name} if len(chains) > 1 else rec

    # Several shards: one stream in time order (each chain is already in order).
    merged = heapq.merge(*[tagged(c) for c in chains], key=lambda r: r.get("ts", 0.0))
    records = filter_records(merged, agent=args.agent, tool=args.tool, decision=args.decision,
                             kind=args.kind, since=args.since, until=args.until)
    try:
        for rec in records:
            if args.json:
                print(json.dumps(rec, default=lambda b: b.hex() if isinstance(b, bytes) else str(b)),
                      file=args.json_out)
            else:
                print(format_flow(rec) if args.kind == FLOW else format_record(rec))
    except (OSError, AuditFormatError) as exc:
        print(f"warden: cannot read audit log {args.path}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def cmd_audit_export(args: argparse.Namespace) -> int:
    from .auditlog import AuditChainError, export_jsonl
    from .auditlog import verify

    chains = audit_chains(args.path)
    if len(chains) > 1:  # one shard's chain after the other; each record has its time
        status = EXIT_OK
        for path in chains:
            status = max(status, cmd_audit_export(argparse.Namespace(**{**vars(args), "path": path})))
        return status
    args = argparse.Namespace(**{**vars(args), "path": chains[0]})  # a run directory of one chain: that log
    report = verify(args.path)
    if not report.ok:
        refused = "" if args.allow_broken else "; not exported (--allow-broken exports it anyway)"
        print(f"{args.path}: BROKEN: {report.problem}{refused}", file=sys.stderr)
        if not args.allow_broken:
            return EXIT_FAIL
    filters = dict(agent=args.agent, tool=args.tool, decision=args.decision, kind=args.kind,
                   since=args.since, until=args.until)
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        count = export_jsonl(args.path, out, allow_broken=args.allow_broken, **filters)
    except AuditChainError as exc:  # broke after the check above
        print(f"warden: {exc}", file=sys.stderr)
        return EXIT_FAIL
    finally:
        if args.out:
            out.close()
    print(f"exported {count} records" + (f" to {args.out}" if args.out else ""), file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_FAIL


# --------------------------------------------------------------------------- main


# ----------------------------------------------------------------- operating a job


def _client(args: argparse.Namespace) -> Any:
    from .control import ControlClient, find_run

    return ControlClient.from_run_dir(find_run(args.run, args.runs_dir))


def _who(args: argparse.Namespace) -> str:
    import getpass

    return args.as_name or os.environ.get("WARDEN_OPERATOR") or getpass.getuser()


def cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)
    st = client.status()
    if args.json:
        print(json.dumps(st, indent=2), file=args.json_out)
        return EXIT_OK
    print(f"job {st['job']} at {client.url}: agents {', '.join(st['agents'])}")
    print(f"quarantined: {', '.join(st['quarantined']) or 'none'}; revoked: {', '.join(st['revoked_agents']) or 'none'}")
    for problem in st.get("unreachable_shards", []):
        print(f"UNREACHABLE supervisor shard: {problem}")
    print(f"approvals pending: {len(st['approvals_pending'])}; supervisor shards: {len(st.get('shards', [0]))}; "
          f"root keys: {', '.join(st.get('keys', []))} (current {st.get('current_key', '?')})\n")
    print(_table(summary_rows(st["stats"]), ["agent", "tool", "allowed", "denied", "codes"]))
    if st.get("contexts"):
        print("\ncontexts (one per agent run; a label only goes down, towards untrusted and fewer readers):")
        print(contexts_table(st["contexts"]))
    return EXIT_OK


def contexts_table(contexts: list[dict[str, Any]]) -> str:
    """``Supervisor.status()["contexts"]`` as a table: each run's label, what tainted it, its handles."""
    from .auditlog import format_label, format_origin

    def handles(value: Any) -> str:
        if isinstance(value, dict):  # {"count", "bytes"}
            return f"{value.get('count', '?')} ({value.get('bytes', '?')} B)"
        return str(len(value)) if isinstance(value, list) else str(value if value is not None else 0)

    rows = [[str(c.get("agent", "?")), str(c.get("run", "?")), str(c.get("depth", 0)),
             format_label(c.get("label")), format_origin(c.get("origin")), handles(c.get("handles"))]
            for c in sorted(contexts, key=lambda c: (str(c.get("agent")), c.get("depth", 0), str(c.get("run"))))]
    return _table(rows, ["agent", "run", "depth", "label", "tainted by", "handles"])


def cmd_approvals_list(args: argparse.Namespace) -> int:
    pending = _client(args).approvals()
    if args.json:
        print(json.dumps(pending, indent=2), file=args.json_out)
    elif not pending:
        print("no calls waiting for approval")
    else:
        now, width = time.time(), None if args.full else 80
        rows = [[p["id"], p["agent"], p["tool"], json.dumps(p["args"])[:width], f"{p['expires'] - now:.0f}s"]
                for p in pending]
        header = ["id", "agent", "tool", "arguments", "expires in"]
        if any(p.get("flow") for p in pending):  # parked by an information-flow rule: say which, and why
            rows = [r + [flow_reason(p.get("flow"))] for r, p in zip(rows, pending)]
            header.append("flow rule broken (argument: label, from)")
        print(_table(rows, header))
    return EXIT_OK


def flow_reason(flow: Any) -> str:
    """The flow violations a call was parked for, in one cell: rule, argument, label and origin."""
    from .auditlog import format_label, format_origin

    if not flow:
        return "-"
    items = flow if isinstance(flow, list) else flow.get("violations") or [flow] if isinstance(flow, dict) else []
    return "; ".join(f"{v.get('rule', '?')} ({v.get('arg', '?')}: {format_label(v.get('label'))}, from "
                     f"{format_origin(v.get('origin')) if v.get('origin') else 'the task'})"
                     if isinstance(v, dict) else str(v)[:80] for v in items)


def _decide(args: argparse.Namespace, approve: bool) -> int:
    out = _client(args).decide(args.id, approve=approve, approver=_who(args), reason=args.reason or "")
    d = out["decided"]
    print(f"{'approved' if approve else 'denied'} {d['id']}: {d['agent']} -> {d['tool']} {json.dumps(d['args'])[:120]}"
          f" (as {_who(args)})")
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace) -> int:
    if bool(args.agent) == bool(args.token):
        print("warden revoke: give exactly one of --agent NAME or --token ID", file=sys.stderr)
        return EXIT_USAGE
    if args.cascade and not args.agent:
        print("warden revoke: --cascade goes with --agent (a token id already revokes its descendants)",
              file=sys.stderr)
        return EXIT_USAGE
    out = _client(args).revoke(agent=args.agent, token_id=args.token, by=_who(args), cascade=args.cascade)
    what = f"agent {out['revoked_agent']}" if "revoked_agent" in out else f"token {out['revoked_token']}"
    also = ", and every token derived from one it held" if out.get("cascade") else ""
    print(f"revoked {what}{also}; its next call is denied")
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    if args.action == "retire" and not args.kid:
        print("warden keys retire: give the key id to retire (see the audit log's key_added records)",
              file=sys.stderr)
        return EXIT_USAGE
    out = _client(args).keys(action=args.action, kid=args.kid, by=_who(args))
    if args.action == "rotate":
        print(f"new current key {out['current']} on every supervisor shard; tokens under older keys still "
              "verify until those keys are retired")
    else:
        print(f"retired key {out['retired']} on every supervisor shard; every token under it is refused")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    command = "warden bench " + args.suite + (" --quick" if args.quick else "")
    if args.shards:
        if args.suite != "e2e":
            print("warden bench: --shards applies to the e2e suite only", file=sys.stderr)
            return EXIT_USAGE
        command += " --shards " + ",".join(map(str, args.shards)) + (" --pin" if args.pin else "")
    elif args.pin:
        print("warden bench: --pin goes with --shards", file=sys.stderr)
        return EXIT_USAGE
    if args.profile:
        if args.suite not in ("e2e", "all") or args.shards:
            print("warden bench: --profile applies to the e2e concurrency sweep", file=sys.stderr)
            return EXIT_USAGE
        command += " --profile"
    return bench_main(args.suite, quick=args.quick, as_json=args.json, out=args.out, command=command,
                      shards=args.shards, json_out=args.json_out, profile=args.profile, pin=args.pin)


def cmd_redteam(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from .job import LOCAL_ADDRESS, ensure_ray
    from .redteam import format_report, load_catalogue, new_run_dir, run_catalogue, save

    catalogue = Path(args.catalogue)
    scenarios = load_catalogue(catalogue, args.scenario or ())
    if args.list:
        return _list_catalogue(scenarios, args)

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"[redteam] {msg}", file=sys.stderr, flush=True)

    if str(Path.cwd()) not in sys.path:  # the catalogue's agents and tools are imported from here
        sys.path.insert(0, str(Path.cwd()))
    out = new_run_dir(args.runs_dir)
    without = args.without == "flow"
    old_way = args.without == "reader"
    progress(f"{len(scenarios)} scenario(s){' WITHOUT flow rules' if without else ''}"
             f"{' WITHOUT the reader' if old_way else ''}; results in {out}")
    progress("connecting to Ray at " + args.address if args.address and args.address != LOCAL_ADDRESS
             else "starting a private local Ray (--address to use a cluster)")
    ensure_ray(args.address)
    report = asyncio.run(run_catalogue(scenarios, catalogue=catalogue, out=out, without_flow=without,
                                       without_reader=old_way, compare=False if args.no_compare else None,
                                       progress=progress))
    save(report)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str), file=args.json_out)
    else:
        print(format_report(report), file=args.json_out)
    return EXIT_OK if report.ok or without else EXIT_FAIL


def _list_catalogue(scenarios: list[Any], args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps([{"name": s.name, "class": s.attack_class, "summary": s.summary, "asks_reader": s.uses_reader,
                           "attacks": [{"id": a.attack, "agent": a.agent, "tool": a.key, "layer": a.layer}
                                       for a in s.attacks]} for s in scenarios], indent=2), file=args.json_out)
        return EXIT_OK
    rows = [[s.name, s.attack_class, ", ".join(a.attack or "" for a in s.attacks) or "(benign only)",
             "yes" if s.uses_reader else "", ", ".join(sorted({a.policy for a in s.agents}))] for s in scenarios]
    print(_table(rows, ["scenario", "class", "injected actions", "asks the reader", "policies"]))
    return EXIT_OK


def _shard_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected shard counts like 1,2,4, got {text!r}") from None
    if not counts or any(not 1 <= c <= 64 for c in counts):
        raise argparse.ArgumentTypeError("shard counts must be between 1 and 64")
    return counts


def _job_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", help="the job's run directory (holds control.json); default: the newest running job")
    p.add_argument("--runs-dir", default="runs", help="where to look for running jobs (default: runs)")


def build_parser() -> argparse.ArgumentParser:
    from .auditlog import KIND_FILTERS, KINDS

    p = argparse.ArgumentParser(prog="warden", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run 'warden COMMAND --help' for the options of a command.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a job file", description=(
        "Run a job: start tool workers, the supervisor and the agents on Ray, run the entry agents, "
        "print a summary of allowed and denied calls and the audit log path. Uses the Ray cluster at "
        "--address or RAY_ADDRESS if set, else starts a local Ray. Exit 1 when an agent fails or the "
        "audit log does not verify."))
    run.add_argument("job", help="job file (YAML)")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    run.add_argument("--runs-dir", help="where run directories (audit log, workspace) go (default: the job's "
                     "runs_dir, 'runs')")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    run.add_argument("--dry-run", action="store_true", help="only check the job (as 'warden job check'), start nothing")
    run.set_defaults(fn=cmd_run)
    mcp = sub.add_parser("mcp", help="serve an agent's tools to MCP clients, governed by Warden").add_subparsers(
        dest="mcp_command", required=True, metavar="SUBCOMMAND")
    ms = mcp.add_parser("serve", help="start the job's control plane and serve one agent's tools over MCP",
                        description=(
        "Start the job as 'warden run' does (tool workers, supervisor shards, audit log, operator API), but "
        "instead of running agent AGENT's class, serve the tools AGENT's policy allows as an MCP server (with "
        "their JSON Schemas). Every tools/call is made as AGENT (its token and request key stay in this "
        "process, never with the client): decided, quota'd, flow-checked, parked for approval and audited "
        "as the agent's own call would be. A refusal is an MCP tool error that starts with its Warden code "
        "(POLICY_DENIED, FLOW_DENIED, ...). stdio (default): the client starts this command and talks on "
        "its stdin/stdout; the gateway stops when the client closes. http: streamable HTTP at "
        "http://HOST:PORT/mcp; every request needs 'Authorization: Bearer TOKEN', the token in the run "
        "directory's mcp-gateway.json (mode 0600, path printed at start). Stop with Ctrl-C or SIGTERM: the "
        "audit log is closed and verified as 'warden run' does. Progress goes to stderr."))
    ms.add_argument("job", help="job file (YAML)")
    ms.add_argument("--agent", required=True, help="the agent whose policy and token the MCP client's calls use")
    ms.add_argument("--transport", choices=["stdio", "http"], default="stdio", help="default: stdio")
    ms.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    ms.add_argument("--port", type=int, default=0, help="HTTP port (default 0: a free port, printed at start)")
    ms.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    ms.add_argument("--runs-dir", help="where the run directory goes (default: the job's runs_dir, 'runs')")
    ms.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    ms.set_defaults(fn=cmd_mcp_serve)
    job = sub.add_parser("job", help="check job files").add_subparsers(dest="job_command", required=True,
                                                                       metavar="SUBCOMMAND")
    jc = job.add_parser("check", help="everything that can be checked before Ray starts: keys, agent classes, "
                        "policies against the tools, environment variables, local placement; one line per problem, "
                        "exit 1 if any")
    jc.add_argument("jobs", nargs="+", metavar="JOB")
    jc.set_defaults(fn=cmd_job_check)

    pol = sub.add_parser("policy", help="check or explain policy files").add_subparsers(
        dest="policy_command", required=True, metavar="SUBCOMMAND")
    check = pol.add_parser("check", help="validate policy files; exit 1 with a precise message on any error")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("--tools", action="append", default=[], metavar="MODULE",
                       help="also check the rules against these modules' tools (parameters exist; path_under/url_host "
                       "only on PATH/URL parameters), as job start does; repeatable")
    check.set_defaults(fn=cmd_policy_check)
    exp = pol.add_parser("explain", help="print what a policy allows, and what its delegates would get")
    exp.add_argument("file", metavar="FILE")
    exp.add_argument("--job", help="the job file that uses this policy: its tools and the delegates' policies "
                     "(default: the built-in tools, and delegates' policies in the same directory)")
    exp.add_argument("--json", action="store_true", help="print it as one JSON document")
    exp.set_defaults(fn=cmd_policy_explain)
    test = pol.add_parser("test", help="run test cases against a policy, in-process (no Ray): each case is a call "
                          "and the decision it must get; exit 1 with expected vs got and the reason on a mismatch")
    test.add_argument("file", metavar="FILE", help="the policy under test")
    test.add_argument("--cases", action="append", required=True, metavar="CASES.yaml",
                      help="case file (repeatable); format: README, Testing policies")
    test.add_argument("-v", "--verbose", action="store_true", help="list passing cases too")
    test.set_defaults(fn=cmd_policy_test)

    aud = sub.add_parser("audit", help="verify or read audit logs").add_subparsers(
        dest="audit_command", required=True, metavar="SUBCOMMAND")
    ver = aud.add_parser("verify", help="check the hash chain; names the first bad record; exit 1 if broken")
    ver.add_argument("path")
    ver.set_defaults(fn=cmd_audit_verify)
    show = aud.add_parser("show", help="print audit records, optionally filtered")
    export = aud.add_parser("export", help="write records as JSON Lines for a SIEM; verifies first, "
                            "exit 1 (and no export without --allow-broken) if the chain is broken")
    for cmd in (show, export):
        cmd.add_argument("path")
        cmd.add_argument("--agent")
        cmd.add_argument("--tool", help="tool name, or delegate:AGENT for delegations to AGENT")
        cmd.add_argument("--decision", choices=DECISIONS, metavar="DECISION",
                         help="allow, deny, or an error code such as POLICY_DENIED (README: Errors)")
        cmd.add_argument("--kind", choices=KIND_FILTERS, metavar="KIND", help="record kind: " + ", ".join(KINDS)
                         + "; or flow: decision and approval records with information-flow details")
        cmd.add_argument("--since", type=_when, help="ISO time or UNIX seconds")
        cmd.add_argument("--until", type=_when, help="ISO time or UNIX seconds")
    show.add_argument("--json", action="store_true", help="one JSON object per line")
    show.set_defaults(fn=cmd_audit_show)
    export.add_argument("--out", metavar="FILE", help="write here (default: stdout)")
    export.add_argument("--allow-broken", action="store_true", help="export a log whose chain does not verify")
    export.set_defaults(fn=cmd_audit_export)
    bench = sub.add_parser("bench", help="measure what the authorization and isolation cost", description=(
        "Run benchmark suites: authz (in-process decision), e2e (direct Ray call vs supervised, 1/4/16 agents), "
        "sandbox (gVisor and bubblewrap cold start and warm calls), cost (memory per agent, audit bytes per "
        "call, latency over 10,000 calls), peers (the same decision by Warden and by Tenuo, Biscuit, macaroons and the Agent Governance Toolkit's policy engine; needs pip install -e '.[peers]', not part of all), or all. Prints a table with targets met or MISSED and writes JSON "
        "and PNG plots. Figures are medians over repeated runs with p99 and the spread between runs."))
    bench.add_argument("suite", choices=["authz", "e2e", "sandbox", "cost", "peers", "all"])
    bench.add_argument("--quick", action="store_true", help="few repetitions: shows it works, figures are rough")
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    bench.add_argument("--out", help="where JSON and PNGs go (default: a new runs/bench-<UTC time>-<id>/; "
                       "--out benchmarks/results replaces the committed figures)")
    bench.add_argument("--shards", type=_shard_counts, metavar="N,N,...",
                       help="e2e only: instead of the 1/4/16-agent sweep, measure 16 agents against each number "
                       "of supervisor shards (e.g. 1,2,4): throughput per shard count and the routing cost")
    bench.add_argument("--pin", action="store_true",
                       help="with --shards: each shard on a CPU core of its own and the agents and workers on the "
                       "cores left (sched_setaffinity), and the scaling efficiency against one shard; with fewer "
                       "cores than shards + 1 they share, and the notes say so")
    bench.add_argument("--profile", action="store_true",
                       help="e2e: sample the supervisor actor and the tool worker (and, to compare, the plain relay "
                       "and its worker) with py-spy at 1 and 16 agents; e2e-profile.txt (CPU per call of each "
                       "process, hottest functions) and the raw stacks (e2e-profile-*.txt, for a flame graph) go "
                       "next to the results (needs py-spy: pip install py-spy, or the bench extra)")
    bench.set_defaults(fn=cmd_bench)

    red = sub.add_parser("redteam", help="run the attack catalogue and report what stopped each attack",
                         formatter_class=argparse.RawDescriptionHelpFormatter, description=(
        "Run the attack catalogue (scenarios/*.yaml of --catalogue, default ./redteam) through real jobs on Ray:\n"
        "each scenario is a scripted adversarial model hidden in a benign task, under per-agent policies.\n"
        "Parked calls are answered by a scripted operator through the job's operator API (the benign\n"
        "task's approved, injected ones denied). From each job's audit log it reports, per injected\n"
        "action, whether it was stopped and by which layer (capability, flow, reader, quota, sandbox,\n"
        "approval), and whether the benign task completed and how many approvals it needed; then the\n"
        "totals. The scenarios that ask the quarantined reader are then played again without it (the\n"
        "data revealed to the agent), for the approvals per benign task with and without the reader.\n"
        "Results: runs/redteam-<UTC time>-<id>/report.json (and the job files and audit logs).\n"
        "Exit 1 when an attack got through or a benign task failed (not with --without flow; with\n"
        "--without reader, only when an attack got through)."))
    red.add_argument("--without", choices=["flow", "reader"], help="'flow': run the same scenarios with every ifc "
                     "rule and hide removed from the policies (and the flow rules a delegator adds), to show what "
                     "capabilities, quotas and sandboxes alone let through (nothing hidden: no question to the "
                     "reader either); 'reader': the same policies, each question to the reader replaced by "
                     "revealing the data to the agent (the task done the old way)")
    red.add_argument("--no-compare", action="store_true", help="a normal run only: do not play the scenarios "
                     "that ask the reader again without it")
    red.add_argument("--scenario", action="append", metavar="NAME", help="run only this scenario (repeatable)")
    red.add_argument("--list", action="store_true", help="list the scenarios and their injected actions; run nothing")
    red.add_argument("--json", action="store_true", help="print the report as one JSON document")
    red.add_argument("--catalogue", default="redteam", metavar="DIR", help="the catalogue directory (default: redteam)")
    red.add_argument("--address", help="Ray address (default: a private local Ray, whatever RAY_ADDRESS says)")
    red.add_argument("--runs-dir", default="runs", help="where the run directory goes (default: runs)")
    red.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    red.set_defaults(fn=cmd_redteam)

    st = sub.add_parser("status", help="a running job's agents, quarantines, pending approvals and counts")
    _job_target(st)
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_status)

    appr = sub.add_parser("approvals", help="list, approve or deny calls parked for a human").add_subparsers(
        dest="approvals_command", required=True, metavar="SUBCOMMAND")
    lst = appr.add_parser("list", help="calls waiting for a decision")
    _job_target(lst)
    lst.add_argument("--json", action="store_true")
    lst.add_argument("--full", action="store_true", help="show every argument in full (default: the first 80 "
                     "characters); decide on what you have read")
    lst.set_defaults(fn=cmd_approvals_list)
    for name, approve in (("approve", True), ("deny", False)):
        one = appr.add_parser(name, help=f"{name} one parked call (that call only, never a wider token)")
        one.add_argument("id", help="the id shown by 'warden approvals list'")
        one.add_argument("--as", dest="as_name", help="approver name for the audit log (default: WARDEN_OPERATOR "
                         "or the login name)")
        one.add_argument("--reason", help="recorded in the audit log")
        _job_target(one)
        one.set_defaults(fn=lambda a, approve=approve: _decide(a, approve))

    rev = sub.add_parser("revoke", help="revoke an agent (kill switch) or a token in a running job", description=(
        "Takes effect before the agent's next call: its parked calls are denied, results of its in-flight "
        "calls are withheld, and every later call is denied with TOKEN_REVOKED. Revoking a token id revokes "
        "every token derived from it (delegations included). Revoking an agent leaves its delegates working "
        "under what it gave them, unless --cascade."))
    rev.add_argument("--agent", help="agent name")
    rev.add_argument("--cascade", action="store_true", help="with --agent: also revoke every token derived from "
                     "one the agent held (its own and those it was delegated), on every supervisor shard")
    rev.add_argument("--token", help="token id (hex, as in the audit log's token_id)")
    rev.add_argument("--as", dest="as_name", help="operator name for the audit log")
    _job_target(rev)
    rev.set_defaults(fn=cmd_revoke)

    keys = sub.add_parser("keys", help="rotate or retire the root keys of a running job", description=(
        "rotate: every supervisor shard gets a new current root key before this returns. retire KID: every "
        "shard drops that key, so every token minted under it (and every delegation of one) is refused from "
        "the next call on - an emergency stop for all agents holding such tokens. The current key cannot "
        "be retired; rotate first."))
    keys.add_argument("action", choices=["rotate", "retire"])
    keys.add_argument("kid", nargs="?", help="retire: the key id")
    keys.add_argument("--as", dest="as_name", help="operator name for the audit log")
    _job_target(keys)
    keys.set_defaults(fn=cmd_keys)
    return p


@contextmanager
def json_only_stdout(enabled: bool) -> Iterator[TextIO]:
    """With ``--json`` the standard output carries the JSON document and nothing else.

    Ray prints into the driver's stdout on its own (worker output forwarded by ``log_to_driver``,
    "(raylet) A worker died ..." from its log monitor, leftovers at shutdown), from threads and
    from child processes that inherit file descriptor 1. So while the command runs, descriptor 1
    and ``sys.stdout`` point at stderr; the document goes to a duplicate of the original stdout
    (the stream this yields), which is restored at the end.
    """
    if not enabled:
        yield sys.stdout
        return
    original = sys.stdout
    original.flush()
    try:
        fd = original.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture): Python level only
        fd = None
    saved = os.dup(fd) if fd is not None else None
    doc = os.fdopen(os.dup(saved), "w", encoding="utf-8") if saved is not None else original
    if fd is not None:
        sys.stderr.flush()
        os.dup2(sys.stderr.fileno(), fd)
    sys.stdout = sys.stderr
    try:
        yield doc
    finally:
        doc.flush()
        sys.stdout = original
        if saved is not None:
            doc.close()
            os.dup2(saved, fd)
            os.close(saved)


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _stop_private_ray(connected_before: bool = False) -> None:
    """Before stdout is handed back: a private Ray this command started ends, and a cluster it
    connected to is disconnected from (Ray prints at shutdown, and forwards worker output to a
    connected driver until it disconnects). A connection the caller had before (``main`` called
    from a program or a test that uses Ray itself) is left alone."""
    job = sys.modules.get("runtime.job")
    if job is not None:
        job.stop_private_ray()
    if _ray_connected() and not connected_before:
        sys.modules["ray"].shutdown()  # a connected driver only disconnects: the cluster runs on


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    connected_before = _ray_connected()
    # redteam's text report is a document too: what Ray prints while its jobs run goes to stderr
    clean = bool(getattr(args, "json", False)) or (args.command == "redteam" and not args.list)
    with json_only_stdout(clean) as args.json_out:
        try:
            return _dispatch(args)
        finally:
            _stop_private_ray(connected_before)


DECISIONS = ["allow", "deny", *sorted(c.value for c in ErrorCode)]


def _json_error(args: argparse.Namespace, code: str, reason: str) -> None:
    """With --json a failure is a JSON document too: a script reading stdout gets one either way."""
    if getattr(args, "json", False) and getattr(args, "json_out", None) is not None:
        print(json.dumps({"ok": False, "error": {"code": code, "reason": reason}}), file=args.json_out)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        return int(args.fn(args))
    except WardenError as exc:
        print(f"warden: {exc.code.value}: {exc.reason}", file=sys.stderr)
        _json_error(args, exc.code.value, exc.reason)
        return EXIT_FAIL
    except (ControlError, NoAuditLog) as exc:
        print(f"warden: {exc}", file=sys.stderr)
        _json_error(args, type(exc).__name__, str(exc))
        return EXIT_FAIL
    except KeyboardInterrupt:
        print("warden: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
