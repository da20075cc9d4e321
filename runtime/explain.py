"""The information-flow part of ``warden policy explain``: output labels, sink rules, handle limits.

For each tool a policy names it says how the tool's results are labelled and where each part of
that label comes from (field by field, as the supervisor merges them: the policy's
``tools.<t>.output``, else the job file's ``outputs.<t>``, else the tool's ``@tool(output=...)``,
else ``untrusted`` / ``public`` / not hidden),
whether results are hidden behind handles, whether a result also carries the labels of the
handles passed in (``carries_inputs``; false: a receipt), which items of a result are trusted; and which sink
rules judge the tool's calls: its own ``ifc`` and every policy-wide ``ifc`` rule that selects it
by effect. Plus the policy's ``handles:`` limits and its reader ``schemas:``.

Nothing here decides anything: it reads validated declarations (pydantic models or their plain
dict form) for a person, as text or JSON. The supervisor enforces the same declarations from the
agent's token and its own tables.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from .trusted.flow import ASK

__all__ = ["DEFAULT_HANDLES", "DEFAULT_LABEL", "flow_lines", "flow_view", "handle_limits", "output_labels",
           "sink_rules"]

DEFAULT_LABEL: dict[str, Any] = {"integrity": "untrusted", "readers": "public", "hide": False, "carries_inputs": True,
                                 "trusted_items": None}
DEFAULT_HANDLES: dict[str, Any] = {"max_count": 256, "max_bytes": 16 * 1024 * 1024, "ttl_s": 3600}
_SINK_KEYS = ("context", "args", "destination", "on_violation")


def _get(obj: Any, key: str, default: Any = None) -> Any:
    """A field of a pydantic model or a key of a dict (declarations come in either form)."""
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _plain(value: Any, *, defaults: bool = False) -> Any:
    """JSON-able data from a model (only the fields given, so that ``exact: null`` stays a rule; with
    ``defaults``, every field that is not None), a mapping or a list."""
    if hasattr(value, "model_dump"):
        dumped = value.model_dump(mode="json", exclude_none=True) if defaults else \
            value.model_dump(mode="json", exclude_unset=True)
        return _plain(dumped)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    return value


def _label(decls: list[tuple[str, Any]]) -> dict[str, Any]:
    """Each field from the first declaration that sets it (policy over job over tool, as the supervisor
    merges them); a field none sets takes the fail-closed default. ``source`` says who set each field."""
    out: dict[str, Any] = dict(DEFAULT_LABEL)
    source = {key: "default" for key in DEFAULT_LABEL}
    for key in DEFAULT_LABEL:
        for who, decl in decls:
            value = _get(decl, key)
            if value is not None:
                out[key], source[key] = _plain(value), who
                break
    return {**out, "source": source}


def output_labels(policy: Any, *, job_outputs: Mapping[str, Any] | None = None,
                  tool_outputs: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Per tool the policy names: ``{integrity, readers, hide, carries_inputs, trusted_items, source}``; ``source`` maps
    each field to ``policy``, ``job``, ``tool`` or ``default`` (nobody set it: untrusted, public, shown)."""
    out = {}
    for name, rule in sorted(_get(policy, "tools", {}).items()):
        decls = [(who, d) for who, d in (("policy", _get(rule, "output")), ("job", (job_outputs or {}).get(name)),
                                         ("tool", (tool_outputs or {}).get(name))) if d is not None]
        out[name] = _label(decls)
    return out


def _audit_names(rule: Any, tool: str) -> list[str]:
    """The names the supervisor gives this rule's checks in audit records and denials."""
    if not hasattr(rule, "caveats"):
        return []
    from .trusted.flow import rule_name  # a pure function of the caveat: naming, not deciding

    return [rule_name(c) for c in rule.caveats(tool)]


def sink_rules(policy: Any) -> dict[str, list[dict[str, Any]]]:
    """Per tool the policy names: the sink rules that judge its calls, each with ``rule`` (where it
    is written: ``tools.<t>.ifc`` or ``ifc[i]``), the rule's keys (defaults filled in) and ``checks``
    (what the audit log calls each check). A policy-wide rule without ``effects`` selects every tool.
    Tools no rule selects are left out."""
    out: dict[str, list[dict[str, Any]]] = {}
    wide = list(_get(policy, "ifc") or [])
    for name, rule in sorted(_get(policy, "tools", {}).items()):
        rules = []
        own = _get(rule, "ifc")
        if own is not None:
            rules.append({"rule": f"tools.{name}.ifc", **_plain(own, defaults=True),
                          "checks": _audit_names(own, name)})
        effect = _get(rule, "effect")
        for i, w in enumerate(wide):
            effects = _get(w, "effects") or []
            if not effects or effect in effects:
                rules.append({"rule": f"ifc[{i}]", **_plain(w, defaults=True), "checks": _audit_names(w, "*")})
        if rules:
            out[name] = rules
    return out


