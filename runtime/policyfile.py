"""Policy files: YAML turned into a validated ``Policy``, with errors a person can act on.

Loading and reporting need no trust: the ``Policy`` model in ``runtime.trusted.policy`` decides
what a file means (a file that does not validate is refused, whole); this module reads the
file, names the place of each fault with the field most likely meant, and checks the rules
against the parameters of the tools they name.
"""

from __future__ import annotations

from collections import Counter
from difflib import get_close_matches
from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ValidationError

from .errors import ConfigError, ErrorCode, TokenRejected
from .trusted.capability import MAX_CAVEATS, MAX_TOKEN_BYTES, Arg, KeyRing, encode_caveat
from .trusted.policy import ApprovalSpec, ArgRule, Policy
from .trusted.wire import ToolSpec


_CANONICAL_FORMAT = {"path_under": ("path",), "url_host": ("url", "host")}  # rule -> the formats it needs


def check_policy_tools(policy: Policy, tools: dict[str, ToolSpec], *, source: str = "<policy>") -> None:
    """Refuse argument and approval rules that the named tools' parameters make wrong.

    A rule on a parameter the tool lacks, or a list rule on a scalar, would deny every call; a path
    or URL rule on a parameter the tool does not canonicalise (``PATH``/``URL``; never a list's
    items) would check one spelling while the tool opens another. Raises ConfigError.
    """
    errors = []
    for name, rule in sorted(policy.tools.items()):
        when = rule.approval.when if isinstance(rule.approval, ApprovalSpec) else {}
        for where, rules in (("args", rule.args), ("approval.when", when)) if name in tools else ():
            errors += [f"  at tools.{name}.{where}.{arg}: {why}" for arg, arg_rule in sorted(rules.items())
                       for why in _param_errors(tools[name], arg, arg_rule)]
        flow = rule.ifc if name in tools and rule.ifc else None
        named = [("args." + a, a) for a in (flow.args if flow and isinstance(flow.args, dict) else {})]
        named += [("destination", flow.destination)] if flow and flow.destination not in (None, "public") else []
        errors += [f"  at tools.{name}.ifc.{where}: tool {name!r} has no parameter {arg!r}; its parameters: "
                   f"{', '.join(sorted(tools[name].params))}" + "".join(f" (did you mean {m!r}?)" for m in
                   get_close_matches(arg, tools[name].params, 1)) for where, arg in named if arg not in tools[name].params]
    if errors:
        raise ConfigError("\n".join([f"{source}: {len(errors)} error(s)", *errors]), code=ErrorCode.POLICY_INVALID)


def _param_errors(spec: ToolSpec, arg: str, rule: ArgRule) -> list[str]:
    param = spec.params.get(arg)
    if param is None:
        near = get_close_matches(arg, spec.params, 1)
        return [f"tool {spec.name!r} has no parameter {arg!r}; its parameters: {', '.join(sorted(spec.params))}"
                + (f" (did you mean {near[0]!r}?)" if near else "")]
    inner, items = rule.each.model_fields_set if rule.each else set(), getattr(param, "items", None)  # item spec
    wrong = [f"{check} needs a parameter declared {' or '.join(f.upper() for f in fmts)} (in each: its items)"
             for check, fmts in _CANONICAL_FORMAT.items() if check in rule.model_fields_set and param.format not in fmts
             or check in inner and getattr(items, "format", None) not in fmts]
    if {"each", "min_items", "max_items"} & rule.model_fields_set and param.type not in ("array", "any"):
        wrong.append(f"each/min_items/max_items need a list parameter; {arg!r} is {param.type}")
    return wrong


def _where(loc: tuple[Any, ...]) -> str:
    """The place in the file; the branch names pydantic adds for a field of several forms left out."""
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and "[" in p)) or "(top level)"


def _model_in(t: Any) -> Any:  # the pydantic model inside an annotation such as 'dict[str, ArgRule] | None'
    is_model = isinstance(t, type) and issubclass(t, BaseModel)
    return t if is_model else next(filter(None, map(_model_in, get_args(t))), None)


