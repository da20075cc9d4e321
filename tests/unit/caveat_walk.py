"""The reference caveat evaluator: each caveat of a chain, in order, read the plainest way.

The trusted core decides with one evaluator, the evaluation plan (``VerifiedToken.evaluate_call``);
the unit tests hold it to this walk, which it replaced. The walk lists every caveat that does
not hold for a call, with the error and code that caveat stands for; the plan must allow exactly
when the list is empty and deny with one of the listed errors otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.errors import ErrorCode, PolicyDenied, TokenRejected
from runtime.trusted.capability import (Arg, Audience, Effects, Expires, NotBefore, Tools, VerifiedToken,
                                        check_arg)

Failure = tuple[type, ErrorCode]


@dataclass(frozen=True)
class CallContext:
    """What a caveat is evaluated against: the canonicalised call."""

    agent: str
    tool: str
    effect: str
    args: dict[str, Any]
    now: float
    job: str


def evaluate(vt: VerifiedToken, ctx: CallContext) -> None:
    """The trusted core's decision on ``ctx``: returns, or raises its typed denial."""
    vt.evaluate_call(ctx.agent, ctx.tool, ctx.effect, ctx.args, ctx.now, ctx.job)


def _arg_holds(c: Arg, ctx: CallContext) -> bool:
    if c.tool != ctx.tool and c.tool != "*":
        return True
    if c.arg not in ctx.args:
        return c.tool == "*"
    try:
        return check_arg(c.check, c.param, ctx.args[c.arg]) is None
    except Exception:  # a value the check cannot judge
        return False


def failures(vt: VerifiedToken, ctx: CallContext) -> list[Failure]:
    """Every caveat of ``vt`` (and the holder) that does not hold for ``ctx``, in chain order."""
    out: list[Failure] = []
    if ctx.agent != vt.holder:
        out.append((TokenRejected, ErrorCode.WRONG_HOLDER))
    for c in vt.caveats:
        if isinstance(c, Expires) and not ctx.now <= c.at:
            out.append((TokenRejected, ErrorCode.TOKEN_EXPIRED))
        elif isinstance(c, NotBefore) and ctx.now < c.at:
            out.append((TokenRejected, ErrorCode.TOKEN_NOT_YET_VALID))
        elif isinstance(c, Audience) and ctx.job != c.job:
            out.append((TokenRejected, ErrorCode.WRONG_AUDIENCE))
        elif isinstance(c, Tools) and ctx.tool not in c.names:
            out.append((PolicyDenied, ErrorCode.POLICY_DENIED))
        elif isinstance(c, Effects) and ctx.effect not in c.effects:
            out.append((PolicyDenied, ErrorCode.POLICY_DENIED))
        elif isinstance(c, Arg) and not _arg_holds(c, ctx):
            out.append((PolicyDenied, ErrorCode.POLICY_DENIED))
        # budgets: the quota ledger; Holder seals and MaxDepth: KeyRing.verify
    return out


def decision(vt: VerifiedToken, ctx: CallContext) -> Failure | None:
    """None if the plan allows ``ctx``, else the type and code of its denial."""
    try:
        evaluate(vt, ctx)
    except (TokenRejected, PolicyDenied) as exc:
        return type(exc), exc.code
    return None


def assert_plan_agrees(vt: VerifiedToken, ctx: CallContext) -> None:
    """The plan allows exactly what the walk allows, and denies with the error of a caveat that fails."""
    walk, plan = failures(vt, ctx), decision(vt, ctx)
    if not walk:
        assert plan is None, f"plan denied {plan} a call every caveat allows"
    else:
        assert plan in walk, f"plan said {plan}, failing caveats say {walk}"