def handle_limits(policy: Any) -> dict[str, Any]:
    """The policy's ``handles:`` per agent, defaults filled in."""
    given = _get(policy, "handles")
    return {k: (_get(given, k) if given is not None and _get(given, k) is not None else v)
            for k, v in DEFAULT_HANDLES.items()}


def flow_view(policy: Any, *, job_outputs: Mapping[str, Any] | None = None,
              tool_outputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything ``policy explain`` says about information flow, as JSON-able data."""
    return {"outputs": output_labels(policy, job_outputs=job_outputs, tool_outputs=tool_outputs),
            "sinks": sink_rules(policy), "handles": handle_limits(policy),
            "schemas": _plain(_get(policy, "schemas") or {})}


# ------------------------------------------------------------------------------ text


def _readers(readers: Any) -> str:
    if readers in (None, "public", [], [[]]):
        return "public"
    if isinstance(readers, list) and all(isinstance(r, str) for r in readers):
        readers = [readers]  # one set, as a policy writes it
    if isinstance(readers, list):
        return " and ".join("[" + ", ".join(map(str, r)) + "]" if isinstance(r, list) else str(r) for r in readers)
    return str(readers)


def _rule_text(rule: Any) -> str:
    if not isinstance(rule, Mapping):
        return json.dumps(rule)
    return ", ".join(f"each({_rule_text(v)})" if k == "each" else f"{k}={v!r}" for k, v in sorted(rule.items())
                     if v is not None or k == "exact")


def _items_text(items: Any) -> str:
    if not items:
        return "-"
    where = f"items of {items['path']!r}" if items.get("path") else "items of the result (a list)"
    when = "; ".join(f"{field}: {_rule_text(r)}" for field, r in sorted((items.get("when") or {}).items()))
    return f"{where} with {when or 'any fields'}: trusted"


def _source_text(source: dict[str, str]) -> str:
    """``policy`` when the policy set every field it could, else who set what: ``job (integrity), policy (hide)``."""
    who = {w for w in source.values() if w != "default"}
    if not who:
        return "default: nothing declared"
    if len(who) == 1:
        return who.pop()
    return ", ".join(f"{w} ({', '.join(k for k, v in source.items() if v == w)})"
                     for w in ("policy", "job", "tool") if w in who)


def _sink_text(rule: dict[str, Any]) -> list[str]:
    where = rule["rule"] + (f" (effects: {', '.join(rule['effects'])})" if rule.get("effects") else "")
    args = rule.get("args")
    if isinstance(args, Mapping):
        args = ", ".join(f"{a}: {level}" for a, level in sorted(args.items()))
    elif isinstance(args, str):
        args = f"every argument: {args}"
    dest = rule.get("destination")
    if dest == "public":
        dest = "public data only"
    elif dest:
        dest = f"readers must admit every value of {dest!r}"
    return [where, rule.get("context") or "-", args or "-", dest or "-", rule.get("on_violation") or "deny"]


def flow_lines(view: dict[str, Any], table: Any) -> list[str]:
    """``flow_view`` as lines of text; ``table(rows, header)`` draws a table (the CLI's)."""
    rows = [[tool, o["integrity"], _readers(o["readers"]), "HANDLE" if o["hide"] else "no",
             "yes" if o["carries_inputs"] else "no (a receipt)", _items_text(o["trusted_items"]),
             _source_text(o["source"])] if tool != ASK else  # its label is the answer's, set by the supervisor
            [tool, "endorsed", "the data's", "free text", "-", "-", "the supervisor: a checked answer"]
            for tool, o in view["outputs"].items()]
    lines = ["", "information flow:",
             "  results are labelled (what reaches the agent carries this label; with HANDLE the agent gets a handle, "
             "not the content):"]
    lines += ["  " + line for line in table(rows, ["tool", "integrity", "readers", "hide", "carries inputs",
                                                   "trusted items", "declared by"]).splitlines()]
    sinks = [[tool, *_sink_text(r)] for tool, rules in view["sinks"].items() for r in rules]
    if sinks:
        lines.append("  sink rules (what may flow into a call; a call must pass every rule listed for its tool):")
        lines += ["  " + line for line in table(sinks, ["tool", "rule", "context at least", "arguments at least",
                                                        "destination", "on violation"]).splitlines()]
    else:
        lines.append("  sink rules: none (labels are tracked and audited, no call is judged by them)")
    h = view["handles"]
    lines.append(f"  handles: at most {h['max_count']} per agent, {h['max_bytes']} bytes in all, each for {h['ttl_s']:g}s")
    schemas = view.get("schemas") or {}
    if schemas:
        lines.append("  reader schemas (reader.ask may name them; a validated answer is endorsed, free text a handle):")
        lines += [f"    {name}: {json.dumps(schema, sort_keys=True)}" for name, schema in sorted(schemas.items())]
    return lines