def explain_error(model: type[BaseModel], err: Any) -> str:
    """pydantic's message; for a key the model does not have, the field it most likely meant."""
    for part in err["loc"][:-1]:  # a list index or dict key keeps the model of the items
        model = _model_in(model.model_fields[part].annotation) if model and part in model.model_fields else model
    fields = model.model_fields.items() if model and err["type"] == "extra_forbidden" and err["loc"] else ()
    near = get_close_matches(str(err["loc"][-1]), [f.alias or k for k, f in fields], 1) if fields else []
    if err["type"] == "string_pattern_mismatch" and "readers" in err["loc"]:
        return f"{err['input']!r} is not a reader: a name, '*', '*@domain' or '*.domain' (not '*name': evilname)"
    return f"{err['msg']} (did you mean {near[0]!r}?)" if near else err["msg"]


M = TypeVar("M", bound=BaseModel)


def read_yaml(path: str | Path, what: str, code: ErrorCode, *, text: str | None = None) -> Any:
    """The YAML document in the file ``path`` (or in ``text``, named ``path``); ConfigError(``code``) if
    the file cannot be read (``what`` says what it should have been) or is not YAML."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8") if text is None else text)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}", code=code) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}", code=code) from None


def validated(model: type[M], data: Any, source: str | Path, code: ErrorCode) -> M:
    """``data`` as a ``model``; else ConfigError(``code``) naming each fault at its place in the file
    (with the key most likely meant for a misspelt one)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: {len(exc.errors())} error(s)"]
        lines += [f"  at {_where(e['loc'])}: {explain_error(model, e)}" for e in exc.errors()]
        raise ConfigError("\n".join(lines), code=code) from None


def parse_policy(data: Any, *, source: str = "<policy>") -> Policy:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a policy must be a YAML mapping, got {type(data).__name__}",
                          code=ErrorCode.POLICY_INVALID)
    policy = validated(Policy, data, source, ErrorCode.POLICY_INVALID)
    empty = [f"tools.{t}.ifc" for t, r in policy.tools.items() if r.ifc and not r.ifc.caveats(t)]
    empty += [f"ifc.{i}" for i, r in enumerate(policy.ifc) if not r.caveats("*")]
    if empty:  # harmless (it adds no rule), but surely not what was meant
        raise ConfigError(f"{source}: {len(empty)} error(s)" + "".join(
            f"\n  at {w}: an ifc rule needs context, args or destination above untrusted" for w in empty),
            code=ErrorCode.POLICY_INVALID)
    if why := token_problem(policy):
        raise ConfigError(f"{source}: 1 error(s)\n  at (top level): {why}", code=ErrorCode.POLICY_INVALID)
    return policy


def token_problem(policy: Policy) -> str | None:
    """Why the policy's root token would be refused at every call (too big, too many caveats, more
    regex caveats than a token may hold), found at load; None if it would verify."""
    caveats = policy.root_caveats(job_id="j" * 96, now=0.0)  # a long job id; the key ring is a throwaway
    ring = KeyRing.generate()
    token = ring.mint(holder=policy.agent, caveats=caveats)
    n = len(token.encode())
    if n > MAX_TOKEN_BYTES or len(caveats) + 1 > MAX_CAVEATS:
        size = Counter(f"tools.{c.tool}.args.{c.arg}" for c in caveats if isinstance(c, Arg)
                       for _byte in encode_caveat(c))  # one count per encoded byte
        return (f"its token would be {n} bytes with {len(caveats) + 1} caveats (limits {MAX_TOKEN_BYTES}"
                f" and {MAX_CAVEATS}); the biggest rules: {size.most_common(3) or 'none'}")
    try:
        ring.verify(token)  # what the supervisor would refuse at every call, refused now
    except TokenRejected as exc:
        return f"its token would be refused: {exc.reason}"
    return None


def load_policy(source: str | Path | dict[str, Any]) -> Policy:
    """A file (``Path``, or ``str`` on one line), YAML text (a ``str`` with a line break or a
    leading ``{``) or a dict: all through ``parse_policy``."""
    inline = isinstance(source, dict) or isinstance(source, str) and ("\n" in source or source.lstrip()[:1] == "{")
    where = f"<policy {type(source).__name__}>" if inline else str(source)
    data = source if isinstance(source, dict) else read_yaml(where, "policy", ErrorCode.POLICY_INVALID,
                                                             text=source if inline else None)
    return parse_policy(data, source=where)
