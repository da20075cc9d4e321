"""The information-flow part of ``warden policy explain``: output labels, sink rules, handle limits.

For each tool a policy names it says how the tool's results are labelled and where that label
comes from (precedence, as the supervisor applies it: the policy's ``tools.<t>.output``, else the
job file's ``outputs.<t>``, else the tool's ``@tool(output=...)``, else ``untrusted`` / ``public``),
whether results are hidden behind handles, which items of a result are trusted; and which sink
rules judge the tool's calls: its own ``ifc`` and every policy-wide ``ifc`` rule that selects it
by effect. Plus the policy's ``handles:`` limits.

Nothing here decides anything: it reads validated declarations (pydantic models or their plain
dict form) for a person, as text or JSON. The supervisor enforces the same declarations from the
agent's token and its own tables.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

__all__ = ["DEFAULT_HANDLES", "DEFAULT_LABEL", "flow_lines", "flow_view", "handle_limits", "output_labels",
           "sink_rules"]

DEFAULT_LABEL: dict[str, Any] = {"integrity": "untrusted", "readers": "public", "hide": False, "trusted_items": None}
DEFAULT_HANDLES: dict[str, Any] = {"max_count": 256, "max_bytes": 16 * 1024 * 1024, "ttl_s": 3600}
_SINK_KEYS = ("context", "args", "destination", "on_violation")


def _get(obj: Any, key: str, default: Any = None) -> Any:
    """A field of a pydantic model or a key of a dict (declarations come in either form)."""
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _plain(value: Any) -> Any:
    """JSON-able data from a model (only the fields given, so that ``exact: null`` stays a rule), a
    mapping or a list."""
    if hasattr(value, "model_dump"):
        return _plain(value.model_dump(mode="json", exclude_unset=True))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    return value


def _label(decl: Any, source: str) -> dict[str, Any]:
    """A declared output with every field filled (fields left out take the fail-closed default)."""
    out = dict(DEFAULT_LABEL)
    for key in DEFAULT_LABEL:
        value = _get(decl, key)
        if value is not None:
            out[key] = _plain(value)
    return {**out, "source": source}


def output_labels(policy: Any, *, job_outputs: Mapping[str, Any] | None = None,
                  tool_outputs: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Per tool the policy names: ``{integrity, readers, hide, trusted_items, source}``, where
    ``source`` is ``policy``, ``job``, ``tool`` or ``default`` (nothing declared: untrusted, public)."""
    out = {}
    for name, rule in sorted(_get(policy, "tools", {}).items()):
        for source, decl in (("policy", _get(rule, "output")), ("job", (job_outputs or {}).get(name)),
                             ("tool", (tool_outputs or {}).get(name))):
            if decl is not None:
                out[name] = _label(decl, source)
                break
        else:
            out[name] = {**DEFAULT_LABEL, "source": "default"}
    return out


def sink_rules(policy: Any) -> dict[str, list[dict[str, Any]]]:
    """Per tool the policy names: the sink rules that judge its calls, each with ``rule`` (where it
    is written: ``tools.<t>.ifc`` or ``ifc[i]``) and the rule's own keys. Tools without one are left out."""
    out: dict[str, list[dict[str, Any]]] = {}
    wide = list(_get(policy, "ifc") or [])
    for name, rule in sorted(_get(policy, "tools", {}).items()):
        rules = []
        own = _get(rule, "ifc")
        if own is not None:
            rules.append({"rule": f"tools.{name}.ifc", **_plain(own)})
        effect = _get(rule, "effect")
        for i, w in enumerate(wide):
            effects, tools = _get(w, "effects"), _get(w, "tools")
            if (effects is not None and effect in effects) or (tools is not None and name in tools):
                rules.append({"rule": f"ifc[{i}]", **_plain(w)})
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
            "sinks": sink_rules(policy), "handles": handle_limits(policy)}


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
             _items_text(o["trusted_items"]), "default: nothing declared" if o["source"] == "default" else o["source"]]
            for tool, o in view["outputs"].items()]
    lines = ["", "information flow:",
             "  results are labelled (what reaches the agent carries this label; with HANDLE the agent gets a handle, "
             "not the content):"]
    lines += ["  " + line for line in table(rows, ["tool", "integrity", "readers", "hide", "trusted items", "declared by"]
                                          ).splitlines()]
    sinks = [[tool, *_sink_text(r)] for tool, rules in view["sinks"].items() for r in rules]
    if sinks:
        lines.append("  sink rules (what may flow into a call; a call must pass every rule listed for its tool):")
        lines += ["  " + line for line in table(sinks, ["tool", "rule", "context at least", "arguments at least",
                                                        "destination", "on violation"]).splitlines()]
    else:
        lines.append("  sink rules: none (labels are tracked and audited, no call is judged by them)")
    h = view["handles"]
    lines.append(f"  handles: at most {h['max_count']} per agent, {h['max_bytes']} bytes in all, each for {h['ttl_s']:g}s")
    return lines
